"""Shared rate limits: buckets from the config, leases from Postgres, several daemons at once."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta

import anyio
import asyncpg
import pytest

from dripd.config import RateLimits
from dripd.db import limits, store
from dripd.errors import DatabaseError
from dripd.rules.limiter import Bucket, Grant, Limiter, RateTable, Request, Unused

T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)  # the start of a minute (and of an hour)
SECOND = timedelta(seconds=1)
MINUTE = timedelta(minutes=1)
HOUR = timedelta(hours=1)


def bucket(key: str, limit: int, window: timedelta = MINUTE) -> Bucket:
    return Bucket(key=key, limit=limit, window=window)


class Db:
    """The limiter's database side over one pool, counting the lease round trips."""

    def __init__(self, db: store.Executor) -> None:
        self.db = db
        self.calls: list[list[Request]] = []

    async def acquire(self, requests: Sequence[Request]) -> Sequence[Grant]:
        self.calls.append(list(requests))
        return await limits.acquire(self.db, requests)

    async def release(self, unused: Sequence[Unused]) -> None:
        await limits.release(self.db, unused)

    def limiter(self) -> Limiter:
        return Limiter(acquire=self.acquire, release=self.release)


async def slices(db: store.Executor, b: Bucket) -> dict[datetime, int]:
    """What the database granted of `b` per slice start (slices with nothing left out)."""
    row = await db.fetchrow(
        "SELECT start_at, grants FROM dripd.rate_windows WHERE bucket = $1 AND slice = $2",
        b.key,
        b.slice,
    )
    if row is None:
        return {}
    return {row["start_at"] + n * b.slice: g for n, g in enumerate(row["grants"]) if g}


def ask(
    key: str, at: datetime, want: int, limit: int, *, back_at: datetime | None = None, back: int = 0
) -> Request:
    """A request for a one-minute bucket (3 s slices, 22 to a span)."""
    return Request(
        bucket=key,
        slice=MINUTE / 20,
        at=at,
        want=want,
        limit=limit,
        span=22,
        back_at=back_at,
        back=back,
    )


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


def test_slices_are_aligned_to_the_unix_epoch_and_spans_cover_the_tolerance() -> None:
    seven = bucket("k", 1, timedelta(minutes=7))
    assert seven.slice == timedelta(seconds=21)
    now = T0 + timedelta(minutes=3, seconds=5)
    start = seven.slice_of(now)
    assert (start - datetime(1970, 1, 1, tzinfo=UTC)) % seven.slice == timedelta(0)
    assert start <= now < start + seven.slice
    # Any interval of window + tolerance meets at most `span` slices.
    one_second = bucket("k", 5, SECOND)  # slices of 50 ms, a tolerance of 100 ms
    assert (one_second.tolerance, one_second.span) == (timedelta(milliseconds=100), 23)
    assert one_second.period == timedelta(milliseconds=1150)
    minute = bucket("k", 100)  # slices of 3 s, a tolerance of 250 ms
    assert (minute.tolerance, minute.span, minute.period) == (
        timedelta(seconds=0.25),
        22,
        66 * SECOND,
    )
    assert bucket("k", 5, 5 * SECOND).span == 22  # the 250 ms tolerance is one 250 ms slice
    assert (bucket("k", 100).lease_size, bucket("k", 101).lease_size) == (5, 6)
    assert bucket("k", 3).lease_size == 1


# -- one daemon ----------------------------------------------------------------------------


