"""`dripd preview`: render a sequence's steps for given data, exactly as a send would."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from dripd.content.liquid import TemplateError
from dripd.db import store
from dripd.engine.advance import compile_version
from dripd.engine.pipeline import default_recipient, template_context
from dripd.errors import Conflict, NotFound
from dripd.model import ClaimedExecution, EnrollmentStatus, format_duration

_NIL = uuid.UUID(int=0)


async def preview(
    conn: store.Connection,
    *,
    tenant: str | None,
    sequence_key: str,
    subscriber_id: str,
    subscriber_type: str = "user",
    data: dict[str, Any],
    step_key: str | None = None,
) -> list[dict[str, Any]]:
    """Every step of the active version (or one), rendered; a step that cannot render
    carries `error` instead of its content. Nothing is written and nothing is sent."""
    seq = await store.find_sequence(conn, tenant, sequence_key)
    if seq is None:
        raise NotFound(f"no sequence {sequence_key!r} for tenant {tenant or '(global)'}")
    if seq.first_step_id is None:
        raise Conflict(f"sequence {sequence_key!r} has no active version; run `dripd apply`")
    steps = compile_version(await store.load_versions(conn, [seq.first_step_id]))
    ordered = sorted(steps.values(), key=lambda s: s.step.position)
    if step_key is not None:
        ordered = [s for s in ordered if s.step.key == step_key]
        if not ordered:
            raise NotFound(f"sequence {sequence_key!r} has no step {step_key!r}")
    item = ClaimedExecution(
        id=_NIL,
        claim_token=_NIL,
        enrollment_id=_NIL,
        step_id=_NIL,
        tenant_key=tenant,
        due_at=datetime.now(UTC),
        attempt=0,
        replay=0,
        advance=True,
        enrollment_status=EnrollmentStatus.ACTIVE,
        subscriber_type=subscriber_type,
        subscriber_id=subscriber_id,
        data=data,
    )
    out: list[dict[str, Any]] = []
    for compiled in ordered:
        step = compiled.step
        entry: dict[str, Any] = {
            "step": step.key,
            "channel": step.channel,
            "after": format_duration(step.delay),
        }
        if step.timing.at is not None:
            entry["at"] = step.timing.at.isoformat(timespec="minutes")
        if step.timing.cron is not None:
            entry["cron"] = step.timing.cron
        if step.wait_event is not None and step.wait_timeout is not None:
            entry["wait_for"] = {
                "event": step.wait_event,
                "timeout": format_duration(step.wait_timeout),
            }
        if compiled.hooks:
            # Hooks are not called by a preview (they may have effects): see `dripd hook test`.
            entry["hooks"] = sorted(compiled.hooks)
        context = template_context(item, compiled)
        rendered: dict[str, str] = {}
        errors: list[str] = []
        for name, template in compiled.templates.items():
            try:
                rendered[name] = template.render(context)
            except TemplateError as exc:  # every step's problem is reported, not the first
                errors.append(str(exc))
        default = (
            default_recipient(step.channel, data, subscriber_id=subscriber_id)
            if step.channel
            else None
        )
        entry["to"] = rendered.pop("to", None) or default
        entry.update(rendered)
        if errors:
            entry["error"] = "; ".join(errors)
        out.append(entry)
    return out
