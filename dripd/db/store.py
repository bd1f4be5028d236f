"""The only code that runs SQL: named statements from sql/*.sql, asyncpg errors translated here."""

from __future__ import annotations

import contextlib
import functools
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, time, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeAlias, TypeVar

import asyncpg
import msgspec

from dripd.db.migrate import NOT_INSTALLED
from dripd.errors import ConfigError, Conflict, DatabaseError, DripdError, Refused, SchemaError
from dripd.model import ClaimedExecution, EnrollmentStatus, VersionStepRow
from dripd.redaction import Redactor, dsn_secrets

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

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

# SQLSTATEs after which the same statement may well succeed: the server shutting down,
# crashing, starting up or failing over (a standby refuses writes), a cancelled statement,
# exhausted resources, and the conflicts a retry resolves (serialization failures,
# deadlocks, lock timeouts). They are DatabaseError ("retry later"), never Refused, so no
# caller gives up on an outcome or a claim because Postgres restarted under it.
_RETRY_SQLSTATES = frozenset(
    {
        "57P01",  # admin_shutdown
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now: starting up or shutting down
        "57014",  # query_canceled
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "55P03",  # lock_not_available
        "53000",  # insufficient_resources
        "53100",  # disk_full
        "53200",  # out_of_memory
        "53300",  # too_many_connections
        "53400",  # configuration_limit_exceeded
        "25006",  # read_only_sql_transaction: failed over to (or still on) a standby
    }
)
# Of those, the ones after which the connection is useless (its server is going away or
# can no longer write): the pool must open a fresh one.
_DROP_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "25006"})


def _sqlstate(exc: BaseException) -> str:
    state = getattr(exc, "sqlstate", None)
    return state if isinstance(state, str) else ""


def retryable(exc: BaseException) -> bool:
    """Whether a driver error means "try again": a lost connection (class 08 too) or one of
    the SQLSTATEs above."""
    state = _sqlstate(exc)
    return (
        isinstance(exc, _CONNECTION_ERRORS) or state.startswith("08") or state in _RETRY_SQLSTATES
    )


def _unusable(exc: BaseException) -> bool:
    state = _sqlstate(exc)
    return isinstance(exc, _CONNECTION_ERRORS) or state.startswith("08") or state in _DROP_SQLSTATES


@dataclass(frozen=True, slots=True)
class Queries:
    """Every statement dripd runs, one file each, loaded once at import."""

    active_hooks: str
    active_templates: str
    active_version: str
    adapter_rates: str
    analyze_queue: str
    archive_versions: str
    backlog: str
    claim: str
    clear_default_adapter: str
    click_stats: str
    db_now: str
    delete_secret: str
    disable_adapter: str
    lock_adapter: str
    update_adapter: str
    release_paused: str
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
    lanes: str
    latest_enrollment: str
    list_adapters: str
    list_secrets: str
    load_adapters: str
    load_versions: str
    lock_credentials: str
    lock_secrets: str
    lock_sequence: str
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
    released_events: str
    renew: str
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


def encode_json(value: Any) -> str:
    # Writes pass JSON as text cast in SQL (`$n::text::jsonb`) so they work on any
    # connection, including a host application's that lacks dripd's jsonb codec.
    return _json_encode(value).decode()


def json_value(value: Any) -> Any:
    """A jsonb column's value, whether or not the connection has dripd's codec (host apps')."""
    return _json_decode(value) if isinstance(value, str | bytes) else value


#: Field metadata of a row type: the column is jsonb, read through `json_value`.
JSONB: Final = {"convert": json_value}

_Row = TypeVar("_Row", bound="DataclassInstance")


@functools.cache
def _columns(cls: type[DataclassInstance]) -> tuple[tuple[str, Callable[[Any], Any] | None], ...]:
    return tuple((f.name, f.metadata.get("convert")) for f in fields(cls))


def from_record(cls: type[_Row], record: Mapping[str, Any]) -> _Row:
    """A row type (a dataclass) from the columns of `record` named as its fields; other
    columns are left out. A field whose metadata has a `convert` function (see `JSONB`)
    gets its column's value through it."""
    return cls(
        **{
            name: record[name] if convert is None else convert(record[name])
            for name, convert in _columns(cls)
        }
    )


