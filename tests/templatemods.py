"""Python templates for tests/test_content.py, imported by path like a host application's."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dripd.conditions.hooks import HookEnrollment, HookStep

CALLS: list[tuple[str, str | None, dict[str, Any]]] = []


async def welcome(
    enrollment: HookEnrollment, step: HookStep, hooks: Mapping[str, Any]
) -> dict[str, Any]:
    CALLS.append((enrollment.subscriber_id, step.channel, dict(hooks)))
    name = enrollment.data.get("first_name", "there")
    return {
        "subject": f"Welcome,\r\n{name}",  # folded to one line like a rendered subject
        "mjml": (
            "<mjml><mj-body><mj-section><mj-column>"
            f"<mj-text>{{Hi|Hello}} {name}, see https://example.com/docs.</mj-text>"
            "</mj-column></mj-section></mj-body></mjml>"
        ),
        "headers": {"X-Campaign": "spring"},
    }


async def not_fields(enrollment: HookEnrollment, step: HookStep, hooks: Mapping[str, Any]) -> Any:
    return ["subject", "text"]


async def sets_from_header(
    enrollment: HookEnrollment, step: HookStep, hooks: Mapping[str, Any]
) -> dict[str, Any]:
    return {"subject": "s", "text": "t", "headers": {"From": "evil@example.com"}}


async def raises(enrollment: HookEnrollment, step: HookStep, hooks: Mapping[str, Any]) -> None:
    raise RuntimeError(f"secret detail for {enrollment.subscriber_id}")
