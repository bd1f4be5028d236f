"""The only code that runs SQL: named statements from sql/*.sql, asyncpg errors translated here."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, time, timedelta
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

import asyncpg
import msgspec

from dripd.errors import Conflict, DatabaseError, DripdError, Refused

# asyncpg ships no type information, so these are Any to mypy; they document intent.
Connection: TypeAlias = asyncpg.Connection
Pool: TypeAlias = asyncpg.Pool
Executor: TypeAlias = asyncpg.Connection | asyncpg.Pool

_SQL_DIR = Path(__file__).with_name("sql")

# Errors that mean the connection itself is gone or unusable (not that a statement failed).
_CONNECTION_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
)


@dataclass(frozen=True, slots=True)
class Queries:
    """Every statement dripd runs, one file each, loaded once at import."""

    active_hooks: str
    active_version: str
    adapter_rates: str
    analyze_queue: str
    archive_versions: str
    backlog: str
    claim: str
    clear_default_adapter: str
    delete_secret: str
    disable_adapter: str
    entry_sequences: str
    event_stats: str
    execution_status: str
    exit_enrollments: str
    find_event: str
    find_sequence: str
    get_enrollment: str
    hold_pending: str
    insert_adapter: str
    insert_enrollment: str
    insert_event: str
    insert_execution: str
    insert_steps: str
    insert_suppression: str
    insert_transitions: str
    insert_version: str
    latest_enrollment: str
    list_adapters: str
    list_secrets: str
    load_adapters: str
    load_versions: str
    lock_credentials: str
    lock_secrets: str
    lock_sequence: str
    next_due: str
    pause_adapter: str
    previous_enrollment: str
    purge_quota_ledger: str
    queue_stats: str
    quota_open: str
    quota_release: str
    quota_take: str
    record: str
    release: str
    release_held: str
    release_waits: str
    replay: str
    resume_adapter: str
    secret_row: str
    set_credentials: str
    set_enrollment_status: str
    set_secret: str
    skip_pending: str
    suppressed: str
    upsert_secret: str
    upsert_sequence: str

    @classmethod
    def load(cls) -> Queries:
        return load_statements(cls, _SQL_DIR)


_T = TypeVar("_T")


def load_statements(cls: type[_T], folder: Path) -> _T:
    """A dataclass of statements, one field per `<field>.sql` file in `folder` (a store
    module of one area keeps its statements in a subfolder of sql/)."""
    return cls(**{f.name: (folder / f"{f.name}.sql").read_text() for f in fields(cls)})  # type: ignore[arg-type]


Q = Queries.load()

_json_encode = msgspec.json.Encoder().encode
_json_decode = msgspec.json.Decoder().decode


def _encode_json(value: Any) -> str:
    # Writes pass JSON as text cast in SQL (`$n::text::jsonb`) so they work on any
    # connection, including a host application's that lacks dripd's jsonb codec.
    return _json_encode(value).decode()


def json_value(value: Any) -> Any:
    """A jsonb column's value, whether or not the connection has dripd's codec (host apps')."""
    return _json_decode(value) if isinstance(value, str | bytes) else value


async def init_connection(conn: Connection) -> None:
    """Teach a connection to move jsonb as Python values through msgspec."""
    await conn.set_type_codec(
        "jsonb", encoder=_encode_json, decoder=_json_decode, schema="pg_catalog", format="text"
    )
    await conn.set_type_codec(
        "json", encoder=_encode_json, decoder=_json_decode, schema="pg_catalog", format="text"
    )


async def connect(dsn: str, *, timeout: float = 10.0) -> Connection:
    """One connection with dripd's codecs; errors become DatabaseError."""
    try:
        conn = await asyncpg.connect(dsn, timeout=timeout)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise DatabaseError(f"cannot connect to Postgres: {_describe(exc)}") from exc
    await init_connection(conn)
    return conn


async def create_pool(dsn: str, *, min_size: int, max_size: int, timeout: float = 10.0) -> Pool:
    """A pool with dripd's codecs; errors become DatabaseError."""
    try:
        pool = await asyncpg.create_pool(
            dsn, min_size=min_size, max_size=max_size, timeout=timeout, init=init_connection
        )
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise DatabaseError(f"cannot connect to Postgres: {_describe(exc)}") from exc
    assert pool is not None
    return pool


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    # A DSN may carry a password; asyncpg does not echo it, but be sure.
    return text.splitlines()[0]


@contextlib.asynccontextmanager
async def acquire(db: Executor) -> AsyncIterator[Connection]:
    """A connection from a pool, or the connection itself (the caller's transaction applies).

    A pooled connection that failed at the connection level (the server ended it, or the
    driver lost track of its state) is terminated, so the pool opens a fresh one instead
    of handing the broken one out again.
    """
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn:
            try:
                yield conn
            except _CONNECTION_ERRORS:
                conn.terminate()
                raise
    else:
        yield db


@contextlib.asynccontextmanager
async def transaction(db: Executor) -> AsyncIterator[Connection]:
    """A transaction, or a savepoint inside the caller's; asyncpg errors become dripd errors."""
    with translated():
        async with acquire(db) as conn, conn.transaction():
            yield conn


@contextlib.contextmanager
def translated() -> Any:
    """Translate driver errors raised inside the block."""
    try:
        yield
    except DripdError:
        raise
    except asyncpg.UniqueViolationError as exc:
        raise Conflict(f"conflicts with an existing row ({exc.constraint_name})") from exc
    except _CONNECTION_ERRORS as exc:
        raise DatabaseError(f"lost the database connection: {_describe(exc)}") from exc
    except asyncpg.PostgresError as exc:
        raise Refused(f"Postgres refused: {_describe(exc)}") from exc


# --- the worker's statements -------------------------------------------------------------


async def claim(
    db: Executor, *, now: datetime, limit: int, token: uuid.UUID, lease_until: datetime, daemon: str
) -> list[asyncpg.Record]:
    with translated():
        async with acquire(db) as conn:
            rows: list[asyncpg.Record] = await conn.fetch(
                Q.claim, now, limit, token, lease_until, daemon
            )
            return rows


@dataclass(slots=True, kw_only=True)
class RecordRow:
    """One outcome as the record statement takes it."""

    id: uuid.UUID
    token: uuid.UUID
    status: str
    due_at: datetime | None = None
    spent: int = 0
    channel: str | None = None
    provider: str | None = None
    adapter_id: uuid.UUID | None = None
    recipient: str | None = None
    reason: str | None = None
    error: str | None = None
    provider_message_id: str | None = None
    finished_at: datetime
    event_type: str | None = None
    next_step_id: uuid.UUID | None = None
    next_due_at: datetime | None = None
    enrollment_status: str | None = None
    enrollment_reason: str | None = None
    next_wait: str | None = None  # the event the next step waits for
    suppress: str | None = None  # a suppression reason for the recipient (a hard bounce)


_RECORD_COLUMNS = tuple(f.name for f in fields(RecordRow))


async def record(
    db: Executor, rows: Sequence[RecordRow], *, notify_before: datetime | None
) -> set[uuid.UUID]:
    """Record outcomes in one transaction; returns the ids this daemon still owned.

    NOTIFY dripd_due is sent with the commit when a next execution (or a retry) falls
    due before `notify_before`, so that idle daemons wake for it.
    """
    columns = [[getattr(r, name) for r in rows] for name in _RECORD_COLUMNS]
    with translated():
        async with acquire(db) as conn, conn.transaction():
            owned = await conn.fetch(Q.record, *columns)
            soonest = min(
                (t for r in rows for t in (r.due_at, r.next_due_at) if t is not None),
                default=None,
            )
            if notify_before is not None and soonest is not None and soonest <= notify_before:
                await conn.execute("SELECT pg_notify('dripd_due', $1)", soonest.isoformat())
    return {r["id"] for r in owned}


async def release(db: Executor, ids: Sequence[uuid.UUID], token: uuid.UUID) -> int:
    with translated():
        async with acquire(db) as conn:
            status: str = await conn.execute(Q.release, list(ids), token)
    return int(status.rsplit(" ", 1)[-1])


async def next_due(db: Executor) -> datetime | None:
    with translated():
        async with acquire(db) as conn:
            at: datetime | None = await conn.fetchval(Q.next_due)
            return at


async def backlog(db: Executor, now: datetime) -> tuple[int, datetime | None]:
    with translated():
        async with acquire(db) as conn:
            row = await conn.fetchrow(Q.backlog, now)
    return int(row["due"]), row["oldest_due_at"]


async def load_versions(db: Executor, step_ids: Sequence[uuid.UUID]) -> list[asyncpg.Record]:
    with translated():
        async with acquire(db) as conn:
            rows: list[asyncpg.Record] = await conn.fetch(Q.load_versions, list(step_ids))
            return rows


async def suppressed(db: Executor, keys: Sequence[tuple[str | None, str, str]]) -> set[int]:
    """Indexes (0-based) of the (tenant, channel, address) keys that are suppressed."""
    if not keys:
        return set()
    tenants, channels, addresses = (list(col) for col in zip(*keys, strict=True))
    with translated():
        async with acquire(db) as conn:
            rows = await conn.fetch(Q.suppressed, tenants, channels, addresses)
    return {int(r["n"]) - 1 for r in rows}


async def load_adapters(db: Executor) -> list[asyncpg.Record]:
    with translated():
        async with acquire(db) as conn:
            rows: list[asyncpg.Record] = await conn.fetch(Q.load_adapters)
            return rows


async def analyze_queue_if_stale(db: Executor, *, min_age: timedelta, now: datetime) -> bool:
    """ANALYZE dripd.step_executions when its statistics are missing or well out of date
    (autovacuum may be off or slow); True if this call ran it."""
    with translated():
        async with acquire(db) as conn:
            stats = await conn.fetchrow(Q.queue_stats)
            if stats is None:
                return False
            rows, modified, at = stats["live"], stats["modified"], stats["analyzed_at"]
            if at is None:
                stale = rows + modified >= 1000
            else:
                stale = modified >= max(10_000, rows // 10) and now - at >= min_age
            if not stale:
                return False
            async with conn.transaction():
                if not await conn.fetchval(Q.analyze_queue):
                    return False
                await conn.execute("ANALYZE dripd.step_executions")
            return True


# --- authoring ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class StepRow:
    key: str
    position: int
    channel: str | None
    delay: timedelta
    template: dict[str, str]
    adapter: str | None
    on_failure: str
    max_attempts: int | None
    at_time: time | None = None
    cron: str | None = None
    timezone: str | None = None
    wait_event: str | None = None
    wait_timeout: timedelta | None = None
    on_timeout: str | None = None
    when: str | None = None
    send_window: dict[str, Any] | None = None
    require_verified: bool = False
    max_length: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TransitionRow:
    from_key: str
    to_key: str | None
    priority: int
    when: str | None
    position: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class VersionRow:
    tenant_key: str | None
    key: str
    name: str | None
    mode: str
    timezone: str | None
    reenroll: str
    entry_events: list[str]
    exit_events: list[str]
    on_no_match: str
    hooks: dict[str, Any]
    send_window: dict[str, Any] | None
    content_hash: str
    source: dict[str, Any]
    steps: list[StepRow]
    transitions: list[TransitionRow]


@dataclass(frozen=True, slots=True, kw_only=True)
class Applied:
    key: str
    tenant_key: str | None
    version: int
    created: bool


async def apply_version(conn: Connection, spec: VersionRow, *, now: datetime) -> Applied:
    """Create and activate a new version unless the active one has the same content."""
    sequence_id = await conn.fetchval(Q.upsert_sequence, spec.tenant_key, spec.key)
    await conn.fetchval(Q.lock_sequence, sequence_id)
    active = await conn.fetchrow(Q.active_version, sequence_id)
    if active is not None and active["content_hash"] == spec.content_hash:
        return Applied(
            key=spec.key, tenant_key=spec.tenant_key, version=active["version"], created=False
        )
    await conn.execute(Q.archive_versions, sequence_id)
    version = await conn.fetchrow(
        Q.insert_version,
        sequence_id,
        spec.name,
        spec.mode,
        spec.timezone,
        spec.reenroll,
        spec.entry_events,
        spec.exit_events,
        spec.content_hash,
        _encode_json(spec.source),
        now,
        spec.on_no_match,
        _encode_json(spec.hooks),
        None if spec.send_window is None else _encode_json(spec.send_window),
    )
    steps = spec.steps
    inserted = await conn.fetch(
        Q.insert_steps,
        version["id"],
        [s.key for s in steps],
        [s.position for s in steps],
        [s.channel for s in steps],
        [s.delay for s in steps],
        [_encode_json(s.template) for s in steps],
        [s.adapter for s in steps],
        [s.on_failure for s in steps],
        [s.max_attempts for s in steps],
        [s.at_time for s in steps],
        [s.cron for s in steps],
        [s.timezone for s in steps],
        [s.wait_event for s in steps],
        [s.wait_timeout for s in steps],
        [s.on_timeout for s in steps],
        [s.when for s in steps],
        [None if s.send_window is None else _encode_json(s.send_window) for s in steps],
        [s.require_verified for s in steps],
        [s.max_length for s in steps],
    )
    ids = {r["key"]: r["id"] for r in inserted}
    if spec.transitions:
        ts = spec.transitions
        await conn.execute(
            Q.insert_transitions,
            version["id"],
            [ids[t.from_key] for t in ts],
            [ids[t.to_key] if t.to_key else None for t in ts],
            [t.priority for t in ts],
            [t.when for t in ts],
            [t.position for t in ts],
        )
    return Applied(
        key=spec.key, tenant_key=spec.tenant_key, version=version["version"], created=True
    )


# --- enrollments, events, suppressions ---------------------------------------------------


async def find_sequence(conn: Connection, tenant: str | None, key: str) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(Q.find_sequence, tenant, key)
    return row


async def insert_enrollment(
    conn: Connection,
    *,
    tenant: str | None,
    sequence_id: uuid.UUID,
    version_id: uuid.UUID,
    subscriber_type: str,
    subscriber_id: str,
    data: dict[str, Any],
    timezone: str | None,
    now: datetime,
) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        Q.insert_enrollment,
        tenant,
        sequence_id,
        version_id,
        subscriber_type,
        subscriber_id,
        _encode_json(data),
        timezone,
        now,
    )
    return row


async def latest_enrollment(
    conn: Connection,
    tenant: str | None,
    sequence_id: uuid.UUID,
    subscriber_type: str,
    subscriber_id: str,
) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        Q.latest_enrollment, tenant, sequence_id, subscriber_type, subscriber_id
    )
    return row