async def init_connection(conn: Connection) -> None:
    """Teach a connection to move jsonb as Python values through msgspec."""
    await conn.set_type_codec(
        "jsonb", encoder=encode_json, decoder=_json_decode, schema="pg_catalog", format="text"
    )
    await conn.set_type_codec(
        "json", encoder=encode_json, decoder=_json_decode, schema="pg_catalog", format="text"
    )


async def connect(dsn: str, *, timeout: float = 10.0) -> Connection:
    """One connection with dripd's codecs; errors become DatabaseError."""
    try:
        conn = await asyncpg.connect(dsn, timeout=timeout)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise DatabaseError(f"cannot connect to Postgres: {_describe(exc)}") from exc
    except ValueError as exc:  # asyncpg's ClientConfigurationError too
        raise _bad_dsn(dsn, exc) from None
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
    except ValueError as exc:  # asyncpg's ClientConfigurationError too
        raise _bad_dsn(dsn, exc) from None
    assert pool is not None
    return pool


def _bad_dsn(dsn: str, exc: ValueError) -> ConfigError:
    """The driver refused the DSN itself (config.check_dsn lets few such through): say so
    without its password, which the driver's message may quote (a bad query string)."""
    text = Redactor(dsn_secrets(dsn))(_describe(exc))
    return ConfigError(f"the database DSN is invalid: {text}")


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
            except (*_CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                if _unusable(exc):
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
    except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError) as exc:
        # Postgres names the missing relation or schema only in the message: every dripd
        # statement qualifies its relations with the schema `dripd`.
        if '"dripd.' in exc.message or 'schema "dripd"' in exc.message:
            raise SchemaError(NOT_INSTALLED) from exc
        raise Refused(f"Postgres refused: {_describe(exc)}") from exc
    except _CONNECTION_ERRORS as exc:
        raise DatabaseError(f"lost the database connection: {_describe(exc)}") from exc
    except asyncpg.PostgresError as exc:
        if retryable(exc):
            raise DatabaseError(
                f"the database cannot serve this now ({_sqlstate(exc)}): {_describe(exc)}"
            ) from exc
        raise Refused(f"Postgres refused: {_describe(exc)}") from exc


# --- the worker's statements -------------------------------------------------------------


async def db_now(db: Executor) -> datetime:
    """The database server's clock (`clock_timestamp()`), aware UTC."""
    with translated():
        async with acquire(db) as conn:
            now: datetime = await conn.fetchval(Q.db_now)
            return now


@dataclass(frozen=True, slots=True, kw_only=True)
class LaneRow:
    """A lane with pending work and when its next row becomes claimable."""

    lane: str
    at: datetime


async def lanes(db: Executor) -> list[LaneRow]:
    """Every lane with pending rows (held rows of paused enrollments aside), with the
    instant its oldest becomes claimable: one index probe per lane (lanes.sql)."""
    with translated():
        async with acquire(db) as conn:
            rows = await conn.fetch(Q.lanes)
    return [LaneRow(lane=r["lane"], at=r["at"]) for r in rows]


async def claim(
    db: Executor,
    *,
    lanes: Sequence[tuple[str, int]],
    now: datetime,
    token: uuid.UUID,
    lease_until: datetime,
    daemon: str,
) -> list[ClaimedExecution]:
    """Claim up to `limit` due rows of each (lane, limit), oldest first, under one claim
    token and lease (claim.sql); returns them with what the pipeline needs, a released
    wait with its event (read again when it committed while the claim ran)."""
    if not lanes:
        return []
    names, limits = [lane for lane, _ in lanes], [n for _, n in lanes]
    with translated():
        async with acquire(db) as conn:
            rows = await conn.fetch(Q.claim, names, limits, now, token, lease_until, daemon)
            unseen = [r["event_id"] for r in rows if r["event_id"] is not None and not r["event"]]
            late = dict(await conn.fetch(Q.released_events, unseen)) if unseen else {}
    return [
        ClaimedExecution(
            id=r["id"],
            claim_token=token,
            enrollment_id=r["enrollment_id"],
            step_id=r["step_id"],
            tenant_key=r["tenant_key"],
            lane=r["lane"],
            due_at=r["due_at"],
            attempt=r["attempt"],
            replay=r["replay"],
            advance=r["advance"],
            enrollment_status=EnrollmentStatus(r["enrollment_status"]),
            subscriber_type=r["subscriber_type"],
            subscriber_id=r["subscriber_id"],
            data=r["data"],
            timezone=r["timezone"],
            created_at=r["created_at"],
            event=_released_by(r["event"] or late.get(r["event_id"])),
        )
        for r in rows
    ]


