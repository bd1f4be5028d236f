"""Outcomes into rows: what each outcome writes (Planner), written in batches (Recorder)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import partial
from zoneinfo import ZoneInfo

import anyio
import structlog

from dripd.clock import Clock
from dripd.db import store
from dripd.engine.advance import CompiledStep, choose_next, recipient_zone, schedule
from dripd.engine.held import Held, Signal
from dripd.engine.pipeline import Pipeline, condition_context
from dripd.errors import ConfigError, Conflict, DripdError, Refused
from dripd.inputs import storable
from dripd.metrics import Metrics
from dripd.model import (
    EnrollmentStatus,
    ExecutionStatus,
    MessageEventType,
    OnFailure,
    Outcome,
    Reason,
    Verdict,
    check_due,
    scheduling,
)

log = structlog.get_logger("dripd.recorder")

# How long the recorder waits before writing again after the database failed it.
_RETRY_DELAY = 0.5


class Planner:
    """The rows one outcome writes: its own status, a message event, what comes next."""

    def __init__(
        self,
        *,
        steps: dict[uuid.UUID, CompiledStep],
        pipeline: Pipeline,
        zone_of: Callable[[str | None], ZoneInfo],
    ) -> None:
        self._steps = steps  # the worker's compiled steps (every claimed row's step is in it)
        self._pipeline = pipeline
        self._zone_of = zone_of

    def plan(self, outcome: Outcome) -> store.RecordRow:
        item, verdict = outcome.execution, outcome.verdict
        step = self._steps[item.step_id]
        row = self._own_row(outcome)
        if verdict in (Verdict.DEFERRED, Verdict.RETRY) or outcome.enrollment_ended:
            return row  # nothing follows yet, or nothing follows an enrollment that has ended
        if verdict is Verdict.FAILED and step.step.on_failure is OnFailure.FAIL:
            row.enrollment_status = EnrollmentStatus.FAILED.value
            row.enrollment_reason = f"step {step.step.key!r} failed"
            return row
        nxt = choose_next(
            step,
            condition_context(item, outcome.finished_at),
            partial(self._pipeline.condition_failed, item),
            timed_out=step.step.wait_event is not None and item.event is None,
        )
        if nxt.step_id is None:
            row.enrollment_status = (
                EnrollmentStatus.FAILED if nxt.failed else EnrollmentStatus.COMPLETED
            ).value
            row.enrollment_reason = nxt.reason
            return row
        following = self._steps[nxt.step_id]
        what = f"step {following.step.key!r}"
        try:
            with scheduling(what):
                zone = recipient_zone(following, item.timezone, self._zone_of(item.tenant_key))
                due, wait = schedule(following, base=outcome.finished_at, tz=zone)
            check_due(due, what=what)
        except ConfigError as exc:
            log.error(
                "the next step cannot be scheduled; the enrollment fails",
                execution_id=str(item.id),
                enrollment_id=str(item.enrollment_id),
                error=exc.message,
            )
            return self.stranded(outcome, exc.message)
        row.next_step_id = nxt.step_id
        row.next_due_at, row.next_wait = due, wait
        return row

    def stranded(self, outcome: Outcome, error: str) -> store.RecordRow:
        """The row of an outcome whose next step could not be planned: the execution keeps
        what happened to it (a sent message stays sent) and the enrollment, which cannot go
        on, fails with `error`."""
        row = self._own_row(outcome)
        if outcome.verdict not in (Verdict.DEFERRED, Verdict.RETRY):
            row.enrollment_status = EnrollmentStatus.FAILED.value
            row.enrollment_reason = error
        return row

    @staticmethod
    def _own_row(outcome: Outcome) -> store.RecordRow:
        """The execution's own status and message event, with nothing about what follows."""
        item, verdict = outcome.execution, outcome.verdict
        row = store.RecordRow(
            id=item.id,
            token=item.claim_token,
            status=verdict.value,
            spent=1 if outcome.attempted else 0,
            channel=outcome.channel,
            provider=outcome.provider,
            adapter_id=outcome.adapter_id,
            # What a provider said (an error echoing the request, a message id) is kept
            # even with a NUL or a lone surrogate in it: an outcome Postgres refused would
            # leave its row to run (and send) again.
            recipient=_storable(outcome.recipient),
            reason=outcome.stored_reason,
            error=_storable(outcome.error),
            provider_message_id=_storable(outcome.provider_message_id),
            finished_at=outcome.finished_at,
            event_type=verdict.value,
        )
        if verdict in (Verdict.DEFERRED, Verdict.RETRY):
            row.status = ExecutionStatus.SCHEDULED.value
            row.due_at = outcome.retry_at
            row.event_type = MessageEventType.DEFERRED.value
            if verdict is Verdict.RETRY:
                row.reason = Reason.RETRY.value
        elif not outcome.enrollment_ended:
            if verdict is Verdict.DONE:
                row.event_type = None  # nothing was sent: no message event
            if outcome.bounced:
                row.event_type = MessageEventType.BOUNCED.value
                row.suppress = "bounce"
        return row