async def previous_enrollment(
    conn: Connection,
    tenant: str | None,
    sequence_id: uuid.UUID,
    subscriber_type: str,
    subscriber_id: str,
    new_id: uuid.UUID,
) -> str | None:
    status: str | None = await conn.fetchval(
        Q.previous_enrollment, tenant, sequence_id, subscriber_type, subscriber_id, new_id
    )
    return status


async def insert_execution(
    conn: Connection,
    tenant: str | None,
    enrollment_id: uuid.UUID,
    step_id: uuid.UUID,
    due_at: datetime,
    *,
    now: datetime,
    waiting_for: str | None = None,
) -> uuid.UUID:
    new_id: uuid.UUID = await conn.fetchval(
        Q.insert_execution, tenant, enrollment_id, step_id, due_at, waiting_for, now
    )
    return new_id


async def notify_due(conn: Connection, due_at: datetime) -> None:
    await conn.execute("SELECT pg_notify('dripd_due', $1)", due_at.isoformat())


async def notify_adapters(conn: Connection) -> None:
    await conn.execute("SELECT pg_notify('dripd_adapters', '')")


async def get_enrollment(
    conn: Connection, tenant: str | None, enrollment_id: uuid.UUID
) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(Q.get_enrollment, tenant, enrollment_id)
    return row


