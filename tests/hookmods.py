"""Python hooks for tests/test_hooks.py, imported by path like a host application's."""

from __future__ import annotations

import asyncio
from typing import Any

from dripd.conditions.hooks import HookEnrollment, HookStep


async def plan_for(enrollment: HookEnrollment, step: HookStep) -> dict[str, Any]:
    return {
        "plan": enrollment.data["plan"],
        "enrollment": enrollment.id,
        "tenant": enrollment.tenant_key,
        "sequence": enrollment.sequence_key,
        "subscriber": f"{enrollment.subscriber_type}:{enrollment.subscriber_id}",
        "step": f"{step.key}/{step.channel}",
        "scores": [1, 2.5, None, True],
    }


def not_async(enrollment: HookEnrollment, step: HookStep) -> str:
    return "sync"


async def raises(enrollment: HookEnrollment, step: HookStep) -> None:
    raise ValueError(f"no plan for {enrollment.subscriber_id}")


async def own_timeout(enrollment: HookEnrollment, step: HookStep) -> None:
    raise TimeoutError("the CRM timed out")


async def slow(enrollment: HookEnrollment, step: HookStep) -> str:
    await asyncio.sleep(30)
    return "too late"


async def returns_set(enrollment: HookEnrollment, step: HookStep) -> Any:
    return {"tags": {"a", "b"}}


async def returns_tuple(enrollment: HookEnrollment, step: HookStep) -> Any:
    return [("a", 1)]


async def returns_nan(enrollment: HookEnrollment, step: HookStep) -> Any:
    return {"score": float("nan")}


async def returns_int_key(enrollment: HookEnrollment, step: HookStep) -> Any:
    return {1: "one"}


class Namespace:
    @staticmethod
    async def nested(enrollment: HookEnrollment, step: HookStep) -> str:
        return "nested"
