"""Shared rate limits: buckets from the config, leases from Postgres, several daemons at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from dripd.config import RateLimits
from dripd.db import limits, store
from dripd.errors import DatabaseError
from dripd.rules.limiter import Bucket, Limiter, RateTable, Request, Unused

T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)  # the start of a minute (and of an hour)
MINUTE = timedelta(minutes=1)


def queued(opening: datetime, position: int, b: Bucket) -> datetime:
    """Where the `position`-th refused take of a spent window is sent: the first `limit`
    spread evenly over the next window, the next `limit` over the one after."""
    windows, slot = divmod(position, b.limit)
    return opening + b.window * windows + b.window * slot / b.limit


def bucket(key: str, limit: int, window: timedelta = MINUTE) -> Bucket:
    return Bucket(key=key, limit=limit, window=window)


class Db:
    """The limiter's database side over one pool, counting the lease round trips."""

    def __init__(self, db: store.Executor) -> None:
        self.db = db
        self.calls: list[list[Request]] = []

    async def acquire(self, requests: Sequence[Request]) -> Sequence[int]:
        self.calls.append(list(requests))
        return await limits.acquire(self.db, requests)

    async def release(self, unused: Sequence[Unused]) -> None:
        await limits.release(self.db, unused)

    def limiter(self) -> Limiter:
        return Limiter(acquire=self.acquire, release=self.release)


async def granted(db: store.Executor, key: str, start: datetime) -> int | None:
    value: int | None = await db.fetchval(
        "SELECT granted FROM dripd.rate_windows WHERE bucket = $1 AND window_start = $2",
        key,
        start,
    )
    return value


# -- buckets from the config ---------------------------------------------------------------

NONE: dict[str, str | None] = {
    "adapter": None,
    "provider": None,
    "sending_domain": None,
    "recipient_domain": None,
    "tenant": None,
    "sequence": None,
}


def test_a_value_of_its_own_wins_over_the_wildcard() -> None:
    table = RateTable(RateLimits(adapter={"*": "10/1s", "bulk": "500/1m"}))
    [own] = table.buckets_for(**{**NONE, "adapter": "bulk"})
    [other] = table.buckets_for(**{**NONE, "adapter": "welcome"})
    assert own == Bucket(key="rate:adapter:bulk", limit=500, window=MINUTE)
    # The wildcard limits each value separately: one bucket per adapter name.
    assert other == Bucket(key="rate:adapter:welcome", limit=10, window=timedelta(seconds=1))


def test_every_scope_that_applies_gives_one_bucket_in_scope_order() -> None:
    rates = RateLimits(
        adapter={"a": "1/1s"},
        provider={"*": "2/1s"},
        sending_domain={"*": "3/1s"},
        recipient_domain={"*": "4/1s"},
        tenant={"acme": "5/1h"},
        sequence={"*": "6/1d"},
    )
    values = {
        "adapter": "a",
        "provider": "smtp",
        "sending_domain": "mail.acme.test",
        "recipient_domain": "gmail.com",
        "tenant": "acme",
        "sequence": "welcome",
    }
    keys = [b.key for b in RateTable(rates).buckets_for(**values)]
    assert keys == [
        "rate:adapter:a",
        "rate:provider:smtp",
        "rate:sending_domain:mail.acme.test",
        "rate:recipient_domain:gmail.com",
        "rate:tenant:acme",
        "rate:sequence:welcome",
    ]
    # None leaves a scope out; so does a value with neither an entry nor a wildcard.
    partial = RateTable(rates).buckets_for(**{**values, "provider": None, "tenant": "other"})
    assert [b.key for b in partial] == [
        "rate:adapter:a",
        "rate:sending_domain:mail.acme.test",
        "rate:recipient_domain:gmail.com",
        "rate:sequence:welcome",
    ]
    assert RateTable(rates).buckets_for(**NONE) == []


def test_domains_are_compared_lowercased() -> None:
    rates = RateLimits(recipient_domain={"GMail.com": "100/1m"}, sending_domain={"*": "9/1s"})
    table = RateTable(rates)
    buckets = table.buckets_for(
        **{**NONE, "recipient_domain": "gmail.COM", "sending_domain": "Mail.Acme.TEST"}
    )
    assert [(b.key, b.limit) for b in buckets] == [
        ("rate:sending_domain:mail.acme.test", 9),
        ("rate:recipient_domain:gmail.com", 100),
    ]
    # Other scopes keep their case: adapter and sequence keys are names, not domains.
    adapters = RateTable(RateLimits(adapter={"Bulk": "1/1s"}))
    assert adapters.buckets_for(**{**NONE, "adapter": "bulk"}) == []


