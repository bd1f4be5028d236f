"""Migrations: applied once, in order, under a lock, and never silently over an edited past."""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import AsyncIterator

import asyncpg
import pytest

from dripd.cli import main
from dripd.db.migrate import (
    LOCK_KEY,
    NEWEST_TESTED_SERVER,
    OLDEST_SERVER,
    Migration,
    ServerVersion,
    check_server,
    migrate,
    migrations,
    require_current,
    schema_dir,
    server_version,
    status,
    teardown_sql,
)
from dripd.errors import DatabaseError, SchemaError


@pytest.fixture
async def empty(server_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(server_dsn)
    try:
        yield conn
    finally:
        await conn.close()


def fake(version: int, slug: str, sql: str) -> Migration:
    return Migration(
        version=version,
        name=f"{version:04d}_{slug}.sql",
        sql=sql,
        checksum=hashlib.sha256(sql.encode()).hexdigest(),
    )


def with_extra(*extra: Migration) -> list[Migration]:
    return [*migrations(), *extra]


async def ledger(conn: asyncpg.Connection) -> list[tuple[int, str]]:
    rows = await conn.fetch("SELECT version, name FROM dripd.schema_migrations ORDER BY version")
    return [(row["version"], row["name"]) for row in rows]


def test_migrations_are_the_schema_files_in_order() -> None:
    found = migrations()
    assert found[0].name == "0001_init.sql"
    assert [m.version for m in found] == sorted({m.version for m in found})
    first = (schema_dir() / "0001_init.sql").read_bytes()
    assert found[0].checksum == hashlib.sha256(first).hexdigest()


async def test_migrate_applies_pending_once(empty: asyncpg.Connection) -> None:
    names = [m.name for m in migrations()]

    assert await migrate(empty) == names
    assert await migrate(empty) == []
    assert [name for _, name in await ledger(empty)] == names
    assert await empty.fetchval("SELECT to_regclass('dripd.enrollments') IS NOT NULL")


async def test_concurrent_migrates_apply_once(server_dsn: str) -> None:
    conns = [await asyncpg.connect(server_dsn) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate(conn) for conn in conns))
        assert sorted(map(len, results)) == [0, 0, 0, len(migrations())]
        assert len(await ledger(conns[0])) == len(migrations())
    finally:
        for conn in conns:
            await conn.close()


async def test_migrate_waits_for_the_lock_holder(server_dsn: str) -> None:
    holder = await asyncpg.connect(server_dsn)
    waiter = await asyncpg.connect(server_dsn)
    try:
        async with holder.transaction():
            # Hold the ledger's lock the way a concurrent migrate would.
            await holder.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
            task = asyncio.create_task(migrate(waiter))
            waiting_pid = waiter.get_server_pid()
            while not await holder.fetchval(
                "SELECT count(*) FROM pg_locks WHERE pid = $1 AND locktype = 'advisory'"
                " AND NOT granted",
                waiting_pid,
            ):
                assert not task.done()
                await asyncio.sleep(0.01)
            await holder.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
        assert await task == [m.name for m in migrations()]
    finally:
        await holder.close()
        await waiter.close()


async def test_failed_migration_leaves_no_trace(empty: asyncpg.Connection, server_dsn: str) -> None:
    broken = fake(9001, "broken", "CREATE TABLE dripd.half_done (id int); SELECT 1/0;")

    with pytest.raises(DatabaseError, match=r"migration 9001_broken\.sql failed"):
        await migrate(empty, available=with_extra(broken))

    assert [name for _, name in await ledger(empty)] == [m.name for m in migrations()]
    assert await empty.fetchval("SELECT to_regclass('dripd.half_done')") is None
    # The lock was released: another session can take it at once.
    other = await asyncpg.connect(server_dsn)
    try:
        assert await other.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY)
    finally:
        await other.close()


async def test_edited_migration_is_refused(empty: asyncpg.Connection) -> None:
    await migrate(empty)
    await empty.execute("UPDATE dripd.schema_migrations SET checksum = 'f00d' WHERE version = 1")

    with pytest.raises(SchemaError, match=r"migration 0001_init\.sql was edited .*f00d≠"):
        await migrate(empty)
    with pytest.raises(SchemaError, match=r"0001_init\.sql was edited"):
        await require_current(empty)
    assert (await status(empty)).edited == ["0001_init.sql"]


async def test_applied_migration_without_file_is_refused(empty: asyncpg.Connection) -> None:
    await migrate(empty)
    await empty.execute(
        "INSERT INTO dripd.schema_migrations (version, name, checksum)"
        " VALUES (9999, '9999_from_the_future.sql', 'abc')"
    )

    with pytest.raises(SchemaError, match=r"9999_from_the_future\.sql .* file is missing"):
        await migrate(empty)
    with pytest.raises(SchemaError, match=r"9999_from_the_future\.sql"):
        await require_current(empty)
    found = await status(empty)
    assert found.unknown == ["9999_from_the_future.sql"]
    assert not found.current


async def test_status_before_and_after_migrate(empty: asyncpg.Connection) -> None:
    names = [m.name for m in migrations()]

    before = await status(empty)
    assert (before.applied, before.pending, before.current) == ([], names, False)
    with pytest.raises(SchemaError) as info:
        await require_current(empty)
    assert info.value.message == "schema not installed: run `dripd migrate`"

    await migrate(empty)

    after = await status(empty)
    assert (after.applied, after.pending, after.edited, after.unknown) == (names, [], [], [])
    assert after.current
    await require_current(empty)


