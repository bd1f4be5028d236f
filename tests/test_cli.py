"""The CLI: exit codes, --json, and adapters whose credentials are stored encrypted."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from dripd.channels.credentials import generate_key
from dripd.cli import main

SEQ = """
[sequence]
key = "welcome"

[[steps]]
key = "hello"
channel = "email"
subject = "Hi"
text = "Hello {{ first_name | default: 'you' }}"
"""


def add_smtp_adapter(
    capsys: pytest.CaptureFixture[str], dsn: str, name: str, *argv: str
) -> tuple[int, str, str]:
    """`dripd adapter add NAME --channel email --provider smtp --dsn DSN ARGV…`."""
    return run(capsys, "adapter", "add", name, "--channel", "email", "--provider", "smtp",
               "--dsn", dsn, *argv)  # fmt: skip


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def seq_file(tmp_path: Path) -> Path:
    path = tmp_path / "welcome.toml"
    path.write_text(SEQ)
    return path


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DRIPD_DSN", raising=False)
    monkeypatch.delenv("DRIPD_ENCRYPTION_KEY", raising=False)
    monkeypatch.setenv("DRIPD_CONFIG", str(tmp_path / "none.toml"))
    (tmp_path / "none.toml").write_text("")


def test_apply_enroll_event_suppress_print_json(
    capsys: pytest.CaptureFixture[str], dsn: str, seq_file: Path
) -> None:
    code, out, _ = run(capsys, "apply", "--dsn", dsn, "--json", str(seq_file))
    assert code == 0
    assert json.loads(out) == [
        {
            "file": str(seq_file),
            "key": "welcome",
            "tenant": None,
            "version": 1,
            "created": True,
            "warnings": [],
        }
    ]
    code, out, _ = run(capsys, "apply", "--dsn", dsn, str(seq_file))
    assert (code, out.strip()) == (0, f"{seq_file}: welcome v1 unchanged")

    code, out, _ = run(
        capsys,
        "enroll",
        "welcome",
        "u1",
        "--dsn",
        dsn,
        "--json",
        "--data",
        '{"email": "a@example.com"}',
    )
    enrollment = json.loads(out)
    assert code == 0
    assert enrollment["status"] == "active"
    assert enrollment["id"]
    code, out, _ = run(capsys, "event", "u1", "activated", "--dsn", dsn, "--json", "--id", "e1")
    assert (code, json.loads(out)["created"]) == (0, True)
    code, out, _ = run(capsys, "event", "u1", "activated", "--dsn", dsn, "--json", "--id", "e1")
    assert (code, json.loads(out)["created"]) == (0, False)
    code, out, _ = run(capsys, "suppress", "email", "A@Example.com", "--dsn", dsn, "--json")
    assert (code, json.loads(out)["address"]) == (0, "a@example.com")


def test_bad_input_exits_2_and_names_the_problem(
    capsys: pytest.CaptureFixture[str], dsn: str, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        SEQ.replace('after = "0s"', "").replace(
            'channel = "email"', 'channel = "email"\nafter = "soon"'
        )
    )
    code, _, err = run(capsys, "apply", "--dsn", dsn, str(bad))
    assert code == 2
    assert f"{bad}: step 'hello': key 'after'" in err
    code, _, err = run(capsys, "enroll", "welcome", "u1", "--dsn", dsn, "--data", "[1]")
    assert (code, "--data: must be a JSON object" in err) == (2, True)
    config = tmp_path / "c.toml"
    config.write_text("[worker]\nbatch_sise = 5\n")
    code, _, err = run(capsys, "check-schema", "--dsn", dsn, "--config", str(config))
    assert code == 2
    assert "worker.batch_sise: unknown key" in err
    code, _, err = run(capsys, "enroll", "nope", "u1", "--dsn", dsn)
    assert code == 1
    assert "no sequence 'nope'" in err


def test_migrate_check_schema_and_uninstall(
    capsys: pytest.CaptureFixture[str], server_dsn: str
) -> None:
    code, out, _ = run(capsys, "check-schema", "--dsn", server_dsn, "--json")
    assert code == 1
    every = sorted(p.name for p in (Path(__file__).parents[1] / "schema").glob("*.sql"))
    assert every[:2] == ["0001_init.sql", "0002_flow.sql"]
    assert json.loads(out)["pending"] == every
    code, out, _ = run(capsys, "migrate", "--dsn", server_dsn, "--json")
    assert (code, json.loads(out)) == (0, {"applied": every})
    code, out, _ = run(capsys, "check-schema", "--dsn", server_dsn)
    assert code == 0
    assert "current" in out
    code, out, _ = run(capsys, "uninstall", "--dsn", server_dsn)
    assert code == 0
    assert "DROP SCHEMA IF EXISTS dripd CASCADE;" in out
    code, out, _ = run(capsys, "check-schema", "--dsn", server_dsn)
    assert code == 0  # printing the SQL dropped nothing
    code, out, _ = run(capsys, "uninstall", "--dsn", server_dsn, "--execute", "--json")
    assert (code, json.loads(out)["executed"]) == (0, True)
    code, out, _ = run(capsys, "check-schema", "--dsn", server_dsn)
    assert code == 1


async def _raw_credentials(dsn: str) -> bytes:
    conn = await asyncpg.connect(dsn)
    try:
        raw: bytes = await conn.fetchval("SELECT credentials FROM dripd.channel_adapters")
        return raw
    finally:
        await conn.close()


def test_adapter_credentials_are_stored_encrypted(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    dsn: str,
    tmp_path: Path,
) -> None:
    creds = tmp_path / "creds.json"
    creds.write_text('{"username": "mailer", "password": "hunter2-very-secret"}')
    config = '{"host": "smtp.example.com", "port": 587, "tls": "starttls", "from": "a@b.co"}'
    code, _, err = add_smtp_adapter(
        capsys, dsn, "mail", "--config", config, "--credentials-file", str(creds)
    )
    assert code == 2
    assert "DRIPD_ENCRYPTION_KEY is not set" in err
    monkeypatch.setenv("DRIPD_ENCRYPTION_KEY", generate_key())
    code, out, err = add_smtp_adapter(
        capsys,
        dsn,
        "mail",
        "--config",
        config,
        "--default",
        "--json",
        "--credentials-file",
        str(creds),
    )
    assert code == 0, err
    added = json.loads(out)
    assert added["default"] is True
    assert "password" not in out
    assert "hunter2" not in out
    raw = asyncio.run(_raw_credentials(dsn))
    assert b"hunter2-very-secret" not in raw
    assert b"mailer" not in raw
    assert b"password" not in raw

    monkeypatch.setattr("sys.stdin", io.StringIO('{"username": "x", "password": "y"}'))
    code, _, err = add_smtp_adapter(
        capsys,
        dsn,
        "mail2",
        "--config",
        '{"host": "h", "from": "a@b.co", "tls": "sometimes"}',
        "--credentials-file",
        "-",
    )
    assert code == 2
    assert "tls" in err

    code, out, _ = run(capsys, "adapter", "list", "--dsn", dsn, "--json")
    assert [a["name"] for a in json.loads(out)] == ["mail"]
    code, out, _ = run(capsys, "adapter", "disable", "mail", "--dsn", dsn, "--json")
    assert (code, json.loads(out)["enabled"]) == (0, False)
    code, _, err = run(capsys, "adapter", "disable", "nope", "--dsn", dsn)
    assert code == 1
    assert "no adapter 'nope'" in err


def test_keygen_prints_a_usable_key(capsys: pytest.CaptureFixture[str]) -> None:
    from dripd.channels.credentials import Vault

    code, out, _ = run(capsys, "keygen")
    assert code == 0
    vault = Vault.from_text(out.strip())
    assert vault.decrypt(vault.encrypt({"a": 1}, aad=b"x"), aad=b"x") == {"a": 1}
    code, out, _ = run(capsys, "keygen", "--json")
    assert json.loads(out)["env"] == "DRIPD_ENCRYPTION_KEY"


def test_no_database_is_a_configuration_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "migrate")
    assert code == 2
    assert "no database: pass --dsn, set DRIPD_DSN" in err


def test_the_example_config_loads_and_lists_every_key() -> None:
    import tomllib

    import msgspec

    from dripd.config import Config, from_dict

    path = Path(__file__).resolve().parents[1] / "config" / "dripd.example.toml"
    raw = tomllib.loads(path.read_text())
    assert from_dict(raw) == Config()  # every value shown is the default
    defaults = msgspec.to_builtins(Config())
    assert set(raw) == set(defaults)
    for section, keys in defaults.items():
        assert set(raw[section]) == set(keys), section


def test_preview_renders_every_step_and_sends_nothing(
    capsys: pytest.CaptureFixture[str], dsn: str, tmp_path: Path
) -> None:
    path = tmp_path / "two.toml"
    path.write_text(
        SEQ + '\n[[steps]]\nkey = "nudge"\nchannel = "sms"\nafter = "2d"\n'
        'body = "Still there, {{ first_name }}?"\n'
    )
    assert run(capsys, "apply", "--dsn", dsn, str(path))[0] == 0
    code, out, _ = run(
        capsys,
        "preview",
        "welcome",
        "u1",
        "--dsn",
        dsn,
        "--json",
        "--data",
        '{"email": "a@example.com", "phone": "+15550100001", "first_name": "Ada"}',
    )
    assert code == 0
    assert json.loads(out) == [
        {
            "step": "hello",
            "channel": "email",
            "after": "0s",
            "to": "a@example.com",
            "subject": "Hi",
            "text": "Hello Ada",
        },
        {
            "step": "nudge",
            "channel": "sms",
            "after": "2d",
            "to": "+15550100001",
            "body": "Still there, Ada?",
        },
    ]
    # Missing data: every step that cannot render says why, and the exit code is 1.
    code, out, _ = run(capsys, "preview", "welcome", "--dsn", dsn, "--step", "nudge")
    assert code == 1
    assert "error: body: 'first_name' is undefined" in out
    code, _, err = run(capsys, "preview", "welcome", "--dsn", dsn, "--step", "nope")
    assert code == 1
    assert "has no step 'nope'" in err
    assert asyncio.run(_count(dsn, "dripd.enrollments")) == 0


async def _count(dsn: str, table: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
    finally:
        await conn.close()


def test_rotate_key_re_encrypts_every_adapter_in_one_go(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    dsn: str,
    tmp_path: Path,
) -> None:
    from dripd.channels.credentials import Vault
    from dripd.engine.adapters import adapter_aad

    old, new = generate_key(), generate_key()
    creds = tmp_path / "creds.json"
    creds.write_text('{"username": "mailer", "password": "pw-1"}')
    monkeypatch.setenv("DRIPD_ENCRYPTION_KEY", old)
    for name in ("a", "b"):
        code, _, err = add_smtp_adapter(
            capsys,
            dsn,
            name,
            "--config",
            '{"host": "h", "from": "x@y.z"}',
            "--credentials-file",
            str(creds),
        )
        assert code == 0, err
    before = asyncio.run(_blobs(dsn))

    monkeypatch.setenv("DRIPD_ENCRYPTION_KEY", new)
    code, _, err = run(capsys, "rotate-key", "--dsn", dsn)
    assert code == 2  # the old key is not given: nothing changes
    assert "adapter 'a'" in err
    assert "encrypted with a different key" in err
    assert asyncio.run(_blobs(dsn)) == before

    monkeypatch.setenv("DRIPD_ENCRYPTION_KEYS_RETIRED", old)
    code, out, err = run(capsys, "rotate-key", "--dsn", dsn, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert sorted(result["rotated"]) == ["a", "b"]
    assert result["key_id"] == Vault.from_text(new).key_id
    after = asyncio.run(_blobs(dsn))
    for adapter_id, blob in after.items():
        assert Vault.from_text(new).decrypt(blob, aad=adapter_aad(adapter_id)) == {
            "username": "mailer",
            "password": "pw-1",
        }
        with pytest.raises(Exception, match="different key"):
            Vault.from_text(old).decrypt(blob, aad=adapter_aad(adapter_id))
    code, out, _ = run(capsys, "rotate-key", "--dsn", dsn, "--json")
    assert (code, json.loads(out)["rotated"]) == (0, [])


async def _blobs(dsn: str) -> dict[Any, bytes]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT id, credentials FROM dripd.channel_adapters")
        return {r["id"]: bytes(r["credentials"]) for r in rows}
    finally:
        await conn.close()


def test_secrets_are_stored_encrypted_listed_without_values_and_rotated(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    dsn: str,
    tmp_path: Path,
) -> None:
    from dripd.channels.credentials import Vault
    from dripd.engine.hookset import secret_aad

    old, new = generate_key(), generate_key()
    monkeypatch.setenv("DRIPD_ENCRYPTION_KEY", old)
    monkeypatch.setattr("sys.stdin", io.StringIO("tok-secret-1\n"))
    code, out, err = run(capsys, "secret", "set", "crm_token", "--dsn", dsn, "--json")
    assert (code, json.loads(out)) == (
        0,
        {"name": "crm_token", "tenant_key": None, "created": True},
    )
    code, out, _ = run(
        capsys, "secret", "generate", "crm_signing", "--tenant", "acme", "--dsn", dsn
    )
    assert code == 0
    signing = out.strip()
    assert signing.startswith("whsec_")
    assert len(base64.b64decode(signing.removeprefix("whsec_"))) == 32
    empty = tmp_path / "empty"
    empty.write_text("\n")
    code, _, err = run(capsys, "secret", "set", "x", "--from-file", str(empty), "--dsn", dsn)
    assert (code, err.strip()) == (2, "dripd: --from-file: the secret is empty")

    code, out, _ = run(capsys, "secret", "list", "--all-tenants", "--dsn", dsn, "--json")
    listed = json.loads(out)
    assert [(r["tenant_key"], r["name"]) for r in listed] == [
        (None, "crm_token"),
        ("acme", "crm_signing"),
    ]
    assert "tok-secret-1" not in out
    assert signing not in out

    async def blobs() -> dict[str, tuple[Any, bytes]]:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch("SELECT id, name, value FROM dripd.secrets")
            return {r["name"]: (r["id"], bytes(r["value"])) for r in rows}
        finally:
            await conn.close()

    stored = asyncio.run(blobs())
    assert b"tok-secret-1" not in stored["crm_token"][1]
    monkeypatch.setenv("DRIPD_ENCRYPTION_KEY", new)
    monkeypatch.setenv("DRIPD_ENCRYPTION_KEYS_RETIRED", old)
    code, out, err = run(capsys, "rotate-key", "--dsn", dsn, "--json")
    assert code == 0, err
    assert sorted(json.loads(out)["rotated_secrets"]) == ["crm_signing", "crm_token"]
    secret_id, blob = asyncio.run(blobs())["crm_token"]
    assert Vault.from_text(new).decrypt(blob, aad=secret_aad(secret_id)) == {
        "value": "tok-secret-1"
    }

    code, out, _ = run(capsys, "secret", "delete", "crm_token", "--dsn", dsn)
    assert (code, out.strip()) == (0, "secret crm_token deleted")
    code, _, err = run(capsys, "secret", "delete", "crm_token", "--dsn", dsn)
    assert code == 1
    assert "no secret 'crm_token' for tenant (global)" in err


LEGACY_TIMEOUT = """
[sequence]
key = "legacy"

