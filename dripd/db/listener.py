"""The dedicated LISTEN connection of a daemon: NOTIFY callbacks, reconnected with backoff."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import anyio
import structlog

from dripd.db import store
from dripd.errors import DripdError
from dripd.metrics import Metrics

log = structlog.get_logger("dripd.listener")


class Listener:
    """The dedicated LISTEN connection; it reconnects with backoff, and NOTIFY stays a hint."""

    def __init__(
        self,
        dsn: str,
        channels: Mapping[str, Callable[[str], None]],
        metrics: Metrics,
        on_reconnect: Callable[[], None],
    ) -> None:
        self._dsn = dsn
        self._channels = channels
        self._metrics = metrics
        self._on_reconnect = on_reconnect
        self._conn: store.Connection | None = None
        self._lost = asyncio.Event()

    async def _connect(self) -> None:
        conn = await store.connect(self._dsn, timeout=5.0)
        for name, callback in self._channels.items():
            await conn.add_listener(name, lambda *args, cb=callback: cb(args[-1]))
        conn.add_termination_listener(lambda _conn: self._lost.set())
        self._conn = conn
        self._lost.clear()

    async def run(self) -> None:
        """Listen until cancelled; then close the connection."""
        try:
            await self._listen()
        finally:
            with anyio.CancelScope(shield=True):
                await self.close()

    async def _listen(self) -> None:
        delay = 0.2
        while True:
            if self._conn is None or self._conn.is_closed():
                try:
                    await self._connect()
                    delay = 0.2
                    self._on_reconnect()
                except DripdError as exc:
                    log.warning(
                        "LISTEN connection failed; retrying", error=exc.message, retry_in_s=delay
                    )
                    await anyio.sleep(delay)
                    delay = min(delay * 2, 10.0)
                    continue
            # A killed backend is not always reported at once: probe now and then too.
            with anyio.move_on_after(2.0):
                await self._lost.wait()
            if not self._lost.is_set() and self._conn is not None:
                try:
                    with anyio.fail_after(2.0):
                        await self._conn.fetchval("SELECT 1")
                    continue
                except Exception as exc:  # noqa: BLE001 - any failed probe means reconnect
                    log.warning("LISTEN connection probe failed", error=str(exc) or repr(exc))
            self._metrics.listen_reconnects.inc()
            log.warning("LISTEN connection lost; reconnecting")
            await self.close()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                with anyio.fail_after(2.0):
                    await conn.close()
            except Exception:  # noqa: BLE001 - a connection that will not close is dropped
                conn.terminate()
        elif conn is not None:
            conn.terminate()
