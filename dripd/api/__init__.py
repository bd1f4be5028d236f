"""The Python API for host applications: enroll, track events, suppress, pause, resume.

Every function takes an asyncpg connection or pool and an explicit tenant scope
(`tenant=None` is the global scope, never "every tenant"). Given a connection inside
the caller's transaction, the work commits or rolls back with it.
"""

from __future__ import annotations

import uuid
import zoneinfo
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from enum import Enum, StrEnum
from typing import Any, Final, TypeAlias

import asyncpg
import email_validator
import phonenumbers

from dripd.addresses import InvalidAddress, mailbox, normalize, phone_key
from dripd.db import feedback, leads, store
from dripd.db.leads import DuplicateLead, LeadStatus
from dripd.errors import ConfigError, Conflict, NotFound
from dripd.inputs import InvalidInput, check_data, check_optional, check_text
from dripd.model import CHANNELS, EnrollmentStatus, check_due, check_instant, scheduling
from dripd.timing import Timing, next_due, zone

__all__ = [
    "ALL_TENANTS",
    "ConfirmOutcome",
    "DuplicateLead",
    "Enrollment",
    "Event",
    "InvalidAddress",
    "InvalidInput",
    "InvalidLead",
    "Lead",
    "LeadConfirmation",
    "LeadStatus",
    "MailboxLimited",
    "Replayed",
    "Suppression",
    "confirm_lead",
    "create_lead",
    "enroll",
    "expire_leads",
    "get_enrollment",
    "pause",
    "replay",
    "report",
    "resume",
    "suppress",
    "track_event",
    "unenroll",
]

Db: TypeAlias = asyncpg.Connection | asyncpg.Pool


class _AllTenants(Enum):
    ALL = "all"


#: Operator scope for `replay` from the control socket: any tenant's execution.
ALL_TENANTS: Final = _AllTenants.ALL

