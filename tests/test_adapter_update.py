"""`dripd adapter update`: config and credentials merged key by key, validated whole,
sealed again, default and enabled state, and a NOTIFY for the daemons."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from dripd.channels.credentials import Vault, generate_key
from dripd.cli import main
from dripd.engine.adapters import adapter_aad

KEY = generate_key()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`dripd ARGV…` in-process; an argparse refusal counts as its exit code."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DRIPD_DSN", raising=False)
    monkeypatch.setenv("DRIPD_ENCRYPTION_KEY", KEY)
    monkeypatch.setenv("DRIPD_CONFIG", str(tmp_path / "none.toml"))
    (tmp_path / "none.toml").write_text("")


def _file(tmp_path: Path, name: str, value: Any) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(value))
    return str(path)


def _row(dsn: str, name: str = "pm") -> dict[str, Any]:
    async def read() -> dict[str, Any]:
        conn = await asyncpg.connect(dsn)
        try:
            row = await conn.fetchrow(
                "SELECT id, config, credentials, is_default, enabled FROM dripd.channel_adapters "
                "WHERE name = $1",
                name,
            )
        finally:
            await conn.close()
        assert row is not None
        out = dict(row)
        out["config"] = json.loads(row["config"])
        out["credentials"] = (
            Vault.from_env({"DRIPD_ENCRYPTION_KEY": KEY}).decrypt(
                row["credentials"], aad=adapter_aad(row["id"])
            )
            if row["credentials"] is not None
            else None
        )
        return out

    return asyncio.run(read())


@pytest.fixture
def postmark(capsys: pytest.CaptureFixture[str], dsn: str, tmp_path: Path) -> str:
    creds = _file(
        tmp_path,
        "c.json",
        {"server_token": "tok-1", "webhook_username": "u1", "webhook_password": "pw-1"},
    )
    code, _, err = run(
        capsys, "adapter", "add", "pm", "--channel", "email", "--provider", "postmark",
        "--dsn", dsn, "--credentials-file", creds,
        "--config", json.dumps({"from": "a@example.com", "tag": "t1"}),
    )  # fmt: skip
    assert code == 0, err
    return dsn


def test_config_keys_are_merged_and_null_removes_one(
    capsys: pytest.CaptureFixture[str], postmark: str
) -> None:
    code, out, err = run(
        capsys, "adapter", "update", "pm", "--dsn", postmark, "--json",
        "--config", json.dumps({"message_stream": "broadcast", "tag": None}),
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["config"] == {"from": "a@example.com", "message_stream": "broadcast"}
    row = _row(postmark)
    assert row["config"] == {"from": "a@example.com", "message_stream": "broadcast"}
    assert row["credentials"] == {
        "server_token": "tok-1",
        "webhook_username": "u1",
        "webhook_password": "pw-1",
    }


def test_credentials_are_merged_and_sealed_again(
    capsys: pytest.CaptureFixture[str], postmark: str, tmp_path: Path
) -> None:
    before = _row(postmark)
    patch = _file(
        tmp_path,
        "p.json",
        {"server_token": "tok-2", "webhook_username": None, "webhook_password": None},
    )
    code, out, err = run(
        capsys, "adapter", "update", "pm", "--dsn", postmark, "--credentials-file", patch
    )
    assert code == 0, err
    assert "tok-2" not in out + err
    after = _row(postmark)
    assert after["credentials"] == {"server_token": "tok-2"}
    assert after["config"] == before["config"]


def test_the_result_is_validated_whole_and_nothing_changes_on_error(
    capsys: pytest.CaptureFixture[str], postmark: str, tmp_path: Path
) -> None:
    before = _row(postmark)
    code, _, err = run(
        capsys, "adapter", "update", "pm", "--dsn", postmark,
        "--config", json.dumps({"from": None}),
    )  # fmt: skip
    assert code == 2
    assert "'from'" in err or "`from`" in err
    patch = _file(tmp_path, "p.json", {"server_token": None})
    code, _, err = run(
        capsys, "adapter", "update", "pm", "--dsn", postmark, "--credentials-file", patch
    )
    assert code == 2
    assert "server_token" in err
    code, _, err = run(
        capsys, "adapter", "update", "pm", "--dsn", postmark,
        "--config", json.dumps({"server_token": "in the clear"}),
    )  # fmt: skip
    assert code == 2
    assert "in the clear" not in err
    assert _row(postmark) == before


def test_default_and_enabled_state(capsys: pytest.CaptureFixture[str], postmark: str) -> None:
    code, _, err = run(capsys, "adapter", "update", "pm", "--dsn", postmark, "--default")
    assert code == 0, err
    assert _row(postmark)["is_default"] is True
    code, _, err = run(
        capsys, "adapter", "update", "pm", "--dsn", postmark, "--no-default", "--disable"
    )
    assert code == 0, err
    row = _row(postmark)
    assert (row["is_default"], row["enabled"]) == (False, False)
    code, _, err = run(capsys, "adapter", "update", "pm", "--dsn", postmark, "--enable")
    assert code == 0, err
    assert _row(postmark)["enabled"] is True


def test_a_new_default_replaces_the_old_one(
    capsys: pytest.CaptureFixture[str], postmark: str, tmp_path: Path
) -> None:
    code, _, err = run(
        capsys, "adapter", "add", "box", "--channel", "email", "--provider", "outbox",
        "--dsn", postmark, "--default", "--config", json.dumps({"path": str(tmp_path / "o")}),
    )  # fmt: skip
    assert code == 0, err
    code, _, err = run(capsys, "adapter", "update", "pm", "--dsn", postmark, "--default")
    assert code == 0, err
    assert _row(postmark, "box")["is_default"] is False
    assert _row(postmark, "pm")["is_default"] is True


def test_an_unknown_adapter_is_an_error_naming_it(
    capsys: pytest.CaptureFixture[str], dsn: str
) -> None:
    code, _, err = run(capsys, "adapter", "update", "nope", "--dsn", dsn, "--enable")
    assert code == 1
    assert "no adapter 'nope'" in err


def test_credentials_never_come_from_the_command_line(
    capsys: pytest.CaptureFixture[str], postmark: str
) -> None:
    code, _, err = run(
        capsys, "adapter", "update", "pm", "--dsn", postmark, "--credentials", '{"a": 1}'
    )
    # Refused as what it is, not read as an abbreviated --credentials-file "path".
    assert code == 2
    assert "unrecognized arguments: --credentials" in err
    assert "cannot read" not in err


def test_an_update_notifies_the_daemons(capsys: pytest.CaptureFixture[str], postmark: str) -> None:
    async def listen_while_updating() -> list[str]:
        conn = await asyncpg.connect(postmark)
        heard: list[str] = []
        await conn.add_listener("dripd_adapters", lambda *a: heard.append(a[3]))
        try:
            code = await asyncio.to_thread(
                main, ["adapter", "update", "pm", "--dsn", postmark, "--default"]
            )
            assert code == 0
            for _ in range(200):
                if heard:
                    break
                await asyncio.sleep(0.05)
        finally:
            await conn.close()
        return heard

    assert asyncio.run(listen_while_updating()) == [""]


@pytest.mark.parametrize("flags", [("--default", "--no-default"), ("--enable", "--disable")])
def test_contradicting_flags_are_a_usage_error(
    capsys: pytest.CaptureFixture[str], postmark: str, flags: tuple[str, str]
) -> None:
    code, _, err = run(capsys, "adapter", "update", "pm", "--dsn", postmark, *flags)
    assert code == 2
    assert "not allowed with argument" in err


def test_adapter_list_shows_a_paused_adapter_and_why(
    capsys: pytest.CaptureFixture[str], postmark: str
) -> None:
    async def pause() -> None:
        conn = await asyncpg.connect(postmark)
        try:
            await conn.execute(
                "UPDATE dripd.channel_adapters SET paused_at = now(), "
                "paused_reason = 'provider refused the adapter: postmark: HTTP 401'"
            )
        finally:
            await conn.close()

    asyncio.run(pause())
    code, out, err = run(capsys, "adapter", "list", "--dsn", postmark, "--json")
    assert code == 0, err
    assert json.loads(out)[0]["paused"] == "provider refused the adapter: postmark: HTTP 401"
    code, out, _ = run(capsys, "adapter", "list", "--dsn", postmark)
    assert "paused: provider refused the adapter: postmark: HTTP 401" in out
