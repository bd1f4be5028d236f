"""Shared rate limits that hold in every sliding window, leased from Postgres in slices.

A limit such as `"100/1m"` is a bucket: at most `limit` sends in ANY interval of `window`,
as a receiver counts them, across every daemon. A send takes one token of every bucket it
falls in (adapter, provider, sending domain, recipient domain, tenant, sequence), all or none.

How: the window is cut into `SLICES` (20) slices aligned to the Unix epoch, so every daemon
agrees on them without talking to the others. A daemon leases tokens of the slice it is in and
may spend them only until that slice ends. The database grants a lease only while no `span`
consecutive slices hold more than `limit` tokens together. An interval of `window` meets at
most SLICES + 1 slices, so span = SLICES + 1 would do for sends counted when they start; but
receivers count arrivals, and a send takes up to ~100 ms to arrive (plus the hosts' clocks
disagree a little). So span also covers a `tolerance` of min(window / 10, 250 ms): any
interval of window + tolerance meets at most span slices, and two sends can arrive that much
closer than they started and still never exceed the limit in any window. (This replaces
the guard at the end of a fixed window: no send pauses, the budget pays instead.) The price
is the throughput a bucket kept busy can reach: `limit` per span slices, 20/23 of the limit
for a 1 s window, 20/22 (91 %) from 5 s up. What a daemon leased and did not spend goes back
with its next lease of the bucket (no extra round trip) or on `give_back`.

The budget lives in `dripd.rate_windows`, one row per bucket holding the grants of its recent
slices; one upsert, serialized by that row's lock, decides a lease for every bucket of a take,
so N daemons together never exceed the limit. A lease asks for what the takes waiting on it
need, or for twice what this daemon spent of the bucket in its last slice (at most
`lease_size`, a twentieth of the limit) when that is more: a bucket kept busy costs about one
round trip per slice and per daemon, not one per send. When the database says a bucket is
spent, it also says when it can grant again, and until then takes are refused from memory.

Why slices and not GCRA: GCRA (a leaky bucket) bounds the rate plus a burst, not the count
in every window (a full burst followed by the steady rate puts up to 2 x limit in one window
unless the burst is cut to nothing), and handing out runs of its emission times in leases
makes each token valid only at its own instant. Slices keep bursts (a lane with a budget
of 5/1s sends 5 at once, then waits) and lease in bulk.

Measured (a script driving `take` against Postgres 15 on one loaded 2-core host; 4 daemons,
each a pool of its own and 50 concurrent takers, in one process; medians of 3 runs):
  - three buckets far above the demand (1 s, 1 m, 1 m windows): 48k takes/s in all (CPU
    bound: the old fixed windows did 35k in the same runs), 25 round trips/s per daemon, 20
    of them the 1 s bucket's slices; `take` from memory alone: 93k/s (the old: 76k/s);
  - one busy "2000/1s" bucket shared by the 4: 1743 takes/s granted (20/23 of the limit),
    one round trip per 50 granted takes, and the busiest second held exactly 2000. The old
    fixed windows granted 2309/s, and their busiest second held 4000.
  20 slices a window rather than 10: 10 would halve the round trips (a few per second and
  bucket either way) but hold 1660/s (5/6) of the same bucket, and 5/6 for every window.

Database access is injected (`acquire`, `release`): this module never imports dripd.db.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TypeAlias

import anyio
import anyio.lowlevel

from dripd import config
from dripd.addresses import normalize_domain
from dripd.model import parse_rate

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

SCOPES = ("adapter", "provider", "sending_domain", "recipient_domain", "tenant", "sequence")
_DOMAIN_SCOPES = frozenset({"sending_domain", "recipient_domain"})

SLICES = 20  # a window is leased in 20 slices: ~1 round trip per slice, 91 % of the limit
MAX_TOLERANCE = timedelta(milliseconds=250)  # how much sooner a send may arrive than it started
_SWEEP_EVERY = timedelta(minutes=1)


@dataclass(frozen=True, slots=True, kw_only=True)
class Bucket:
    """One shared budget: at most `limit` tokens in any interval of length `window`."""

    key: str  # "rate:<scope>:<value>", the bucket's name in dripd.rate_windows
    limit: int
    window: timedelta

    @property
    def slice(self) -> timedelta:
        """The unit tokens are leased in and expire with: a `SLICES`-th of the window."""
        return self.window / SLICES

    def slice_of(self, now: datetime) -> datetime:
        """The start of the slice `now` falls in (slices are aligned to the Unix epoch)."""
        return now - (now - EPOCH) % self.slice

    @property
    def tolerance(self) -> timedelta:
        """How much closer two sends may arrive than they started without passing the limit in
        any window of a receiver: a tenth of the window, at most `MAX_TOLERANCE`."""
        return min(self.window / 10, MAX_TOLERANCE)

    @property
    def span(self) -> int:
        """How many consecutive slices together hold at most `limit` tokens: every interval of
        `window + tolerance` meets no more than that many."""
        return SLICES + 1 - (-self.tolerance // self.slice)

    @property
    def period(self) -> timedelta:
        """The time in which a bucket kept busy grants its `limit` (`span` slices)."""
        return self.slice * self.span

    @property
    def lease_size(self) -> int:
        """The most a lease asks for beyond the demand waiting on it: a `SLICES`-th of the
        limit, at least one."""
        return -(-self.limit // SLICES)


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """One bucket's part of a lease: up to `want` tokens in the slice of length `slice` that
    starts at `at`, such that no `span` consecutive slices grant more than `limit` together;
    and `back` tokens, leased in the earlier slice `back_at` and never spent, given back."""

    bucket: str
    slice: timedelta
    at: datetime
    want: int
    limit: int
    span: int
    back_at: datetime | None = None
    back: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Grant:
    """The database's answer to one `Request`: `granted` tokens (0 to `want`), and the
    bucket's grants per slice after the lease, `grants[0]` in the slice that starts at
    `start_at` and each next one in the slice after."""

    granted: int
    start_at: datetime
    grants: tuple[int, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Unused:
    """`count` tokens of a bucket leased in the slice that starts at `at` and never spent."""

    bucket: str
    slice: timedelta
    at: datetime
    count: int


Acquire: TypeAlias = Callable[[Sequence[Request]], Awaitable[Sequence[Grant]]]
Release: TypeAlias = Callable[[Sequence[Unused]], Awaitable[None]]


class RateTable:
    """The configured rate limits, parsed once: the buckets one send is charged to."""

    def __init__(self, limits: config.RateLimits) -> None:
        self._exact: dict[str, dict[str, tuple[int, timedelta]]] = {}
        self._wildcard: dict[str, tuple[int, timedelta]] = {}
        for scope in SCOPES:
            exact: dict[str, tuple[int, timedelta]] = {}
            for value, text in getattr(limits, scope).items():
                rate = parse_rate(text, where=f"rate_limits.{scope}.{value}")
                if value == "*":
                    self._wildcard[scope] = rate
                else:
                    where = f"rate_limits.{scope}.{value}"
                    key = normalize_domain(value, field=where) if scope in _DOMAIN_SCOPES else value
                    exact[key] = rate
            self._exact[scope] = exact
        windows = [w for _, w in self._wildcard.values()]
        windows += [w for rates in self._exact.values() for _, w in rates.values()]
        self.longest_window: timedelta = max(windows, default=timedelta(0))
        self._empty = not windows

    def __bool__(self) -> bool:
        """Whether any rate limit is configured."""
        return not self._empty

    def buckets_for(
        self,
        *,
        adapter: str | None,
        provider: str | None,
        sending_domain: str | None,
        recipient_domain: str | None,
        tenant: str | None,
        sequence: str | None,
    ) -> list[Bucket]:
        """The buckets of one send. Per scope, the value's own entry wins over `"*"` (which
        limits every value separately); a None value leaves the scope out; domains are
        compared in the one spelling of `dripd.addresses` (lowercase, `xn--` as Unicode)."""
        if self._empty:
            return []
        buckets: list[Bucket] = []
        values = (adapter, provider, sending_domain, recipient_domain, tenant, sequence)
        for scope, value in zip(SCOPES, values, strict=True):
            if not value:
                continue
            if scope in _DOMAIN_SCOPES:
                value = normalize_domain(value, field=scope)
            rate = self._exact[scope].get(value) or self._wildcard.get(scope)
            if rate is not None:
                buckets.append(Bucket(key=f"rate:{scope}:{value}", limit=rate[0], window=rate[1]))
        return buckets


@dataclass(eq=False, slots=True)
class _Lease:
    """A lease in flight, run by the take that started it; the others wait for `done`."""

    done: anyio.Event = field(default_factory=anyio.Event)
    error: Exception | None = None

    async def wait(self) -> None:
        await self.done.wait()
        if self.error is not None:
            raise self.error  # the lease's error is every waiter's


@dataclass(slots=True, eq=False)
class _Hold:
    """This daemon's share of one bucket: the tokens of its current slice, and what it knows."""

    bucket: Bucket
    at: datetime  # the start of the slice `tokens` belong to; they expire at its end
    tokens: int = 0
    spent: int = 0  # tokens taken in slice `at`
    pace: int = 0  # tokens taken in the slice just before it
    back_at: datetime | None = None  # an earlier slice whose `back` tokens were never spent
    back: int = 0
    until: datetime | None = None  # the database can grant nothing before this
    refused: int = 0  # takes refused since the bucket last granted: the queue behind it
    demand: int = 0  # tokens wanted by the takes and prefetches waiting for a lease
    lease: _Lease | None = None  # the lease in flight, shared by every taker


