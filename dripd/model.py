"""Domain values shared by every layer: states, steps, claimed work and outcomes."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Final
from zoneinfo import ZoneInfoNotFoundError

from dripd.errors import ConfigError
from dripd.timing import Timing

# Channels, and the subscriber data key each takes its recipient from when a step has no `to`.
CHANNELS = frozenset({"email", "sms", "whatsapp", "chat", "webhook", "pubsub"})
DEFAULT_RECIPIENT = {"email": "email", "sms": "phone", "whatsapp": "phone", "chat": "chat_id"}
# Channels whose adapter is the destination (a webhook URL, a Slack channel, a NOTIFY
# channel): with neither a `to` nor the data key above, the recipient is the subscriber id,
# which suppressions and the execution's record then name.
SUBSCRIBER_RECIPIENT = frozenset({"chat", "webhook", "pubsub"})
# Channels whose body is a text message with a length limit (`max_length`, default 1600).
SMS_CHANNELS = frozenset({"sms", "whatsapp"})
SMS_MAX_LENGTH = 1600


class EnrollmentStatus(StrEnum):
    ACTIVE = "active"
    PAUSED = "paused"
    COMPLETED = "completed"
    EXITED = "exited"
    CANCELLED = "cancelled"
    FAILED = "failed"


class ExecutionStatus(StrEnum):
    SCHEDULED = "scheduled"
    CLAIMED = "claimed"
    SENT = "sent"
    SKIPPED = "skipped"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DONE = "done"


class MessageEventType(StrEnum):
    SENT = "sent"
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    COMPLAINED = "complained"
    OPENED = "opened"
    CLICKED = "clicked"
    REPLIED = "replied"
    UNSUBSCRIBED = "unsubscribed"
    DEFERRED = "deferred"
    SKIPPED = "skipped"
    FAILED = "failed"


class OnFailure(StrEnum):
    """What a step's permanent failure does to its enrollment."""

    FAIL = "fail"
    CONTINUE = "continue"


class Verdict(StrEnum):
    """What the pipeline decided for one claimed execution."""

    SENT = "sent"
    SKIPPED = "skipped"
    DEFERRED = "deferred"
    RETRY = "retry"
    FAILED = "failed"
    DONE = "done"  # a step that sends nothing (a wait) finished


class Reason(StrEnum):
    """Why an execution was skipped, deferred, done or retried: the `reason` column of
    dripd.step_executions and dripd.message_events (a released wait stores `event:<key>`)."""

    ENROLLMENT_PAUSED = "enrollment_paused"
    ENROLLMENT_COMPLETED = "enrollment_completed"
    ENROLLMENT_EXITED = "enrollment_exited"
    ENROLLMENT_CANCELLED = "enrollment_cancelled"
    ENROLLMENT_FAILED = "enrollment_failed"
    EVENT = "event"  # a wait released by its event: stored as "event:<key>"
    WAIT_TIMEOUT = "wait_timeout"
    CONDITION_FALSE = "condition_false"
    NO_CHANNEL = "no_channel"
    OUTSIDE_WINDOW = "outside_window"
    NO_RECIPIENT = "no_recipient"
    UNVERIFIED = "unverified"
    SUPPRESSED = "suppressed"
    ADAPTER_PAUSED = "adapter_paused"
    RATE_LIMITED = "rate_limited"
    QUOTA_EXHAUSTED = "quota_exhausted"
    RULES_UNAVAILABLE = "rules_unavailable"
    PROVIDER_UNAVAILABLE = "provider_unavailable"  # a provider-wide failure or open circuit
    RETRY = "retry"

    @classmethod
    def ended(cls, status: EnrollmentStatus) -> Reason:
        """The skip reason of an execution whose enrollment is no longer active."""
        return cls(f"enrollment_{status.value}")


