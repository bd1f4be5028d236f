"""Where an enrollment goes after a step, and when: transitions first, else the next step."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import msgspec

from dripd.conditions.expr import Expr, evaluate_safely, parse
from dripd.conditions.hookspecs import HookSpec, parse_hooks
from dripd.config import ShortLinkRules, merge_link_rules
from dripd.content.liquid import Template, compile_stored
from dripd.model import OnFailure, Step, VersionStepRow
from dripd.rules.window import Window, parse_window
from dripd.timing import Timing, next_due


@dataclass(frozen=True, slots=True, kw_only=True)
class Edge:
    to: uuid.UUID | None
    priority: int
    when: Expr | None


@dataclass(frozen=True, slots=True, kw_only=True)
class CompiledStep:
    """A step with its templates and conditions compiled and its ways out resolved, cached
    per step id (a version never changes)."""

    step: Step
    templates: Mapping[str, Template]
    when: Expr | None
    edges: tuple[Edge, ...]
    next_by_position: uuid.UUID | None
    # where a timed-out wait goes when it has `on_timeout` or no transitions (None: complete)
    timeout_to: uuid.UUID | None
    fail_on_no_match: bool
    sequence_timezone: str | None
    hook_specs: Mapping[str, HookSpec]  # the version's hooks
    hooks: frozenset[str]  # the hooks this step reads (templates, its condition, its edges)
    event_keys: frozenset[str]  # the `events.<key>` its conditions read
    window: Window | None  # the step's own send window
    sequence_window: Window | None  # the sequence's default (for the configured channels)
    vars: Mapping[str, Any] = field(default_factory=dict)  # sequence vars, then step vars
    # The sequence's and the step's short-link settings merged (None: neither has any).
    short_links: ShortLinkRules | None = None
    reads_clicks: bool = False  # its conditions read `clicks.*`


@dataclass(frozen=True, slots=True)
class Next:
    step_id: uuid.UUID | None
    reason: str
    failed: bool = False  # no transition matched and the sequence says that fails


def compile_version(rows: list[VersionStepRow]) -> dict[uuid.UUID, CompiledStep]:
    """Compile every step of one or more versions (rows of load_versions.sql)."""
    by_version: dict[uuid.UUID, list[VersionStepRow]] = {}
    for row in rows:
        by_version.setdefault(row.version_id, []).append(row)
    compiled: dict[uuid.UUID, CompiledStep] = {}
    for version_rows in by_version.values():
        version_rows.sort(key=lambda r: r.position)
        ids = {r.key: r.id for r in version_rows}
        head = version_rows[0]
        hook_specs = parse_hooks(dict(head.hooks), where="hooks")
        sequence_window = _window(head.sequence_window, "sequence.window")
        for index, row in enumerate(version_rows):
            step = Step(
                id=row.id,
                version_id=row.version_id,
                sequence_key=row.sequence_key,
                key=row.key,
                position=row.position,
                channel=row.channel,
                delay=row.delay,
                template=dict(row.template),
                adapter=row.adapter,
                on_failure=OnFailure(row.on_failure),
                max_attempts=row.max_attempts,
                timing=Timing(
                    delay=row.delay,
                    at=row.at_time,
                    cron=row.cron,
                    timezone=row.timezone,
                ),
                wait_event=row.wait_event,
                wait_timeout=row.wait_timeout,
                on_timeout=row.on_timeout,
                when=row.when_expr,
                require_verified=row.require_verified,
                max_length=row.max_length,
                spintax=row.spintax,
                python_template=row.python_template,
            )
            following = version_rows[index + 1].id if index + 1 < len(version_rows) else None
            edges = tuple(
                Edge(
                    to=uuid.UUID(t["to"]) if t["to"] else None,
                    priority=t["priority"],
                    when=parse(t["when"]) if t["when"] else None,
                )
                for t in row.transitions
            )
            templates = {k: compile_stored(v, field=k) for k, v in step.template.items()}
            when = parse(step.when) if step.when else None
            conditions = [e.when for e in edges if e.when is not None]
            if when is not None:
                conditions.append(when)
            names = {tuple(name.split(".")) for expr in conditions for name in expr.names}
            hooks = {path[1] for path in names if path[0] == "hooks" and len(path) > 1}
            for template in templates.values():
                hooks |= template.hooks()
            if "*" in hooks:
                hooks = set(hook_specs)
            if step.on_timeout == "complete":
                timeout_to = None
            elif step.on_timeout:
                timeout_to = ids[step.on_timeout]
            else:
                timeout_to = following
            compiled[step.id] = CompiledStep(
                step=step,
                templates=templates,
                when=when,
                edges=edges,
                next_by_position=following,
                timeout_to=timeout_to,
                fail_on_no_match=row.on_no_match == "fail",
                sequence_timezone=row.sequence_timezone,
                hook_specs=hook_specs,
                hooks=frozenset(hooks),
                event_keys=frozenset(
                    path[1] for path in names if path[0] == "events" and len(path) > 1
                ),
                window=_window(row.send_window, f"step {step.key!r} window"),
                sequence_window=sequence_window,
                vars={**(row.sequence_vars or {}), **(row.vars or {})},
                short_links=_link_rules(row.sequence_short_links, row.short_links),
                reads_clicks=any(path[0] == "clicks" for path in names),
            )
    return compiled


def _link_rules(*tables: dict[str, Any] | None) -> ShortLinkRules | None:
    """Stored `short_links` tables (checked when applied) merged, a later one winning."""
    given = [msgspec.convert(t, ShortLinkRules) for t in tables if t is not None]
    return merge_link_rules(*given) if given else None


def _window(raw: Any, where: str) -> Window | None:
    return None if raw is None else parse_window(dict(raw), where=where)


def choose_next(
    current: CompiledStep,
    context: Mapping[str, Any],
    on_error: Callable[[str, str], None],
    *,
    timed_out: bool = False,
) -> Next:
    """The next step (None: the enrollment ends) and why.

    A wait that timed out goes to its `on_timeout` step when it names one; otherwise it takes
    its transitions like any step, with `event` null in `context` (a wait without transitions
    goes to the next step by position). With transitions, the first match by priority wins,
    and no match completes the enrollment with reason `no_matching_transition` (or fails it,
    if the sequence says so); a condition that cannot be evaluated counts as false (fail
    closed) and is reported through `on_error`. Without transitions the next step by
    position follows.
    """
    if timed_out and (current.step.on_timeout is not None or not current.edges):
        return Next(current.timeout_to, "wait_timeout" if current.timeout_to else "completed")
    if current.edges:
        for edge in current.edges:
            if edge.when is not None:
                matched, error = evaluate_safely(edge.when, context)
                if error is not None:
                    on_error(edge.when.source, error)
                if not matched:
                    continue
            return Next(edge.to, "transition" if edge.to else "completed")
        return Next(None, "no_matching_transition", failed=current.fail_on_no_match)
    return Next(current.next_by_position, "next" if current.next_by_position else "completed")


def recipient_zone(
    step: CompiledStep, enrollment_timezone: str | None, default: ZoneInfo
) -> ZoneInfo:
    """The recipient's zone: their own (data `timezone`), else the sequence's, else
    `default` (the tenant's zone from the config, else `recipients.default_timezone`).
    The names were validated when stored."""
    name = enrollment_timezone or step.sequence_timezone
    return ZoneInfo(name) if name else default


def schedule(step: CompiledStep, *, base: datetime, tz: ZoneInfo) -> tuple[datetime, str | None]:
    """When `step` falls due once reached at `base`, and the event it waits for, if any."""
    s = step.step
    if s.wait_event is not None and s.wait_timeout is not None:
        return base + s.wait_timeout, s.wait_event
    return next_due(s.timing, base=base, tz=tz), None