def test_the_table_knows_whether_any_limit_is_set_and_the_longest_window() -> None:
    assert not RateTable(RateLimits())
    table = RateTable(RateLimits(adapter={"*": "1/1s"}, sequence={"s": "10/1d"}))
    assert table
    assert table.longest_window == timedelta(days=1)


def test_windows_are_aligned_to_the_unix_epoch() -> None:
    seven = bucket("k", 1, timedelta(minutes=7))
    now = T0 + timedelta(minutes=3, seconds=5)
    start = seven.start_of(now)
    assert (start - datetime(1970, 1, 1, tzinfo=UTC)) % timedelta(minutes=7) == timedelta(0)
    assert start <= now < start + timedelta(minutes=7)
    assert bucket("k", 1).start_of(T0 + timedelta(seconds=59.9)) == T0
    assert bucket("k", 100).lease_size == 10
    assert bucket("k", 101).lease_size == 11
    assert bucket("k", 3).lease_size == 1


# -- one daemon ----------------------------------------------------------------------------


async def test_exactly_the_limit_is_taken_in_a_window_and_the_next_grants_again(
    pool: asyncpg.Pool,
) -> None:
    db = Db(pool)
    limiter = db.limiter()
    b = bucket("rate:tenant:acme", 25)
    results = [await limiter.take([b], T0 + timedelta(milliseconds=i)) for i in range(30)]
    assert results[:25] == [None] * 25
    # The refused queue up behind the window, spread over the next one (60 s / 25 each).
    assert results[25:] == [T0 + MINUTE + timedelta(seconds=2.4 * k) for k in range(5)]
    assert await granted(pool, b.key, T0) == 25
    # Slices of 3 (a tenth, rounded up): 9 round trips, and none for the refusals that follow
    # within a second (the database said the window is spent); one after that.
    assert [c[0][2] for c in db.calls] == [3] * 9
    assert await limiter.take([b], T0 + timedelta(seconds=1.1)) == queued(T0 + MINUTE, 5, b)
    assert len(db.calls) == 10
    next_window = [await limiter.take([b], T0 + MINUTE + timedelta(seconds=i)) for i in range(26)]
    assert next_window == [None] * 25 + [T0 + 2 * MINUTE]
    assert await granted(pool, b.key, T0 + MINUTE) == 25


async def test_a_refused_take_charges_no_bucket(pool: asyncpg.Pool) -> None:
    limiter = Db(pool).limiter()
    scarce, plenty = bucket("rate:tenant:acme", 1), bucket("rate:provider:smtp", 100)
    assert await limiter.take([scarce, plenty], T0) is None
    assert limiter.tokens(plenty, T0) == 9
    assert await limiter.take([scarce, plenty], T0) == T0 + MINUTE
    assert limiter.tokens(plenty, T0) == 9  # not charged
    assert [await limiter.take([plenty], T0) for _ in range(100)] == [None] * 99 + [T0 + MINUTE]


async def test_the_latest_next_window_of_the_refusing_buckets_is_named(
    pool: asyncpg.Pool,
) -> None:
    limiter = Db(pool).limiter()
    minute, hour = (
        bucket("rate:provider:smtp", 1),
        bucket("rate:tenant:acme", 1, timedelta(hours=1)),
    )
    now = T0 + timedelta(minutes=10)
    assert await limiter.take([minute, hour], now) is None
    assert await limiter.take([minute, hour], now) == T0 + timedelta(hours=1)
    # The minute bucket's second refusal queues behind the first: the window after next.
    assert await limiter.take([minute], now) == now + 2 * MINUTE


async def test_tokens_of_a_past_window_are_dropped(pool: asyncpg.Pool) -> None:
    db = Db(pool)
    limiter = db.limiter()
    b = bucket("rate:tenant:acme", 100)
    assert await limiter.take([b], T0) is None
    assert limiter.tokens(b, T0) == 9
    assert await limiter.take([b], T0 + MINUTE) is None
    assert [(c[0][0], c[0][1]) for c in db.calls] == [(b.key, T0), (b.key, T0 + MINUTE)]
    assert limiter.tokens(b, T0 + MINUTE) == 9
    assert limiter.tokens(b, T0) == 0  # swept: the window ended
    await limiter.give_back()
    assert await granted(pool, b.key, T0) == 10  # an ended window is not given back to
    assert await granted(pool, b.key, T0 + MINUTE) == 1


# -- the guard at the end of a window ------------------------------------------------------