async def set_enrollment_status(
    conn: Connection,
    tenant: str | None,
    enrollment_id: uuid.UUID,
    status: str,
    allowed_from: Sequence[str],
    reason: str | None,
    now: datetime,
) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        Q.set_enrollment_status, tenant, enrollment_id, status, list(allowed_from), reason, now
    )
    return row


async def hold_pending(conn: Connection, enrollment_id: uuid.UUID) -> None:
    await conn.execute(Q.hold_pending, enrollment_id)


async def release_held(conn: Connection, enrollment_id: uuid.UUID) -> datetime | None:
    at: datetime | None = await conn.fetchval(Q.release_held, enrollment_id)
    return at


async def skip_pending(
    conn: Connection, enrollment_id: uuid.UUID, reason: str, now: datetime
) -> None:
    await conn.execute(Q.skip_pending, enrollment_id, reason, now)


async def insert_event(
    conn: Connection,
    *,
    tenant: str | None,
    subscriber_type: str,
    subscriber_id: str,
    key: str,
    data: dict[str, Any],
    idempotency_id: str | None,
    now: datetime,
) -> tuple[int, bool]:
    """Returns (event id, created); a repeated idempotency id returns the first event."""
    new_id = await conn.fetchval(
        Q.insert_event,
        tenant,
        subscriber_type,
        subscriber_id,
        key,
        _encode_json(data),
        idempotency_id,
        now,
    )
    if new_id is not None:
        return int(new_id), True
    old_id = await conn.fetchval(
        Q.find_event, tenant, subscriber_type, subscriber_id, idempotency_id
    )
    return int(old_id), False