class Recorder:
    """Buffers outcomes and writes them in batches, one transaction each. An outcome is
    kept until it is written: a lost connection or a restarting server (any error that
    means "try again") only delays it; a row the database refuses is isolated and given
    up alone, and its lease then runs out so that it runs again."""

    def __init__(
        self,
        *,
        pool: store.Pool,
        clock: Clock,
        metrics: Metrics,
        held: Held,
        planner: Planner,
        batch_size: int,
        linger: timedelta,
        notify_horizon: timedelta,
        on_due: Callable[[datetime], None],
        on_change: Callable[[], None],
    ) -> None:
        self._pool = pool
        self._clock = clock
        self._metrics = metrics
        self._held = held
        self._planner = planner
        self._batch_size = batch_size
        self._linger = linger.total_seconds()
        self._horizon = notify_horizon
        self._on_due = on_due
        self._on_change = on_change
        self._buffer: list[tuple[Outcome, store.RecordRow]] = []
        self._pending = Signal()  # there is something to write
        self._kick = Signal()  # write now
        # Held while a batch is written. The worker's lease renewal takes it too: both
        # statements update many of the held rows, in no particular order, and run
        # together they can deadlock (Postgres then aborts one: seen under load).
        self._lock = anyio.Lock()

    def __len__(self) -> int:
        return len(self._buffer)

    def add(self, outcome: Outcome) -> None:
        _log_outcome(outcome)
        try:
            row = self._planner.plan(outcome)
        except Exception as exc:  # the per-step guard: never lose an outcome
            log.exception("planning the next step failed", execution_id=str(outcome.execution.id))
            row = self._planner.stranded(
                outcome, f"internal error planning the next step: {type(exc).__name__}"
            )
        self._held.done(outcome.execution.id)
        self._buffer.append((outcome, row))
        self._pending.set()
        # Write at once when the batch is full, or when nothing else is outstanding
        # (waiting would only add latency); otherwise linger to batch more.
        if len(self._buffer) >= min(self._batch_size, len(self._held)):
            self._kick.set()

    async def run(self) -> None:
        """Write batches until cancelled."""
        while True:
            if not self._buffer:
                self._pending.clear()
                await self._pending.wait()
                continue
            if not self._kick.is_set():
                with anyio.move_on_after(self._linger):
                    await self._kick.wait()
            self._kick.clear()
            try:
                written = await self._flush_once()
            except Exception:  # the recorder must outlive a bug: what it holds is kept
                log.exception("recording a batch failed unexpectedly; retrying")
                written = False
            if not written:
                await anyio.sleep(_RETRY_DELAY)

    async def flush(self, deadline: float) -> None:
        """Write everything buffered, retrying until `deadline` (anyio.current_time()).

        Returns only once no batch is being written either: run() takes its batch out of
        the buffer before writing it, and a caller that released the held rows while that
        write was under way would void their claims and the write with them (the rows,
        already sent, would be sent again)."""
        while True:
            with anyio.move_on_at(deadline):
                async with self._lock:  # wait out a batch run() is writing
                    if not self._buffer:
                        return
            try:
                written = await self._flush_once()
            except Exception:
                log.exception("recording a batch failed unexpectedly")
                written = False
            if written:
                continue
            if anyio.current_time() + _RETRY_DELAY >= deadline:
                for outcome, _ in self._buffer:
                    log.error(
                        "stopping with an outcome not recorded; the execution runs again "
                        "after its lease",
                        execution_id=str(outcome.execution.id),
                        verdict=outcome.verdict.value,
                    )
                return
            await anyio.sleep(_RETRY_DELAY)

    @property
    def writing(self) -> anyio.Lock:
        """Held while a batch of outcomes is written (see `__init__`)."""
        return self._lock

    async def _flush_once(self) -> bool:
        """Write one batch; False when the database failed (the batch is kept)."""
        async with self._lock:
            batch, self._buffer = self._buffer[: self._batch_size], self._buffer[self._batch_size :]
            if not batch:
                return True
            try:
                await self._write(batch)
            except (Conflict, Refused) as exc:
                # A row the database refuses (not a lost connection) must not block the
                # others: write them one by one and give up only on the row that fails.
                log.warning("record refused; isolating the bad row", error=exc.message)
                for one in batch:
                    try:
                        await self._write([one])
                    except (Conflict, Refused) as single:
                        self._abandon(one[0], single.message)
                    except DripdError:
                        self._buffer.append(one)
            except DripdError as exc:
                log.warning("record failed; will retry", error=exc.message, rows=len(batch))
                self._buffer[:0] = batch
                return False
            except BaseException:
                self._buffer[:0] = batch  # nothing held is dropped, whatever went wrong
                raise
            return True

    async def _write(self, batch: list[tuple[Outcome, store.RecordRow]]) -> None:
        started = time.perf_counter()
        owned = await store.record(
            self._pool,
            [row for _, row in batch],
            notify_before=self._clock.now() + self._horizon,
        )
        self._metrics.record_duration.observe(time.perf_counter() - started)
        self._recorded([o for o, _ in batch], owned)
        dues = [t for _, row in batch for t in (row.due_at, row.next_due_at) if t is not None]
        if dues:
            self._on_due(min(dues))

    def _recorded(self, outcomes: list[Outcome], owned: set[uuid.UUID]) -> None:
        now = time.perf_counter()
        for o in outcomes:
            held = self._held.pop(o.execution.id)
            if held is not None:
                self._metrics.claim_to_record.observe(now - held.claimed_at)
            self._metrics.verdict(o.verdict, o.channel, o.provider or "dripd")
            if o.verdict is Verdict.DEFERRED and o.reason:
                self._metrics.deferrals.labels(reason=o.reason.value).inc()
            if o.execution.id not in owned:
                log.warning(
                    "outcome not recorded: the lease was lost to another claim",
                    execution_id=str(o.execution.id),
                    verdict=o.verdict.value,
                )
        self._metrics.in_flight.set(len(self._held))
        self._on_change()

    def _abandon(self, outcome: Outcome, error: str) -> None:
        # The row stays claimed in the database and is no longer renewed: its lease runs
        # out and it runs again.
        log.error(
            "cannot record an outcome; the execution will run again after its lease",
            execution_id=str(outcome.execution.id),
            verdict=outcome.verdict.value,
            error=error,
        )
        self._held.pop(outcome.execution.id)
        self._metrics.in_flight.set(len(self._held))
        self._on_change()


def _log_outcome(o: Outcome) -> None:
    # Only what an operator must see: a per-message debug line costs 2 % of throughput.
    if o.verdict is Verdict.FAILED:
        log.warning(
            "execution failed",
            execution_id=str(o.execution.id),
            channel=o.channel,
            provider=o.provider,
            attempt=o.execution.attempt,
            error=o.error,
        )
    elif o.verdict is Verdict.RETRY:
        log.info(
            "send failed; will retry",
            execution_id=str(o.execution.id),
            channel=o.channel,
            provider=o.provider,
            error=o.error,
            retry_at=str(o.retry_at),
        )


def _storable(text: str | None) -> str | None:
    return None if text is None else storable(text)
