"""A database without dripd's schema, or with an older one: every command, the daemon and
`/readyz` say what to run, in one line (never a traceback, never "relation … does not
exist")."""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from background import background
from conftest import with_database

from dripd.channels.credentials import generate_key
from dripd.cli import _parser, main
from dripd.config import from_dict
from dripd.db import migrate as migrate_mod
from dripd.db.migrate import NOT_INSTALLED, migrations
from dripd.engine.daemon import Daemon
from dripd.http.app import HttpServer, build_app
from dripd.metrics import Metrics

UUID = "00000000-0000-0000-0000-000000000001"

# Every command that needs dripd's schema, with arguments that would otherwise work or
# fail only at the database; `{tmp}` is the test's directory.
COMMANDS: dict[str, list[str]] = {
    "run": ["run"],
    "apply": ["apply", "{tmp}/welcome.toml"],
    "enroll": ["enroll", "welcome", "u1", "--data", '{"email": "a@example.com"}'],
    "event": ["event", "u1", "signed_up", "--id", "e1"],
    "suppress": ["suppress", "email", "a@example.com"],
    "preview": ["preview", "welcome"],
    "replay": ["replay", UUID],
    "adapter add": ["adapter", "add", "out", "--channel", "email", "--provider", "outbox",
                    "--config", '{"path": "{tmp}/outbox"}'],
    "adapter list": ["adapter", "list"],
    "adapter update": ["adapter", "update", "out", "--no-default"],
    "adapter disable": ["adapter", "disable", "out"],
    "secret set": ["secret", "set", "s", "--from-file", "{tmp}/secret"],
    "secret generate": ["secret", "generate", "s"],
    "secret list": ["secret", "list"],
    "secret delete": ["secret", "delete", "s"],
    "token create": ["token", "create"],
    "token list": ["token", "list"],
    "token revoke": ["token", "revoke", UUID],
    "hook test": ["hook", "test", "welcome", "h"],
    "rotate-key": ["rotate-key"],
}  # fmt: skip
# The commands that work without the schema (they install, inspect or remove it) or
# without a database at all.
WITHOUT_SCHEMA = {"migrate", "check-schema", "uninstall", "dev", "keygen", "ctl"}

SEQUENCE = """
[sequence]
key = "welcome"

[[steps]]
key = "hello"
channel = "email"
subject = "Hi"
text = "Hello"
"""


def _leaf_commands(parser: argparse.ArgumentParser, prefix: str = "") -> set[str]:
    found: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                path = f"{prefix} {name}".strip()
                found |= _leaf_commands(sub, path) or {path}
    return found


def test_every_command_is_covered() -> None:
    assert _leaf_commands(_parser()) == set(COMMANDS) | WITHOUT_SCHEMA


async def _create(admin_dsn: str, name: str, *, migrations_applied: int) -> None:
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    finally:
        await admin.close()
    if migrations_applied:
        conn = await asyncpg.connect(with_database(admin_dsn, name))
        try:
            await migrate_mod.migrate(conn, available=migrations()[:migrations_applied])
        finally:
            await conn.close()


async def _drop(admin_dsn: str, name: str) -> None:
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


# The commands only read (and fail), so one database of each kind serves the module.
@pytest.fixture(scope="module", params=["empty", "older"])
def database(request: pytest.FixtureRequest, admin_dsn: str) -> Iterator[tuple[str, str]]:
    """(DSN, the message every command must print) of a database without dripd's schema,
    or with only its first two migrations."""
    applied = 0 if request.param == "empty" else 2
    name = f"dripd_t_{request.param}_{secrets.token_hex(6)}"
    asyncio.run(_create(admin_dsn, name, migrations_applied=applied))
    if applied:
        pending = [m.name for m in migrations()[applied:]]
        message = (
            f"schema is out of date: migrations {', '.join(pending)} are not applied; "
            "run `dripd migrate`"
        )
    else:
        message = NOT_INSTALLED
    try:
        yield with_database(admin_dsn, name), message
    finally:
        asyncio.run(_drop(admin_dsn, name))


@pytest.fixture(autouse=True)
def _environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DRIPD_DSN", raising=False)
    monkeypatch.setenv("DRIPD_ENCRYPTION_KEY", generate_key())
    config = tmp_path / "dripd.toml"
    config.write_text(f'[control]\nsocket = "{tmp_path}/control.sock"\n[http]\nenabled = false\n')
    monkeypatch.setenv("DRIPD_CONFIG", str(config))
    (tmp_path / "welcome.toml").write_text(SEQUENCE)
    (tmp_path / "secret").write_text("s3cret\n")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_says_what_to_run(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    database: tuple[str, str],
    command: str,
) -> None:
    dsn, message = database
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in COMMANDS[command]]

    code = main([*argv, "--dsn", dsn])

    out, err = capsys.readouterr()
    assert (code, out, err) == (1, "", f"dripd: {message}\n")
    assert not (tmp_path / "control.sock").exists()  # the daemon stopped before serving


async def test_readyz_says_what_to_run(
    database: tuple[str, str], tmp_path: Path
) -> None:  # fmt: skip
    dsn, message = database
    daemon = Daemon(from_dict({"database": {"dsn": dsn}}))
    daemon.pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    server = HttpServer(build_app(metrics=Metrics(), readiness=daemon.readiness))
    try:
        async with (
            background(server.serve, "127.0.0.1", 0),
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client,
        ):
            response = await client.get("/readyz")
    finally:
        await daemon.pool.close()
    assert response.status_code == 503
    assert response.json() == {"ready": False, "database": "ok", "schema": message}


def test_check_schema_and_migrate_work_without_the_schema(
    capsys: pytest.CaptureFixture[str], server_dsn: str
) -> None:
    fresh = server_dsn
    names = [m.name for m in migrations()]
    assert main(["check-schema", "--dsn", fresh, "--json"]) == 1
    result: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert (result["current"], result["pending"]) == (False, names)

    assert main(["migrate", "--dsn", fresh]) == 0
    capsys.readouterr()
    assert main(["adapter", "list", "--dsn", fresh, "--json"]) == 0
    assert capsys.readouterr() == ("[]\n", "")
