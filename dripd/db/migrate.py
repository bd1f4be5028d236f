"""Forward-only schema migrations: the `schema/NNNN_name.sql` files, applied in order."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import re
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import asyncpg

from dripd.errors import DatabaseError, SchemaError

# Serialises concurrent `migrate` runs on one database (advisory locks are scoped
# to the current database). The value spells "dripdmig" in ASCII.
LOCK_KEY = 0x64726970646D6967

# The PostgreSQL majors dripd runs on: the oldest its schema needs (its unique indexes over
# nullable tenant keys use NULLS NOT DISTINCT, new in 15) and the newest the suite runs on
# in CI (.ci/run runs it on both ends).
OLDEST_SERVER = 15
NEWEST_TESTED_SERVER = 18

#: What every command, the daemon and `/readyz` say of a database without dripd's schema.
NOT_INSTALLED = "schema not installed: run `dripd migrate`"

# Matched whole (`fullmatch`): `$` would also match before a trailing newline.
_FILENAME = re.compile(r"([0-9]{4})_([a-z0-9_]+)\.sql", re.ASCII)

_LEDGER_DDL = """
CREATE SCHEMA IF NOT EXISTS dripd;
CREATE TABLE IF NOT EXISTS dripd.schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class Migration:
    """One migration file; `name` is its file name, e.g. `0001_init.sql`."""

    version: int
    name: str
    sql: str
    checksum: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SchemaStatus:
    """How the database's ledger compares with the migration files (lists of file names)."""

    applied: list[str]
    pending: list[str]
    edited: list[str]
    unknown: list[str]

    @property
    def current(self) -> bool:
        return not (self.pending or self.edited or self.unknown)


@dataclass(frozen=True, slots=True)
class ServerVersion:
    """A server's `server_version_num` (e.g. 180006) and `server_version` (e.g. "18.6")."""

    number: int
    text: str

    @property
    def major(self) -> int:
        return self.number // 10000


async def server_version(conn: asyncpg.Connection) -> ServerVersion:
    number, text = await _db(
        conn.fetchrow(
            "SELECT current_setting('server_version_num')::int, current_setting('server_version')"
        ),
        "could not read the server's version",
    )
    return ServerVersion(number, text.split()[0])


def check_server(version: ServerVersion, *, allow_newer: bool = False) -> None:
    """Raise SchemaError unless dripd runs on this server: PostgreSQL OLDEST_SERVER through
    NEWEST_TESTED_SERVER, or newer when `allow_newer`. The message names the version."""
    tested = f"dripd is tested on PostgreSQL {OLDEST_SERVER} through {NEWEST_TESTED_SERVER}"
    if version.major < OLDEST_SERVER:
        raise SchemaError(
            f"PostgreSQL {version.text} is too old: dripd's schema needs {OLDEST_SERVER} or "
            f"newer (its unique indexes use NULLS NOT DISTINCT); {tested}"
        )
    if version.major > NEWEST_TESTED_SERVER and not allow_newer:
        raise SchemaError(
            f"PostgreSQL {version.text} is newer than dripd knows: {tested}; "
            "`dripd migrate --allow-newer-server` goes ahead anyway"
        )


def schema_dir() -> Traversable:
    """Where the migration files are: inside the wheel, else the repository's `schema/`."""
    packaged = importlib.resources.files("dripd") / "_schema"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "schema"


def migrations() -> list[Migration]:
    """Every migration file, ordered by version."""
    where = schema_dir()
    if not where.is_dir():
        raise SchemaError(f"no migrations found: {where} is not a directory")
    found: dict[int, Migration] = {}
    for entry in where.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILENAME.fullmatch(entry.name)
        if match is None:
            # A misnamed migration silently skipped would leave the schema short.
            raise SchemaError(
                f"migration file {entry.name} is misnamed: expected NNNN_name.sql "
                "(four digits, lower-case letters, digits and underscores)"
            )
        version = int(match.group(1))
        if version in found:
            raise SchemaError(
                f"migrations {found[version].name} and {entry.name} share version {version}"
            )
        data = entry.read_bytes()
        found[version] = Migration(
            version=version,
            name=entry.name,
            sql=data.decode("utf-8"),
            checksum=hashlib.sha256(data).hexdigest(),
        )
    return [found[version] for version in sorted(found)]


async def migrate(
    conn: asyncpg.Connection,
    *,
    available: Sequence[Migration] | None = None,
    allow_newer_server: bool = False,
) -> list[str]:
    """Apply every pending migration, each in its own transaction; return their names.

    Refuses (SchemaError) a server `check_server` refuses, and when an applied migration
    was edited or its file is gone. `available` replaces the migration files (tests).
    """
    check_server(await server_version(conn), allow_newer=allow_newer_server)
    files = _files(available)
    await _db(conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY), "could not take the lock")
    try:
        applied = await _apply_pending(conn, files)
    except BaseException:
        # The original error is the one worth raising; a broken session has lost
        # its lock already, and a pool's reset unlocks everything anyway.
        with contextlib.suppress(DatabaseError):
            await _unlock(conn)
        raise
    await _unlock(conn)
    return applied


