"""Shared rate limits: fixed windows whose budget each daemon leases in slices and spends in memory.

A limit such as `"100/1m"` is a bucket: at most `limit` tokens per fixed window aligned to
the Unix epoch (`window_start = floor(now / window) * window`), so every daemon agrees on the
windows without talking to the others. A send takes one token of every bucket it falls in
(adapter, provider, sending domain, recipient domain, tenant, sequence), all or none.

The budget of a window lives in `dripd.rate_windows`: `granted` counts the tokens leased to
all daemons together and never passes the limit (the upsert's row lock serializes them).
A daemon leases a slice (a tenth of the limit) when it runs out and spends it in memory, so a
busy bucket costs one round trip per slice, not one per send. What a daemon leased but did
not spend expires with the window; a stopping daemon gives it back at once (`give_back`).

Guard at the end of a window: within `min(window / 20, 250 ms)` of a window's end, `take`
refuses and names the next window. A token is charged when the send starts, but receivers
(providers' rate limits, the test SMTP sink) count messages when they arrive: a send started
just before the boundary would land in the next window on top of that window's full budget.
The guard also absorbs small clock differences between the daemons' hosts.

Database access is injected (`acquire`, `release`): this module never imports dripd.db.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeAlias

from dripd import config
from dripd.model import parse_rate

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

SCOPES = ("adapter", "provider", "sending_domain", "recipient_domain", "tenant", "sequence")
_DOMAIN_SCOPES = frozenset({"sending_domain", "recipient_domain"})

SHARE = 10  # a lease is 1/SHARE of the limit: few round trips, little stranded when idle
MAX_GUARD = timedelta(milliseconds=250)
# After the database said a window is spent, ask again no sooner than this (tokens come back
# only when a daemon stops), instead of a round trip per refused send.
MAX_RECHECK = timedelta(seconds=1)
_SWEEP_EVERY = timedelta(minutes=1)

Request: TypeAlias = tuple[str, datetime, int, int]  # (bucket key, window start, want, limit)
Unused: TypeAlias = tuple[str, datetime, int]  # (bucket key, window start, count)
Acquire: TypeAlias = Callable[[Sequence[Request]], Awaitable[Sequence[int]]]
Release: TypeAlias = Callable[[Sequence[Unused]], Awaitable[None]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Bucket:
    """One shared budget: `limit` tokens per fixed `window` aligned to the Unix epoch."""

    key: str  # "rate:<scope>:<value>", the bucket's name in dripd.rate_windows
    limit: int
    window: timedelta

    def start_of(self, now: datetime) -> datetime:
        """The start of the window `now` falls in."""
        return now - (now - EPOCH) % self.window

    @property
    def guard(self) -> timedelta:
        """How long before a window's end `take` stops granting its tokens."""
        return min(self.window / 20, MAX_GUARD)

    @property
    def lease_size(self) -> int:
        """Tokens one lease asks for: a tenth of the limit, at least one (the database
        grants less when less is left)."""
        return -(-self.limit // SHARE)

    @property
    def recheck(self) -> timedelta:
        return min(self.window / 10, MAX_RECHECK)


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
                    exact[value.lower() if scope in _DOMAIN_SCOPES else value] = rate
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
        compared lowercased."""
        if self._empty:
            return []
        buckets: list[Bucket] = []
        values = (adapter, provider, sending_domain, recipient_domain, tenant, sequence)
        for scope, value in zip(SCOPES, values, strict=True):
            if not value:
                continue
            if scope in _DOMAIN_SCOPES:
                value = value.lower()
            rate = self._exact[scope].get(value) or self._wildcard.get(scope)
            if rate is not None:
                buckets.append(Bucket(key=f"rate:{scope}:{value}", limit=rate[0], window=rate[1]))
        return buckets


@dataclass(slots=True, eq=False)
class _Window:
    """This daemon's share of one bucket's window."""

    end: datetime
    tokens: int = 0
    spent_at: datetime | None = None  # when the database last had less left than we asked
    pending: asyncio.Task[None] | None = None  # the lease in flight, shared by every taker
    refused: int = 0  # takes refused since the window ran out: the queue behind it


class Limiter:
    """This daemon's side of the shared rate limits: leases tokens from the database in
    slices (through the injected `acquire`) and spends them in memory."""

    def __init__(self, *, acquire: Acquire, release: Release) -> None:
        self._acquire = acquire
        self._release = release
        self._windows: dict[tuple[str, datetime], _Window] = {}
        self._sweep_at: datetime | None = None

    async def take(self, buckets: Sequence[Bucket], now: datetime) -> datetime | None:
        """Take one token of every bucket, all or none. None when taken; otherwise the
        instant tokens are expected again (the next window of the latest refusing bucket).

        A bucket with no local token left leases a slice first; the takes that run out at
        the same time share that one round trip (one for all their buckets).
        """
        self._sweep(now)
        while True:
            held: dict[tuple[str, datetime], _Window] = {}
            missing: dict[tuple[str, datetime], tuple[Bucket, _Window]] = {}
            retry_at: datetime | None = None
            for bucket in buckets:
                start = bucket.start_of(now)
                end = start + bucket.window
                if now >= end - bucket.guard:
                    retry_at = end if retry_at is None else max(retry_at, end)
                    continue
                key = (bucket.key, start)
                window = self._windows.get(key)
                if window is None:
                    window = self._windows[key] = _Window(end=end)
                if window.tokens > 0:
                    held[key] = window
                elif (
                    window.pending is None
                    and window.spent_at is not None
                    and now < window.spent_at + bucket.recheck
                ):
                    at = end + _queue_offset(bucket, window.refused)
                    window.refused += 1
                    retry_at = at if retry_at is None else max(retry_at, at)
                else:
                    missing[key] = (bucket, window)
            if retry_at is not None:
                return retry_at
            if not missing:
                for window in held.values():
                    window.tokens -= 1
                return None
            # Then look again: others waiting on the same lease may have spent it first.
            await self._lease(missing, now)

    async def _lease(
        self, missing: dict[tuple[str, datetime], tuple[Bucket, _Window]], now: datetime
    ) -> None:
        fresh = [(key, b, w) for key, (b, w) in missing.items() if w.pending is None]
        if fresh:
            # A task of its own, so that a cancelled taker does not lose a lease the
            # database already granted, nor the other takers waiting for it.
            task = asyncio.create_task(self._fill(fresh, now))
            task.add_done_callback(_retrieve)
            for _, _, window in fresh:
                window.pending = task
        tasks = {w.pending for _, w in missing.values() if w.pending is not None}
        await asyncio.wait(tasks)
        for task in tasks:
            task.result()  # the lease's error, if it failed, is every waiter's

    async def _fill(
        self, fresh: list[tuple[tuple[str, datetime], Bucket, _Window]], now: datetime
    ) -> None:
        try:
            requests = [(key, start, b.lease_size, b.limit) for (key, start), b, _ in fresh]
            granted = await self._acquire(requests)
            for (_, _, window), (_, _, want, _), got in zip(fresh, requests, granted, strict=True):
                window.tokens += got
                if got < want:
                    window.spent_at = now  # the window has nothing left for anyone
        finally:
            for _, _, window in fresh:
                window.pending = None

    def tokens(self, bucket: Bucket, now: datetime) -> int:
        """The unspent tokens this daemon holds of `bucket`'s window at `now`."""
        window = self._windows.get((bucket.key, bucket.start_of(now)))
        return 0 if window is None else window.tokens

    async def give_back(self) -> None:
        """Return the unspent tokens to the shared budget, for the other daemons to lease in
        the same window. Call it on stop, after the last `take`."""
        while pending := {w.pending for w in self._windows.values() if w.pending is not None}:
            await asyncio.wait(pending)
        unused = [(key, start, w.tokens) for (key, start), w in self._windows.items() if w.tokens]
        self._windows.clear()
        if unused:
            await self._release(unused)

    def _sweep(self, now: datetime) -> None:
        # Tokens of an ended window expire with it; drop them so that a limit on every
        # recipient domain does not keep one entry per domain ever seen.
        if self._sweep_at is not None and now < self._sweep_at:
            return
        self._sweep_at = now + _SWEEP_EVERY
        ended = [k for k, w in self._windows.items() if w.end <= now and w.pending is None]
        for key in ended:
            del self._windows[key]


def _queue_offset(bucket: Bucket, position: int) -> timedelta:
    """When, after its window ends, the `position`-th refused take should try again: the
    first `limit` refused spread evenly over the next window, the next `limit` over the
    one after, and so on. A backlog far larger than the limit is then not claimed, and
    deferred again, in full at every window start (only this daemon's refusals count, so
    with several daemons some rows come back early and are simply deferred once more)."""
    windows, slot = divmod(position, bucket.limit)
    return bucket.window * windows + bucket.window * slot / bucket.limit


def _retrieve(task: asyncio.Task[None]) -> None:
    # Mark the exception retrieved even when every waiter was cancelled before it came.
    if not task.cancelled():
        task.exception()