async def test_no_token_is_granted_in_the_last_moments_of_a_window(pool: asyncpg.Pool) -> None:
    db = Db(pool)
    limiter = db.limiter()
    minute = bucket("rate:provider:smtp", 100)  # guard: 250 ms (capped)
    second = bucket("rate:tenant:acme", 100, timedelta(seconds=1))  # guard: 50 ms
    assert await limiter.take([minute], T0 + timedelta(seconds=59.75)) == T0 + MINUTE
    assert await limiter.take([second], T0 + timedelta(seconds=0.95)) == T0 + timedelta(seconds=1)
    assert db.calls == []  # refused without asking the database
    # One guarded bucket refuses the take; the other is not charged.
    assert await limiter.take([minute, second], T0 + timedelta(seconds=59.96)) == T0 + MINUTE
    assert db.calls == []
    assert await limiter.take([minute], T0 + timedelta(seconds=59.749)) is None
    assert await limiter.take([second], T0 + timedelta(seconds=0.949)) is None


# -- one round trip for many takes ---------------------------------------------------------


async def test_concurrent_takes_of_an_empty_bucket_share_one_lease(pool: asyncpg.Pool) -> None:
    db = Db(pool)
    limiter = db.limiter()
    b = bucket("rate:recipient_domain:gmail.com", 1000)
    results = await asyncio.gather(*(limiter.take([b], T0) for _ in range(50)))
    assert results == [None] * 50
    assert db.calls == [[(b.key, T0, 100, 1000)]]
    assert limiter.tokens(b, T0) == 50


async def test_one_take_leases_all_its_empty_buckets_in_one_round_trip(
    pool: asyncpg.Pool,
) -> None:
    db = Db(pool)
    limiter = db.limiter()
    a, b, c = (bucket(f"rate:tenant:{n}", 100) for n in "abc")
    assert await asyncio.gather(limiter.take([a, b], T0), limiter.take([b, c], T0)) == [None] * 2
    # The second take waits for the lease of b in flight and leases only c itself.
    assert [[r[0] for r in call] for call in db.calls] == [[a.key, b.key], [c.key]]
    assert (limiter.tokens(a, T0), limiter.tokens(b, T0), limiter.tokens(c, T0)) == (9, 8, 9)


async def test_a_failed_lease_fails_its_waiters_and_the_next_take_retries(
    pool: asyncpg.Pool,
) -> None:
    db = Db(pool)
    failures = 1

    async def flaky(requests: Sequence[Request]) -> Sequence[int]:
        nonlocal failures
        if failures:
            failures -= 1
            await asyncio.sleep(0)  # let the other takes find the lease in flight
            raise DatabaseError("lost the database connection")
        return await db.acquire(requests)

    limiter = Limiter(acquire=flaky, release=db.release)
    b = bucket("rate:tenant:acme", 100)
    results = await asyncio.gather(
        *(limiter.take([b], T0) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, DatabaseError) for r in results)
    assert await limiter.take([b], T0) is None
    assert len(db.calls) == 1


async def test_a_cancelled_take_does_not_lose_its_lease(pool: asyncpg.Pool) -> None:
    db = Db(pool)
    called, go = asyncio.Event(), asyncio.Event()

    async def slow(requests: Sequence[Request]) -> Sequence[int]:
        called.set()
        await go.wait()
        return await db.acquire(requests)

    limiter = Limiter(acquire=slow, release=db.release)
    b = bucket("rate:tenant:acme", 100)
    taker = asyncio.create_task(limiter.take([b], T0))
    await called.wait()
    taker.cancel()
    with pytest.raises(asyncio.CancelledError):
        await taker
    go.set()
    assert await limiter.take([b], T0) is None  # waits for the lease still in flight
    assert len(db.calls) == 1
    assert limiter.tokens(b, T0) == 9


# -- several daemons on one database -------------------------------------------------------


@pytest.fixture
async def daemons(dsn: str) -> AsyncIterator[list[Db]]:
    """Three daemons' database sides, each over a pool of its own."""
    pools = [await store.create_pool(dsn, min_size=1, max_size=2) for _ in range(3)]
    try:
        yield [Db(p) for p in pools]
    finally:
        for p in pools:
            await p.close()


@pytest.mark.parametrize("limit", [7, 50])
async def test_three_daemons_together_take_exactly_the_limit_per_window(
    daemons: list[Db], pool: asyncpg.Pool, limit: int
) -> None:
    limiters = [d.limiter() for d in daemons]
    tenant = bucket("rate:tenant:acme", limit)
    provider = bucket("rate:provider:smtp", 1000)  # charged too, never the one that runs out
    demand = limit + 10  # each daemon alone wants more than the limit
    for w in range(4):
        start = T0 + w * MINUTE
        results = await asyncio.gather(
            *(
                limiter.take([provider, tenant], start + timedelta(milliseconds=i))
                for i in range(demand)
                for limiter in limiters
            )
        )
        assert results.count(None) == limit
        refused = [r for r in results if r is not None]
        assert min(refused) == start + MINUTE  # never before the next window
        assert await granted(pool, tenant.key, start) == limit
        assert all(limiter.tokens(tenant, start) == 0 for limiter in limiters)
        provider_granted = await granted(pool, provider.key, start)
        assert provider_granted is not None
        held = sum(limiter.tokens(provider, start) for limiter in limiters)
        assert provider_granted == limit + held


