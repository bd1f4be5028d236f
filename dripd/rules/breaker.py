"""Circuit breakers per adapter, shared by every daemon: a provider's outage spends no attempts.

    closed ──`failures` provider-wide failures in a row──► open (for `open_for`, ±20 % jitter)
    open ──retry_at passed: ONE daemon of all takes the probe──► half_open
    half_open ──the probe went through──► closed (the backoff starts over)
    half_open ──the probe failed──► open, the backoff doubled (capped at `max_open_for`)
    half_open ──the prober's lease (`probe_timeout`) ran out──► another daemon takes the probe

Only provider-wide failures count (`TransientError.provider_wide`: connection refused or
reset, timeouts, SMTP 421, HTTP 5xx/429, a full disk); a refusal of one message is the
message's and never trips the breaker. The count of consecutive failures is per daemon, in
memory; the open and half-open states live in `dripd.channel_adapters` (`circuit_*`), so every
daemon stops sending through an open adapter, and a NOTIFY dripd_adapters tells them at once.
The probe is claimed with one atomic UPDATE and a lease, so exactly one daemon probes and a
dead prober blocks the others for `probe_timeout` at most.

While a circuit is open, `budget` is 0: the worker's claim gives its lane nothing, and a send
that fails provider-wide is deferred (to `record_failure`'s instant) without spending one of
the execution's attempts. The daemon holding the probe gets a budget of 1 for one send.

Database access is injected (`load`, `trip`, `probe`, `close`; dripd.db.circuits has them):
this module never imports dripd.db.
"""

from __future__ import annotations

import asyncio
import random
import re
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol, assert_never

import structlog

from dripd import config
from dripd.clock import Clock
from dripd.errors import DripdError
from dripd.metrics import Metrics

__all__ = ["Breaker", "CircuitRow", "CircuitState", "scrub"]

log = structlog.get_logger("dripd.breaker")

JITTER = 0.2  # open_for is spread by ±20 %, so that daemons and adapters do not probe in step
# While the circuit is still closed, a provider-wide failure retries after 1 s per failure in a
# row (at most this, jittered): soon enough to count towards tripping, not a hot loop.
MAX_CLOSED_RETRY = timedelta(seconds=5)
# A deferral never lands closer than this: a row is not handed back to the claim at once.
MIN_RETRY = timedelta(seconds=1)
MAX_REASON = 500  # characters of the provider's error kept as the reason


class CircuitState(StrEnum):
    """An adapter's circuit, as the `circuit_state` column stores it."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


_GAUGE = {CircuitState.CLOSED: 0, CircuitState.OPEN: 1, CircuitState.HALF_OPEN: 2}


@dataclass(frozen=True, slots=True, kw_only=True)
class CircuitRow:
    """One adapter's circuit as `dripd.channel_adapters` stores it (the `circuit_*` columns).

    Open: `opened_at`, `retry_at` (when a probe may go), `open_for` (the current backoff) and
    `reason` are set. Half-open: also `probe_by` (a daemon id) and `probe_until` (its lease).
    Closed: none of them.
    """

    adapter_id: uuid.UUID
    tenant_key: str | None
    name: str
    state: CircuitState
    opened_at: datetime | None = None
    retry_at: datetime | None = None
    open_for: timedelta | None = None
    reason: str | None = None
    probe_by: str | None = None
    probe_until: datetime | None = None

    @property
    def label(self) -> str:
        """The adapter as metrics and logs name it: "tenant/name" for a tenant's adapter."""
        return f"{self.tenant_key}/{self.name}" if self.tenant_key else self.name


class Load(Protocol):
    """Every enabled adapter's circuit that is not closed."""

    def __call__(self) -> Awaitable[Sequence[CircuitRow]]: ...


class Trip(Protocol):
    """Open a closed circuit, or a half-open one whose probe `by` holds; NOTIFY the daemons.
    None when nothing changed (someone else opened it or took the probe over)."""

    def __call__(
        self,
        adapter_id: uuid.UUID,
        *,
        now: datetime,
        retry_at: datetime,
        open_for: timedelta,
        reason: str,
        by: str,
    ) -> Awaitable[CircuitRow | None]: ...


class Probe(Protocol):
    """Take, for `by` until `until`, the probe of each circuit among `adapter_ids` that lets one
    go at `now`, in one atomic UPDATE; the rows taken."""

    def __call__(
        self, adapter_ids: Sequence[uuid.UUID], *, now: datetime, until: datetime, by: str
    ) -> Awaitable[Sequence[CircuitRow]]: ...


class Close(Protocol):
    """Close a circuit whose probe `by` holds; NOTIFY the daemons. None when `by` does not."""

    def __call__(self, adapter_id: uuid.UUID, *, by: str) -> Awaitable[CircuitRow | None]: ...