SUPPRESSION_REASONS = frozenset({"manual", "unsubscribe", "bounce", "complaint", "provider_block"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Enrollment:
    id: uuid.UUID
    tenant_key: str | None
    sequence_key: str
    version: int
    subscriber_type: str
    subscriber_id: str
    status: EnrollmentStatus
    status_reason: str | None
    data: dict[str, Any]
    timezone: str | None
    created_at: datetime
    ended_at: datetime | None
    next_step: str | None
    next_due_at: datetime | None
    created: bool = False

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """A tracked event and what it did (nothing, when its idempotency id was seen before)."""

    id: int
    created: bool
    enrolled: list[uuid.UUID] = field(default_factory=list)  # by entry_events
    not_enrolled: list[dict[str, str]] = field(default_factory=list)  # sequence, reason
    exited: list[uuid.UUID] = field(default_factory=list)  # by exit_events
    released: list[uuid.UUID] = field(default_factory=list)  # waiting executions released

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for name in ("enrolled", "exited", "released"):
            out[name] = [str(i) for i in out[name]]
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Suppression:
    tenant_key: str | None
    channel: str
    address: str
    reason: str
    created: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class Replayed:
    execution_id: uuid.UUID
    replay: int
    advances: bool

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


def _jsonable(value: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(item, uuid.UUID):
            item = str(item)
        elif isinstance(item, datetime):
            item = item.isoformat()
        elif isinstance(item, Enum):
            item = item.value
        out[key] = item
    return out


async def _now(db: Db, now: datetime | None) -> datetime:
    """`now` if given (checked: see `check_instant`), else the database's clock: one clock
    for every due time, whatever the host's clock says."""
    return check_instant(now, where="now") if now is not None else await store.db_now(db)


def _tenant(tenant: str | None) -> None:
    if tenant is not None and (not isinstance(tenant, str) or not tenant.strip()):
        raise ConfigError("tenant: must be a non-empty string, or None for the global scope")
    check_optional(tenant, field="tenant")


def _subscriber(subscriber_id: str, subscriber_type: str) -> None:
    if not isinstance(subscriber_id, str) or not subscriber_id.strip():
        raise ConfigError("subscriber_id: must be a non-empty string")
    if not isinstance(subscriber_type, str) or not subscriber_type.strip():
        raise ConfigError("subscriber_type: must be a non-empty string")
    check_text(subscriber_id, field="subscriber_id")
    check_text(subscriber_type, field="subscriber_type")


async def enroll(
    db: Db,
    *,
    tenant: str | None,
    sequence_key: str,
    subscriber_id: str,
    subscriber_type: str = "user",
    data: Mapping[str, Any] | None = None,
    now: datetime | None = None,
    default_timezone: str = "UTC",
) -> Enrollment:
    """Enroll a subscriber in the active version of a sequence and schedule its first step.

    Enrolling a subscriber who already has an active or paused enrollment returns that
    enrollment (`created=False`). A sequence of the tenant wins over a global one of the
    same key; either way the enrollment belongs to `tenant`. `default_timezone` is the
    recipients' zone when neither the data nor the sequence names one (config
    `recipients.default_timezone`).
    """
    _tenant(tenant)
    check_text(sequence_key, field="sequence_key", kind="sequence")
    _subscriber(subscriber_id, subscriber_type)
    data = check_data(data or {}, where="data")
    _zone(default_timezone, "default_timezone")
    at = await _now(db, now)
    async with store.transaction(db) as conn:
        enrollment_id, created = await _enroll_in(
            conn, tenant, sequence_key, subscriber_type, subscriber_id, data, at, default_timezone
        )
        return await _load(conn, tenant, enrollment_id, created=created)


def _zone(name: Any, where: str) -> zoneinfo.ZoneInfo | None:
    if name is None:
        return None
    if not isinstance(name, str):
        raise ConfigError(f"{where}: must be an IANA timezone name")
    return zone(name, where=where)


async def _enroll_in(
    conn: asyncpg.Connection,
    tenant: str | None,
    sequence_key: str,
    subscriber_type: str,
    subscriber_id: str,
    data: dict[str, Any],
    at: datetime,
    default_timezone: str,
) -> tuple[uuid.UUID, bool]:
    """Insert the enrollment and its first execution; (id, created). Conflict when the
    reenroll policy forbids it, in which case the caller's transaction must roll back."""
    _zone(data.get("timezone"), "data.timezone")
    seq = await store.find_sequence(conn, tenant, sequence_key)
    if seq is None:
        raise NotFound(f"no sequence {sequence_key!r} for tenant {tenant or '(global)'}")
    if seq.version_id is None or seq.first_step_id is None:
        raise Conflict(f"sequence {sequence_key!r} has no active version; run `dripd apply`")
    timezone = data.get("timezone")
    # Computed before anything is written: a sequence stored before its durations were
    # range-checked (or a cron expression that never fires) is refused as bad input.
    first = f"sequence: {sequence_key!r}: its first step"
    waiting_for = seq.wait_event
    with scheduling(first):
        if waiting_for is not None:
            assert seq.wait_timeout is not None  # a CHECK pairs it with wait_event
            due = at + seq.wait_timeout
        else:
            assert seq.first_delay is not None  # NOT NULL in the first step found
            tz = zoneinfo.ZoneInfo(timezone or seq.timezone or default_timezone)
            timing = Timing(
                delay=seq.first_delay,
                at=seq.at_time,
                cron=seq.cron,
                timezone=seq.step_timezone,
            )
            due = next_due(timing, base=at, tz=tz)
    check_due(due, what=first)
    enrollment_id = await store.insert_enrollment(
        conn,
        tenant=tenant,
        sequence_id=seq.sequence_id,
        version_id=seq.version_id,
        subscriber_type=subscriber_type,
        subscriber_id=subscriber_id,
        data=data,
        timezone=timezone,
        now=at,
    )
    if enrollment_id is None:
        existing = await store.latest_enrollment(
            conn, tenant, seq.sequence_id, subscriber_type, subscriber_id
        )
        assert existing is not None
        return existing, False
    previous = await store.previous_enrollment(
        conn, tenant, seq.sequence_id, subscriber_type, subscriber_id, enrollment_id
    )
    if previous is not None:
        assert seq.reenroll is not None  # NOT NULL in the active version found
        _check_reenroll(seq.reenroll, previous, sequence_key)
    await store.insert_execution(
        conn, tenant, enrollment_id, seq.first_step_id, due, now=at, waiting_for=waiting_for
    )
    await store.notify_due(conn, due)
    return enrollment_id, True


def _check_reenroll(policy: str, previous: str, sequence_key: str) -> None:
    if policy == "always":
        return
    if policy == "after_exit" and previous == EnrollmentStatus.EXITED:
        return
    raise Conflict(
        f"subscriber was enrolled in {sequence_key!r} before (status {previous}) and the "
        f"sequence's reenroll policy is {policy!r}"
    )


async def _load(
    conn: asyncpg.Connection, tenant: str | None, enrollment_id: uuid.UUID, *, created: bool
) -> Enrollment:
    row = await store.get_enrollment(conn, tenant, enrollment_id)
    if row is None:
        raise NotFound(f"no enrollment {enrollment_id} for tenant {tenant or '(global)'}")
    return Enrollment(
        id=row.id,
        tenant_key=row.tenant_key,
        sequence_key=row.sequence_key,
        version=row.version,
        subscriber_type=row.subscriber_type,
        subscriber_id=row.subscriber_id,
        status=row.status,
        status_reason=row.status_reason,
        data=row.data,
        timezone=row.timezone,
        created_at=row.created_at,
        ended_at=row.ended_at,
        next_step=row.pending_step_key,
        next_due_at=row.pending_due_at,
        created=created,
    )


async def get_enrollment(db: Db, *, tenant: str | None, enrollment_id: uuid.UUID) -> Enrollment:
    """One enrollment in the tenant scope, with its next step; NotFound otherwise."""
    with store.translated():
        async with store.acquire(db) as conn:
            return await _load(conn, tenant, enrollment_id, created=False)


async def _move(
    conn: asyncpg.Connection,
    tenant: str | None,
    enrollment_id: uuid.UUID,
    to: EnrollmentStatus,
    allowed: tuple[EnrollmentStatus, ...],
    reason: str | None,
    at: datetime,
) -> None:
    if await store.set_enrollment_status(
        conn, tenant, enrollment_id, to.value, [a.value for a in allowed], reason, at
    ):
        return
    current = await store.get_enrollment(conn, tenant, enrollment_id)
    if current is None:
        raise NotFound(f"no enrollment {enrollment_id} for tenant {tenant or '(global)'}")
    raise Conflict(f"enrollment {enrollment_id} is {current.status}; cannot move it to {to}")


async def pause(
    db: Db, *, tenant: str | None, enrollment_id: uuid.UUID, now: datetime | None = None
) -> Enrollment:
    """Hold an active enrollment: its pending step waits, nothing is cancelled."""
    async with store.transaction(db) as conn:
        await _move(
            conn,
            tenant,
            enrollment_id,
            EnrollmentStatus.PAUSED,
            (EnrollmentStatus.ACTIVE,),
            "paused",
            await _now(conn, now),
        )
        await store.hold_pending(conn, enrollment_id)
        return await _load(conn, tenant, enrollment_id, created=False)


async def resume(
    db: Db, *, tenant: str | None, enrollment_id: uuid.UUID, now: datetime | None = None
) -> Enrollment:
    """Continue a paused enrollment where it stopped; a delay that ran out meanwhile is due now."""
    async with store.transaction(db) as conn:
        await _move(
            conn,
            tenant,
            enrollment_id,
            EnrollmentStatus.ACTIVE,
            (EnrollmentStatus.PAUSED,),
            None,
            await _now(conn, now),
        )
        due = await store.release_held(conn, enrollment_id)
        if due is not None:
            await store.notify_due(conn, due)
        return await _load(conn, tenant, enrollment_id, created=False)


async def unenroll(
    db: Db,
    *,
    tenant: str | None,
    enrollment_id: uuid.UUID,
    reason: str = "unenrolled",
    now: datetime | None = None,
) -> Enrollment:
    """Cancel an active or paused enrollment; its pending step is skipped with `reason`."""
    at = await _now(db, now)
    async with store.transaction(db) as conn:
        await _move(
            conn,
            tenant,
            enrollment_id,
            EnrollmentStatus.CANCELLED,
            (EnrollmentStatus.ACTIVE, EnrollmentStatus.PAUSED),
            reason,
            at,
        )
        await store.skip_pending(conn, enrollment_id, reason, at)
        return await _load(conn, tenant, enrollment_id, created=False)


async def track_event(
    db: Db,
    *,
    tenant: str | None,
    subscriber_id: str,
    key: str,
    subscriber_type: str = "user",
    data: Mapping[str, Any] | None = None,
    idempotency_id: str | None = None,
    now: datetime | None = None,
    default_timezone: str = "UTC",
) -> Event:
    """Record an event of a subscriber, and in the same transaction act on it.

    It ends the subscriber's enrollments whose sequence lists it in `exit_events` (status
    `exited`, pending step cancelled), releases their steps waiting for it (`wait_for`), and
    enrolls them, with the event's data as the enrollment's, in the sequences that list it
    in `entry_events` (their `reenroll` policy decides; a refusal is reported in
    `not_enrolled`, not raised). The same idempotency id
    twice records one event and does all this once.
    """
    _tenant(tenant)
    _subscriber(subscriber_id, subscriber_type)
    if not isinstance(key, str) or not key.strip():
        raise ConfigError("key: an event needs a non-empty key")
    if idempotency_id is not None and not idempotency_id:
        raise ConfigError("idempotency_id: must not be empty")
    check_text(key, field="key")
    check_optional(idempotency_id, field="idempotency_id")
    data = check_data(data or {}, where="data")
    _zone(default_timezone, "default_timezone")
    at = await _now(db, now)
    async with store.transaction(db) as conn:
        event_id, created = await store.insert_event(
            conn,
            tenant=tenant,
            subscriber_type=subscriber_type,
            subscriber_id=subscriber_id,
            key=key,
            data=data,
            idempotency_id=idempotency_id,
            now=at,
        )
        if not created:
            return Event(id=event_id, created=False)
        who = (tenant, subscriber_type, subscriber_id)
        exited = await store.exit_enrollments(conn, *who, key, at)
        released = await store.release_waits(conn, *who, key, event_id, at)
        if released:
            await store.notify_due(conn, at)
        enrolled: list[uuid.UUID] = []
        refused: list[dict[str, str]] = []
        for sequence_key in await store.entry_sequences(conn, tenant, key):
            try:
                async with conn.transaction():  # a savepoint: a refusal undoes only itself
                    enrollment_id, new = await _enroll_in(
                        conn, tenant, sequence_key, subscriber_type, subscriber_id,
                        dict(data), at, default_timezone,
                    )  # fmt: skip
            except (Conflict, ConfigError) as exc:
                refused.append({"sequence": sequence_key, "reason": exc.message})
                continue
            if new:
                enrolled.append(enrollment_id)
            else:
                refused.append({"sequence": sequence_key, "reason": "already enrolled"})
    return Event(
        id=event_id,
        created=True,
        enrolled=enrolled,
        not_enrolled=refused,
        exited=exited,
        released=released,
    )


async def suppress(
    db: Db,
    *,
    tenant: str | None,
    channel: str,
    address: str,
    reason: str = "manual",
    source: str | None = None,
    now: datetime | None = None,
    default_region: str | None = "US",
) -> Suppression:
    """Stop every send to `address` on `channel` (in this tenant, or everywhere if global).

    Any spelling works (see `dripd.addresses`): email is stored bare (without a display
    name), NFC, lowercased, its domain as Unicode (`xn--` decoded); a phone number becomes
    E.164 (read in `default_region` when it has no country code; config
    `recipients.default_region`). An address that cannot be read raises InvalidAddress (a
    ConfigError whose message starts with `address:`)."""
    _tenant(tenant)
    if not isinstance(channel, str) or not channel.strip():
        raise ConfigError("channel: must be a channel name such as email or sms")
    if channel not in CHANNELS:
        raise InvalidInput(
            "channel", f"{channel[:64]!r} is not a channel; channels: {', '.join(sorted(CHANNELS))}"
        )
    if not isinstance(address, str) or not address.strip():
        raise ConfigError("address: must not be empty")
    check_text(address, field="address")
    if reason not in SUPPRESSION_REASONS:
        raise ConfigError(
            f"reason: {reason!r} is not one of {', '.join(sorted(SUPPRESSION_REASONS))}"
        )
    normalized = normalize(channel, address, default_region=default_region)
    async with store.transaction(db) as conn:
        row = await store.insert_suppression(
            conn,
            tenant=tenant,
            channel=channel,
            address=normalized,
            reason=reason,
            source=source,
            now=await _now(conn, now),
        )
    return Suppression(
        tenant_key=row.tenant_key,
        channel=row.channel,
        address=row.address,
        reason=row.reason,
        created=row.created,
    )


async def report(
    db: Db,
    *,
    tenant: str | None,
    execution_id: uuid.UUID,
    type: str,
    reason: str | None = None,
    source: str | None = None,
    now: datetime | None = None,
) -> bool:
    """Record what became of a sent message (delivered, opened, clicked, replied, bounced,
    complained, unsubscribed) as a message event of its execution. A bounce, a complaint
    or an unsubscribe also suppresses the recipient, in the same transaction; bounces and
    complaints count towards the adapter's thresholds. False when there is no such
    execution in the tenant scope."""
    _tenant(tenant)
    at = await _now(db, now)
    async with store.transaction(db) as conn:
        recorded = await feedback.record_feedback(
            conn, tenant=tenant, execution_id=execution_id, type=type, reason=reason, now=at
        )
        if recorded is None:
            return False
        suppression = feedback.SUPPRESSES.get(type)
        if suppression and recorded.channel and recorded.recipient:
            try:
                address = normalize(recorded.channel, recorded.recipient)
            except InvalidAddress:
                address = recorded.recipient  # recorded before addresses were checked
            await store.insert_suppression(
                conn,
                tenant=tenant,
                channel=recorded.channel,
                address=address,
                reason=suppression,
                source=source or "report",
                now=at,
            )
        return True


async def replay(
    db: Db,
    *,
    tenant: str | _AllTenants | None,
    execution_id: uuid.UUID,
    now: datetime | None = None,
) -> Replayed:
    """Send a failed execution again, with a new idempotency key and Message-ID.

    If its failure ended the enrollment, the enrollment is reactivated and the flow
    continues after it; otherwise the replay sends once and does not advance.
    """
    any_tenant = tenant is ALL_TENANTS
    scope = None if isinstance(tenant, _AllTenants) else tenant
    at = await _now(db, now)
    async with store.transaction(db) as conn:
        row = await store.replay(conn, execution_id, tenant=scope, any_tenant=any_tenant, now=at)
        if row is None:
            current = await store.execution_status(conn, execution_id)
            if current is None or (not any_tenant and current.tenant_key != scope):
                raise NotFound(f"no execution {execution_id}")
            raise Conflict(
                f"execution {execution_id} is {current.status}; only a failed "
                "execution can be replayed"
            )
        await store.notify_due(conn, at)
    return Replayed(execution_id=row.id, replay=row.replay, advances=row.advance)


# --- leads (the lead-drip intake) --------------------------------------------------------

LEAD_NAME_MAX = 200
LEAD_NOTES_MAX = 2000
_PHONE_HINT = "write it like +1 202 555 0143"


class InvalidLead(ConfigError):
    """A lead's field is invalid."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field


@dataclass(frozen=True, slots=True, kw_only=True)
class Lead:
    """A stored lead: `active` and in the lead sequence (`enrollment_id`), or `pending` until
    its confirmation (double opt-in), before `confirm_expires_at`."""

    id: uuid.UUID
    tenant_key: str | None
    name: str
    email: str | None
    phone: str | None
    notes: str | None
    enrollment_id: uuid.UUID | None
    created_at: datetime
    status: LeadStatus = LeadStatus.ACTIVE
    confirm_expires_at: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


#: The span of `leads.max_per_mailbox_per_day`: a rolling day, not a calendar one.
MAILBOX_DAY: Final = timedelta(days=1)


class MailboxLimited(Conflict):
    """The mailbox got as many new leads in the last 24 hours as it may."""

    def __init__(self, cap: int, retry_at: datetime) -> None:
        super().__init__(
            f"email: this mailbox got {cap} new lead{'s' if cap != 1 else ''} in the last "
            "24 hours; try again later"
        )
        self.field = "email"
        self.retry_at = retry_at


class ConfirmOutcome(StrEnum):
    """What confirming a lead did."""

    CONFIRMED = "confirmed"  # it is active now, in the lead sequence
    ALREADY = "already_confirmed"  # it was active before: nothing changed
    EXPIRED = "expired"  # it was not confirmed in time (or it is gone)


@dataclass(frozen=True, slots=True, kw_only=True)
class LeadConfirmation:
    """The outcome of `confirm_lead`, and the lead (None when there is none)."""

    outcome: ConfirmOutcome
    lead: Lead | None


def _blank_to_none(value: str | None, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidLead(field, "must be a string")
    return value.strip() or None


def _lead_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise InvalidLead("name", "a name is required")
    name = name.strip()
    if len(name) > LEAD_NAME_MAX:
        raise InvalidLead("name", f"the name must be at most {LEAD_NAME_MAX} characters")
    if not name.isprintable():
        raise InvalidLead("name", "the name must be one line of text, without control characters")
    return name


def _lead_email(email: str) -> str:
    try:
        checked = email_validator.validate_email(email, check_deliverability=False)
    except email_validator.EmailNotValidError as exc:
        raise InvalidLead("email", str(exc)) from exc
    # The one spelling suppressions and sends use too: duplicates are found in that form.
    try:
        return normalize("email", checked.normalized)
    except InvalidAddress as exc:
        raise InvalidLead("email", exc.message.removeprefix("address: ")) from exc


def _lead_phone(phone: str, region: str) -> str:
    try:
        number = phonenumbers.parse(phone, region)
    except phonenumbers.NumberParseException as exc:
        raise InvalidLead("phone", f"this is not a phone number ({_PHONE_HINT})") from exc
    if not phonenumbers.is_valid_number(number):
        raise InvalidLead("phone", f"this phone number is not valid ({_PHONE_HINT})")
    return phone_key(number)


async def create_lead(
    db: Db,
    *,
    tenant: str | None,
    sequence_key: str,
    name: str,
    email: str | None,
    phone: str | None,
    notes: str | None,
    default_region: str = "US",
    default_timezone: str = "UTC",
    now: datetime | None = None,
    confirm_sequence: str | None = None,
    confirm_ttl: timedelta | None = None,
    max_per_mailbox: int | None = None,
) -> Lead:
    """Validate a lead, store it and enroll it in `sequence_key`, all in one transaction;
    with `confirm_sequence` (double opt-in), store it pending until `now + confirm_ttl` and
    enroll it in `confirm_sequence` instead (its message carries the link that
    `confirm_lead` answers), so it enters `sequence_key` only once confirmed.

    Email is stored in the one spelling of `dripd.addresses` (NFC, lowercased, the domain
    as Unicode), phone in E.164 (a national number is read in
    `default_region`); blank email, phone and notes count as absent, and one of email and
    phone is required. An invalid field raises InvalidLead and a lead already holding the
    email, its mailbox (the email without a `+tag`, `dripd.addresses.mailbox`) or the phone
    raises DuplicateLead; both are ConfigErrors whose `.field` names the field and whose
    message starts with it. A pending lead past its expiry holds none of them: it expires,
    its confirmation enrollment ends, and the new lead takes its place. With
    `max_per_mailbox`, a mailbox that got that many new leads in the last 24 hours (expired
    ones included) raises MailboxLimited (a Conflict, with `.retry_at`). The enrollment
    (subscriber type "lead", the lead's id as subscriber id) gets name, first_name, email,
    phone, notes and lead_id as data; if it fails (NotFound, Conflict) no lead is stored.
    """
    _tenant(tenant)
    name = _lead_name(name)
    email = _blank_to_none(email, "email")
    phone = _blank_to_none(phone, "phone")
    notes = _blank_to_none(notes, "notes")
    if email is None and phone is None:
        raise InvalidLead("email", "give an email address or a phone number")
    if email is not None:
        email = _lead_email(email)
    if phone is not None:
        phone = _lead_phone(phone, default_region)
    if notes is not None and len(notes) > LEAD_NOTES_MAX:
        raise InvalidLead("notes", f"the notes must be at most {LEAD_NOTES_MAX} characters")
    if notes is not None and "\x00" in notes:  # Postgres text cannot hold it
        raise InvalidLead("notes", "the notes must not contain NUL characters")
    _zone(default_timezone, "default_timezone")
    if (confirm_sequence is None) != (confirm_ttl is None):
        raise ConfigError("confirm_ttl: give it together with confirm_sequence, or neither")
    if confirm_ttl is not None and confirm_ttl <= timedelta(0):
        raise ConfigError("confirm_ttl: must be longer than 0s")
    if max_per_mailbox is not None and max_per_mailbox < 1:
        raise ConfigError("max_per_mailbox: must be a positive integer")
    box = mailbox(email) if email is not None else None
    at = await _now(db, now)
    async with store.transaction(db) as conn:
        expired = await leads.expire_matching(
            conn, tenant=tenant, mailbox=box, email=email, phone=phone, now=at
        )
        for old in expired:
            await _end_confirmation(conn, old, "confirmation_expired", at)
        inserted = await leads.insert_lead(
            conn,
            tenant=tenant,
            name=name,
            email=email,
            phone=phone,
            notes=notes,
            mailbox=box,
            confirm_expires_at=None if confirm_ttl is None else at + confirm_ttl,
            now=at,
        )
        if max_per_mailbox is not None and box is not None:
            created = await leads.mailbox_leads(
                conn, tenant=tenant, mailbox=box, since=at - MAILBOX_DAY
            )
            if len(created) > max_per_mailbox:  # this lead is one of them
                raise MailboxLimited(max_per_mailbox, created[max_per_mailbox] + MAILBOX_DAY)
        data = _lead_data(inserted)
        if confirm_sequence is not None:
            enrollment_id, _ = await _enroll_in(
                conn, tenant, confirm_sequence, LEAD, str(inserted.id), data, at, default_timezone
            )
            row = await leads.set_confirm_enrollment(conn, inserted.id, enrollment_id)
        else:
            enrollment_id, _ = await _enroll_in(
                conn, tenant, sequence_key, LEAD, str(inserted.id), data, at, default_timezone
            )
            row = await leads.set_lead_enrollment(conn, inserted.id, enrollment_id)
    return _lead_of(row)


async def confirm_lead(
    db: Db,
    *,
    tenant: str | None,
    lead_id: uuid.UUID,
    sequence_key: str,
    default_timezone: str = "UTC",
    now: datetime | None = None,
) -> LeadConfirmation:
    """Confirm a pending lead (double opt-in), in one transaction: it becomes active, enters
    `sequence_key` and its enrollment in the confirmation sequence exits (reason
    `lead_confirmed`). Idempotent: a lead confirmed before stays as it is (ALREADY), and the
    lead row's lock orders a confirmation racing another one or a new post of the lead. A
    lead past its `confirm_expires_at` expires (EXPIRED), as does one that is gone.
    NotFound or Conflict from the enrollment (no such sequence, no active version) roll
    everything back.
    """
    _tenant(tenant)
    at = await _now(db, now)
    async with store.transaction(db) as conn:
        row = await leads.lock_lead(conn, lead_id, tenant)
        if row is None or row.status is LeadStatus.EXPIRED:
            return LeadConfirmation(
                outcome=ConfirmOutcome.EXPIRED, lead=None if row is None else _lead_of(row)
            )
        if row.status is LeadStatus.ACTIVE:
            return LeadConfirmation(outcome=ConfirmOutcome.ALREADY, lead=_lead_of(row))
        assert row.confirm_expires_at is not None  # a CHECK pairs it with pending
        if at >= row.confirm_expires_at:
            expired = await leads.expire_lead(conn, lead_id)
            assert expired is not None
            await _end_confirmation(conn, expired, "confirmation_expired", at)
            return LeadConfirmation(outcome=ConfirmOutcome.EXPIRED, lead=_lead_of(expired))
        enrollment_id, _ = await _enroll_in(
            conn, tenant, sequence_key, LEAD, str(row.id), _lead_data(row), at, default_timezone
        )
        confirmed = await leads.activate_lead(conn, lead_id, enrollment_id=enrollment_id, now=at)
        await _end_confirmation(conn, confirmed, "lead_confirmed", at)
    return LeadConfirmation(outcome=ConfirmOutcome.CONFIRMED, lead=_lead_of(confirmed))


async def expire_leads(db: Db, *, now: datetime | None = None) -> int:
    """Expire every pending lead past its `confirm_expires_at` and end its confirmation
    enrollment (reason `confirmation_expired`); how many expired. The daemon's housekeeping
    calls it; a new post or a confirmation of such a lead expires it on its own too."""
    at = await _now(db, now)
    async with store.transaction(db) as conn:
        expired = await leads.expire_due(conn, at)
        for old in expired:
            await _end_confirmation(conn, old, "confirmation_expired", at)
    return len(expired)


#: The subscriber type of a lead's enrollments.
LEAD: Final = "lead"


def _lead_data(row: leads.LeadRow) -> dict[str, Any]:
    return {
        "name": row.name,
        "first_name": row.name.split()[0],
        "email": row.email,
        "phone": row.phone,
        "notes": row.notes,
        "lead_id": str(row.id),
    }


async def _end_confirmation(
    conn: asyncpg.Connection,
    lead: leads.LeadRow | leads.ExpiredLead,
    reason: str,
    at: datetime,
) -> None:
    """End a lead's enrollment in the confirmation sequence, if it is still running."""
    enrollment_id = lead.confirm_enrollment_id
    if enrollment_id is None:
        return
    running = [EnrollmentStatus.ACTIVE.value, EnrollmentStatus.PAUSED.value]
    if await store.set_enrollment_status(
        conn, lead.tenant_key, enrollment_id, EnrollmentStatus.EXITED.value, running, reason, at
    ):
        await store.skip_pending(conn, enrollment_id, reason, at)


def _lead_of(row: leads.LeadRow) -> Lead:
    return Lead(
        id=row.id,
        tenant_key=row.tenant_key,
        name=row.name,
        email=row.email,
        phone=row.phone,
        notes=row.notes,
        enrollment_id=row.enrollment_id,
        created_at=row.created_at,
        status=row.status,
        confirm_expires_at=row.confirm_expires_at,
    )