def _released_by(value: Any) -> dict[str, Any] | None:
    """The event that released a wait, as claimed (jsonb), with its time a datetime."""
    if value is None:
        return None
    event = dict(json_value(value))
    event["occurred_at"] = datetime.fromisoformat(event["occurred_at"])
    return event


async def renew(
    db: Executor, held: Sequence[tuple[uuid.UUID, uuid.UUID]], lease_until: datetime
) -> set[uuid.UUID]:
    """Extend the lease of each held (id, claim token) to `lease_until` in one statement;
    returns the ids still held under their token (the others were lost)."""
    if not held:
        return set()
    ids, tokens = [i for i, _ in held], [t for _, t in held]
    with translated():
        async with acquire(db) as conn:
            rows = await conn.fetch(Q.renew, ids, tokens, lease_until)
    return {r["id"] for r in rows}


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
    return {r[0] for r in owned}


async def release(db: Executor, ids: Sequence[uuid.UUID], token: uuid.UUID) -> int:
    with translated():
        async with acquire(db) as conn:
            status: str = await conn.execute(Q.release, list(ids), token)
    return int(status.rsplit(" ", 1)[-1])


@dataclass(frozen=True, slots=True, kw_only=True)
class _Backlog:
    due: int
    oldest_due_at: datetime | None


async def backlog(db: Executor, now: datetime) -> tuple[int, datetime | None]:
    with translated():
        async with acquire(db) as conn:
            row = from_record(_Backlog, await conn.fetchrow(Q.backlog, now))
    return int(row.due), row.oldest_due_at


async def load_versions(db: Executor, step_ids: Sequence[uuid.UUID]) -> list[VersionStepRow]:
    """Every step of the versions that own `step_ids`, by version and position."""
    with translated():
        async with acquire(db) as conn:
            rows = await conn.fetch(Q.load_versions, list(step_ids))
    return [from_record(VersionStepRow, r) for r in rows]


async def suppressed(db: Executor, keys: Sequence[tuple[str | None, str, str]]) -> set[int]:
    """Indexes (0-based) of the (tenant, channel, address) keys that are suppressed."""
    if not keys:
        return set()
    tenants, channels, addresses = (list(col) for col in zip(*keys, strict=True))
    with translated():
        async with acquire(db) as conn:
            rows = await conn.fetch(Q.suppressed, tenants, channels, addresses)
    return {int(r[0]) - 1 for r in rows}


@dataclass(frozen=True, slots=True, kw_only=True)
class EnabledAdapterRow:
    """An enabled adapter as the daemon loads it, its credentials still sealed."""

    id: uuid.UUID
    tenant_key: str | None
    name: str
    channel: str
    provider: str
    config: dict[str, Any] = field(metadata=JSONB)
    credentials: bytes | None
    is_default: bool
    paused_reason: str | None


async def load_adapters(db: Executor) -> list[EnabledAdapterRow]:
    """Every enabled adapter (load_adapters.sql)."""
    with translated():
        async with acquire(db) as conn:
            rows = await conn.fetch(Q.load_adapters)
    return [from_record(EnabledAdapterRow, r) for r in rows]


@dataclass(frozen=True, slots=True, kw_only=True)
class _QueueStats:
    live: int
    modified: int
    analyzed_at: datetime | None


async def analyze_queue_if_stale(db: Executor, *, min_age: timedelta, now: datetime) -> bool:
    """ANALYZE dripd.step_executions when its statistics are missing or well out of date
    (autovacuum may be off or slow); True if this call ran it."""
    with translated():
        async with acquire(db) as conn:
            found = await conn.fetchrow(Q.queue_stats)
            if found is None:
                return False
            stats = from_record(_QueueStats, found)
            rows, modified, at = stats.live, stats.modified, stats.analyzed_at
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
    spintax: bool = False
    python_template: str | None = None
    vars: dict[str, Any] | None = None
    short_links: dict[str, Any] | None = None  # a ShortLinkRules table as written


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
    vars: dict[str, Any] | None = None
    short_links: dict[str, Any] | None = None  # a ShortLinkRules table as written
    warnings: tuple[str, ...] = ()  # what apply accepts but the author should know