async def insert_suppression(
    conn: Connection,
    *,
    tenant: str | None,
    channel: str,
    address: str,
    reason: str,
    source: str | None,
    now: datetime,
) -> asyncpg.Record:
    row: asyncpg.Record = await conn.fetchrow(
        Q.insert_suppression, tenant, channel, address, reason, source, now
    )
    return row


async def replay(
    conn: Connection,
    execution_id: uuid.UUID,
    *,
    tenant: str | None,
    any_tenant: bool,
    now: datetime,
) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        Q.replay, tenant, execution_id, any_tenant, now
    )
    return row


async def execution_status(conn: Connection, execution_id: uuid.UUID) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(Q.execution_status, execution_id)
    return row


# --- adapters ----------------------------------------------------------------------------


async def insert_adapter(
    conn: Connection,
    *,
    adapter_id: uuid.UUID,
    tenant: str | None,
    name: str,
    channel: str,
    provider: str,
    config: dict[str, Any],
    credentials: bytes | None,
    is_default: bool,
    now: datetime,
) -> asyncpg.Record:
    if is_default:
        await conn.execute(Q.clear_default_adapter, tenant, channel)
    row: asyncpg.Record = await conn.fetchrow(
        Q.insert_adapter,
        adapter_id,
        tenant,
        name,
        channel,
        provider,
        _encode_json(config),
        credentials,
        is_default,
        now,
    )
    return row


