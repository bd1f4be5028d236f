"""Batch sends: the messages of one adapter that fall due together go out in one request.

The worker sends one execution per sender task, so the pipeline, its rules and its record
stay per message. A `Batcher` wraps a provider that has a batch endpoint (a `BatchChannel`):
each `send()` joins the open batch and waits for its own result. A batch is sent when it is
full (`max_batch`) or `linger` after its first message, so the sends of one claim, which
start within a few milliseconds of each other, share a request. Each message gets its own
receipt or error: one bad recipient never fails the others.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

import structlog

from dripd.channels.base import BatchChannel, ChannelError, Message, Receipt, TransientError

__all__ = ["LINGER", "Batcher"]

log = structlog.get_logger("dripd.channels")

#: Seconds a batch waits for more messages after its first one.
LINGER = 0.005


class Batcher:
    """A Channel that sends through `channel.send_batch`, gathering concurrent sends.

    `capacity` (sends the claim may start at once for this adapter) is the provider's own
    capacity (requests at once) times `max_batch`: a full lane fills whole batches.
    """

    def __init__(self, channel: BatchChannel, *, linger: float = LINGER) -> None:
        self._channel = channel
        self._linger = linger
        self._open: list[tuple[Message, asyncio.Future[Receipt]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.provider = channel.provider
        self.max_batch = max(1, channel.max_batch)
        requests = getattr(channel, "capacity", None)
        self.capacity = (requests if isinstance(requests, int) and requests > 0 else 1) * (
            self.max_batch
        )

    @property
    def wrapped(self) -> BatchChannel:
        return self._channel

    @property
    def issued_secrets(self) -> Iterable[str]:
        """The wrapped provider's `issued_secrets` (see dripd.channels.base.Channel)."""
        return getattr(self._channel, "issued_secrets", ())

    def __repr__(self) -> str:
        return f"Batcher({self._channel!r})"

    async def send(self, message: Message) -> Receipt:
        """Deliver `message` in the next batch; its own receipt, or its own error."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Receipt] = loop.create_future()
        self._open.append((message, future))
        if len(self._open) >= self.max_batch:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self._linger, self._flush)
        # A sender cancelled at stop cancels only its future: the batch runs in a task of
        # its own and goes out for the others (it skips futures already done); the
        # cancelled row is released and claimed again (at-least-once, like a single send).
        return await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._open:
            batch, self._open = self._open[: self.max_batch], self._open[self.max_batch :]
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[tuple[Message, asyncio.Future[Receipt]]]) -> None:
        messages = [message for message, _ in batch]
        try:
            results = await self._channel.send_batch(messages)
            if len(results) != len(batch):
                raise TransientError(
                    f"{self.provider} batch returned {len(results)} results "
                    f"for {len(batch)} messages"
                )
        except ChannelError as exc:
            results = [exc] * len(batch)
        except Exception as exc:  # noqa: BLE001 - each sender's RedactedChannel logs and redacts it
            results = [exc] * len(batch)  # type: ignore[list-item]
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def aclose(self) -> None:
        """Send what is open, wait for the batches in flight, then close the provider."""
        if self._open:
            self._flush()
        if self._tasks:
            with contextlib.suppress(Exception):
                await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._channel.aclose()