@dataclass(frozen=True, slots=True, kw_only=True)
class Applied:
    key: str
    tenant_key: str | None
    version: int
    created: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class _VersionId:
    id: uuid.UUID
    version: int


@dataclass(frozen=True, slots=True, kw_only=True)
class _ActiveVersion:
    version: int
    content_hash: str


@dataclass(frozen=True, slots=True, kw_only=True)
class _StepId:
    id: uuid.UUID
    key: str


async def apply_version(conn: Connection, spec: VersionRow, *, now: datetime) -> Applied:
    """Create and activate a new version unless the active one has the same content."""
    sequence_id = await conn.fetchval(Q.upsert_sequence, spec.tenant_key, spec.key)
    await conn.fetchval(Q.lock_sequence, sequence_id)
    found = await conn.fetchrow(Q.active_version, sequence_id)
    active = None if found is None else from_record(_ActiveVersion, found)
    if active is not None and active.content_hash == spec.content_hash:
        return Applied(
            key=spec.key, tenant_key=spec.tenant_key, version=active.version, created=False
        )
    await conn.execute(Q.archive_versions, sequence_id)
    inserted_version = await conn.fetchrow(
        Q.insert_version,
        sequence_id,
        spec.name,
        spec.mode,
        spec.timezone,
        spec.reenroll,
        spec.entry_events,
        spec.exit_events,
        spec.content_hash,
        encode_json(spec.source),
        now,
        spec.on_no_match,
        encode_json(spec.hooks),
        None if spec.send_window is None else encode_json(spec.send_window),
        None if spec.vars is None else encode_json(spec.vars),
        None if spec.short_links is None else encode_json(spec.short_links),
    )
    version = from_record(_VersionId, inserted_version)
    steps = spec.steps
    inserted = await conn.fetch(
        Q.insert_steps,
        version.id,
        [s.key for s in steps],
        [s.position for s in steps],
        [s.channel for s in steps],
        [s.delay for s in steps],
        [encode_json(s.template) for s in steps],
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
        [None if s.send_window is None else encode_json(s.send_window) for s in steps],
        [s.require_verified for s in steps],
        [s.max_length for s in steps],
        [s.spintax for s in steps],
        [s.python_template for s in steps],
        [None if s.vars is None else encode_json(s.vars) for s in steps],
        [None if s.short_links is None else encode_json(s.short_links) for s in steps],
    )
    ids = {step.key: step.id for step in (from_record(_StepId, r) for r in inserted)}
    if spec.transitions:
        ts = spec.transitions
        await conn.execute(
            Q.insert_transitions,
            version.id,
            [ids[t.from_key] for t in ts],
            [ids[t.to_key] if t.to_key else None for t in ts],
            [t.priority for t in ts],
            [t.when for t in ts],
            [t.position for t in ts],
        )
    return Applied(key=spec.key, tenant_key=spec.tenant_key, version=version.version, created=True)


# --- enrollments, events, suppressions ---------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SequenceRow:
    """A sequence with its active version and that version's first step (find_sequence.sql).
    The version's columns are None when it has no active version, the step's when it has
    no step."""

    sequence_id: uuid.UUID
    sequence_tenant: str | None
    sequence_key: str
    version_id: uuid.UUID | None
    reenroll: str | None
    timezone: str | None
    hooks: dict[str, Any] | None = field(metadata=JSONB)
    first_step_id: uuid.UUID | None
    first_delay: timedelta | None
    at_time: time | None
    cron: str | None
    step_timezone: str | None
    wait_event: str | None
    wait_timeout: timedelta | None


async def find_sequence(conn: Connection, tenant: str | None, key: str) -> SequenceRow | None:
    """The tenant's own sequence `key`, else the global one; None if neither exists."""
    with translated():
        row = await conn.fetchrow(Q.find_sequence, tenant, key)
    return None if row is None else from_record(SequenceRow, row)


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
) -> uuid.UUID | None:
    """The new enrollment's id; None when the subscriber has a live one in the sequence."""
    new_id: uuid.UUID | None = await conn.fetchval(
        Q.insert_enrollment,
        tenant,
        sequence_id,
        version_id,
        subscriber_type,
        subscriber_id,
        encode_json(data),
        timezone,
        now,
    )
    return new_id