async def list_adapters(
    conn: Connection, tenant: str | None, *, all_tenants: bool
) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(Q.list_adapters, tenant, all_tenants)
    return rows


async def disable_adapter(
    conn: Connection, tenant: str | None, name: str, now: datetime
) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(Q.disable_adapter, tenant, name, now)
    return row


async def lock_credentials(conn: Connection) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(Q.lock_credentials)
    return rows


async def set_credentials(
    conn: Connection, adapter_id: uuid.UUID, blob: bytes, now: datetime
) -> None:
    await conn.execute(Q.set_credentials, adapter_id, blob, now)


# --- flow: events that enroll, exit and release; secrets for hooks ------------------------


async def exit_enrollments(
    conn: Connection,
    tenant: str | None,
    subscriber_type: str,
    subscriber_id: str,
    key: str,
    now: datetime,
) -> list[uuid.UUID]:
    rows = await conn.fetch(Q.exit_enrollments, tenant, subscriber_type, subscriber_id, key, now)
    return [r["id"] for r in rows]


async def release_waits(
    conn: Connection,
    tenant: str | None,
    subscriber_type: str,
    subscriber_id: str,
    key: str,
    event_id: int,
    now: datetime,
) -> list[uuid.UUID]:
    rows = await conn.fetch(
        Q.release_waits, tenant, subscriber_type, subscriber_id, key, event_id, now
    )
    return [r["id"] for r in rows]


async def entry_sequences(conn: Connection, tenant: str | None, key: str) -> list[str]:
    rows = await conn.fetch(Q.entry_sequences, tenant, key)
    return [r["key"] for r in rows]


