"""A server's `serve(..., task_status=...)` run in the background of a test.

pytest-asyncio sets a fixture up and tears it down in different tasks, and a task group must
be left by the task that entered it; so a task of its own hosts the task group here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import anyio

Serve = Callable[..., Coroutine[Any, Any, None]]


class Background:
    """`await start()` returns once `serve` is listening (or raises its error, unwrapped);
    `await stop()` cancels it and returns once it has shut down."""

    def __init__(self, serve: Serve, *args: Any) -> None:
        self._serve = serve
        self._args = args
        self._scope = anyio.CancelScope()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def host() -> None:
            with self._scope:
                async with anyio.create_task_group() as tg:
                    try:
                        await tg.start(self._serve, *self._args)
                    except BaseException as exc:
                        started.set_exception(exc)
                        return
                    started.set_result(None)

        self._task = asyncio.create_task(host())
        try:
            await asyncio.shield(started)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            self._scope.cancel()
            await task


@asynccontextmanager
async def background(serve: Serve, *args: Any) -> AsyncIterator[None]:
    """`serve(*args)` running for the body of the `async with`."""
    running = Background(serve, *args)
    await running.start()
    try:
        yield
    finally:
        await running.stop()