async def latest_enrollment(
    conn: Connection,
    tenant: str | None,
    sequence_id: uuid.UUID,
    subscriber_type: str,
    subscriber_id: str,
) -> uuid.UUID | None:
    """The id of the subscriber's live enrollment in the sequence, else of the newest one."""
    found: uuid.UUID | None = await conn.fetchval(
        Q.latest_enrollment, tenant, sequence_id, subscriber_type, subscriber_id
    )
    return found


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


@dataclass(frozen=True, slots=True, kw_only=True)
class EnrollmentRow:
    """An enrollment with its sequence key, version number and pending step, if any
    (get_enrollment.sql)."""

    id: uuid.UUID
    tenant_key: str | None
    sequence_key: str
    version: int
    subscriber_type: str
    subscriber_id: str
    status: EnrollmentStatus = field(metadata={"convert": EnrollmentStatus})
    status_reason: str | None
    data: dict[str, Any] = field(metadata=JSONB)
    timezone: str | None
    created_at: datetime
    ended_at: datetime | None
    pending_step_key: str | None
    pending_due_at: datetime | None


async def get_enrollment(
    conn: Connection, tenant: str | None, enrollment_id: uuid.UUID
) -> EnrollmentRow | None:
    """One enrollment in the tenant scope; None if there is none."""
    row = await conn.fetchrow(Q.get_enrollment, tenant, enrollment_id)
    return None if row is None else from_record(EnrollmentRow, row)


async def set_enrollment_status(
    conn: Connection,
    tenant: str | None,
    enrollment_id: uuid.UUID,
    status: str,
    allowed_from: Sequence[str],
    reason: str | None,
    now: datetime,
) -> bool:
    """Move the enrollment to `status` if it is in one of `allowed_from`; whether it moved."""
    moved = await conn.fetchval(
        Q.set_enrollment_status, tenant, enrollment_id, status, list(allowed_from), reason, now
    )
    return moved is not None


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
        encode_json(data),
        idempotency_id,
        now,
    )
    if new_id is not None:
        return int(new_id), True
    old_id = await conn.fetchval(
        Q.find_event, tenant, subscriber_type, subscriber_id, idempotency_id
    )
    return int(old_id), False


@dataclass(frozen=True, slots=True, kw_only=True)
class SuppressionRow:
    """A suppression as stored; `created` is false when it existed before."""

    id: uuid.UUID
    tenant_key: str | None
    channel: str
    address: str
    reason: str
    source: str | None
    created_at: datetime
    created: bool


async def insert_suppression(
    conn: Connection,
    *,
    tenant: str | None,
    channel: str,
    address: str,
    reason: str,
    source: str | None,
    now: datetime,
) -> SuppressionRow:
    """Suppress an address, given in its one spelling (`dripd.addresses.normalize`, as
    `api.suppress` and the send path pass it); an existing suppression keeps its reason."""
    row = await conn.fetchrow(Q.insert_suppression, tenant, channel, address, reason, source, now)
    return from_record(SuppressionRow, row)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplayedRow:
    """A failed execution scheduled again; `advance`: its send continues the flow."""

    id: uuid.UUID
    replay: int
    advance: bool
    enrollment_id: uuid.UUID


async def replay(
    conn: Connection,
    execution_id: uuid.UUID,
    *,
    tenant: str | None,
    any_tenant: bool,
    now: datetime,
) -> ReplayedRow | None:
    """Schedule a failed execution again (replay.sql); None unless it is failed and in scope."""
    row = await conn.fetchrow(Q.replay, tenant, execution_id, any_tenant, now)
    return None if row is None else from_record(ReplayedRow, row)


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecutionStatusRow:
    id: uuid.UUID
    status: str
    tenant_key: str | None


async def execution_status(conn: Connection, execution_id: uuid.UUID) -> ExecutionStatusRow | None:
    row = await conn.fetchrow(Q.execution_status, execution_id)
    return None if row is None else from_record(ExecutionStatusRow, row)


# --- adapters ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class AdapterRow:
    """An adapter as `dripd adapter` shows it: never its credentials."""

    id: uuid.UUID
    tenant_key: str | None
    name: str
    channel: str
    provider: str
    config: dict[str, Any] = field(metadata=JSONB)
    is_default: bool
    enabled: bool
    paused_reason: str | None  # paused by a threshold or by its provider, until resumed
    created_at: datetime


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
) -> AdapterRow:
    if is_default:
        await conn.execute(Q.clear_default_adapter, tenant, channel)
    row = await conn.fetchrow(
        Q.insert_adapter,
        adapter_id,
        tenant,
        name,
        channel,
        provider,
        encode_json(config),
        credentials,
        is_default,
        now,
    )
    return from_record(AdapterRow, row)