class Limiter:
    """This daemon's side of the shared rate limits: leases tokens from the database in
    slices (through the injected `acquire`) and spends them in memory."""

    def __init__(self, *, acquire: Acquire, release: Release) -> None:
        self._acquire = acquire
        self._release = release
        self._holds: dict[tuple[str, timedelta], _Hold] = {}
        self._sweep_at: datetime | None = None

    async def take(self, buckets: Sequence[Bucket], now: datetime) -> datetime | None:
        """Take one token of every bucket, all or none. None when taken; otherwise the
        instant to try again: when the latest refusing bucket can grant again, plus this
        take's place in the queue of refused takes behind it (the first `limit` refused
        are spread over one `period`, the next `limit` over the one after, and so on).

        A bucket with no token of the current slice left leases first; the takes that run
        out at the same time share that one round trip (one for all their buckets).
        Raises DripdError (the injected `acquire`'s) when the lease fails.
        """
        self._sweep(now)
        while True:
            holds = [self._hold(bucket, now) for bucket in buckets]
            retry_at: datetime | None = None
            joined: list[_Hold] = []
            missing: list[tuple[Bucket, _Hold]] = []
            for bucket, hold in zip(buckets, holds, strict=True):
                if hold.lease is not None:
                    joined.append(hold)
                    continue
                _roll(hold, now)
                if hold.tokens > 0:
                    continue
                if _full(hold, now):
                    at = _queued(bucket, hold)
                    retry_at = at if retry_at is None else max(retry_at, at)
                else:
                    missing.append((bucket, hold))
            if retry_at is not None:
                return retry_at
            if not joined and not missing:
                for hold in holds:
                    hold.tokens -= 1
                    hold.spent += 1
                return None
            # Then look again: others waiting on the same lease may have spent it first.
            await self._lease(missing, joined, [1] * (len(missing) + len(joined)))

    def blocked_until(self, buckets: Sequence[Bucket], now: datetime) -> datetime | None:
        """The instant before which `take(buckets, …)` would certainly refuse: the latest
        instant until which one of the buckets is known spent (the database said so, and
        this daemon holds none of its tokens, neither for the current slice nor expired ones
        that a lease would give back and could take again). None when no bucket is known
        spent, or while a lease of it is in flight. No I/O."""
        until: datetime | None = None
        for bucket in buckets:
            hold = self._holds.get((bucket.key, bucket.slice))
            if hold is None or hold.lease is not None or hold.tokens or hold.until is None:
                continue
            if _full(hold, now):
                until = hold.until if until is None else max(until, hold.until)
        return until

    async def prefetch(self, buckets: Sequence[Bucket], want: int, now: datetime) -> int:
        """Make sure up to `want` tokens of every bucket are held for the current slice,
        leasing what is missing in one round trip for all the buckets (none when every
        bucket holds enough, or one is known spent); return how many sends could now take
        a token of every bucket without another round trip: the least held over the
        buckets, 0 when one is spent (`want` when there are no buckets). It may be more
        than `want`. Tokens not taken stay held: they expire with their slice (and go back
        with the next lease) or go back with `give_back`.
        Raises DripdError (the injected `acquire`'s) when the lease fails."""
        if not buckets:
            return max(want, 0)
        self._sweep(now)
        holds = [self._hold(bucket, now) for bucket in buckets]
        joined: list[_Hold] = []
        missing: list[tuple[Bucket, _Hold]] = []
        for bucket, hold in zip(buckets, holds, strict=True):
            if hold.lease is not None:
                joined.append(hold)
                continue
            _roll(hold, now)
            full = _full(hold, now)
            if full and hold.tokens == 0:
                return 0
            if not full and hold.tokens < want:
                missing.append((bucket, hold))
        if missing or joined:
            needs = [want - hold.tokens for _, hold in missing] + [0] * len(joined)
            await self._lease(missing, joined, needs)
        return min(_current(hold, now) for hold in holds)

    def tokens(self, bucket: Bucket, now: datetime) -> int:
        """The unspent tokens this daemon holds of `bucket` for the slice `now` falls in."""
        hold = self._holds.get((bucket.key, bucket.slice))
        return 0 if hold is None else _current(hold, now)

    async def give_back(self) -> None:
        """Return the unspent tokens to the shared budget, for the other daemons to lease
        while their slices still count. Call it on stop, after the last `take`.
        Raises DripdError (the injected `release`'s)."""
        while pending := {h.lease for h in self._holds.values() if h.lease is not None}:
            for lease in pending:
                await lease.done.wait()
        unused: list[Unused] = []
        for hold in self._holds.values():
            key, length = hold.bucket.key, hold.bucket.slice
            if hold.tokens:
                unused.append(Unused(bucket=key, slice=length, at=hold.at, count=hold.tokens))
            if hold.back and hold.back_at is not None:
                unused.append(Unused(bucket=key, slice=length, at=hold.back_at, count=hold.back))
        self._holds.clear()
        if unused:
            await self._release(unused)

    def _hold(self, bucket: Bucket, now: datetime) -> _Hold:
        key = (bucket.key, bucket.slice)
        hold = self._holds.get(key)
        if hold is None:
            hold = self._holds[key] = _Hold(bucket=bucket, at=bucket.slice_of(now))
        return hold

    async def _lease(
        self, missing: list[tuple[Bucket, _Hold]], joined: list[_Hold], needs: list[int]
    ) -> None:
        """Lease the `missing` buckets in one round trip and wait for the leases the
        `joined` holds have in flight; `needs` counts the tokens each hold is wanted for
        (missing first, then joined)."""
        waits = {hold.lease for hold in joined if hold.lease is not None}
        counted = [hold for _, hold in missing] + joined
        for hold, need in zip(counted, needs, strict=True):
            hold.demand += need
        try:
            if missing:
                lease = _Lease()
                for _, hold in missing:
                    hold.lease = lease
                # Shielded, so that a cancelled taker neither loses a lease the database
                # granted nor strands the takes waiting for it. (asyncio's own task
                # cancellation passes anyio's shield: then the waiters wake, find no tokens
                # and lease again; what the interrupted lease may have granted stays
                # counted, which wastes a little budget and never passes the limit.)
                with anyio.CancelScope(shield=True):
                    await self._run(lease, missing)
                # A taker cancelled meanwhile leaves now, its tokens to the others.
                await anyio.lowlevel.checkpoint_if_cancelled()
            for other in waits:
                await other.wait()
        finally:
            for hold, need in zip(counted, needs, strict=True):
                hold.demand -= need

    async def _run(self, lease: _Lease, missing: list[tuple[Bucket, _Hold]]) -> None:
        try:
            # Let the takes that run out at this moment join first, so the lease asks for
            # them too.
            await anyio.lowlevel.checkpoint()
            requests: list[Request] = []
            for bucket, hold in missing:
                ask = max(hold.demand, min(bucket.lease_size, 2 * max(hold.spent, hold.pace)), 1)
                requests.append(
                    Request(
                        bucket=bucket.key,
                        slice=bucket.slice,
                        at=hold.at,
                        want=min(ask, bucket.limit),
                        limit=bucket.limit,
                        span=bucket.span,
                        back_at=hold.back_at,
                        back=hold.back,
                    )
                )
                # Given back once at most, even if the outcome stays unknown: a return that
                # is lost only wastes budget, one counted twice could pass the limit.
                hold.back_at, hold.back = None, 0
            grants = await self._acquire(requests)
            for (_, hold), request, grant in zip(missing, requests, grants, strict=True):
                hold.tokens += grant.granted
                if grant.granted:
                    hold.refused = 0
                hold.until = _reopens(request, grant)
        except Exception as exc:
            lease.error = exc
            raise
        finally:
            for _, hold in missing:
                hold.lease = None
            lease.done.set()

    def _sweep(self, now: datetime) -> None:
        # A bucket idle for a period has nothing left to spend or give back that still
        # counts; drop it so that a limit on every recipient domain does not keep one entry
        # per domain ever seen.
        if self._sweep_at is not None and now < self._sweep_at:
            return
        self._sweep_at = now + _SWEEP_EVERY
        idle = [
            key
            for key, hold in self._holds.items()
            if hold.lease is None
            and hold.demand == 0
            and hold.at + hold.bucket.period <= now
            and (hold.until is None or hold.until <= now)
        ]
        for key in idle:
            del self._holds[key]