async def test_a_bucket_grants_its_limit_once_per_sliding_window_and_queues_the_rest(
    pool: asyncpg.Pool,
) -> None:
    db = Db(pool)
    limiter = db.limiter()
    b = bucket("rate:tenant:acme", 25)  # 3 s slices, 22 to a span: a period of 66 s
    results = [await limiter.take([b], T0 + timedelta(milliseconds=i)) for i in range(30)]
    assert results[:25] == [None] * 25
    # Slice 22 is the first whose span does not hold slice 0: the refused queue up behind
    # it, spread over the next period (66 s / 25 each).
    reopen = T0 + 66 * SECOND
    assert results[25:] == [reopen + timedelta(seconds=2.64 * k) for k in range(5)]
    # A lease asks for twice what was spent in the slice, at most a twentieth of the limit.
    assert [c[0].want for c in db.calls] == [1] + [2] * 12
    assert await slices(pool, b) == {T0: 25}
    # A fixed window would start again at T0 + 1 min; a sliding one does not: refused from
    # memory, without a round trip.
    assert await limiter.take([b], T0 + MINUTE) == reopen + timedelta(seconds=2.64 * 5)
    assert len(db.calls) == 13
    assert await limiter.take([b], reopen - timedelta(microseconds=1)) is not None
    again = [await limiter.take([b], reopen + i * timedelta(milliseconds=1)) for i in range(26)]
    assert again == [None] * 25 + [reopen + 66 * SECOND]
    assert await slices(pool, b) == {T0: 25, reopen: 25}


async def test_a_refused_take_charges_no_bucket(pool: asyncpg.Pool) -> None:
    limiter = Db(pool).limiter()
    scarce, plenty = bucket("rate:tenant:acme", 1), bucket("rate:provider:smtp", 100)
    assert await limiter.prefetch([plenty], 10, T0) == 10
    assert await limiter.take([scarce, plenty], T0) is None
    assert limiter.tokens(plenty, T0) == 9
    assert await limiter.take([scarce, plenty], T0) == T0 + 66 * SECOND
    assert limiter.tokens(plenty, T0) == 9  # not charged


async def test_the_latest_reopening_of_the_refusing_buckets_is_named(pool: asyncpg.Pool) -> None:
    limiter = Db(pool).limiter()
    minute, hour = bucket("rate:provider:smtp", 1), bucket("rate:tenant:acme", 1, HOUR)
    now = T0 + timedelta(minutes=10)
    assert await limiter.take([minute, hour], now) is None
    # The hour's slices are 3 min long: 12:09 + 22 of them.
    assert await limiter.take([minute, hour], now) == T0 + timedelta(minutes=75)
    # The minute bucket's second refusal queues behind its first: one period later.
    assert await limiter.take([minute], now) == now + 2 * 66 * SECOND


async def test_unspent_tokens_expire_with_their_slice_and_go_back_with_the_next_lease(
    pool: asyncpg.Pool,
) -> None:
    db = Db(pool)
    limiter = db.limiter()
    b = bucket("rate:tenant:acme", 100)  # 3 s slices
    assert await limiter.prefetch([b], 10, T0) == 10
    assert await limiter.take([b], T0) is None
    assert limiter.tokens(b, T0) == 9
    later = T0 + 3 * SECOND
    assert limiter.tokens(b, later) == 0  # they expired with their slice
    assert await limiter.take([b], later) is None
    (request,) = db.calls[-1]
    assert (request.at, request.back_at, request.back) == (later, T0, 9)
    assert request.want == 2  # twice what was spent in the slice before
    assert await slices(pool, b) == {T0: 1, later: 2}
    # A stale reading of the clock spends the current slice's tokens; it never goes back.
    assert await limiter.take([b], T0 + SECOND) is None
    assert limiter.tokens(b, later) == 0
    assert len(db.calls) == 2


async def test_prefetch_holds_what_a_lane_can_send_and_blocked_until_names_the_wait(
    pool: asyncpg.Pool,
) -> None:
    db = Db(pool)
    limiter = db.limiter()
    lane = [bucket("rate:adapter:smtp", 5, SECOND), bucket("rate:provider:smtp", 1000)]
    assert limiter.blocked_until(lane, T0) is None
    assert await limiter.prefetch(lane, 20, T0) == 5  # the least over the buckets
    assert [[(r.bucket, r.want) for r in c] for c in db.calls] == [
        [("rate:adapter:smtp", 5), ("rate:provider:smtp", 20)]  # never more than the limit
    ]
    assert limiter.tokens(lane[1], T0) == 20
    # The sends take what was prefetched without another round trip.
    assert [await limiter.take(lane, T0) for _ in range(5)] == [None] * 5
    assert len(db.calls) == 1
    reopen = T0 + 23 * timedelta(milliseconds=50)  # 1 s + tolerance + a slice
    assert limiter.blocked_until(lane, T0) == reopen
    half = T0 + SECOND / 2
    assert limiter.blocked_until(lane, half) == reopen
    assert await limiter.prefetch(lane, 20, half) == 0  # known spent: no round trip
    assert await limiter.take(lane, half) == reopen
    assert len(db.calls) == 1
    assert limiter.blocked_until(lane, reopen) is None
    assert limiter.blocked_until(lane[1:], half) is None  # the provider has tokens left
    # At the reopening only the spent bucket leases: the provider still holds 15 (3 s slices).
    assert await limiter.prefetch(lane, 3, reopen) == 3
    assert [[(r.bucket, r.want) for r in c] for c in db.calls[1:]] == [[("rate:adapter:smtp", 3)]]
    assert await limiter.prefetch([], 7, reopen) == 7  # nothing limits it