async def list_adapters(
    conn: Connection, tenant: str | None, *, all_tenants: bool
) -> list[AdapterRow]:
    with translated():
        rows = await conn.fetch(Q.list_adapters, tenant, all_tenants)
    return [from_record(AdapterRow, r) for r in rows]


async def disable_adapter(
    conn: Connection, tenant: str | None, name: str, now: datetime
) -> AdapterRow | None:
    row = await conn.fetchrow(Q.disable_adapter, tenant, name, now)
    return None if row is None else from_record(AdapterRow, row)


@dataclass(frozen=True, slots=True, kw_only=True)
class LockedAdapterRow:
    """An adapter with its sealed credentials, locked for `dripd adapter update`."""

    id: uuid.UUID
    tenant_key: str | None
    name: str
    channel: str
    provider: str
    config: dict[str, Any] = field(metadata=JSONB)
    credentials: bytes | None
    is_default: bool
    enabled: bool


async def lock_adapter(conn: Connection, tenant: str | None, name: str) -> LockedAdapterRow | None:
    row = await conn.fetchrow(Q.lock_adapter, tenant, name)
    return None if row is None else from_record(LockedAdapterRow, row)


async def update_adapter(
    conn: Connection,
    adapter: LockedAdapterRow,
    *,
    config: dict[str, Any],
    credentials: bytes | None,
    is_default: bool,
    enabled: bool,
    now: datetime,
) -> AdapterRow:
    """Write an adapter's config, sealed credentials, default and enabled state; a default
    that is enabled replaces the tenant's other default for the channel."""
    if is_default and enabled:
        await conn.execute(Q.clear_default_adapter, adapter.tenant_key, adapter.channel)
    row = await conn.fetchrow(
        Q.update_adapter, adapter.id, encode_json(config), credentials, is_default, enabled, now
    )
    return from_record(AdapterRow, row)


@dataclass(frozen=True, slots=True, kw_only=True)
class SealedCredentialsRow:
    """An adapter's encrypted credentials, locked for `dripd rotate-key`."""

    id: uuid.UUID
    tenant_key: str | None
    name: str
    credentials: bytes


async def lock_credentials(conn: Connection) -> list[SealedCredentialsRow]:
    rows = await conn.fetch(Q.lock_credentials)
    return [from_record(SealedCredentialsRow, r) for r in rows]


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
    return [r[0] for r in rows]


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
    return [r[0] for r in rows]


async def entry_sequences(conn: Connection, tenant: str | None, key: str) -> list[str]:
    rows = await conn.fetch(Q.entry_sequences, tenant, key)
    return [r[0] for r in rows]


@dataclass(frozen=True, slots=True, kw_only=True)
class _EventStat:
    n: int
    key: str
    count: int
    last_at: datetime


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
    for stat in (from_record(_EventStat, r) for r in rows):
        stats.setdefault(int(stat.n) - 1, {})[stat.key] = (int(stat.count), stat.last_at)
    return stats


@dataclass(frozen=True, slots=True)
class _ClickStat:
    enrollment_id: uuid.UUID
    count: int
    last_at: datetime | None
    last_step: str | None


async def click_stats(
    db: Executor, enrollment_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, dict[str, Any]]:
    """Per enrollment: its link clicks as conditions read them (`clicks.count`,
    `clicks.last_at`, `clicks.last_step`; 0 and nulls without any)."""
    if not enrollment_ids:
        return {}
    with translated():
        async with acquire(db) as conn:
            rows = await conn.fetch(Q.click_stats, list(enrollment_ids))
    return {
        stat.enrollment_id: {
            "count": int(stat.count),
            "last_at": stat.last_at,
            "last_step": stat.last_step,
        }
        for stat in (from_record(_ClickStat, r) for r in rows)
    }


async def upsert_secret(
    conn: Connection,
    secret_id: uuid.UUID,
    tenant: str | None,
    name: str,
    blob: bytes,
    now: datetime,
) -> bool:
    """Store a secret under `secret_id`, or replace the value of the one of that name;
    whether it was created."""
    created: bool = await conn.fetchval(Q.upsert_secret, secret_id, tenant, name, blob, now)
    return created


