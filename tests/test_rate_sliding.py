"""Rate limits hold in every sliding window: several daemons' limiters on one database, with
time moved by hand. For each granted take at t, the takes granted in [t, t + window) (and even
in [t, t + window + tolerance), the slack kept for arrivals) never pass the limit."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dripd.clock import ManualClock
from dripd.db import limits, store
from dripd.rules.limiter import Bucket, Grant, Limiter, Request, Unused

T0 = datetime(2026, 1, 5, 12, 0, 0, 123456, tzinfo=UTC)  # not on any slice boundary


class Daemon:
    """One daemon's limiter over a pool of its own, counting its lease round trips."""

    def __init__(self, db: store.Executor) -> None:
        self.db = db
        self.calls = 0
        self.limiter = Limiter(acquire=self.acquire, release=self.release)

    async def acquire(self, requests: Sequence[Request]) -> Sequence[Grant]:
        self.calls += 1
        return await limits.acquire(self.db, requests)

    async def release(self, unused: Sequence[Unused]) -> None:
        await limits.release(self.db, unused)


@pytest.fixture
async def pools(dsn: str) -> AsyncIterator[list[store.Pool]]:
    """Three daemons' pools on one database."""
    made = [await store.create_pool(dsn, min_size=1, max_size=3) for _ in range(3)]
    try:
        yield made
    finally:
        for p in made:
            await p.close()


def busiest(times: list[datetime], length: timedelta) -> int:
    """The most of `times` in any interval [t, t + length) that starts at one of them (the
    busiest interval of any start begins at a time in the list)."""
    times = sorted(times)
    most, end = 0, 0
    for start, t in enumerate(times):
        while end < len(times) and times[end] < t + length:
            end += 1
        most = max(most, end - start)
    return most


async def test_several_daemons_under_steady_demand_never_pass_the_limit_in_any_window(
    pools: list[store.Pool],
) -> None:
    daemons = [Daemon(p) for p in pools]
    clock = ManualClock(T0)
    rng = random.Random(7)
    adapter = Bucket(key="rate:adapter:smtp", limit=10, window=timedelta(seconds=1))
    provider = Bucket(key="rate:provider:smtp", limit=25, window=timedelta(seconds=3))
    only_adapter: list[datetime] = []
    both: list[datetime] = []
    for _ in range(400):
        clock.advance(timedelta(milliseconds=rng.randint(0, 60)))
        now = clock.now()
        takes = [
            (daemon, [adapter, provider] if rng.random() < 0.5 else [adapter])
            for daemon in daemons
            for _ in range(rng.randint(0, 3))
        ]
        results = await asyncio.gather(*(d.limiter.take(bs, now) for d, bs in takes))
        for (_, buckets), result in zip(takes, results, strict=True):
            if result is None:
                (both if len(buckets) == 2 else only_adapter).append(now)
            else:
                assert result > now
    elapsed = clock.now() - T0
    for b, granted in ((adapter, only_adapter + both), (provider, both)):
        assert busiest(granted, b.window) <= b.limit
        assert busiest(granted, b.window + b.tolerance) <= b.limit
    # Demand far above the limit: the adapter's budget was used, at `limit` per period.
    assert len(only_adapter + both) >= (elapsed // adapter.period - 1) * adapter.limit
    # About one round trip per slice and daemon, not one per send.
    calls = sum(d.calls for d in daemons)
    assert calls <= len(daemons) * 2 * (elapsed // adapter.slice + 1)


_examples = itertools.count()

op = st.tuples(
    st.integers(min_value=0, max_value=400),  # thousandths of the window to move the clock
    st.integers(min_value=0, max_value=2),  # which daemon
    st.sampled_from(["take", "take", "take", "prefetch", "give_back"]),
    st.integers(min_value=1, max_value=6),  # concurrent takes, or how many to prefetch
    st.booleans(),  # also charge the second bucket
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    limit=st.integers(min_value=1, max_value=30),
    window=st.sampled_from([1, 2, 3, 10, 60, 3600]),
    second=st.integers(min_value=1, max_value=60),
    ops=st.lists(op, min_size=1, max_size=60),
)
async def test_any_takes_of_any_daemons_hold_the_limit_in_every_sliding_window(
    pools: list[store.Pool],
    limit: int,
    window: int,
    second: int,
    ops: list[tuple[int, int, str, int, bool]],
) -> None:
    n = next(_examples)
    daemons = [Daemon(p) for p in pools]
    clock = ManualClock(T0)
    first = Bucket(key=f"rate:tenant:{n}", limit=limit, window=timedelta(seconds=window))
    other = Bucket(key=f"rate:sequence:{n}", limit=second, window=timedelta(seconds=window * 2))
    granted: dict[Bucket, list[datetime]] = {first: [], other: []}
    for thousandths, which, action, count, charge_other in ops:
        clock.advance(first.window * thousandths / 1000)
        now = clock.now()
        daemon = daemons[which]
        buckets = [first, other] if charge_other else [first]
        if action == "give_back":
            await daemon.limiter.give_back()
            continue
        if action == "prefetch":
            ready = await daemon.limiter.prefetch(buckets, count, now)
            assert ready >= 0
            calls = daemon.calls
            # What prefetch says is ready is taken without another round trip.
            for _ in range(min(ready, count)):
                assert await daemon.limiter.take(buckets, now) is None
                for b in buckets:
                    granted[b].append(now)
            assert daemon.calls == calls
            continue
        blocked = daemon.limiter.blocked_until(buckets, now)
        results = await asyncio.gather(*(daemon.limiter.take(buckets, now) for _ in range(count)))
        for result in results:
            if result is None:
                assert blocked is None  # blocked_until never names a wait that is not one
                for b in buckets:
                    granted[b].append(now)
            else:
                assert result > now
    for b, times in granted.items():
        assert busiest(times, b.window + b.tolerance) <= b.limit, (b, times)
