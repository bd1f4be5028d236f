"""Bounce and complaint thresholds: the watcher that pauses an adapter whose rates cross them."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import structlog

from dripd.clock import Clock
from dripd.config import Thresholds
from dripd.db import store
from dripd.errors import DripdError
from dripd.metrics import Metrics

log = structlog.get_logger("dripd.rules")


async def check_thresholds(
    pool: store.Executor, t: Thresholds, *, clock: Clock, metrics: Metrics
) -> list[str]:
    """Pause every adapter whose bounce or complaint rate over the window crossed its
    threshold (with at least `min_volume` sends); returns the names it paused."""
    now = clock.now()
    window: timedelta = t._duration("window")
    paused: list[str] = []
    for row in await store.adapter_rates(pool, now - window):
        label = f"{row.tenant_key}/{row.name}" if row.tenant_key else row.name
        sent, bounced, complained = int(row.sent), int(row.bounced), int(row.complained)
        gauge = metrics.adapter_paused.labels(adapter=label)
        gauge.set(0 if row.paused_reason is None else 1)
        if row.paused_reason is not None or sent < t.min_volume:
            continue
        reason = None
        if complained / sent >= t.complaint_rate:
            reason = _rate("complaint", complained, sent, t.complaint_rate)
        elif bounced / sent >= t.bounce_rate:
            reason = _rate("bounce", bounced, sent, t.bounce_rate)
        if reason is None:
            continue
        async with store.transaction(pool) as conn:
            if not await store.pause_adapter(conn, row.id, reason, now):
                continue  # another daemon paused it first
            await store.notify_adapters(conn)
        gauge.set(1)
        log.warning(
            "adapter paused: threshold crossed; executions defer until "
            "`dripd ctl resume-adapter` lifts it",
            adapter=label,
            reason=reason,
            window=str(window),
        )
        paused.append(label)
    return paused


def _rate(kind: str, count: int, sent: int, threshold: float) -> str:
    return f"{kind} rate {count}/{sent} = {count / sent:.2%}, threshold {threshold:.2%}"


async def watch_thresholds(
    pool: store.Executor, t: Thresholds, *, clock: Clock, metrics: Metrics
) -> None:
    """Check the thresholds every `thresholds.interval`, until cancelled."""
    interval = t._duration("interval").total_seconds()
    while True:
        try:
            await check_thresholds(pool, t, clock=clock, metrics=metrics)
        except DripdError as exc:
            log.warning("threshold check failed", error=exc.message)
        await asyncio.sleep(interval)
