"""Custom providers from the `dripd.providers` entry-point group: a package installed on
the path (a module and its `.dist-info` with `entry_points.txt`, as pip writes them) adds a
provider that `dripd adapter add` accepts and `dripd run` sends through."""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest
from support import apply_text, executions, running_daemon, wait_for

from dripd import api
from dripd.channels import registry
from dripd.cli import main
from dripd.clock import ManualClock
from dripd.errors import ConfigError

MODULE = '''
"""A custom dripd provider, as a third-party package would ship it."""
import json
from pathlib import Path

from dripd.channels.base import Receipt
from dripd.channels.spec import ProviderSpec


class Journal:
    provider = "journal"

    def __init__(self, path):
        self.path = Path(path)

    async def send(self, message):
        with self.path.open("a") as file:
            file.write(json.dumps({"to": message.to, "body": message.body}) + "\\n")
        return Receipt(provider_message_id=f"journal-{message.execution_id}")

    async def aclose(self):
        pass


def spec():
    return ProviderSpec(
        name="journal",
        channels=frozenset({"sms"}),
        config_keys=frozenset({"path"}),
        required_config=frozenset({"path"}),
        credential_keys=frozenset(),
        required_credentials=frozenset(),
        factory=lambda adapter, context: Journal(adapter.config["path"]),
    )
'''


def install(root: Path, entry: str = "journal = journal_dripd:spec") -> None:
    """What `pip install` leaves on the path: the module and its distribution metadata."""
    (root / "journal_dripd.py").write_text(textwrap.dedent(MODULE))
    info = root / "journal_dripd-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: journal-dripd\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[dripd.providers]\n{entry}\n")


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    root = tmp_path / "site"
    root.mkdir()
    install(root)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    yield root
    registry._providers.pop("journal", None)
    sys.modules.pop("journal_dripd", None)


SMS = """
[sequence]
key = "sms"
[[steps]]
key = "hi"
channel = "sms"
body = "Hi {{ name }}"
"""


def test_the_cli_accepts_an_installed_provider(
    installed: Path, dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    journal = tmp_path / "journal.jsonl"
    code = main(
        ["adapter", "add", "j", "--channel", "sms", "--provider", "journal", "--default",
         "--config", json.dumps({"path": str(journal)}), "--dsn", dsn]
    )  # fmt: skip
    _, err = capsys.readouterr()
    assert code == 0, err
    assert main(["adapter", "add", "k", "--channel", "sms", "--provider", "nope", "--dsn", dsn])
    _, err = capsys.readouterr()
    assert "--provider: unknown provider 'nope'" in err
    assert "journal" in err  # listed among the known ones


async def test_dripd_run_loads_it_at_start_and_sends_through_it(
    installed: Path, dsn: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    journal = tmp_path / "journal.jsonl"
    await apply_text(pool, SMS)
    await pool.execute(
        "INSERT INTO dripd.channel_adapters (name, channel, provider, config, is_default) "
        "VALUES ('j', 'sms', 'journal', $1::text::jsonb, true)",
        json.dumps({"path": str(journal)}),
    )
    clock = ManualClock()
    await api.enroll(
        pool,
        tenant=None,
        sequence_key="sms",
        subscriber_id="ann",
        data={"phone": "+15555550100", "name": "Ann"},
        now=clock.now(),
    )
    assert "journal" not in registry._providers
    async with running_daemon(dsn, tmp_path, clock=clock):
        assert "journal" in registry._providers  # loaded at start
        clock.advance(timedelta(seconds=1))
        rows = await wait_for(lambda: _sent(pool))
    assert rows[0]["provider_message_id"] == f"journal-{rows[0]['id']}"
    assert [json.loads(line) for line in journal.read_text().splitlines()] == [
        {"to": "+15555550100", "body": "Hi Ann"}
    ]


async def _sent(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    rows = await executions(pool)
    return rows if rows and rows[0]["status"] == "sent" else []


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("journal = journal_dripd:missing", "cannot load: AttributeError"),
        ("journal = no_such_module:spec", "cannot load: ModuleNotFoundError"),
        ("journal = journal_dripd:json", "not a dripd ProviderSpec"),
        ("smtp2 = journal_dripd:spec_smtp", "already registered"),
    ],
)
def test_a_broken_entry_point_is_an_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry: str, problem: str
) -> None:
    root = tmp_path / "site"
    root.mkdir()
    install(root, entry)
    # A second spec named like a built-in one: `dataclasses.replace` keeps the name.
    another_smtp = (
        "\n\ndef spec_smtp():\n    import dataclasses\n    from dripd.channels import smtp\n"
    )
    another_smtp += "    return dataclasses.replace(smtp.SPEC)\n"
    (root / "journal_dripd.py").write_text(textwrap.dedent(MODULE) + another_smtp)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    try:
        with pytest.raises(ConfigError) as info:
            registry.load_entry_points()
    finally:
        sys.modules.pop("journal_dripd", None)
    assert f"entry point {entry.split(' =')[0]!r}" in info.value.message
    assert problem in info.value.message
