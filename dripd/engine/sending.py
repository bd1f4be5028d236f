"""The sending rules' shared parts in the daemon: built from the config, and the watcher of
bounce and complaint thresholds."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from functools import lru_cache, partial
from zoneinfo import ZoneInfo

import structlog

from dripd.channels.credentials import Vault
from dripd.clock import Clock
from dripd.config import Config, Thresholds
from dripd.db import limits, store
from dripd.engine.pipeline import Rules, Unsubscribe
from dripd.errors import DripdError
from dripd.metrics import Metrics
from dripd.rules.limiter import Limiter, RateTable
from dripd.rules.quota import QuotaBucket

log = structlog.get_logger("dripd.rules")


def zones(cfg: Config) -> Callable[[str | None], ZoneInfo]:
    """A tenant's recipients' default zone, resolved once per tenant."""

    @lru_cache(maxsize=4096)
    def zone_of(tenant: str | None) -> ZoneInfo:
        return ZoneInfo(cfg.timezone_of(tenant))

    return zone_of


_Reservation = tuple[tuple[str, datetime, int], ...]  # (bucket, period start, limit)…


class DbLedger:
    """The quota ledger in Postgres, with the reservations of concurrent senders gathered:
    while one statement runs, the requests that arrive wait and go together in the next,
    one statement per distinct set of buckets, granted in the order they arrived (a
    single ledger row takes every send of every daemon, so one round trip per send would
    make it the bottleneck)."""

    def __init__(self, pool: store.Executor) -> None:
        self._pool = pool
        self._waiting: dict[_Reservation, list[asyncio.Future[bool]]] = {}
        self._running: asyncio.Task[None] | None = None

    async def reserve(self, buckets: Sequence[QuotaBucket]) -> bool:
        key = tuple((b.key, b.period_start, b.limit) for b in buckets)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append(future)
        if self._running is None or self._running.done():
            self._running = asyncio.create_task(self._drain(), name="quota-ledger")
        return await future

    async def _drain(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, {}
            for key, futures in batch.items():
                try:
                    granted = await store.quota_reserve(self._pool, key, len(futures))
                except DripdError as exc:
                    for future in futures:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for n, future in enumerate(futures):
                    if future.done():  # its sender was cancelled: give its place back
                        if n < granted:
                            await store.quota_release(self._pool, [k[:2] for k in key])
                        continue
                    future.set_result(n < granted)

    async def release(self, buckets: Sequence[QuotaBucket]) -> None:
        await store.quota_release(self._pool, [(b.key, b.period_start) for b in buckets])


def build_rules(cfg: Config, *, pool: store.Executor, vault: Vault | None) -> Rules:
    """The pipeline's rules from the configuration."""
    unsubscribe = None
    if cfg.unsubscribe.base_url:
        if vault is None:
            log.warning(
                "unsubscribe.base_url is set but DRIPD_ENCRYPTION_KEY is not: lifecycle "
                "email goes out without List-Unsubscribe (the tokens are encrypted)"
            )
        else:
            unsubscribe = Unsubscribe(
                vault=vault,
                base_url=cfg.unsubscribe.base_url,
                mailto=cfg.unsubscribe.mailto or None,
                ttl=cfg.unsubscribe._duration("token_ttl"),
            )
    else:
        log.warning(
            "unsubscribe.base_url is not set: lifecycle email goes out without "
            "List-Unsubscribe headers (RFC 8058)"
        )
    rates = RateTable(cfg.rate_limits)
    limiter = None
    if rates:
        limiter = Limiter(
            acquire=partial(limits.acquire, pool), release=partial(limits.release, pool)
        )
    return Rules(
        zone_of=zones(cfg),
        default_region=cfg.recipients.default_region,
        rates=rates if rates else None,
        limiter=limiter,
        window_channels=frozenset(cfg.windows.channels),
        window_spread=cfg.windows._duration("spread"),
        paused_adapter_retry=cfg.thresholds._duration("interval") * 5,
        unsubscribe=unsubscribe,
        quotas=tuple(cfg.quotas),
        ledger=DbLedger(pool) if cfg.quotas else None,
    )


async def check_thresholds(
    pool: store.Executor, t: Thresholds, *, clock: Clock, metrics: Metrics
) -> list[str]:
    """Pause every adapter whose bounce or complaint rate over the window crossed its
    threshold (with at least `min_volume` sends); returns the names it paused."""
    now = clock.now()
    window: timedelta = t._duration("window")
    paused: list[str] = []
    for row in await store.adapter_rates(pool, now - window):
        label = f"{row['tenant_key']}/{row['name']}" if row["tenant_key"] else row["name"]
        sent, bounced, complained = int(row["sent"]), int(row["bounced"]), int(row["complained"])
        gauge = metrics.adapter_paused.labels(adapter=label)
        gauge.set(0 if row["paused_reason"] is None else 1)
        if row["paused_reason"] is not None or sent < t.min_volume:
            continue
        reason = None
        if complained / sent >= t.complaint_rate:
            reason = _rate("complaint", complained, sent, t.complaint_rate)
        elif bounced / sent >= t.bounce_rate:
            reason = _rate("bounce", bounced, sent, t.bounce_rate)
        if reason is None:
            continue
        async with store.transaction(pool) as conn:
            if not await store.pause_adapter(conn, row["id"], reason, now):
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
