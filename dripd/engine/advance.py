"""Where an enrollment goes after a step: transitions first, else the next step by position."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from dripd.conditions.expr import Expr, evaluate_safely, parse
from dripd.content.liquid import Template, compile_template
from dripd.model import OnFailure, Step


@dataclass(frozen=True, slots=True, kw_only=True)
class Edge:
    to: uuid.UUID | None
    priority: int
    when: Expr | None


@dataclass(frozen=True, slots=True, kw_only=True)
class CompiledStep:
    """A step with its templates compiled and its way out resolved, cached per step id."""

    step: Step
    templates: Mapping[str, Template]
    edges: tuple[Edge, ...]
    next_by_position: uuid.UUID | None


@dataclass(frozen=True, slots=True)
class Next:
    step_id: uuid.UUID | None
    delay: timedelta
    reason: str


def compile_version(rows: list[Mapping[str, Any]]) -> dict[uuid.UUID, CompiledStep]:
    """Compile every step of one or more versions (rows of load_versions.sql)."""
    by_version: dict[uuid.UUID, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_version.setdefault(row["version_id"], []).append(row)
    compiled: dict[uuid.UUID, CompiledStep] = {}
    for version_rows in by_version.values():
        version_rows.sort(key=lambda r: r["position"])
        for index, row in enumerate(version_rows):
            step = Step(
                id=row["id"],
                version_id=row["version_id"],
                sequence_key=row["sequence_key"],
                key=row["key"],
                position=row["position"],
                channel=row["channel"],
                delay=row["delay"],
                template=dict(row["template"]),
                adapter=row["adapter"],
                on_failure=OnFailure(row["on_failure"]),
                max_attempts=row["max_attempts"],
            )
            following = version_rows[index + 1]["id"] if index + 1 < len(version_rows) else None
            edges = tuple(
                Edge(
                    to=uuid.UUID(t["to"]) if t["to"] else None,
                    priority=t["priority"],
                    when=parse(t["when"]) if t["when"] else None,
                )
                for t in row["transitions"]
            )
            compiled[step.id] = CompiledStep(
                step=step,
                templates={k: compile_template(v, field=k) for k, v in step.template.items()},
                edges=edges,
                next_by_position=following,
            )
    return compiled


def choose_next(
    current: CompiledStep,
    steps: Mapping[uuid.UUID, CompiledStep],
    context: Mapping[str, Any],
    on_error: Callable[[str, str], None],
) -> Next:
    """The next step (None: the enrollment is done) and why.

    With transitions, the first match by priority wins and no match completes the
    enrollment with reason `no_matching_transition`; a condition that cannot be
    evaluated counts as false (fail closed) and is reported through `on_error`.
    """
    if current.edges:
        for edge in current.edges:
            if edge.when is not None:
                matched, error = evaluate_safely(edge.when, context)
                if error is not None:
                    on_error(edge.when.source, error)
                if not matched:
                    continue
            if edge.to is None:
                return Next(None, timedelta(0), "completed")
            return Next(edge.to, steps[edge.to].step.delay, "transition")
        return Next(None, timedelta(0), "no_matching_transition")
    if current.next_by_position is None:
        return Next(None, timedelta(0), "completed")
    return Next(current.next_by_position, steps[current.next_by_position].step.delay, "next")