def _roll(hold: _Hold, now: datetime) -> None:
    """Move `hold` on to the slice `now` falls in: the tokens of an ended slice expire and
    are given back with the next lease. A `now` older than the hold's slice (a caller's
    stale reading of the clock) changes nothing."""
    at = hold.bucket.slice_of(now)
    if at <= hold.at:
        return
    if hold.tokens:
        # No older return is pending: the lease that brought these tokens took it along.
        hold.back_at, hold.back = hold.at, hold.tokens
    hold.pace = hold.spent if at - hold.at == hold.bucket.slice else 0
    hold.at, hold.tokens, hold.spent = at, 0, 0


def _full(hold: _Hold, now: datetime) -> bool:
    """Whether a lease at `now` would certainly get nothing: the database said the bucket has
    no room before `until`, and this daemon has no expired tokens to give back (a lease that
    returns them may take them again)."""
    return hold.until is not None and now < hold.until and hold.back == 0


def _current(hold: _Hold, now: datetime) -> int:
    """The tokens of `hold` that a take at `now` may spend (none once their slice ended)."""
    return hold.tokens if hold.bucket.slice_of(now) <= hold.at else 0


def _reopens(request: Request, grant: Grant) -> datetime | None:
    """When the bucket can grant again after this lease: None while the request's slice has
    room left; else the start of the first later slice with room (given what the database
    has granted so far; other daemons may still take it first)."""
    length, span, limit = request.slice, request.span, request.limit
    first = (grant.start_at - EPOCH) // length
    grants = grant.grants

    def counted(index: int) -> int:
        # The lease rule of acquire.sql: the slices from index - span + 1 on.
        return sum(grants[max(index - span + 1 - first, 0) :])

    index = (request.at - EPOCH) // length
    if grant.granted >= request.want and counted(index) < limit:
        return None
    index += 1
    while counted(index) >= limit:
        index += 1
    return EPOCH + length * index


def _queued(bucket: Bucket, hold: _Hold) -> datetime:
    """When the next refused take of a spent bucket should try again: the first `limit`
    refused spread evenly over the `period` from when the bucket can grant again, the next
    `limit` over the period after, and so on. A backlog far larger than the limit is then
    not claimed, and deferred again, in full whenever the bucket grants (only this daemon's
    refusals count, so with several daemons some rows come back early and are simply
    deferred once more)."""
    assert hold.until is not None
    periods, slot = divmod(hold.refused, bucket.limit)
    hold.refused += 1
    return hold.until + bucket.period * periods + bucket.period * slot / bucket.limit
