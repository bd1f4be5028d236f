"""Time as an injected object: the daemon asks its clock, tests move it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, aware UTC."""
        ...

    async def sleep_until(self, when: datetime) -> None:
        """Sleep until this clock reads `when` (at once if it has passed). A deadline, not a
        duration: time that passes before the sleep starts is not slept again."""
        ...


class SystemClock:
    """The wall clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep_until(self, when: datetime) -> None:
        await asyncio.sleep(max((when - self.now()).total_seconds(), 0.0))


class DatabaseClock:
    """The database server's clock, read once per `sync()` and carried forward on this
    host's monotonic clock in between: one clock for every daemon's claims, leases and due
    times, whatever their hosts' wall clocks say (a host clock 40 s fast would otherwise
    see every 30 s lease of the others as expired, and send early).

    `read` returns the server's `clock_timestamp()`; half the round trip is added to it.
    """

    def __init__(self, read: Callable[[], Awaitable[datetime]]) -> None:
        self._read = read
        self._base: datetime | None = None
        self._base_mono = 0.0
        self.skew = timedelta(0)  # this host's wall clock minus the database's, at the last sync

    async def sync(self) -> timedelta:
        """Read the database's time; returns the host's skew (host wall clock − database)."""
        sent = time.monotonic()
        server = await self._read()
        received = time.monotonic()
        self._base = server + timedelta(seconds=(received - sent) / 2)
        self._base_mono = received
        self.skew = datetime.now(UTC) - self._base
        return self.skew

    def now(self) -> datetime:
        if self._base is None:
            raise RuntimeError("DatabaseClock.now() before the first sync()")
        return self._base + timedelta(seconds=time.monotonic() - self._base_mono)

    async def sleep_until(self, when: datetime) -> None:
        await asyncio.sleep(max((when - self.now()).total_seconds(), 0.0))


class ManualClock:
    """A clock that only moves when told to; sleepers wake when it passes their deadline."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
        self._changed = asyncio.Event()

    def now(self) -> datetime:
        return self._now

    def advance(self, delta: timedelta | float) -> None:
        self._now += delta if isinstance(delta, timedelta) else timedelta(seconds=delta)
        self._changed.set()
        self._changed = asyncio.Event()

    def set(self, when: datetime) -> None:
        self.advance(when - self._now)

    async def sleep_until(self, when: datetime) -> None:
        while self._now < when:
            await self._changed.wait()