[[steps]]
key = "wait"
wait_for = { event = "activated", timeout = "1d" }

[[steps]]
key = "reminder"          # reached only by the wait's timeout, the old way
channel = "email"
subject = "Need a hand?"
text = "Hi"

[[steps]]
key = "congrats"
channel = "email"
subject = "Congrats"
text = "Well done"

[[transitions]]
from = "wait"
to = "congrats"
when = "event.key == 'activated'"
"""


def test_apply_accepts_a_file_that_relied_on_the_old_timeout_path_with_a_warning(
    capsys: pytest.CaptureFixture[str], dsn: str, tmp_path: Path
) -> None:
    path = tmp_path / "legacy.toml"
    path.write_text(LEGACY_TIMEOUT)
    code, out, err = run(capsys, "apply", "--dsn", dsn, "--json", str(path))
    assert code == 0
    [warning] = json.loads(out)[0]["warnings"]
    assert warning.startswith(f"{path}: step 'reminder': unreachable")
    assert "set on_timeout to keep the old path" in warning
    assert f"dripd: warning: {warning}" in err
    # With on_timeout the path is explicit again and nothing is said.
    path.write_text(
        LEGACY_TIMEOUT.replace('timeout = "1d"', 'timeout = "1d", on_timeout = "reminder"')
    )
    code, out, err = run(capsys, "apply", "--dsn", dsn, "--json", str(path))
    assert (code, json.loads(out)[0]["warnings"], err) == (0, [], "")