async def test_require_current_names_the_pending_migrations(empty: asyncpg.Connection) -> None:
    await migrate(empty)
    newer = with_extra(fake(9002, "x", "SELECT 1"), fake(9003, "y", "SELECT 1"))

    with pytest.raises(SchemaError) as info:
        await require_current(empty, available=newer)
    assert info.value.message == (
        "schema is out of date: migrations 9002_x.sql, 9003_y.sql are not applied; "
        "run `dripd migrate`"
    )
    await migrate(empty, available=with_extra(fake(9002, "x", "SELECT 1")))
    with pytest.raises(SchemaError) as info:
        await require_current(empty, available=newer)
    assert info.value.message == (
        "schema is out of date: migration 9003_y.sql is not applied; run `dripd migrate`"
    )
    assert await migrate(empty, available=newer) == ["9003_y.sql"]
    await require_current(empty, available=newer)


async def test_teardown_removes_the_schema(empty: asyncpg.Connection) -> None:
    await migrate(empty)

    await empty.execute(teardown_sql())

    assert not await empty.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = 'dripd'")
    assert (await status(empty)).pending == [m.name for m in migrations()]


async def test_driver_errors_become_database_errors(server_dsn: str) -> None:
    conn = await asyncpg.connect(server_dsn)
    await conn.close()

    with pytest.raises(DatabaseError, match=r"could not read the server.s version"):
        await migrate(conn)
    with pytest.raises(DatabaseError):
        await status(conn)


async def test_template_clones_are_current(conn: asyncpg.Connection) -> None:
    await require_current(conn)


async def test_0005_respells_the_email_suppressions_stored_before_it(
    empty: asyncpg.Connection,
) -> None:
    before = [m for m in migrations() if m.version < 5]
    await migrate(empty, available=before)
    rows = [
        # (tenant, channel, address as stored before 0005, created_at offset in seconds)
        (None, "email", "bob <bob@example.com>", 1),  # a one-click unsubscribe's spelling
        (None, "email", "jose\u0301@example.com", 2),  # decomposed
        (None, "email", "josé@example.com", 3),  # composed: meets the one above, later
        ("acme", "email", '"Bob, Jr." <bob@example.com>', 4),
        (None, "email", "ann@xn--bcher-kva.example", 5),  # punycode: left as it is
        (None, "sms", "+1 202 555 0143", 6),  # not email: untouched
    ]
    for tenant, channel, address, offset in rows:
        await empty.execute(
            "INSERT INTO dripd.suppressions (tenant_key, channel, address, created_at)"
            " VALUES ($1, $2, $3, now() + make_interval(secs => $4))",
            tenant,
            channel,
            address,
            offset,
        )
    await migrate(empty)
    found = await empty.fetch(
        "SELECT tenant_key, channel, address FROM dripd.suppressions ORDER BY created_at"
    )
    assert [tuple(r) for r in found] == [
        (None, "email", "bob@example.com"),
        (None, "email", "josé@example.com"),
        ("acme", "email", "bob@example.com"),
        (None, "email", "ann@xn--bcher-kva.example"),
        (None, "sms", "+1 202 555 0143"),
    ]


# --- the servers dripd runs on ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("number", "text", "refused"),
    [
        (140011, "14.11", "PostgreSQL 14.11 is too old: dripd's schema needs 15 or newer"),
        (150000, "15.0", None),
        (151900, "15.19", None),
        (170002, "17.2", None),
        (180006, "18.6", None),
        (190000, "19devel", "PostgreSQL 19devel is newer than dripd knows"),
        (200001, "20.1", "PostgreSQL 20.1 is newer than dripd knows"),
    ],
)
def test_the_servers_dripd_accepts_are_15_through_18(
    number: int, text: str, refused: str | None
) -> None:
    version = ServerVersion(number, text)
    if refused is None:
        check_server(version)
        return
    with pytest.raises(SchemaError) as caught:
        check_server(version)
    assert caught.value.message.startswith(refused)
    assert "tested on PostgreSQL 15 through 18" in caught.value.message
    if version.major > NEWEST_TESTED_SERVER:
        check_server(version, allow_newer=True)  # the operator's explicit choice
        assert "--allow-newer-server" in caught.value.message
    else:
        with pytest.raises(SchemaError):
            check_server(version, allow_newer=True)  # never: the schema would not load


async def test_this_server_is_in_the_range_and_its_version_is_read(
    empty: asyncpg.Connection,
) -> None:
    version = await server_version(empty)
    assert OLDEST_SERVER <= version.major <= NEWEST_TESTED_SERVER
    assert version.text == (await empty.fetchval("SHOW server_version")).split()[0]
    assert version.number == int(await empty.fetchval("SHOW server_version_num"))


@pytest.mark.parametrize(("number", "text"), [(140009, "14.9"), (190001, "19.1")])
async def test_migrate_refuses_a_server_out_of_range_naming_it_and_creates_nothing(
    empty: asyncpg.Connection,
    server_dsn: str,
    number: int,
    text: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def reported(conn: asyncpg.Connection) -> ServerVersion:
        return ServerVersion(number, text)

    monkeypatch.setattr("dripd.db.migrate.server_version", reported)
    with pytest.raises(SchemaError, match=rf"PostgreSQL {re.escape(text)} is"):
        await migrate(empty)
    code = await asyncio.to_thread(main, ["migrate", "--dsn", server_dsn])
    err = capsys.readouterr().err
    assert code == 1
    assert f"PostgreSQL {text} is" in err
    assert await empty.fetchval("SELECT to_regnamespace('dripd')") is None
    if number >= 190000:
        assert (
            await asyncio.to_thread(main, ["migrate", "--dsn", server_dsn, "--allow-newer-server"])
            == 0
        )
        assert (await status(empty)).current
    else:
        with pytest.raises(SchemaError, match=r"PostgreSQL 14\.9 is too old"):
            await require_current(empty)  # the daemon and every command say so too
