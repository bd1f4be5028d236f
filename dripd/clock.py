"""Time as an injected object: the daemon asks its clock, tests move it."""

from __future__ import annotations

import asyncio
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