# ASCII digits only: `\d` would also take "١٢" (Arabic-Indic) and other Unicode digits.
_DURATION = re.compile(r"\s*([0-9]+)\s*(ms|s|m|h|d|w)\s*", re.ASCII)
_UNIT_MS: Final = {
    "ms": 1,
    "s": 1000,
    "m": 60_000,
    "h": 3_600_000,
    "d": 86_400_000,
    "w": 604_800_000,
}
_MS: Final = timedelta(milliseconds=1)
# More digits than this is out of any range (and int() refuses past 4300 digits).
_MAX_DIGITS: Final = 15

#: The longest duration dripd accepts anywhere: ten years. A due time is scheduled at most
#: one such duration (plus an `at` or `cron` wait) after the moment it is computed, so it
#: stays far inside Python's datetime (year 9999) and Postgres' timestamptz and interval.
MAX_DURATION: Final = timedelta(days=3650)


@dataclass(frozen=True, slots=True)
class Span:
    """The durations a key accepts: `minimum` to `maximum`, both included."""

    minimum: timedelta = timedelta(0)
    maximum: timedelta = MAX_DURATION

    def __post_init__(self) -> None:
        if not timedelta(0) <= self.minimum <= self.maximum <= MAX_DURATION:
            raise ValueError(f"a span runs from 0s up to {format_duration(MAX_DURATION)}")

    def __str__(self) -> str:
        low, high = format_duration(self.minimum), format_duration(self.maximum)
        if self.minimum == _MS:
            return f"longer than 0s and at most {high}"
        return f"from {low} to {high}"


# The ranges of a sequence file's durations (the config's are in config.py).
DURATION: Final = Span()  # anything: 0s to ten years
STEP_DELAY: Final = Span()  # a step's `after`
WAIT_TIMEOUT: Final = Span(_MS)  # `wait_for.timeout`
#: The longest window of a rate limit ("100/1d"): a year.
MAX_RATE_WINDOW: Final = timedelta(days=366)
#: The largest count of a rate or a quota (their ledgers count in 32-bit integers).
MAX_COUNT: Final = 1_000_000_000
#: The most attempts a step may take (`max_attempts`), so that the retry backoff
#: `base·2^(n-1)` stays a finite float.
MAX_ATTEMPTS: Final = 1000
#: The largest integer a 32-bit column (a step's `max_length`, a transition's `priority`) holds.
INT32_MAX: Final = 2**31 - 1


def parse_duration(text: str, *, where: str = "duration", within: Span = DURATION) -> timedelta:
    """Parse `"90s"`, `"15m"`, `"2h"`, `"3d"`, `"1w"` (and `"250ms"`) into a timedelta;
    ConfigError naming `where` unless it is a duration `within` the span."""
    match = _DURATION.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ConfigError(
            f"{where}: {text!r} is not a duration; use a whole number and a unit "
            '(ms, s, m, h, d, w), e.g. "90s" or "3d"'
        )
    digits = match.group(1).lstrip("0") or "0"
    ms = int(digits) * _UNIT_MS[match.group(2)] if len(digits) <= _MAX_DIGITS else None
    if ms is None or not within.minimum // _MS <= ms <= within.maximum // _MS:
        raise ConfigError(f"{where}: {text!r} is out of range; use a duration {within}")
    return timedelta(milliseconds=ms)


_RATE = re.compile(r"\s*([0-9]+)\s*/\s*([0-9]*)\s*(s|m|h|d)\s*", re.ASCII)


def parse_rate(text: str, *, where: str = "rate") -> tuple[int, timedelta]:
    """Parse `"100/1m"` (or `"100/m"`, `"10/15s"`) into (limit, window): a count from 1 to
    `MAX_COUNT` and a window from 1s to `MAX_RATE_WINDOW`."""
    match = _RATE.fullmatch(text) if isinstance(text, str) else None
    count = match.group(1).lstrip("0") if match else ""
    amount = (match.group(2) or "1").lstrip("0") if match else ""
    if match is None or not count or not amount:
        raise ConfigError(
            f'{where}: {text!r} is not a rate; use "<count>/<window>" with a positive count '
            'and a window such as 1s, 1m, 15m, 1h or 1d, e.g. "100/1m"'
        )
    if len(count) > _MAX_DIGITS or int(count) > MAX_COUNT:
        raise ConfigError(f"{where}: {text!r}: the count must be at most {MAX_COUNT}")
    ms = int(amount) * _UNIT_MS[match.group(3)] if len(amount) <= _MAX_DIGITS else None
    if ms is None or ms > MAX_RATE_WINDOW // _MS:
        raise ConfigError(
            f"{where}: {text!r}: the window must be at most {format_duration(MAX_RATE_WINDOW)}"
        )
    return int(count), timedelta(milliseconds=ms)