async def test_an_idle_slice_holds_back_only_itself_and_comes_back_on_give_back(
    daemons: list[Db], pool: asyncpg.Pool
) -> None:
    idle, busy = daemons[0].limiter(), daemons[1].limiter()
    b = bucket("rate:tenant:acme", 100)
    assert await idle.take([b], T0) is None  # leases a slice of 10, spends 1
    results = [await busy.take([b], T0 + timedelta(seconds=1)) for _ in range(100)]
    assert results.count(None) == 90
    assert results[90:] == [queued(T0 + MINUTE, k, b) for k in range(10)]
    await idle.give_back()
    assert await granted(pool, b.key, T0) == 91
    assert idle.tokens(b, T0) == 0
    # Refusals come from memory for a moment (1 s here) before the database is asked again.
    assert await busy.take([b], T0 + timedelta(seconds=1.5)) == queued(T0 + MINUTE, 10, b)
    later = [await busy.take([b], T0 + timedelta(seconds=2)) for _ in range(10)]
    assert later == [None] * 9 + [queued(T0 + MINUTE, 11, b)]
    assert await granted(pool, b.key, T0) == 100


async def test_give_back_returns_every_unspent_token_and_keeps_working(pool: asyncpg.Pool) -> None:
    limiter = Db(pool).limiter()
    a, b = bucket("rate:tenant:a", 100), bucket("rate:tenant:b", 30)
    assert await limiter.take([a, b], T0) is None
    assert (await granted(pool, a.key, T0), await granted(pool, b.key, T0)) == (10, 3)
    await limiter.give_back()
    assert (await granted(pool, a.key, T0), await granted(pool, b.key, T0)) == (1, 1)
    await limiter.give_back()  # nothing held: no round trip, no change
    assert await limiter.take([a], T0) is None
    assert await granted(pool, a.key, T0) == 11


# -- the statements ------------------------------------------------------------------------


async def test_acquire_grants_what_is_left_and_never_more(pool: asyncpg.Pool) -> None:
    grants = [await limits.acquire(pool, [("k", T0, 10, 25)]) for _ in range(4)]
    assert grants == [[10], [10], [5], [0]]
    # A lowered limit grants nothing more and does not shrink what was granted.
    assert await limits.acquire(pool, [("k", T0, 10, 20)]) == [0]
    assert await granted(pool, "k", T0) == 25
    # Answers come in request order, whatever order the rows are taken in.
    assert await limits.acquire(pool, [("z", T0, 3, 5), ("a", T0, 4, 5), ("k", T0, 1, 30)]) == [
        3,
        4,
        1,
    ]
    assert await limits.acquire(pool, []) == []
    with pytest.raises(ValueError, match="once"):
        await limits.acquire(pool, [("k", T0, 1, 5), ("k", T0, 1, 5)])


async def test_concurrent_acquires_never_pass_the_limit(
    daemons: list[Db], pool: asyncpg.Pool
) -> None:
    requests = [("x", T0, 3, 40), ("y", T0, 2, 40)]
    grants = await asyncio.gather(
        *(limits.acquire(d.db, requests) for _ in range(15) for d in daemons)
    )
    assert sum(g[0] for g in grants) == 40
    assert sum(g[1] for g in grants) == 40
    assert (await granted(pool, "x", T0), await granted(pool, "y", T0)) == (40, 40)


async def test_release_returns_tokens_down_to_zero(pool: asyncpg.Pool) -> None:
    await limits.acquire(pool, [("k", T0, 10, 100)])
    await limits.release(pool, [("k", T0, 3), ("k", T0, 2), ("missing", T0, 5)])
    assert await granted(pool, "k", T0) == 5
    await limits.release(pool, [("k", T0, 50)])
    assert await granted(pool, "k", T0) == 0
    assert await granted(pool, "missing", T0) is None
    await limits.release(pool, [])


async def test_purge_removes_the_windows_that_ended(pool: asyncpg.Pool) -> None:
    table = RateTable(RateLimits(tenant={"*": "5/1h"}, adapter={"*": "5/1m"}))
    hour = timedelta(hours=1)
    for start in (T0 - 3 * hour, T0 - 2 * hour, T0 - MINUTE, T0):
        await limits.acquire(pool, [("rate:tenant:acme", start, 1, 5)])
    now = T0 + timedelta(minutes=30)
    assert await limits.purge(pool, now - table.longest_window) == 2
    rows = await pool.fetch("SELECT window_start FROM dripd.rate_windows ORDER BY 1")
    assert [r["window_start"] for r in rows] == [T0 - MINUTE, T0]
