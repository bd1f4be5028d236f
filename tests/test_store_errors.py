"""Driver errors translated at the one boundary: "try again" is never "refused", and a
missing dripd schema is a SchemaError."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest

from dripd.db import store
from dripd.errors import Conflict, DatabaseError, Refused, SchemaError

NOW = datetime(2026, 3, 2, tzinfo=UTC)
NOT_INSTALLED = "schema not installed: run `dripd migrate`"


@pytest.fixture
async def empty(server_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to a database without the dripd schema."""
    conn = await store.connect(server_dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def test_a_database_without_the_schema_is_a_schema_error(
    empty: asyncpg.Connection,
) -> None:
    with pytest.raises(SchemaError) as info:
        await store.backlog(empty, NOW)  # relation "dripd.step_executions" does not exist
    assert info.value.message == NOT_INSTALLED
    assert isinstance(info.value.__cause__, asyncpg.UndefinedTableError)


async def test_a_missing_schema_named_by_postgres_is_a_schema_error(
    empty: asyncpg.Connection,
) -> None:
    with pytest.raises(SchemaError, match="dripd migrate") as info, store.translated():
        await empty.execute("SELECT dripd.no_such_function()")  # schema "dripd" does not exist
    assert isinstance(info.value.__cause__, asyncpg.InvalidSchemaNameError)


async def test_a_dropped_dripd_table_is_a_schema_error(conn: asyncpg.Connection) -> None:
    await conn.execute("DROP TABLE dripd.quota_ledger")
    with pytest.raises(SchemaError, match="dripd migrate"):
        await store.quota_release(conn, [("quota:global", NOW)])


async def test_another_missing_relation_stays_refused(conn: asyncpg.Connection) -> None:
    with pytest.raises(Refused, match='relation "nowhere" does not exist'), store.translated():
        await conn.execute("SELECT * FROM nowhere")


# Every error class that means the same statement may succeed later: a server restarting,
# shutting down, starting up or failing over, a conflict a retry resolves, resources.
RETRY = [
    asyncpg.AdminShutdownError,  # 57P01
    asyncpg.CrashShutdownError,  # 57P02
    asyncpg.CannotConnectNowError,  # 57P03: "the database system is starting up"
    asyncpg.QueryCanceledError,  # 57014
    asyncpg.SerializationError,  # 40001
    asyncpg.DeadlockDetectedError,  # 40P01
    asyncpg.LockNotAvailableError,  # 55P03
    asyncpg.TooManyConnectionsError,  # 53300
    asyncpg.DiskFullError,  # 53100
    asyncpg.OutOfMemoryError,  # 53200
    asyncpg.ReadOnlySQLTransactionError,  # 25006: a standby after a failover
    asyncpg.ConnectionFailureError,  # 08006
    asyncpg.ConnectionDoesNotExistError,  # 08003
]


@pytest.mark.parametrize("error", RETRY, ids=lambda e: e.__name__)
def test_errors_that_mean_try_again_are_database_errors_not_refusals(
    error: type[Exception],
) -> None:
    with pytest.raises(DatabaseError) as raised, store.translated():
        raise error("the database system is shutting down")
    assert not isinstance(raised.value, Refused)
    assert store.retryable(raised.value.__cause__)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "error",
    [asyncpg.PostgresSyntaxError, asyncpg.CheckViolationError, asyncpg.NumericValueOutOfRangeError],
    ids=lambda e: e.__name__,
)
def test_a_statement_the_server_refuses_is_refused(error: type[Exception]) -> None:
    with pytest.raises(Refused), store.translated():
        raise error("nope")


def test_a_unique_violation_is_a_conflict() -> None:
    with pytest.raises(Conflict), store.translated():
        raise asyncpg.UniqueViolationError("duplicate key")


async def test_a_pooled_connection_of_a_server_going_away_is_not_handed_out_again(
    pool: asyncpg.Pool,
) -> None:
    pid = await pool.fetchval("SELECT pg_backend_pid()")

    async def fails_on_that_connection() -> None:
        with store.translated():
            async with store.acquire(pool) as conn:
                assert await conn.fetchval("SELECT pg_backend_pid()") == pid
                raise asyncpg.CannotConnectNowError("the database system is starting up")

    with pytest.raises(DatabaseError):
        await fails_on_that_connection()
    async with store.acquire(pool) as conn:
        assert await conn.fetchval("SELECT pg_backend_pid()") != pid