def format_duration(delta: timedelta) -> str:
    """The shortest exact duration string for `delta`."""
    ms = round(delta.total_seconds() * 1000)
    if ms == 0:
        return "0s"
    for unit, seconds in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if ms % (seconds * 1000) == 0:
            return f"{ms // (seconds * 1000)}{unit}"
    return f"{ms}ms"


#: The instants the Python API takes as `now`: aware, from this one ...
EARLIEST_INSTANT: Final = datetime(2000, 1, 1, tzinfo=UTC)
#: ... up to (not including) this one.
LATEST_INSTANT: Final = datetime(2200, 1, 1, tzinfo=UTC)
#: dripd schedules nothing at or after this instant: far inside Python's datetime (year
#: 9999) and Postgres' timestamptz (294276 AD), with room for what may move a due time
#: later (send windows, spreads, retries).
LATEST_DUE: Final = datetime(9000, 1, 1, tzinfo=UTC)


def check_instant(value: datetime, *, where: str) -> datetime:
    """`value`, once it is an aware datetime from `EARLIEST_INSTANT` to before
    `LATEST_INSTANT`; ConfigError naming `where` otherwise."""
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise ConfigError(f"{where}: must be an aware datetime (with a UTC offset)")
    if not EARLIEST_INSTANT <= value < LATEST_INSTANT:
        raise ConfigError(
            f"{where}: {value.isoformat()} is out of range; use an instant from "
            f"{EARLIEST_INSTANT.date()} to before {LATEST_INSTANT.date()}"
        )
    return value


@contextmanager
def scheduling(what: str) -> Iterator[None]:
    """Around computing the due time of `what` (e.g. "step 'tips'"): an error that means it
    cannot be computed becomes a ConfigError saying why. OverflowError: past year 9999;
    ValueError: a cron expression without occurrence in 50 years; ConfigError or
    ZoneInfoNotFoundError: a zone that no longer exists. Check the result with `check_due`."""
    try:
        yield
    except OverflowError as exc:
        raise ConfigError(f"{what} cannot be scheduled: it would fall due after 9999") from exc
    except ZoneInfoNotFoundError as exc:
        raise ConfigError(f"{what} cannot be scheduled: {exc.args[0]}") from exc
    except (ValueError, ConfigError) as exc:
        raise ConfigError(f"{what} cannot be scheduled: {exc}") from exc


def check_due(due: datetime, *, what: str) -> datetime:
    """`due`, once it is before `LATEST_DUE`; ConfigError saying `what` cannot be scheduled
    otherwise."""
    if due >= LATEST_DUE:
        raise ConfigError(
            f"{what} cannot be scheduled: it would fall due on {due.date()}; dripd schedules "
            f"nothing from {LATEST_DUE.date()} on"
        )
    return due


@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    """One step of a sequence version, as stored; immutable once its version exists."""

    id: uuid.UUID
    version_id: uuid.UUID
    sequence_key: str
    key: str
    position: int
    channel: str | None
    delay: timedelta
    template: dict[str, str]
    adapter: str | None
    on_failure: OnFailure
    max_attempts: int | None
    timing: Timing = field(default_factory=Timing)
    wait_event: str | None = None
    wait_timeout: timedelta | None = None
    on_timeout: str | None = None  # a step key, "complete", or None: the next step
    when: str | None = None
    require_verified: bool = False
    max_length: int | None = None
    spintax: bool = False
    python_template: str | None = None  # "module:function" making the message fields


