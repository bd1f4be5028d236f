"""`dripd preview`: render a sequence's steps for given data, exactly as a send would."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from functools import partial
from typing import Any

from dripd.content.compose import finish
from dripd.content.liquid import TemplateError
from dripd.content.spintax import seed_for
from dripd.db import store
from dripd.engine.advance import CompiledStep, compile_version
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
    steps, _ = await active_steps(conn, tenant=tenant, sequence_key=sequence_key)
    ordered = sorted(steps.values(), key=lambda s: s.step.position)
    if step_key is not None:
        ordered = [s for s in ordered if s.step.key == step_key]
        if not ordered:
            raise NotFound(f"sequence {sequence_key!r} has no step {step_key!r}")
    item = preview_execution(
        tenant=tenant, subscriber_id=subscriber_id, subscriber_type=subscriber_type, data=data
    )
    return [await step_preview(compiled, item) for compiled in ordered]


async def active_steps(
    conn: store.Connection, *, tenant: str | None, sequence_key: str
) -> tuple[dict[uuid.UUID, CompiledStep], uuid.UUID]:
    """The compiled steps of the sequence's active version (the tenant's own, else the
    global one) and the id of its first step. NotFound without such a sequence, Conflict
    when it has no active version."""
    seq = await store.find_sequence(conn, tenant, sequence_key)
    if seq is None:
        raise NotFound(f"no sequence {sequence_key!r} for tenant {tenant or '(global)'}")
    if seq.first_step_id is None:
        raise Conflict(f"sequence {sequence_key!r} has no active version; run `dripd apply`")
    return compile_version(await store.load_versions(conn, [seq.first_step_id])), seq.first_step_id


def preview_execution(
    *, tenant: str | None, subscriber_id: str, subscriber_type: str, data: dict[str, Any]
) -> ClaimedExecution:
    """An execution that exists nowhere (nil ids), for rendering and conditions; its
    `event` and `facts` are empty (no event, no hook results)."""
    return ClaimedExecution(
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


async def step_preview(compiled: CompiledStep, item: ClaimedExecution) -> dict[str, Any]:
    """One step for `item`: `step`, `channel`, `after`, and `at`, `cron`, `wait_for`,
    `hooks` when it has them; `to` (the recipient, None when there is none) and the
    rendered fields (`subject`, `text`, `body`, …), or `error` (the template errors, "; "
    joined) when a field cannot render. Hooks are not called."""
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
    if step.python_template is not None:
        entry["template"] = step.python_template  # not called either: its fields are its own
    context = template_context(item, compiled)
    rendered: dict[str, str] = {}
    errors: list[str] = []
    for name, template in compiled.templates.items():
        try:
            rendered[name] = template.render(context)
        except TemplateError as exc:  # every step's problem is reported, not the first
            errors.append(str(exc))
    if not errors:
        try:  # spintax, MJML and the text part, as a send makes them
            finish(
                rendered,
                spintax=partial(seed_for, item.id, item.replay) if step.spintax else None,
                text_part=step.channel == "email",
            )
        except TemplateError as exc:
            errors.append(str(exc))
    default = (
        default_recipient(step.channel, item.data, subscriber_id=item.subscriber_id)
        if step.channel
        else None
    )
    entry["to"] = rendered.pop("to", None) or default
    entry.update(rendered)
    if errors:
        entry["error"] = "; ".join(errors)
    return entry