async def status(
    conn: asyncpg.Connection, *, available: Sequence[Migration] | None = None
) -> SchemaStatus:
    """Compare the ledger with the migration files; works before the first migrate."""
    files = _files(available)
    return _compare(files, await _ledger_if_any(conn))


async def require_current(
    conn: asyncpg.Connection, *, available: Sequence[Migration] | None = None
) -> None:
    """Raise SchemaError unless every migration is applied, unedited, and known, on a
    server that is not too old (a newer one passed `dripd migrate --allow-newer-server`).

    Its message says what to run: `NOT_INSTALLED` for a database without dripd's schema
    (no migration applied), else which migrations are pending, edited or unknown."""
    check_server(await server_version(conn), allow_newer=True)
    files = _files(available)
    ledger = await _ledger_if_any(conn)
    if not ledger:
        raise SchemaError(NOT_INSTALLED)
    _refuse_drift(files, ledger)
    pending = _compare(files, ledger).pending
    if len(pending) == 1:
        raise SchemaError(
            f"schema is out of date: migration {pending[0]} is not applied; run `dripd migrate`"
        )
    if pending:
        raise SchemaError(
            f"schema is out of date: migrations {', '.join(pending)} are not applied; "
            "run `dripd migrate`"
        )


def teardown_sql() -> str:
    """SQL that removes everything dripd created in a database."""
    return (
        "-- dripd teardown: drops the dripd schema with all its tables and data.\n"
        "-- Irreversible. Run `dripd migrate` to start again from an empty schema.\n"
        "DROP SCHEMA IF EXISTS dripd CASCADE;\n"
    )


def _files(available: Sequence[Migration] | None) -> list[Migration]:
    if available is None:
        return migrations()
    return sorted(available, key=lambda migration: migration.version)


async def _apply_pending(conn: asyncpg.Connection, files: list[Migration]) -> list[str]:
    await _db(conn.execute(_LEDGER_DDL), "could not create the migration ledger")
    ledger = await _ledger(conn)
    _refuse_drift(files, ledger)
    applied: list[str] = []
    for migration in files:
        if migration.version not in ledger:
            await _db(_apply(conn, migration), f"migration {migration.name} failed")
            applied.append(migration.name)
    return applied


async def _unlock(conn: asyncpg.Connection) -> None:
    await _db(conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY), "could not release the lock")


async def _apply(conn: asyncpg.Connection, migration: Migration) -> None:
    async with conn.transaction():
        await conn.execute(migration.sql)
        await conn.execute(
            "INSERT INTO dripd.schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            migration.version,
            migration.name,
            migration.checksum,
        )


async def _ledger_if_any(conn: asyncpg.Connection) -> dict[int, tuple[str, str]]:
    exists = await _db(
        conn.fetchval("SELECT to_regclass('dripd.schema_migrations') IS NOT NULL"),
        "could not read the migration ledger",
    )
    return await _ledger(conn) if exists else {}


async def _ledger(conn: asyncpg.Connection) -> dict[int, tuple[str, str]]:
    rows = await _db(
        conn.fetch("SELECT version, name, checksum FROM dripd.schema_migrations ORDER BY version"),
        "could not read the migration ledger",
    )
    return {version: (name, checksum) for version, name, checksum in rows}


def _compare(files: Sequence[Migration], ledger: dict[int, tuple[str, str]]) -> SchemaStatus:
    by_version = {migration.version: migration for migration in files}
    applied, pending, edited = [], [], []
    for migration in files:
        if migration.version not in ledger:
            pending.append(migration.name)
        elif ledger[migration.version][1] != migration.checksum:
            edited.append(migration.name)
        else:
            applied.append(migration.name)
    unknown = [name for version, (name, _) in ledger.items() if version not in by_version]
    return SchemaStatus(applied=applied, pending=pending, edited=edited, unknown=unknown)


def _refuse_drift(files: Sequence[Migration], ledger: dict[int, tuple[str, str]]) -> None:
    for migration in files:
        if migration.version in ledger and ledger[migration.version][1] != migration.checksum:
            recorded = ledger[migration.version][1]
            raise SchemaError(
                f"migration {migration.name} was edited after it was applied "
                f"(checksum {recorded[:12]}≠{migration.checksum[:12]}); "
                "migrations are forward-only: add a new one"
            )
    known = {migration.version for migration in files}
    for version, (name, _) in ledger.items():
        if version not in known:
            raise SchemaError(
                f"migration {name} is recorded as applied but its file is missing; "
                "the database is newer than this dripd"
            )


async def _db(call: Awaitable[Any], what: str) -> Any:
    try:
        return await call
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise DatabaseError(f"{what}: {exc}") from exc
