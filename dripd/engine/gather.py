"""Requests of concurrent tasks answered together, one database statement for many."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Q = TypeVar("Q")
A = TypeVar("A")


class Gathered(Generic[Q, A]):
    """`run` for many requests at once: while one round runs, the requests that arrive
    wait and go together in the next one (at most `most` per round). `run(requests)`
    returns one answer per request, in order; an exception it raises is every request's
    of that round.

    The sending tasks of the slow path (off the claim loop: MJML, short links) each ask
    for their own suppression check and links; gathered, a few hundred of them cost a
    handful of round trips instead of one each."""

    def __init__(self, run: Callable[[list[Q]], Awaitable[Sequence[A]]], *, most: int = 500):
        self._run = run
        self._most = most
        self._waiting: list[tuple[Q, asyncio.Future[A]]] = []
        self._round: asyncio.Task[None] | None = None

    async def ask(self, request: Q) -> A:
        future: asyncio.Future[A] = asyncio.get_running_loop().create_future()
        self._waiting.append((request, future))
        if self._round is None:
            self._round = asyncio.create_task(self._rounds())
        return await future

    async def _rounds(self) -> None:
        live: list[tuple[Q, asyncio.Future[A]]] = []
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[: self._most], self._waiting[self._most :]
                live = [(q, f) for q, f in batch if not f.done()]  # cancelled askers left
                if not live:
                    continue
                try:
                    answers = await self._run([q for q, _ in live])
                except Exception as exc:  # noqa: BLE001 - each asker gets it as its own
                    for _, future in live:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), answer in zip(live, answers, strict=True):
                    if not future.done():
                        future.set_result(answer)
        finally:
            self._round = None
            for _, future in (*live, *self._waiting):  # cancelled (the daemon stops)
                future.cancel()
