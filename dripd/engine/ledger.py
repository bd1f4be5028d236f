"""The quota ledger in Postgres: the reservations of concurrent senders, gathered."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import anyio
import structlog

from dripd.db import store
from dripd.errors import DatabaseError, DripdError
from dripd.rules.quota import QuotaBucket

log = structlog.get_logger("dripd.rules")

_Reservation = tuple[tuple[str, datetime, int], ...]  # (bucket, period start, limit)…


@dataclass(eq=False, slots=True)
class _Ask:
    """One sender's reservation, answered by whichever sender runs the statement it is in."""

    wake: asyncio.Event = field(default_factory=asyncio.Event)  # answered, or its turn to lead
    granted: bool | None = None
    error: DripdError | None = None
    gone: bool = False  # its sender was cancelled: a place granted to it goes back

    @property
    def answered(self) -> bool:
        return self.granted is not None or self.error is not None

    def grant(self, granted: bool) -> None:
        self.granted = granted
        self.wake.set()

    def fail(self, error: DripdError) -> None:
        self.error = error
        self.wake.set()


class DbLedger:
    """The quota ledger in Postgres, with the reservations of concurrent senders gathered:
    while one statement runs, the requests that arrive wait and go together in the next,
    one statement per distinct set of buckets, granted in the order they arrived (a
    single ledger row takes every send of every daemon, so one round trip per send would
    make it the bottleneck).

    No task runs in the background: a sender that finds nobody running statements runs one
    round itself (its own reservation is in it), shielded from cancel scopes so that its
    cancellation does not strand the others; then it wakes one of the senders that arrived
    meanwhile to run the next round. A cancelled sender's granted place is given back.
    """

    def __init__(self, pool: store.Executor) -> None:
        self._pool = pool
        self._waiting: dict[_Reservation, list[_Ask]] = {}
        self._leading = False

    async def reserve(self, buckets: Sequence[QuotaBucket]) -> bool:
        """Reserve a place in every bucket or in none; False when one of them is full."""
        key = tuple((b.key, b.period_start, b.limit) for b in buckets)
        ask = _Ask()
        self._waiting.setdefault(key, []).append(ask)
        try:
            while not ask.answered:
                if self._leading:
                    ask.wake.clear()
                    await ask.wake.wait()
                else:
                    await self._lead()
        except BaseException:
            ask.gone = True
            waiting = self._waiting.get(key)
            if waiting is not None and ask in waiting:
                waiting.remove(ask)
            if not self._leading:
                self._promote()  # it may have been woken to run the next round
            if ask.granted:  # its send will not happen: give its place back
                await self._give_back(key, 1)
            raise
        if ask.error is not None:
            raise ask.error
        return bool(ask.granted)

    async def release(self, buckets: Sequence[QuotaBucket]) -> None:
        await store.quota_release(self._pool, [(b.key, b.period_start) for b in buckets])

    async def _lead(self) -> None:
        """One round: a statement per distinct set of buckets waiting now, in arrival order."""
        self._leading = True
        batch, self._waiting = list(self._waiting.items()), {}
        done = 0
        try:
            with anyio.CancelScope(shield=True):
                for key, asks in batch:
                    await self._take(key, asks)
                    done += 1
        finally:
            self._leading = False
            if done < len(batch):
                # asyncio's own Task.cancel() passes anyio's shield: the statement in flight
                # has an unknown outcome; the ones not started go first in the next round.
                interrupted = DatabaseError("the quota reservation was interrupted")
                for ask in batch[done][1]:
                    if not ask.answered:
                        ask.fail(interrupted)
                waiting = dict(batch[done + 1 :])
                for key, asks in self._waiting.items():
                    waiting.setdefault(key, []).extend(asks)
                self._waiting = waiting
            self._promote()

    async def _take(self, key: _Reservation, asks: list[_Ask]) -> None:
        live = [ask for ask in asks if not ask.gone]
        if not live:
            return
        try:
            granted = await store.quota_reserve(self._pool, key, len(live))
        except DripdError as exc:
            for ask in live:
                ask.fail(exc)
            return
        returned = 0
        for n, ask in enumerate(live):
            if not ask.gone:
                ask.grant(n < granted)
            elif n < granted:  # its sender was cancelled during the statement
                returned += 1
        if returned:
            await self._give_back(key, returned)

    def _promote(self) -> None:
        """Wake the first sender still waiting, to run the next round."""
        for asks in self._waiting.values():
            for ask in asks:
                if not ask.gone:
                    ask.wake.set()
                    return

    async def _give_back(self, key: _Reservation, count: int) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await store.quota_release(self._pool, [(k[0], k[1]) for k in key], count)
            except DripdError as exc:
                log.warning(
                    "quota release failed; the reservation stays counted", error=exc.message
                )
