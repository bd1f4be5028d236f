"""dripd.engine.gather: concurrent requests answered together, errors and cancellation."""

from __future__ import annotations

import asyncio

import pytest

from dripd.engine.gather import Gathered


async def test_requests_that_arrive_while_a_round_runs_go_together_in_the_next() -> None:
    rounds: list[list[int]] = []
    gate = asyncio.Event()

    async def run(requests: list[int]) -> list[int]:
        rounds.append(requests)
        if len(rounds) == 1:
            await gate.wait()  # the first round is slow: the others queue behind it
        return [r * 10 for r in requests]

    gathered = Gathered(run)
    first = asyncio.create_task(gathered.ask(1))
    await asyncio.sleep(0)
    rest = [asyncio.create_task(gathered.ask(n)) for n in range(2, 7)]
    await asyncio.sleep(0)
    gate.set()
    assert await first == 10
    assert [await task for task in rest] == [20, 30, 40, 50, 60]
    assert rounds == [[1], [2, 3, 4, 5, 6]]


async def test_a_round_holds_at_most_most_requests() -> None:
    rounds: list[list[int]] = []

    async def run(requests: list[int]) -> list[int]:
        rounds.append(requests)
        return requests

    gathered = Gathered(run, most=2)
    assert await asyncio.gather(*(gathered.ask(n) for n in range(5))) == [0, 1, 2, 3, 4]
    assert rounds == [[0, 1], [2, 3], [4]]


async def test_an_error_is_each_askers_of_its_round_and_the_next_round_still_runs() -> None:
    calls = 0

    async def run(requests: list[str]) -> list[str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("the database failed")
        return requests

    gathered = Gathered(run)
    failed = await asyncio.gather(gathered.ask("a"), gathered.ask("b"), return_exceptions=True)
    assert [str(e) for e in failed] == ["the database failed"] * 2
    assert await gathered.ask("c") == "c"


async def test_a_cancelled_asker_is_left_out_and_the_others_are_answered() -> None:
    seen: list[list[int]] = []
    gate = asyncio.Event()

    async def run(requests: list[int]) -> list[int]:
        seen.append(requests)
        if len(seen) == 1:
            await gate.wait()
        return requests

    gathered = Gathered(run)
    first = asyncio.create_task(gathered.ask(1))
    await asyncio.sleep(0)
    gone = asyncio.create_task(gathered.ask(2))
    kept = asyncio.create_task(gathered.ask(3))
    await asyncio.sleep(0)
    gone.cancel()
    gate.set()
    assert (await first, await kept) == (1, 3)
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert seen == [[1], [3]]