#: The names dripd gives every template (they win over data and `vars` of the same name).
TEMPLATE_NAMES: Final = frozenset(
    {
        "subscriber_id",
        "subscriber_type",
        "enrollment_id",
        "execution_id",
        "tenant_key",
        "sequence_key",
        "step_key",
        "hooks",
        "confirm_url",
    }
)


@dataclass(frozen=True, slots=True, kw_only=True)
class VersionStepRow:
    """A step as load_versions.sql reads it, with what compiling it needs of its version."""

    id: uuid.UUID
    version_id: uuid.UUID
    key: str
    position: int
    channel: str | None
    delay: timedelta
    template: dict[str, str]
    adapter: str | None
    on_failure: str
    max_attempts: int | None
    at_time: time | None
    cron: str | None
    timezone: str | None
    wait_event: str | None
    wait_timeout: timedelta | None
    on_timeout: str | None
    when_expr: str | None
    send_window: dict[str, Any] | None
    require_verified: bool
    max_length: int | None
    spintax: bool
    python_template: str | None
    vars: dict[str, Any] | None
    short_links: dict[str, Any] | None
    sequence_key: str
    sequence_timezone: str | None
    on_no_match: str
    hooks: dict[str, Any]
    sequence_window: dict[str, Any] | None
    sequence_vars: dict[str, Any] | None
    sequence_short_links: dict[str, Any] | None
    # The step's transitions in order: JSON objects with `from`, `to`, `priority`, `when`.
    transitions: list[dict[str, Any]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Adapter:
    """A channel adapter with its credentials decrypted (held in memory only)."""

    id: uuid.UUID
    tenant_key: str | None
    name: str
    channel: str
    provider: str
    config: dict[str, Any]
    credentials: dict[str, Any] = field(repr=False)
    is_default: bool
    enabled: bool
    paused_reason: str | None = None  # paused by a bounce/complaint threshold


#: `clicks` of an enrollment without any (and before they are read).
NO_CLICKS: Final[Mapping[str, Any]] = MappingProxyType(
    {"count": 0, "last_at": None, "last_step": None}
)


@dataclass(slots=True)
class Facts:
    """What an execution's conditions and templates read beyond its row, gathered while it
    runs: the subscriber's event statistics and the results of hooks."""

    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    hooks: dict[str, Any] = field(default_factory=dict)
    clicks: dict[str, Any] = field(default_factory=lambda: dict(NO_CLICKS))


@dataclass(frozen=True, slots=True, kw_only=True)
class ClaimedExecution:
    """A step execution claimed by this daemon, with what the pipeline needs to run it."""

    id: uuid.UUID
    claim_token: uuid.UUID
    enrollment_id: uuid.UUID
    step_id: uuid.UUID
    tenant_key: str | None
    lane: str = ""  # where it is sent from: [tenant, channel, adapter name] as JSON text
    due_at: datetime
    attempt: int
    replay: int
    advance: bool
    enrollment_status: EnrollmentStatus
    subscriber_type: str
    subscriber_id: str
    data: dict[str, Any]
    timezone: str | None = None
    created_at: datetime | None = None  # when the execution was scheduled (quota order)
    event: dict[str, Any] | None = None  # the event that released a wait: key, data, occurred_at
    facts: Facts = field(default_factory=Facts)


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """What happened to one claimed execution; the recorder turns it into rows."""

    execution: ClaimedExecution
    verdict: Verdict
    channel: str | None = None
    provider: str | None = None
    adapter_id: uuid.UUID | None = None
    recipient: str | None = None
    reason: Reason | None = None
    reason_detail: str | None = None  # stored after the reason: "event:<key>"
    error: str | None = None
    provider_message_id: str | None = None
    retry_at: datetime | None = None
    enrollment_ended: bool = False  # skipped because the enrollment ended: nothing follows
    attempted: bool = False  # a send was tried: a retry or failure spends an attempt
    bounced: bool = False  # the provider refused the address for good: suppress it
    finished_at: datetime

    @property
    def stored_reason(self) -> str | None:
        """The reason as the database stores it."""
        if self.reason is None:
            return None
        return f"{self.reason}:{self.reason_detail}" if self.reason_detail else self.reason.value
