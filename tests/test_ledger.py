"""The quota ledger's gathering: no background task, and cancelled senders strand nobody."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import anyio
import asyncpg
import pytest

from dripd.db import store
from dripd.engine.ledger import DbLedger
from dripd.rules.quota import QuotaBucket

DAY = datetime(2026, 3, 2, tzinfo=UTC)
CAP = QuotaBucket(key="quota:global", limit=10, period_start=DAY, period_end=DAY)


class Gates:
    """Holds each reservation statement until the test lets it run (then it runs for real)."""

    def __init__(self) -> None:
        self.counts: list[int] = []
        self.gates: list[asyncio.Event] = []
        self._arrived = asyncio.Event()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real = store.quota_reserve

        async def gated(db: store.Executor, buckets: object, count: int) -> int:
            gate = asyncio.Event()
            self.counts.append(count)
            self.gates.append(gate)
            self._arrived.set()
            await gate.wait()
            return await real(db, buckets, count)  # type: ignore[arg-type]

        monkeypatch.setattr(store, "quota_reserve", gated)

    async def held(self, n: int) -> None:
        """Until the `n`-th statement (from 1) waits at its gate."""
        while len(self.gates) < n:
            self._arrived.clear()
            await self._arrived.wait()

    def open(self, n: int) -> None:
        self.gates[n - 1].set()


async def used(pool: asyncpg.Pool) -> int:
    value = await pool.fetchval("SELECT used FROM dripd.quota_ledger WHERE bucket = $1", CAP.key)
    return int(value or 0)


@pytest.fixture
def gates(monkeypatch: pytest.MonkeyPatch) -> Gates:
    g = Gates()
    g.install(monkeypatch)
    return g


async def test_a_cancelled_leader_hands_the_next_round_to_a_waiting_sender(
    pool: asyncpg.Pool, gates: Gates
) -> None:
    ledger = DbLedger(pool)
    leader = asyncio.create_task(ledger.reserve([CAP]))
    await gates.held(1)
    waiting = [asyncio.create_task(ledger.reserve([CAP])) for _ in range(2)]
    await asyncio.sleep(0)
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    await gates.held(2)  # one of the waiting senders runs their statement
    assert gates.counts == [1, 2]
    gates.open(2)
    assert await asyncio.gather(*waiting) == [True, True]
    assert await used(pool) == 2  # the cancelled leader's statement never ran


async def test_a_sender_cancelled_during_its_statement_gives_its_place_back(
    pool: asyncpg.Pool, gates: Gates
) -> None:
    ledger = DbLedger(pool)
    first = asyncio.create_task(ledger.reserve([CAP]))
    await gates.held(1)
    kept, cancelled = (asyncio.create_task(ledger.reserve([CAP])) for _ in range(2))
    await asyncio.sleep(0)
    gates.open(1)
    assert await first is True
    await gates.held(2)
    assert gates.counts == [1, 2]  # both in one statement
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    gates.open(2)
    assert await kept is True
    assert await used(pool) == 2  # the cancelled sender's place went back


async def test_a_sender_cancelled_before_its_statement_is_never_counted(
    pool: asyncpg.Pool, gates: Gates
) -> None:
    ledger = DbLedger(pool)
    first = asyncio.create_task(ledger.reserve([CAP]))
    await gates.held(1)
    cancelled, kept = (asyncio.create_task(ledger.reserve([CAP])) for _ in range(2))
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    gates.open(1)
    assert await first is True
    await gates.held(2)
    assert gates.counts == [1, 1]
    gates.open(2)
    assert await kept is True
    assert await used(pool) == 2


async def test_a_cancel_scope_waits_for_the_round_its_sender_runs(
    pool: asyncpg.Pool, gates: Gates
) -> None:
    ledger = DbLedger(pool)
    results: list[bool] = []

    async def lead(scope: anyio.CancelScope) -> None:
        with scope:
            results.append(await ledger.reserve([CAP]))

    scope = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lead, scope)
        await gates.held(1)
        other = asyncio.ensure_future(ledger.reserve([CAP]))
        await asyncio.sleep(0)
        scope.cancel()  # the round is shielded: the statement is not interrupted
        await asyncio.sleep(0)
        assert gates.counts == [1]
        gates.open(1)
        await gates.held(2)
        gates.open(2)
        assert await other is True
    assert await used(pool) == 2
    assert results in ([], [True])  # the scope may end before or after reserve returns