async def event_stats(
    db: Executor, subscribers: Sequence[tuple[str | None, str, str]], keys: Sequence[str]
) -> dict[int, dict[str, tuple[int, datetime]]]:
    """Per subscriber index (0-based): event key → (count, last occurred_at)."""
    if not subscribers or not keys:
        return {}
    tenants, types, ids = (list(col) for col in zip(*subscribers, strict=True))
    with translated():
        async with acquire(db) as conn:
            rows = await conn.fetch(Q.event_stats, tenants, types, ids, list(keys))
    stats: dict[int, dict[str, tuple[int, datetime]]] = {}
    for r in rows:
        stats.setdefault(int(r["n"]) - 1, {})[r["key"]] = (int(r["count"]), r["last_at"])
    return stats


async def upsert_secret(
    conn: Connection,
    secret_id: uuid.UUID,
    tenant: str | None,
    name: str,
    blob: bytes,
    now: datetime,
) -> asyncpg.Record:
    row: asyncpg.Record = await conn.fetchrow(Q.upsert_secret, secret_id, tenant, name, blob, now)
    return row


async def secret_row(db: Executor, tenant: str | None, name: str) -> asyncpg.Record | None:
    with translated():
        async with acquire(db) as conn:
            row: asyncpg.Record | None = await conn.fetchrow(Q.secret_row, tenant, name)
            return row


async def list_secrets(db: Executor, tenant: str | None, *, every: bool) -> list[asyncpg.Record]:
    with translated():
        async with acquire(db) as conn:
            rows: list[asyncpg.Record] = await conn.fetch(Q.list_secrets, tenant, every)
            return rows


async def delete_secret(db: Executor, tenant: str | None, name: str) -> bool:
    with translated():
        async with acquire(db) as conn:
            return await conn.fetchval(Q.delete_secret, tenant, name) is not None


async def lock_secrets(conn: Connection) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(Q.lock_secrets)
    return rows


async def set_secret(conn: Connection, secret_id: uuid.UUID, blob: bytes, now: datetime) -> None:
    await conn.execute(Q.set_secret, secret_id, blob, now)


async def active_hooks(db: Executor) -> list[dict[str, Any]]:
    with translated():
        async with acquire(db) as conn:
            return [dict(json_value(r["hooks"])) for r in await conn.fetch(Q.active_hooks)]


# --- sending rules: quotas, adapter pauses -------------------------------------------------


async def quota_reserve(
    db: Executor, buckets: Sequence[tuple[str, datetime, int]], count: int
) -> int:
    """Reserve up to `count` sends in every (bucket, period start, limit) at once; returns
    how many were granted (each granted send holds a place in every bucket)."""
    keys = [b[0] for b in buckets]
    starts = [b[1] for b in buckets]
    with translated():
        async with acquire(db) as conn, conn.transaction():
            await conn.execute(Q.quota_open, keys, starts)
            granted = await conn.fetchval(
                Q.quota_take, keys, starts, [b[2] for b in buckets], count
            )
    return int(granted or 0)


async def quota_release(
    db: Executor, buckets: Sequence[tuple[str, datetime]], count: int = 1
) -> None:
    with translated():
        async with acquire(db) as conn:
            await conn.execute(
                Q.quota_release, [b[0] for b in buckets], [b[1] for b in buckets], count
            )


async def adapter_rates(db: Executor, since: datetime) -> list[asyncpg.Record]:
    with translated():
        async with acquire(db) as conn:
            rows: list[asyncpg.Record] = await conn.fetch(Q.adapter_rates, since)
            return rows


async def pause_adapter(
    conn: Connection, adapter_id: uuid.UUID, reason: str, now: datetime
) -> bool:
    return await conn.fetchval(Q.pause_adapter, adapter_id, reason, now) is not None


async def resume_adapter(
    db: Executor, tenant: str | None, name: str, now: datetime
) -> asyncpg.Record | None:
    with translated():
        async with transaction(db) as conn:
            row: asyncpg.Record | None = await conn.fetchrow(Q.resume_adapter, tenant, name, now)
            if row is not None:
                await notify_adapters(conn)
            return row


async def purge_quota_ledger(db: Executor, before: datetime) -> int:
    with translated():
        async with acquire(db) as conn:
            status: str = await conn.execute(Q.purge_quota_ledger, before)
    return int(status.rsplit(" ", 1)[-1])
