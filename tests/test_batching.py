"""The Batcher: concurrent sends of one adapter share a request, each gets its own result."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from httpmock import message

from dripd.channels.base import (
    ChannelError,
    Message,
    PermanentError,
    Receipt,
    TransientError,
)
from dripd.channels.batching import Batcher


class _Provider:
    provider = "batchy"
    capacity = 2

    def __init__(self, max_batch: int = 3) -> None:
        self.max_batch = max_batch
        self.batches: list[list[str]] = []
        self.gate: asyncio.Event | None = None
        self.started = asyncio.Event()
        self.fail: ChannelError | None = None
        self.closed = False

    async def send(self, message: Message) -> Receipt:
        raise AssertionError("a batch provider is sent to in batches")

    async def send_batch(self, messages: Sequence[Message]) -> list[Receipt | ChannelError]:
        self.batches.append([m.to for m in messages])
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return [
            PermanentError(f"refused {m.to}", bounce=True)
            if m.to.startswith("bad")
            else Receipt(provider_message_id=f"id-{m.to}")
            for m in messages
        ]

    async def aclose(self) -> None:
        self.closed = True


def _to(*names: str) -> list[Message]:
    return [message(to=f"{name}@example.org") for name in names]


async def _send_all(batcher: Batcher, messages: list[Message]) -> list[Receipt | BaseException]:
    return await asyncio.gather(*(batcher.send(m) for m in messages), return_exceptions=True)


async def test_sends_that_fall_due_together_share_a_request_each_with_its_own_result() -> None:
    provider = _Provider()
    batcher = Batcher(provider, linger=60)  # only a full batch leaves before the timer
    results = await _send_all(batcher, _to("a", "bad", "c"))
    assert provider.batches == [["a@example.org", "bad@example.org", "c@example.org"]]
    assert isinstance(results[0], Receipt)
    assert results[0].provider_message_id == "id-a@example.org"
    assert isinstance(results[1], PermanentError)
    assert results[1].bounce
    assert isinstance(results[2], Receipt)


async def test_a_batch_is_at_most_max_batch_and_a_partial_one_leaves_after_the_linger() -> None:
    provider = _Provider(max_batch=2)
    batcher = Batcher(provider, linger=0.001)
    results = await _send_all(batcher, _to("a", "b", "c"))
    assert provider.batches == [["a@example.org", "b@example.org"], ["c@example.org"]]
    assert all(isinstance(r, Receipt) for r in results)
    assert batcher.capacity == 2 * 2  # requests at once × messages per request


async def test_a_failed_request_fails_every_message_in_it() -> None:
    provider = _Provider()
    provider.fail = TransientError("down", provider_wide=True, retry_after=30)
    results = await _send_all(Batcher(provider, linger=0.001), _to("a", "b"))
    for result in results:
        assert isinstance(result, TransientError)
        assert (result.provider_wide, result.retry_after) == (True, 30)


async def test_a_cancelled_sender_leaves_the_batch_to_go_out_for_the_others() -> None:
    provider = _Provider()
    provider.gate = asyncio.Event()
    batcher = Batcher(provider, linger=0.001)
    first = asyncio.create_task(batcher.send(message(to="a@example.org")))
    second = asyncio.create_task(batcher.send(message(to="b@example.org")))
    await provider.started.wait()  # the batch is in flight
    first.cancel()
    provider.gate.set()
    receipt = await second
    assert receipt.provider_message_id == "id-b@example.org"
    with pytest.raises(asyncio.CancelledError):
        await first
    assert provider.batches == [["a@example.org", "b@example.org"]]


async def test_aclose_sends_what_is_open_then_closes_the_provider() -> None:
    provider = _Provider()
    batcher = Batcher(provider, linger=60)
    pending = asyncio.create_task(batcher.send(message(to="a@example.org")))
    await asyncio.sleep(0)
    await batcher.aclose()
    assert (await pending).provider_message_id == "id-a@example.org"
    assert provider.closed


async def test_a_provider_returning_too_few_results_fails_the_batch_as_transient() -> None:
    provider = _Provider()

    async def short(messages: Sequence[Message]) -> list[Receipt | ChannelError]:
        return [Receipt()]

    provider.send_batch = short  # type: ignore[method-assign]
    results = await _send_all(Batcher(provider, linger=0.001), _to("a", "b"))
    assert all(isinstance(r, TransientError) for r in results)