async def test_prefetch_of_a_partly_spent_bucket_returns_what_it_holds(pool: asyncpg.Pool) -> None:
    limiter = Db(pool).limiter()
    b = bucket("rate:tenant:acme", 4)
    assert await limiter.prefetch([b], 3, T0) == 3
    assert await limiter.prefetch([b], 10, T0) == 4  # one more was left
    assert limiter.blocked_until([b], T0) is None  # it holds tokens
    assert await limiter.prefetch([b], 10, T0) == 4  # spent: no lease, what it holds
    assert [await limiter.take([b], T0) for _ in range(4)] == [None] * 4
    assert limiter.blocked_until([b], T0) == T0 + 66 * SECOND


async def test_expired_tokens_of_a_spent_bucket_go_back_and_are_taken_again(
    pool: asyncpg.Pool,
) -> None:
    db = Db(pool)
    limiter = db.limiter()
    b = bucket("rate:adapter:smtp", 5, SECOND)  # 50 ms slices
    assert await limiter.prefetch([b], 20, T0) == 5  # all there is: spent until T0 + 1.15 s
    later = T0 + timedelta(milliseconds=80)  # the claim took longer than a slice
    assert limiter.tokens(b, later) == 0
    assert limiter.blocked_until([b], later) is None  # a lease would give them back
    results = await asyncio.gather(*(limiter.take([b], later) for _ in range(6)))
    reopen = T0 + timedelta(milliseconds=50) + 23 * timedelta(milliseconds=50)
    assert (results.count(None), [r for r in results if r is not None]) == (5, [reopen])
    (request,) = db.calls[-1]
    assert (request.back_at, request.back, request.want) == (T0, 5, 5)
    assert await slices(pool, b) == {T0 + timedelta(milliseconds=50): 5}
    assert limiter.blocked_until([b], later) == reopen


# -- one round trip for many takes ---------------------------------------------------------


async def test_concurrent_takes_of_an_empty_bucket_share_one_lease(pool: asyncpg.Pool) -> None:
    db = Db(pool)
    limiter = db.limiter()
    b = bucket("rate:recipient_domain:gmail.com", 1000)
    results = await asyncio.gather(*(limiter.take([b], T0) for _ in range(50)))
    assert results == [None] * 50
    # The lease asks for every take that ran out at that moment.
    assert [[(r.bucket, r.at, r.want) for r in c] for c in db.calls] == [[(b.key, T0, 50)]]
    assert limiter.tokens(b, T0) == 0


async def test_one_take_leases_all_its_empty_buckets_in_one_round_trip(
    pool: asyncpg.Pool,
) -> None:
    db = Db(pool)
    limiter = db.limiter()
    a, b, c = (bucket(f"rate:tenant:{n}", 100) for n in "abc")
    assert await asyncio.gather(limiter.take([a, b], T0), limiter.take([b, c], T0)) == [None] * 2
    # The second take waits for the lease of b in flight (which asks for it too) and
    # leases only c itself.
    assert [[(r.bucket, r.want) for r in call] for call in db.calls] == [
        [(a.key, 1), (b.key, 2)],
        [(c.key, 1)],
    ]
    assert (limiter.tokens(a, T0), limiter.tokens(b, T0), limiter.tokens(c, T0)) == (0, 0, 0)


