"""Domain values shared by every layer: states, steps, claimed work and outcomes."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from enum import StrEnum
from typing import Any

from dripd.errors import ConfigError
from dripd.timing import Timing

# Channels, and the subscriber data key each takes its recipient from when a step has no `to`.
CHANNELS = frozenset({"email", "sms", "whatsapp", "chat", "webhook"})
DEFAULT_RECIPIENT = {"email": "email", "sms": "phone", "whatsapp": "phone"}
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


_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d|w)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str, *, where: str = "duration") -> timedelta:
    """Parse `"90s"`, `"15m"`, `"2h"`, `"3d"`, `"1w"` (and `"250ms"`) into a timedelta."""
    match = _DURATION.match(text) if isinstance(text, str) else None
    if match is None:
        raise ConfigError(
            f"{where}: {text!r} is not a duration; use a whole number and a unit "
            '(ms, s, m, h, d, w), e.g. "90s" or "3d"'
        )
    return timedelta(seconds=int(match.group(1)) * _UNIT_SECONDS[match.group(2)])


_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*(s|m|h|d)\s*$")


def parse_rate(text: str, *, where: str = "rate") -> tuple[int, timedelta]:
    """Parse `"100/1m"` (or `"100/m"`, `"10/15s"`) into (limit, window)."""
    match = _RATE.match(text) if isinstance(text, str) else None
    if match is None or int(match.group(1)) <= 0 or match.group(2) in ("0", "00"):
        raise ConfigError(
            f'{where}: {text!r} is not a rate; use "<count>/<window>" with a positive count '
            'and a window such as 1s, 1m, 15m, 1h or 1d, e.g. "100/1m"'
        )
    amount = int(match.group(2) or 1)
    return int(match.group(1)), timedelta(seconds=amount * _UNIT_SECONDS[match.group(3)])


def format_duration(delta: timedelta) -> str:
    """The shortest exact duration string for `delta`."""
    ms = round(delta.total_seconds() * 1000)
    if ms == 0:
        return "0s"
    for unit, seconds in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if ms % (seconds * 1000) == 0:
            return f"{ms // (seconds * 1000)}{unit}"
    return f"{ms}ms"


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
    sequence_key: str
    sequence_timezone: str | None
    on_no_match: str
    hooks: dict[str, Any]
    sequence_window: dict[str, Any] | None
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


@dataclass(slots=True)
class Facts:
    """What an execution's conditions and templates read beyond its row, gathered while it
    runs: the subscriber's event statistics and the results of hooks."""

    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    hooks: dict[str, Any] = field(default_factory=dict)


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