@dataclass(frozen=True, slots=True, kw_only=True)
class SecretRow:
    """A secret's encrypted value, under the id its encryption is bound to."""

    id: uuid.UUID
    tenant_key: str | None
    value: bytes


async def secret_row(db: Executor, tenant: str | None, name: str) -> SecretRow | None:
    """The tenant's own secret `name`, else the global one; None if neither exists."""
    with translated():
        async with acquire(db) as conn:
            row = await conn.fetchrow(Q.secret_row, tenant, name)
    return None if row is None else from_record(SecretRow, row)


@dataclass(frozen=True, slots=True, kw_only=True)
class SecretInfoRow:
    """A secret without its value."""

    tenant_key: str | None
    name: str
    created_at: datetime
    updated_at: datetime


async def list_secrets(db: Executor, tenant: str | None, *, every: bool) -> list[SecretInfoRow]:
    with translated():
        async with acquire(db) as conn:
            rows = await conn.fetch(Q.list_secrets, tenant, every)
    return [from_record(SecretInfoRow, r) for r in rows]


async def delete_secret(db: Executor, tenant: str | None, name: str) -> bool:
    with translated():
        async with acquire(db) as conn:
            return await conn.fetchval(Q.delete_secret, tenant, name) is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class SealedSecretRow:
    """A secret's encrypted value, locked for `dripd rotate-key`."""

    id: uuid.UUID
    tenant_key: str | None
    name: str
    value: bytes


async def lock_secrets(conn: Connection) -> list[SealedSecretRow]:
    rows = await conn.fetch(Q.lock_secrets)
    return [from_record(SealedSecretRow, r) for r in rows]


async def set_secret(conn: Connection, secret_id: uuid.UUID, blob: bytes, now: datetime) -> None:
    await conn.execute(Q.set_secret, secret_id, blob, now)


async def active_hooks(db: Executor) -> list[dict[str, Any]]:
    with translated():
        async with acquire(db) as conn:
            return [dict(json_value(r[0])) for r in await conn.fetch(Q.active_hooks)]


async def active_templates(db: Executor) -> list[str]:
    """The Python templates the steps of active versions name."""
    with translated():
        async with acquire(db) as conn:
            return [r[0] for r in await conn.fetch(Q.active_templates)]


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


@dataclass(frozen=True, slots=True, kw_only=True)
class AdapterRateRow:
    """What an enabled adapter sent since some time, and how much bounced or complained."""

    id: uuid.UUID
    tenant_key: str | None
    name: str
    paused_reason: str | None
    sent: int
    bounced: int
    complained: int


async def adapter_rates(db: Executor, since: datetime) -> list[AdapterRateRow]:
    """Per enabled adapter, its sends and their bounces and complaints since `since`."""
    with translated():
        async with acquire(db) as conn:
            rows = await conn.fetch(Q.adapter_rates, since)
    return [from_record(AdapterRateRow, r) for r in rows]


async def pause_adapter(
    conn: Connection, adapter_id: uuid.UUID, reason: str, now: datetime
) -> bool:
    return await conn.fetchval(Q.pause_adapter, adapter_id, reason, now) is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class ResumedAdapterRow:
    """An adapter whose threshold pause was lifted; `was_paused` is that pause's reason
    (None: it was not paused)."""

    id: uuid.UUID
    name: str
    tenant_key: str | None
    was_paused: str | None


async def resume_adapter(
    db: Executor, tenant: str | None, name: str, now: datetime
) -> ResumedAdapterRow | None:
    """Lift the adapter's pause (a threshold's or its provider's; idempotent), and make the
    executions the pause deferred due now; None if there is no such adapter."""
    with translated():
        async with transaction(db) as conn:
            row = await conn.fetchrow(Q.resume_adapter, tenant, name, now)
            if row is not None:
                await conn.execute(Q.release_paused, row["id"], now)
                await notify_adapters(conn)
    return None if row is None else from_record(ResumedAdapterRow, row)


async def purge_quota_ledger(db: Executor, before: datetime) -> int:
    with translated():
        async with acquire(db) as conn:
            status: str = await conn.execute(Q.purge_quota_ledger, before)
    return int(status.rsplit(" ", 1)[-1])