async def test_a_failed_lease_fails_its_waiters_and_the_next_take_retries(
    pool: asyncpg.Pool,
) -> None:
    db = Db(pool)
    failures = 1

    async def flaky(requests: Sequence[Request]) -> Sequence[Grant]:
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
    called, go = anyio.Event(), anyio.Event()

    async def slow(requests: Sequence[Request]) -> Sequence[Grant]:
        called.set()
        await go.wait()
        return await db.acquire(requests)

    limiter = Limiter(acquire=slow, release=db.release)
    b = bucket("rate:tenant:acme", 100)
    outcomes: list[object] = []

    async def cancelled() -> None:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            outcomes.append(await limiter.take([b], T0))
        outcomes.append("cancelled" if scope.cancelled_caught else "not cancelled")

    async def waiter() -> None:
        outcomes.append(await limiter.take([b], T0))  # waits for the lease still in flight

    scopes: list[anyio.CancelScope] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(cancelled)
        await called.wait()
        tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        scopes[0].deadline = -math.inf  # cancelled at once
        go.set()
    assert sorted(outcomes, key=str) == [None, "cancelled"]
    assert len(db.calls) == 1
    assert limiter.tokens(b, T0) == 0  # the cancelled take left its token to the waiter


async def test_an_interrupted_lease_does_not_strand_its_waiters(pool: asyncpg.Pool) -> None:
    # asyncio's own cancellation (here a timeout) passes anyio's shield: the lease stops,
    # and the takes waiting on it lease again instead of waiting forever.
    db = Db(pool)
    called, go = anyio.Event(), anyio.Event()

    async def slow(requests: Sequence[Request]) -> Sequence[Grant]:
        called.set()
        await go.wait()
        return await db.acquire(requests)

    limiter = Limiter(acquire=slow, release=db.release)
    b = bucket("rate:tenant:acme", 100)
    timeouts: list[asyncio.Timeout] = []
    outcomes: list[object] = []
    stopped = anyio.Event()

    async def interrupted() -> None:
        try:
            async with asyncio.timeout(None) as timeout:
                timeouts.append(timeout)
                await limiter.take([b], T0)
        except TimeoutError:
            outcomes.append("timed out")
            stopped.set()

    async def waiter() -> None:
        outcomes.append(await limiter.take([b], T0))

    async with anyio.create_task_group() as tg:
        tg.start_soon(interrupted)
        await called.wait()
        tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        timeouts[0].reschedule(asyncio.get_running_loop().time())
        await stopped.wait()
        go.set()
    assert outcomes == ["timed out", None]
    assert len(db.calls) == 1  # the interrupted lease never reached the database


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
async def test_three_daemons_together_take_exactly_the_limit_per_period(
    daemons: list[Db], pool: asyncpg.Pool, limit: int
) -> None:
    limiters = [d.limiter() for d in daemons]
    tenant = bucket("rate:tenant:acme", limit)
    provider = bucket("rate:provider:smtp", 1000)  # charged too, never the one that runs out
    demand = limit + 10  # each daemon alone wants more than the limit
    for p in range(4):
        start = T0 + p * tenant.period
        results = await asyncio.gather(
            *(
                limiter.take([provider, tenant], start + timedelta(milliseconds=i))
                for i in range(demand)
                for limiter in limiters
            )
        )
        assert results.count(None) == limit
        refused = [r for r in results if r is not None]
        assert min(refused) == start + tenant.period  # not before the span has passed
        assert (await slices(pool, tenant))[start] == limit  # all in the slice of the takes
        assert all(limiter.tokens(tenant, start) == 0 for limiter in limiters)
        provider_granted = (await slices(pool, provider))[provider.slice_of(start)]
        held = sum(limiter.tokens(provider, start) for limiter in limiters)
        assert provider_granted == limit + held


