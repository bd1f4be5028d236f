"""The worker: claim by lane what can start now → prepare and send → record in batches,
renewing the lease of every row it holds until its outcome is recorded."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar
from zoneinfo import ZoneInfo

import anyio
import structlog

from dripd.clock import Clock
from dripd.db import store
from dripd.engine.advance import CompiledStep, compile_version
from dripd.engine.gather import Gathered
from dripd.engine.held import Held, HeldRow, Signal
from dripd.engine.pipeline import LaneTarget, Pipeline, Prepared
from dripd.engine.recorder import Planner, Recorder
from dripd.errors import DripdError
from dripd.metrics import Metrics
from dripd.model import ClaimedExecution, EnrollmentStatus, Outcome, Verdict

log = structlog.get_logger("dripd.worker")

# How long to wait before trying the database again after it failed us.
_DB_BACKOFF = (0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
# After a failed renewal, try again this soon (the leases still run for most of a lease).
_RENEW_RETRY = timedelta(seconds=1)

K = TypeVar("K")


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    daemon_id: str
    batch_size: int
    concurrency: int
    lease: timedelta
    poll_interval: timedelta
    record_linger: timedelta
    # The zone of a tenant's recipients who name none (config tenants/recipients).
    zone_of: Callable[[str | None], ZoneInfo] = lambda _tenant: ZoneInfo("UTC")

    @property
    def renew_every(self) -> timedelta:
        """Leases are renewed three times per lease: two renewals may fail before one
        runs out."""
        return self.lease / 3


@dataclass(frozen=True, slots=True)
class Unprepared:
    """A claimed execution prepared by a sender, not in the claim's loop: its step calls
    hooks or a Python template, compiles MJML or makes short links
    (Pipeline.off_claim_path)."""

    item: ClaimedExecution
    step: CompiledStep


Job = Prepared | Unprepared


def fair_share(caps: Mapping[K, int], total: int, start: int = 0) -> dict[K, int]:
    """Split `total` among the keys of `caps`, none above its cap, as evenly as the caps
    allow (water-filling); the remainder goes first to the key at position `start` (rotate
    it between calls, so that no key is always last). Keys given nothing are left out."""
    keys = [k for k in caps if caps[k] > 0]
    if not keys or total <= 0:
        return {}
    first = start % len(keys)
    keys = keys[first:] + keys[:first]
    share = dict.fromkeys(keys, 0)
    left = total
    active = keys
    while left > 0 and active:
        each = max(left // len(active), 1)
        still: list[K] = []
        for key in active:
            give = min(each, caps[key] - share[key], left)
            share[key] += give
            left -= give
            if share[key] < caps[key]:
                still.append(key)
        active = still
    return {k: n for k, n in share.items() if n > 0}


class Worker:
    """Runs until stopped; see Daemon for how it is started and stopped."""

    def __init__(
        self,
        *,
        pool: store.Pool,
        clock: Clock,
        metrics: Metrics,
        pipeline: Pipeline,
        settings: Settings,
    ) -> None:
        self._pool = pool
        self._clock = clock
        self._metrics = metrics
        self._pipeline = pipeline
        self._s = settings
        self._steps: dict[uuid.UUID, CompiledStep] = {}
        self._targets: dict[str, LaneTarget] = {}
        self._held = Held()
        self._wakeup = Signal()  # something changed: claim again
        self._changed = Signal()  # a held row was recorded or released
        self._sleep_until: datetime | None = None
        self._idle_now = False
        self._renew_at: datetime | None = None
        self._rotation = 0
        self._stopping = False
        self._deadline = math.inf  # loop time by which in-flight sends must end (stop)
        self._stopped = anyio.Event()
        self._sending = 0
        self.paused = False
        # The senders' feed. An asyncio.Queue, not an anyio memory object stream: the
        # stream's checkpoint and event per receive cost 80 µs of CPU per execution (one
        # daemon: 3,111/s against 4,336/s with the queue, bench/README.md). None ends a sender.
        self._jobs: asyncio.Queue[Job | None] = asyncio.Queue()
        # The slow path's suppression checks, one statement for those asked together.
        self._suppressed = Gathered(self._check_suppressed)
        self._recorder = Recorder(
            pool=pool,
            clock=clock,
            metrics=metrics,
            held=self._held,
            planner=Planner(steps=self._steps, pipeline=pipeline, zone_of=settings.zone_of),
            batch_size=settings.batch_size,
            linger=settings.record_linger,
            notify_horizon=settings.poll_interval,
            on_due=self.due_by,
            on_change=self._on_change,
        )

    # --- state for status and metrics ---------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._held)

    @property
    def idle(self) -> bool:
        """Whether the claim loop is asleep, with nothing it could claim now."""
        return self._idle_now

    def wake(self) -> None:
        """A hint that work may be due (NOTIFY, a control command)."""
        self._wakeup.set()

    def due_by(self, at: datetime) -> None:
        """Work falls due at `at`: wake the idle loop if it meant to sleep past that."""
        if self._sleep_until is None or at < self._sleep_until:
            self._wakeup.set()

    def adapters_changed(self) -> None:
        """Adapters were added, changed, paused or resumed: map the lanes again."""
        self._targets.clear()
        self.wake()

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self.wake()

    async def drained(self) -> None:
        """Wait until nothing is held."""
        while self.in_flight:
            self._changed.clear()
            await self._changed.wait()

    def _on_change(self) -> None:
        self._changed.set()
        self._wakeup.set()

    # --- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        """Claim and send until stop(); then let in-flight sends finish until the deadline,
        record their outcomes and release what is left."""
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._recorder.run, name="recorder")
                async with anyio.create_task_group() as senders:
                    for n in range(self._s.concurrency):
                        senders.start_soon(self._sender, name=f"sender-{n}")
                    try:
                        await self._claim_loop()
                        # In-flight sends may take a while yet: keep their leases alive.
                        tg.start_soon(self._keep_renewing, name="renewal")
                    finally:
                        for _ in range(self._s.concurrency):  # after the jobs left, skipped
                            self._jobs.put_nowait(None)
                        # Sends still running at the deadline are cancelled and released.
                        senders.cancel_scope.deadline = self._deadline
                grace = max(self._deadline, anyio.current_time() + 5.0)
                await self._recorder.flush(grace)
                await self._release(self._held.unsent_by_token())
                tg.cancel_scope.cancel()
        finally:
            self._stopped.set()

    async def stop(self, deadline: float) -> None:
        """Stop claiming; let in-flight sends finish until `deadline` (anyio.current_time()),
        record them, release the rest; returns when run() is over."""
        self._stopping = True
        self._deadline = deadline
        self._wakeup.set()
        await self._stopped.wait()

    async def _claim_loop(self) -> None:
        failures = 0
        while not self._stopping:
            self._wakeup.clear()
            try:
                now = self._clock.now()
                if self._renew_at is not None and now >= self._renew_at:
                    await self._renew(now)
                wake_at = self._renew_at if self.paused else await self._round(now)
                failures = 0
            except DripdError as exc:
                delay = _DB_BACKOFF[min(failures, len(_DB_BACKOFF) - 1)]
                failures += 1
                log.warning("claim failed; retrying", error=exc.message, retry_in_s=delay)
                with anyio.move_on_after(delay):
                    await self._stopped_or_never()
                continue
            if wake_at is not None or self.paused:
                await self._idle(wake_at)

    async def _keep_renewing(self) -> None:
        """Renew the held rows' leases on schedule until cancelled (while stopping)."""
        while True:
            at = self._renew_at
            if at is None:
                return
            await self._clock.sleep_until(at)
            try:
                await self._renew(self._clock.now())
            except DripdError as exc:
                log.warning("lease renewal failed; retrying", error=exc.message)

    async def _stopped_or_never(self) -> None:
        while not self._stopping:
            self._wakeup.clear()
            await self._wakeup.wait()

    async def _round(self, now: datetime) -> datetime | None:
        """One claim round; None to go again at once, else when to look next (unless woken)."""
        room = self._s.concurrency - len(self._held)
        lanes = await store.lanes(self._pool)
        later = [lane.at for lane in lanes if lane.at > now]
        look_at = min([*later, now + self._s.poll_interval])
        if self._renew_at is not None:
            look_at = min(look_at, self._renew_at)
        due = [lane.lane for lane in lanes if lane.at <= now]
        if room <= 0 or not due:
            return look_at
        budgets, blocked_at = await self._budgets(due, now, room)
        if blocked_at is not None:
            look_at = min(look_at, blocked_at)
        if not budgets:
            return look_at
        got = await self._claim(budgets, now)
        # A lane that gave all it was asked for may have more: go again. Otherwise the rest
        # is locked by another daemon's claim, or there is no more.
        if any(got[lane] >= n for lane, n in budgets.items()):
            return None
        return look_at

    async def _budgets(
        self, due: Sequence[str], now: datetime, room: int
    ) -> tuple[dict[str, int], datetime | None]:
        """What to claim of each due lane: the free capacity of the adapter behind it (the
        lanes of one adapter, one per tenant, share it fairly), no more than its rules let
        go now, and the daemon's room and batch size shared fairly across all lanes."""
        by_target: dict[object, list[str]] = {}
        targets: dict[object, LaneTarget] = {}
        for lane in due:
            target = self._target(lane)
            by_target.setdefault(target.key, []).append(lane)
            targets[target.key] = target
        self._rotation += 1
        caps: dict[str, int] = {}
        blocked_at: datetime | None = None
        for key, lanes in by_target.items():
            target = targets[key]
            free = room
            if target.capacity is not None:
                free = min(free, target.capacity - self._held.busy(key))
            n, until = await self._pipeline.lane_budget(target, free, now)
            if n <= 0:
                if until is not None:
                    blocked_at = until if blocked_at is None else min(blocked_at, until)
                continue
            caps.update(fair_share(dict.fromkeys(lanes, n), n, self._rotation))
        return fair_share(caps, min(room, self._s.batch_size), self._rotation), blocked_at

    def _target(self, lane: str) -> LaneTarget:
        target = self._targets.get(lane)
        if target is None:
            target = self._targets[lane] = self._pipeline.lane_target(lane)
        return target

    async def _idle(self, until: datetime | None) -> None:
        """Sleep until `until` (None: no timer), a wake hint or stop()."""
        if self._stopping or self._wakeup.is_set():
            return
        if until is not None and until <= self._clock.now():
            return
        self._sleep_until = until
        self._idle_now = True
        try:
            async with anyio.create_task_group() as tg:

                async def woken() -> None:
                    await self._wakeup.wait()
                    tg.cancel_scope.cancel()

                async def timer(at: datetime) -> None:
                    await self._clock.sleep_until(at)
                    tg.cancel_scope.cancel()

                tg.start_soon(woken)
                if until is not None:
                    tg.start_soon(timer, until)
        finally:
            self._sleep_until = None
            self._idle_now = False

    async def _claim(self, budgets: Mapping[str, int], now: datetime) -> Counter[str]:
        token = uuid.uuid4()
        lease_until = now + self._s.lease
        started = time.perf_counter()
        items = await store.claim(
            self._pool,
            lanes=list(budgets.items()),
            now=now,
            token=token,
            lease_until=lease_until,
            daemon=self._s.daemon_id,
        )
        claimed_at = time.perf_counter()
        self._metrics.claim_duration.observe(claimed_at - started)
        got: Counter[str] = Counter(item.lane for item in items)
        if not items:
            return got
        for lane in got:
            self._pipeline.claimed(self._target(lane), now)
        for item in items:
            target = self._target(item.lane)
            self._held.add(
                HeldRow(
                    item=item, target=target.key, claimed_at=claimed_at, lease_until=lease_until
                )
            )
        if self._renew_at is None:
            self._renew_at = now + self._s.renew_every
        self._metrics.in_flight.set(self.in_flight)
        try:
            await self._dispatch(items)
        except DripdError as exc:
            # Could not even look the steps up: give the batch back untouched.
            log.warning("dispatch failed; releasing the batch", error=exc.message)
            await self._release({token: [i.id for i in items]})
            raise
        return got

    async def _renew(self, now: datetime) -> None:
        """Extend the lease of every held row in one statement; drop the rows whose claim
        another daemon took (their lease ran out while this one could not renew)."""
        leases = self._held.leases()
        if not leases:
            self._renew_at = None
            return
        lease_until = now + self._s.lease
        try:
            async with self._recorder.writing:  # never beside a record statement
                kept = await store.renew(self._pool, leases, lease_until)
        except DripdError:
            self._renew_at = now + _RENEW_RETRY
            raise
        self._renew_at = now + self._s.renew_every
        self._metrics.lease_renewals.inc(len(kept))
        lost = 0
        for row_id, _ in leases:
            row = self._held.rows.get(row_id)
            if row is None:
                continue
            if row_id in kept:
                row.lease_until = max(row.lease_until, lease_until)
                continue
            lost += 1
            row.lost = True
            if not row.busy:
                continue  # its outcome waits in the recorder, which drops it
            self._held.pop(row_id)  # not started, or sending: never sent (again) by us
        if lost:
            self._metrics.leases_lost.inc(lost)
            log.warning("leases lost to another claim; dropping those rows", rows=lost)
            self._on_change()

    async def _dispatch(self, items: list[ClaimedExecution]) -> None:
        """Prepare a claimed batch and hand it on. Nothing is queued or recorded until
        every database read has succeeded: when one fails, the caller gives the whole
        batch back, which is only right while none of it has gone anywhere."""
        missing = {i.step_id for i in items if i.step_id not in self._steps}
        if missing:
            rows = await store.load_versions(self._pool, list(missing))
            # Compiling a version's templates takes up to about 2 s for the largest file
            # (a megabyte of template tags): not on the event loop.
            self._steps.update(await anyio.to_thread.run_sync(compile_version, rows))
        await self._gather_events(items)
        jobs: list[Job] = []
        outcomes: list[Outcome] = []
        prepared: list[Prepared] = []
        for item in items:
            step = self._steps[item.step_id]
            self._metrics.claimed(step.step.channel or "none")
            if (
                self._pipeline.off_claim_path(step, item.tenant_key)
                and item.enrollment_status is EnrollmentStatus.ACTIVE
                and item.attempt < self._pipeline.max_attempts(step)
            ):
                jobs.append(Unprepared(item, step))  # I/O or a long render: a sender runs it
                continue
            try:
                result = await self._pipeline.prepare(item, step)
            except Exception as exc:  # the per-step guard: one bad row never stops a batch
                log.exception("prepare failed", execution_id=str(item.id))
                result = Outcome(
                    execution=item,
                    verdict=Verdict.FAILED,
                    channel=step.step.channel,
                    error=f"internal error: {type(exc).__name__}: {exc}",
                    finished_at=self._clock.now(),
                )
            if isinstance(result, Outcome):
                outcomes.append(result)
            else:
                prepared.append(result)
        if prepared:
            keys = [(p.execution.tenant_key, p.message.channel, p.address) for p in prepared]
            blocked = await store.suppressed(self._pool, keys)
            for n, p in enumerate(prepared):
                if n in blocked:
                    outcomes.append(self._pipeline.suppressed(p))
                else:
                    jobs.append(p)
        for outcome in outcomes:
            self._recorder.add(outcome)
        for job in jobs:
            self._jobs.put_nowait(job)

    async def _gather_events(self, items: list[ClaimedExecution]) -> None:
        """Load `events.<key>` statistics and `clicks` for the items whose conditions read
        them."""
        clicking = [i for i in items if self._steps[i.step_id].reads_clicks]
        if clicking:
            clicks = await store.click_stats(self._pool, [i.enrollment_id for i in clicking])
            for item in clicking:
                item.facts.clicks.update(clicks.get(item.enrollment_id, {}))
        wanted = [i for i in items if self._steps[i.step_id].event_keys]
        if not wanted:
            return
        keys = sorted({k for i in wanted for k in self._steps[i.step_id].event_keys})
        stats = await store.event_stats(
            self._pool, [(i.tenant_key, i.subscriber_type, i.subscriber_id) for i in wanted], keys
        )
        for n, item in enumerate(wanted):
            found = stats.get(n, {})
            for key in self._steps[item.step_id].event_keys:
                count, last_at = found.get(key, (0, None))
                item.facts.events[key] = {"count": count, "last_at": last_at}

    async def _sender(self) -> None:
        while (job := await self._jobs.get()) is not None:
            item = job.item if isinstance(job, Unprepared) else job.execution
            row = self._held.rows.get(item.id)
            if row is None or row.lost or self._stopping:
                continue  # lost or released: never sent; at stop: released untouched
            if row.lease_until - self._clock.now() < self._s.renew_every:
                # Renewals have been failing: the lease could run out mid-send and
                # another daemon send it too. Let it run out instead, unsent.
                log.warning("lease about to run out; not sending", execution_id=str(item.id))
                self._held.pop(item.id)
                self._on_change()
                continue
            outcome = await self._run_job(job, item)
            self._held.done(item.id)
            if self._target(item.lane).capacity is not None:
                self._wakeup.set()  # its adapter has room again
            if outcome is not None:
                self._recorder.add(outcome)

    async def _run_job(self, job: Job, item: ClaimedExecution) -> Outcome | None:
        self._sending += 1
        try:
            if isinstance(job, Unprepared):
                return await self._unprepared(job)
            return await self._pipeline.deliver(job)
        except Exception as exc:  # the per-step guard: a sender task never dies
            log.exception("sending failed unexpectedly", execution_id=str(item.id))
            return Outcome(
                execution=item,
                verdict=Verdict.FAILED,
                error=f"internal error: {type(exc).__name__}: {exc}",
                finished_at=self._clock.now(),
            )
        finally:
            self._sending -= 1

    async def _unprepared(self, job: Unprepared) -> Outcome | None:
        """The path of a step prepared off the claim loop: its hooks (if any), then prepare,
        check suppressions, send."""
        item, step = job.item, job.step
        result: Prepared | Outcome | None = await self._pipeline.run_hooks(item, step)
        if result is None:
            result = await self._pipeline.prepare(item, step)
        if not isinstance(result, Prepared):
            return result
        key = (item.tenant_key, result.message.channel, result.address)
        try:
            blocked = await self._suppressed.ask(key)
        except DripdError as exc:
            # Nothing has gone out yet: give the row back untouched.
            log.warning("suppression check failed", execution_id=str(item.id), error=exc.message)
            await self._release({item.claim_token: [item.id]})
            return None
        if blocked:
            return self._pipeline.suppressed(result)
        return await self._pipeline.deliver(result)

    async def _check_suppressed(self, keys: list[tuple[str | None, str, str]]) -> list[bool]:
        blocked = await store.suppressed(self._pool, keys)
        return [n in blocked for n in range(len(keys))]

    async def _release(self, by_token: dict[uuid.UUID, list[uuid.UUID]]) -> None:
        for token, ids in by_token.items():
            try:
                await store.release(self._pool, ids, token)
            except DripdError as exc:
                log.warning("release failed; the lease will run out instead", error=exc.message)
            for row_id in ids:
                self._held.pop(row_id)
        self._metrics.in_flight.set(self.in_flight)
        self._on_change()
