"""`dripd preview --timeline`: when each step of a sequence would run, and what it would send."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo

from dripd.conditions.expr import evaluate_safely
from dripd.engine.advance import CompiledStep, Next, choose_next, recipient_zone, schedule
from dripd.engine.pipeline import condition_context
from dripd.engine.preview import preview_execution, step_preview
from dripd.errors import ConfigError
from dripd.model import (
    ClaimedExecution,
    EnrollmentStatus,
    Facts,
    OnFailure,
    Reason,
    check_due,
    format_duration,
    scheduling,
)
from dripd.rules.window import next_opening
from dripd.timing import zone

#: The most entries one path (from the first step, through the branches it takes) shows.
MAX_PATH: Final = 50
#: The most times one step shows on one path: a loop is shown once round, then cut.
MAX_RUNS: Final = 2
#: The most entries a whole timeline shows (every wait doubles the paths).
MAX_ENTRIES: Final = 1000


async def timeline(
    steps: Mapping[uuid.UUID, CompiledStep],
    first: uuid.UUID,
    *,
    data: dict[str, Any],
    start: datetime,
    default_zone: ZoneInfo,
    window_channels: frozenset[str],
    spread: timedelta,
    tenant: str | None = None,
    subscriber_id: str = "preview",
    subscriber_type: str = "user",
) -> dict[str, Any]:
    """The dated path of an enrollment made at `start` with `data` through `steps` (one
    compiled version, `first` its first step), as the daemon would take it: nothing is
    written or sent, hooks are not called, and no event happens but a wait's own.

    The times follow the daemon's: a step falls due by `advance.schedule` from when the one
    before it finished, in `advance.recipient_zone` (data `timezone`, else the sequence's,
    else `default_zone`); its `when` is checked then, and its send window (the step's, else
    the sequence's for `window_channels`) defers it to the next opening (shown at the
    opening: the daemon adds a per-execution offset of up to `spread`). The next step is
    `advance.choose_next`'s with the data, `now` the time the step ran and
    `events.<key>.count` 0. A wait has two branches: its event arriving as the wait starts,
    and its timeout.

    Returns `{"start", "timezone", "assumptions", "entries", "end"}`: `entries` is a list of
    `step_preview` dicts with `due_at` (aware UTC), `local` (in the recipient's zone),
    `moved_by` (a list of "at", "cron", "window"), and when they apply `deferred_from` (the
    due time a window moved), `skipped` (a `model.Reason` value), `condition_errors`, and
    on a wait `branches`: `{"event": {"event", "at", "local", "entries", "end"},
    "timeout": {"at", "local", "entries", "end"}}`. `end` is how a path ends:
    `{"status": "completed" | "failed" | "cut", "reason": …}`, None after a wait. A path
    is cut after MAX_PATH entries, before a step's MAX_RUNS + 1-th run on it, and
    everywhere once the timeline has MAX_ENTRIES entries.

    Raises ConfigError for a naive `start`, a `data.timezone` that is not an IANA zone, and
    a step that cannot be scheduled (after 9999, a cron expression that never fires).
    """
    if start.utcoffset() is None:
        raise ConfigError("start: needs a UTC offset, e.g. 2027-03-27T10:00:00+01:00")
    name = data.get("timezone")
    if name is not None:
        if not isinstance(name, str):
            raise ConfigError("data.timezone: must be an IANA timezone name")
        zone(name, where="data.timezone")
    item = preview_execution(
        tenant=tenant, subscriber_id=subscriber_id, subscriber_type=subscriber_type, data=data
    )
    walk = _Walk(
        steps=steps,
        item=replace(item, timezone=name),
        default_zone=default_zone,
        window_channels=window_channels,
    )
    start = start.astimezone(UTC)
    path = await walk.path(first, start, Counter(), 0, {})
    return {
        "start": start,
        "timezone": str(recipient_zone(steps[first], name, default_zone)),
        "assumptions": [
            "each step runs when due (no rate limits, quotas, suppressions or retries)",
            "hooks are not called: conditions and templates see no hook results",
            "no events happen but a wait's own, which arrives as the wait starts in its "
            "'event' branch",
            "a send deferred by a send window is shown at the window's opening; the daemon "
            f"spreads such sends over up to {format_duration(spread)} after it",
        ],
        **path,
    }


@dataclass(kw_only=True)
class _Walk:
    steps: Mapping[uuid.UUID, CompiledStep]
    item: ClaimedExecution
    default_zone: ZoneInfo
    window_channels: frozenset[str]
    shown: int = 0  # entries in the whole timeline

    async def path(
        self,
        step_id: uuid.UUID,
        base: datetime,
        runs: Counter[uuid.UUID],
        length: int,
        events: dict[str, dict[str, Any]],
    ) -> dict[str, Any]:
        """`entries` and `end` of the path from `step_id`, reached at `base`, on: `runs`
        counts the steps of the path so far, `length` its entries, `events` the statistics
        of the events that happened on it."""
        entries: list[dict[str, Any]] = []
        while True:
            compiled = self.steps[step_id]
            step = compiled.step
            cut = self._cut(step.key, runs[step_id], length + len(entries))
            if cut is not None:
                return {"entries": entries, "end": {"status": "cut", "reason": cut}}
            runs[step_id] += 1
            self.shown += 1
            tz = recipient_zone(compiled, self.item.timezone, self.default_zone)
            what = f"step {step.key!r}"
            with scheduling(what):
                due, wait = schedule(compiled, base=base, tz=tz)
            check_due(due, what=what)
            errors: list[str] = []

            def failed(source: str, error: str, errors: list[str] = errors) -> None:
                errors.append(f"{source}: {error} (counted as false)")

            if wait is not None:
                entry = await self._entry(compiled, base, tz, [])
                entries.append(entry)
                seen = events.get(wait, {}).get("count", 0)
                arrived = {**events, wait: {"count": seen + 1, "last_at": base}}
                event = {"key": wait, "data": {}, "occurred_at": base}
                on_event = choose_next(
                    compiled, self._context(compiled, base, arrived, event), failed
                )
                on_timeout = choose_next(
                    compiled, self._context(compiled, due, events), failed, timed_out=True
                )
                so_far = length + len(entries)
                entry["branches"] = {
                    "event": {
                        "event": wait,
                        "at": base,
                        "local": base.astimezone(tz),
                        **await self._follow(on_event, base, runs.copy(), so_far, arrived),
                    },
                    "timeout": {
                        "at": due,
                        "local": due.astimezone(tz),
                        **await self._follow(on_timeout, due, runs, so_far, events),
                    },
                }
                if errors:
                    entry["condition_errors"] = errors
                return {"entries": entries, "end": None}
            moved = [] if due == base + step.delay else ["cron" if step.timing.cron else "at"]
            at, skipped = due, self._skipped(compiled, due, events, failed)
            window = compiled.window
            if window is None and step.channel in self.window_channels:
                window = compiled.sequence_window
            opens = None
            if skipped is None and step.channel is not None and window is not None:
                opens = next_opening(window, due, tz)
                if opens is not None:  # the pipeline checks `when` again when it reopens
                    at, skipped = opens, self._skipped(compiled, opens, events, failed)
                    moved.append("window")
            entry = await self._entry(compiled, at, tz, moved)
            entries.append(entry)
            if opens is not None:
                entry["deferred_from"] = due
            sends = skipped is None and step.channel is not None
            if sends and "error" not in entry and not (entry["to"] or "").strip():
                skipped = Reason.NO_RECIPIENT
            if skipped is not None:
                entry["skipped"] = skipped.value
            # A message that cannot render fails the step (as a send would).
            fails = sends and "error" in entry and step.on_failure is OnFailure.FAIL
            nxt = (
                None
                if fails
                else choose_next(compiled, self._context(compiled, at, events), failed)
            )
            if errors:
                entry["condition_errors"] = errors
            if nxt is None:
                end = {"status": EnrollmentStatus.FAILED.value, "reason": f"{what} failed"}
                return {"entries": entries, "end": end}
            if nxt.step_id is None:
                return {"entries": entries, "end": _end(nxt)}
            step_id, base = nxt.step_id, at

    async def _follow(
        self,
        nxt: Next,
        base: datetime,
        runs: Counter[uuid.UUID],
        length: int,
        events: dict[str, dict[str, Any]],
    ) -> dict[str, Any]:
        if nxt.step_id is None:
            return {"entries": [], "end": _end(nxt)}
        return await self.path(nxt.step_id, base, runs, length, events)

    def _cut(self, key: str, runs: int, length: int) -> str | None:
        if self.shown >= MAX_ENTRIES:
            return f"the timeline has {MAX_ENTRIES} entries"
        if length >= MAX_PATH:
            return f"{MAX_PATH} entries on this path"
        if runs >= MAX_RUNS:
            return f"step {key!r} would run more than {MAX_RUNS} times on this path (a loop)"
        return None

    async def _entry(
        self, compiled: CompiledStep, at: datetime, tz: ZoneInfo, moved: list[str]
    ) -> dict[str, Any]:
        shown = await step_preview(compiled, self.item)
        return {"due_at": at, "local": at.astimezone(tz), **shown, "moved_by": moved}

    def _skipped(
        self,
        compiled: CompiledStep,
        now: datetime,
        events: dict[str, dict[str, Any]],
        failed: Callable[[str, str], None],
    ) -> Reason | None:
        if compiled.when is None:
            return None
        holds, error = evaluate_safely(compiled.when, self._context(compiled, now, events))
        if error is not None:
            failed(compiled.when.source, error)
        return None if holds else Reason.CONDITION_FALSE

    def _context(
        self,
        compiled: CompiledStep,
        now: datetime,
        events: dict[str, dict[str, Any]],
        event: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """What the step's conditions read at `now`: the statistics of the events it reads
        (count 0 unless one happened on this path) and `event`, as the worker loads them."""
        stats = {k: events.get(k, {"count": 0, "last_at": None}) for k in compiled.event_keys}
        return condition_context(replace(self.item, event=event, facts=Facts(events=stats)), now)


def _end(nxt: Next) -> dict[str, Any]:
    status = EnrollmentStatus.FAILED if nxt.failed else EnrollmentStatus.COMPLETED
    return {"status": status.value, "reason": nxt.reason}