_URL_USERINFO = re.compile(r"\b([a-z][a-z0-9+.-]*://)[^/\s@]+@", re.IGNORECASE)
_AUTH_SCHEME = re.compile(r"\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+", re.IGNORECASE)
_SECRET_VALUE = re.compile(
    # No \b in front: `smtp_password=` and `x-api-key:` are secrets too.
    r"(password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|auth[_-]?token"
    r"|authorization|credentials?)\b([\"']?\s*[=:]\s*[\"']?)([^\s\"',;&]+)",
    re.IGNORECASE,
)


def scrub(error: str) -> str:
    """A provider error's text made fit to store, show and log as a circuit's reason: one
    line, at most MAX_REASON characters, with what looks like a credential masked (a URL's
    user:password, `Bearer …`, `password=…`, `api_key: …`). Providers already keep their own
    secrets out of their errors; this is the second line of defence."""
    text = " ".join(error.split())
    text = _URL_USERINFO.sub(r"\1***@", text)
    text = _AUTH_SCHEME.sub(r"\1 ***", text)
    text = _SECRET_VALUE.sub(r"\1\2***", text)
    if len(text) > MAX_REASON:
        text = text[: MAX_REASON - 1] + "…"
    return text or "provider unavailable"


class Breaker:
    """This daemon's view of every adapter's circuit breaker, and its side of the shared state.

    `load`, `trip`, `probe` and `close` are the database functions of dripd.db.circuits bound
    to a pool (`functools.partial(circuits.trip, pool)`); `settings` is the `[circuit]` config
    section; `daemon_id` names this daemon as a prober; `clock` is only read by `status`.
    Times passed in are aware UTC. The worker calls:

      - `poll` on NOTIFY dripd_adapters, every few seconds, and at `wake_at`;
      - `budget` per lane before a claim (None: no limit; 0: skip the lane; 1: one probe),
        then `take_probe` when it claimed the probe's row (and `release_probe` if that row
        was then not sent);
      - `record_failure` after a provider-wide failure (defer the row to its answer, spending
        no attempt) and `record_success` after every other send that reached the provider.
    """

    def __init__(
        self,
        *,
        load: Load,
        trip: Trip,
        probe: Probe,
        close: Close,
        clock: Clock,
        settings: config.Circuit,
        metrics: Metrics | None = None,
        daemon_id: str,
        rng: random.Random | None = None,
    ) -> None:
        self._load = load
        self._trip = trip
        self._probe = probe
        self._close = close
        self._clock = clock
        self._metrics = metrics
        self._daemon_id = daemon_id
        self._rng = rng or random.Random()
        self._threshold = settings.failures
        self._open_for = settings._duration("open_for")
        self._max_open_for = settings._duration("max_open_for")
        self._probe_timeout = settings._duration("probe_timeout")
        self._rows: dict[uuid.UUID, CircuitRow] = {}  # circuits not closed, as last seen
        self._failures: dict[uuid.UUID, int] = {}  # provider-wide failures in a row, here
        self._spent: set[uuid.UUID] = set()  # probes this daemon holds and handed out
        # Serializes this daemon's reads and writes of the shared state, so that a poll
        # cannot put back what a trip or close of ours just replaced.
        self._lock = asyncio.Lock()

    @property
    def probe_timeout(self) -> timedelta:
        """How long a taken probe is leased to its daemon."""
        return self._probe_timeout

    def budget(self, adapter_id: uuid.UUID, now: datetime) -> int | None:
        """How many sends the breaker lets this daemon start through the adapter now: None when
        its circuit is closed (the breaker does not limit), 1 when this daemon holds its probe
        (taken by `poll`, not yet handed out by `take_probe`, lease not ended), else 0."""
        row = self._rows.get(adapter_id)
        if row is None:
            return None
        if self._holds_probe(row, now) and adapter_id not in self._spent:
            return 1
        return 0

    def take_probe(self, adapter_id: uuid.UUID, now: datetime) -> bool:
        """Hand out this daemon's probe of the adapter (the worker claimed the one row it
        sends): `budget` is 0 from now on, until `record_success` or `record_failure` decides,
        or `release_probe` gives it back. False when `budget` was not 1."""
        if self.budget(adapter_id, now) != 1:
            return False
        self._spent.add(adapter_id)
        return True

    def release_probe(self, adapter_id: uuid.UUID) -> None:
        """The row taken as the probe was not sent after all (a rule deferred or skipped it):
        `budget` is 1 again while the probe's lease lasts."""
        self._spent.discard(adapter_id)

    def retry_at(self, adapter_id: uuid.UUID) -> datetime | None:
        """When the adapter's circuit may let a send go again: None when closed; the instant
        a probe may go when open (it may have passed: a `poll` takes the probe); the end of
        the probe's lease when half-open (its outcome is known by then, or another daemon
        probes). For deferring rows of the adapter and for the worker's sleep."""
        row = self._rows.get(adapter_id)
        if row is None:
            return None
        return row.probe_until if row.state is CircuitState.HALF_OPEN else row.retry_at

    def wake_at(self) -> datetime | None:
        """The earliest `retry_at` of every circuit that is not closed: a `poll` then may take
        a probe. None when every circuit is closed."""
        times = [at for adapter_id in self._rows if (at := self.retry_at(adapter_id))]
        return min(times, default=None)

    async def poll(self, now: datetime) -> None:
        """Reload the shared state (one SELECT), then take the probe of every circuit that lets
        one go at `now` (one UPDATE; only when there is one). Call it on NOTIFY dripd_adapters,
        every few seconds and at `wake_at`. DripdError when the database cannot be reached;
        the state in memory is then unchanged."""
        async with self._lock:
            self._replace(await self._load())
            due = [row.adapter_id for row in self._rows.values() if _lets_probe(row, now)]
            if not due:
                return
            taken = await self._probe(
                due, now=now, until=now + self._probe_timeout, by=self._daemon_id
            )
            for row in taken:
                self._rows[row.adapter_id] = row
                self._spent.discard(row.adapter_id)
                self._observe(row)
                self._count(row.label, CircuitState.HALF_OPEN)
                log.info(
                    "circuit half-open: probing",
                    adapter=row.label,
                    adapter_id=str(row.adapter_id),
                    probe_until=_iso(row.probe_until),
                )

    async def record_success(self, adapter_id: uuid.UUID, now: datetime) -> None:
        """A send through the adapter reached the provider (accepted, or refused for reasons
        of the message itself): the count of failures in a row starts over, and when this
        daemon holds the probe, the circuit closes for every daemon (the database row, a
        NOTIFY, the log line "circuit closed" and the metrics). Cheap while closed: no I/O.
        DripdError when the database cannot be reached (the circuit stays half-open; its
        probe lease ends and a later probe closes it)."""
        self._failures.pop(adapter_id, None)
        row = self._rows.get(adapter_id)
        if row is None or not _probed_by(row, self._daemon_id):
            return
        async with self._lock:
            row = self._rows.get(adapter_id)
            if row is None or not _probed_by(row, self._daemon_id):
                return
            closed = await self._close(adapter_id, by=self._daemon_id)
            self._spent.discard(adapter_id)
            if closed is None:
                # Another daemon took the probe over (our lease ran out): its probe decides.
                self._replace(await self._load())
                return
            del self._rows[adapter_id]
            self._observe(closed)
            self._count(closed.label, CircuitState.CLOSED)
            log.info(
                "circuit closed",
                adapter=closed.label,
                adapter_id=str(adapter_id),
                open_s=round((now - row.opened_at).total_seconds(), 3) if row.opened_at else None,
            )

    async def record_failure(self, adapter_id: uuid.UUID, now: datetime, error: str) -> datetime:
        """A provider-wide failure of a send through the adapter (`error`: the exception's
        text). Returns when the failed execution should be tried again, without spending an
        attempt: after a short delay (1–5 s) while the circuit stays closed; the circuit's
        `retry_at` when this failure opens it, or when it is open already.

        The `failures`-th failure in a row, or a failure while this daemon holds the probe,
        opens the circuit for every daemon: the row (state, opened_at, retry_at, open_for,
        reason = `error` scrubbed of anything that looks like a credential), a NOTIFY, the
        warning "circuit opened" and the metrics. Never raises for the database: when the
        circuit cannot be written, the failure stays counted (the next one tries again), a
        warning is logged and the short delay is returned."""
        row = self._rows.get(adapter_id)
        if row is not None and not _probed_by(row, self._daemon_id):
            return self._deferral(row, now)
        if row is None:
            count = self._failures.get(adapter_id, 0) + 1
            self._failures[adapter_id] = count
            if count < self._threshold:
                return now + self._closed_retry(count)
        async with self._lock:
            row = self._rows.get(adapter_id)
            count = self._failures.get(adapter_id, 0)
            if row is None:
                if count < self._threshold:  # a success came in meanwhile
                    return now + self._closed_retry(max(count, 1))
                open_for = self._open_for
            elif _probed_by(row, self._daemon_id):
                open_for = min((row.open_for or self._open_for) * 2, self._max_open_for)
            else:  # opened meanwhile, by us or another daemon
                return self._deferral(row, now)
            reason = scrub(error)
            retry_at = now + open_for * self._rng.uniform(1 - JITTER, 1 + JITTER)
            try:
                opened = await self._trip(
                    adapter_id,
                    now=now,
                    retry_at=retry_at,
                    open_for=open_for,
                    reason=reason,
                    by=self._daemon_id,
                )
                if opened is None:
                    # Another daemon opened it first, or took our probe over: load its state.
                    self._replace(await self._load())
            except DripdError as exc:
                log.warning(
                    "circuit state not written",
                    adapter_id=str(adapter_id),
                    reason=reason,
                    error=exc.message,
                )
                return now + self._closed_retry(max(count, 1))
            if opened is None:
                current = self._rows.get(adapter_id)
                if current is None:  # closed again already, or the adapter is gone
                    return now + self._closed_retry(max(count, 1))
                return self._deferral(current, now)
            self._rows[adapter_id] = opened
            self._failures.pop(adapter_id, None)
            self._spent.discard(adapter_id)
            self._observe(opened)
            self._count(opened.label, CircuitState.OPEN)
            log.warning(
                "circuit opened",
                adapter=opened.label,
                adapter_id=str(adapter_id),
                reason=reason,
                after="probe failed" if row is not None else f"{count} failures in a row",
                open_for_s=open_for.total_seconds(),
                retry_at=_iso(opened.retry_at),
            )
            return self._deferral(opened, now)

    def status(self) -> list[dict[str, Any]]:
        """The adapters whose circuit is not closed, for `dripd ctl status`: JSON-ready dicts
        with `adapter` ("tenant/name"), `adapter_id`, `state` (open | half_open), `since`
        (opened at), `retry_at` (as `retry_at()` gives it), `retry_in_s`, `open_for_s` (the
        backoff), `reason`, `probe_by` (the probing daemon, or null); times in ISO 8601."""
        now = self._clock.now()
        out: list[dict[str, Any]] = []
        for row in sorted(self._rows.values(), key=lambda r: (r.label, str(r.adapter_id))):
            retry_at = self.retry_at(row.adapter_id)
            out.append(
                {
                    "adapter": row.label,
                    "adapter_id": str(row.adapter_id),
                    "state": row.state.value,
                    "since": _iso(row.opened_at),
                    "retry_at": _iso(retry_at),
                    "retry_in_s": (
                        max(round((retry_at - now).total_seconds(), 3), 0.0) if retry_at else None
                    ),
                    "open_for_s": row.open_for.total_seconds() if row.open_for else None,
                    "reason": row.reason,
                    "probe_by": row.probe_by,
                }
            )
        return out

    def _holds_probe(self, row: CircuitRow, now: datetime) -> bool:
        return (
            _probed_by(row, self._daemon_id)
            and row.probe_until is not None
            and now < row.probe_until
        )

    def _deferral(self, row: CircuitRow, now: datetime) -> datetime:
        at = self.retry_at(row.adapter_id) or now
        return max(at, now + MIN_RETRY)

    def _closed_retry(self, count: int) -> timedelta:
        base = min(timedelta(seconds=count), MAX_CLOSED_RETRY)
        return base * self._rng.uniform(1 - JITTER, 1 + JITTER)

    def _replace(self, rows: Sequence[CircuitRow]) -> None:
        fresh = {row.adapter_id: row for row in rows}
        for adapter_id, old in self._rows.items():
            if adapter_id not in fresh:
                # Closed by the daemon that probed it (or the adapter was disabled).
                self._failures.pop(adapter_id, None)
                self._set_gauge(old.label, CircuitState.CLOSED)
                log.debug("circuit closed elsewhere", adapter=old.label)
        for adapter_id, row in fresh.items():
            if not _probed_by(row, self._daemon_id):
                self._spent.discard(adapter_id)
            self._observe(row)
        self._spent &= fresh.keys()
        self._rows = fresh

    def _observe(self, row: CircuitRow) -> None:
        self._set_gauge(row.label, row.state)

    def _set_gauge(self, label: str, state: CircuitState) -> None:
        if self._metrics is not None:
            self._metrics.circuit_state.labels(adapter=label).set(_GAUGE[state])

    def _count(self, label: str, to: CircuitState) -> None:
        if self._metrics is not None:
            self._metrics.circuit_transitions.labels(adapter=label, to=to.value).inc()


def _probed_by(row: CircuitRow, daemon_id: str) -> bool:
    return row.state is CircuitState.HALF_OPEN and row.probe_by == daemon_id


def _lets_probe(row: CircuitRow, now: datetime) -> bool:
    match row.state:
        case CircuitState.OPEN:
            return row.retry_at is not None and row.retry_at <= now
        case CircuitState.HALF_OPEN:
            return row.probe_until is not None and row.probe_until <= now
        case CircuitState.CLOSED:
            return False
        case _:
            assert_never(row.state)


def _iso(at: datetime | None) -> str | None:
    return at.isoformat() if at is not None else None