async def test_an_idle_daemons_tokens_come_back_on_give_back(
    daemons: list[Db], pool: asyncpg.Pool
) -> None:
    idle, busy = daemons[0].limiter(), daemons[1].limiter()
    b = bucket("rate:tenant:acme", 100)
    assert await idle.prefetch([b], 10, T0) == 10
    assert await idle.take([b], T0) is None
    assert await busy.prefetch([b], 100, T0 + SECOND) == 90
    assert await busy.prefetch([b], 100, T0 + SECOND) == 90  # spent: no more
    await idle.give_back()
    assert await slices(pool, b) == {T0: 91}
    assert idle.tokens(b, T0) == 0
    # The busy daemon learns of it when it asks again, from the reopening on.
    assert busy.blocked_until([b], T0 + 2 * SECOND) is None  # it still holds 90
    assert [await busy.take([b], T0 + 2 * SECOND) for _ in range(90)] == [None] * 90
    reopen = busy.blocked_until([b], T0 + 2 * SECOND)
    assert reopen == T0 + 66 * SECOND
    assert await busy.prefetch([b], 100, reopen) == 100  # 100 + 91 in 2 periods: none stranded


async def test_give_back_returns_every_unspent_token_and_keeps_working(pool: asyncpg.Pool) -> None:
    db = Db(pool)
    limiter = db.limiter()
    a, c = bucket("rate:tenant:a", 100), bucket("rate:tenant:c", 30)
    later = T0 + 3 * SECOND
    assert await limiter.prefetch([a], 10, T0) == 10
    assert await limiter.take([a], T0) is None
    assert await limiter.prefetch([c], 5, later) == 5
    assert await limiter.prefetch([a], 0, later) == 0  # a's 9 of slice T0 expired: no lease
    assert len(db.calls) == 2
    await limiter.give_back()
    assert (await slices(pool, a), await slices(pool, c)) == ({T0: 1}, {})
    await limiter.give_back()  # nothing held: no round trip, no change
    assert await limiter.take([a], later) is None
    assert await slices(pool, a) == {T0: 1, later: 1}


# -- the statements ------------------------------------------------------------------------


async def test_acquire_grants_what_the_span_has_left_and_never_more(pool: asyncpg.Pool) -> None:
    s = 3 * SECOND
    grants = [await limits.acquire(pool, [ask("k", T0, 10, 25)]) for _ in range(4)]
    assert [g[0].granted for g in grants] == [10, 10, 5, 0]
    # 21 slices later the span still holds slice T0; one more and it does not.
    assert (await limits.acquire(pool, [ask("k", T0 + 21 * s, 10, 25)]))[0].granted == 0
    fresh = await limits.acquire(pool, [ask("k", T0 + 22 * s, 10, 25)])
    assert fresh[0].granted == 10
    assert (fresh[0].start_at, len(fresh[0].grants)) == (T0, 23)
    # A lowered limit grants nothing more and does not shrink what was granted.
    assert (await limits.acquire(pool, [ask("k", T0 + 22 * s, 10, 5)]))[0].granted == 0
    # Answers come in request order, whatever order the rows are taken in.
    answers = await limits.acquire(
        pool, [ask("z", T0, 3, 5), ask("a", T0, 4, 5), ask("k", T0 + 22 * s, 1, 30)]
    )
    assert [g.granted for g in answers] == [3, 4, 1]
    assert await limits.acquire(pool, []) == []
    with pytest.raises(ValueError, match="once"):
        await limits.acquire(pool, [ask("k", T0, 1, 5), ask("k", T0 + s, 1, 5)])


async def test_a_lagging_request_counts_later_slices_and_a_stale_one_gets_nothing(
    pool: asyncpg.Pool,
) -> None:
    s = 3 * SECOND
    assert (await limits.acquire(pool, [ask("k", T0 + 10 * s, 6, 10)]))[0].granted == 6
    # A daemon whose clock lags asks for an earlier slice: the later grant counts too.
    lagging = await limits.acquire(pool, [ask("k", T0 + 9 * s, 6, 10)])
    assert (lagging[0].granted, lagging[0].start_at, lagging[0].grants) == (4, T0 + 9 * s, (4, 6))
    # An earlier slice, never granted before the row began, is known: it holds nothing.
    assert (await limits.acquire(pool, [ask("k", T0 - 11 * s, 6, 10)]))[0].granted == 0
    assert await slices(pool, bucket("k", 10)) == {T0 + 9 * s: 4, T0 + 10 * s: 6}
    # The row keeps the last 2 × span − 1 slices; a request for a slice older than a span
    # before the newest would need what came before them: it gets nothing.
    far = await limits.acquire(pool, [ask("k", T0 + 100 * s, 1, 10)])
    assert (far[0].start_at, len(far[0].grants)) == (T0 + 58 * s, 43)
    assert (await limits.acquire(pool, [ask("k", T0 + 78 * s, 1, 10)]))[0].granted == 0


async def test_acquire_takes_back_what_rides_along(pool: asyncpg.Pool) -> None:
    s = 3 * SECOND
    await limits.acquire(pool, [ask("k", T0, 10, 10)])
    spent = await limits.acquire(pool, [ask("k", T0 + s, 5, 10)])
    assert spent[0].granted == 0
    # 7 of slice T0 were never spent: they come back before the lease is decided.
    back = await limits.acquire(pool, [ask("k", T0 + s, 5, 10, back_at=T0, back=7)])
    assert (back[0].granted, back[0].grants) == (5, (3, 5))
    # A return never takes a slice below zero, nor touches a slice the row does not keep.
    again = await limits.acquire(pool, [ask("k", T0 + 2 * s, 1, 10, back_at=T0 + s, back=50)])
    assert again[0].grants == (3, 0, 1)
    other = await limits.acquire(pool, [ask("k", T0 + 2 * s, 1, 10, back_at=T0 - 9 * s, back=1)])
    assert other[0].grants == (3, 0, 2)


async def test_concurrent_acquires_never_pass_the_limit(
    daemons: list[Db], pool: asyncpg.Pool
) -> None:
    s = 3 * SECOND
    grants = await asyncio.gather(
        *(
            limits.acquire(d.db, [ask("x", T0 + (n % 4) * s, 3, 40), ask("y", T0, 2, 40)])
            for n in range(15)
            for d in daemons
        )
    )
    assert sum(g[0].granted for g in grants) == 40
    assert sum(g[1].granted for g in grants) == 40
    assert sum((await slices(pool, bucket("x", 40))).values()) == 40
    assert await slices(pool, bucket("y", 40)) == {T0: 40}


async def test_release_returns_tokens_down_to_zero(pool: asyncpg.Pool) -> None:
    s = 3 * SECOND
    k = bucket("k", 100)
    await limits.acquire(pool, [ask("k", T0, 10, 100)])
    await limits.acquire(pool, [ask("k", T0 + s, 4, 100)])
    await limits.release(
        pool,
        [
            Unused(bucket="k", slice=k.slice, at=T0, count=3),
            Unused(bucket="k", slice=k.slice, at=T0, count=2),
            Unused(bucket="k", slice=k.slice, at=T0 + s, count=1),
            Unused(bucket="k", slice=k.slice, at=T0 - s, count=9),  # not kept: skipped
            Unused(bucket="missing", slice=k.slice, at=T0, count=5),
        ],
    )
    assert await slices(pool, k) == {T0: 5, T0 + s: 3}
    await limits.release(pool, [Unused(bucket="k", slice=k.slice, at=T0, count=50)])
    assert await slices(pool, k) == {T0 + s: 3}
    assert await slices(pool, bucket("missing", 100)) == {}
    await limits.release(pool, [])


async def test_purge_removes_the_buckets_whose_slices_ended(pool: asyncpg.Pool) -> None:
    table = RateTable(RateLimits(tenant={"*": "5/1h"}, adapter={"*": "5/1m"}))
    for n, start in enumerate((T0 - 3 * HOUR, T0 - 2 * HOUR, T0 - MINUTE, T0)):
        await limits.acquire(pool, [ask(f"rate:tenant:{n}", start, 1, 5)])
    now = T0 + timedelta(minutes=30)
    assert await limits.purge(pool, now - table.longest_window) == 2
    rows = await pool.fetch("SELECT bucket FROM dripd.rate_windows ORDER BY 1")
    assert [r["bucket"] for r in rows] == ["rate:tenant:2", "rate:tenant:3"]
