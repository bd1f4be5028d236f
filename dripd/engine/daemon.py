"""The composition root: creates every resource of `dripd run`, runs it, and closes it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from dripd import __version__
from dripd.api import ALL_TENANTS, replay
from dripd.channels.credentials import ENV_VAR, Vault
from dripd.clock import Clock, SystemClock
from dripd.conditions.hooks import NetPolicy
from dripd.config import Config
from dripd.control import ControlServer
from dripd.db import intake, limits, migrate, store
from dripd.engine.adapters import AdapterSet
from dripd.engine.hookset import HookSet
from dripd.engine.pipeline import Pipeline, Policy
from dripd.engine.sending import build_rules, watch_thresholds
from dripd.engine.worker import Settings, Worker
from dripd.errors import ConfigError, DatabaseError, DripdError, NotFound
from dripd.http.app import HttpServer, build_app
from dripd.http.context import HttpContext
from dripd.http.routes import http_routes
from dripd.metrics import Metrics
from dripd.rules.limiter import RateTable

log = structlog.get_logger("dripd.daemon")

_HOUSEKEEPING = timedelta(hours=1)
_IDEMPOTENCY_KEPT = timedelta(hours=24)  # an Idempotency-Key is honoured this long
_QUOTA_KEPT = timedelta(days=3)  # ledger rows of periods long over


class Listener:
    """The dedicated LISTEN connection; it reconnects with backoff, and NOTIFY stays a hint."""

    def __init__(
        self, dsn: str, channels: Mapping[str, Any], metrics: Metrics, on_reconnect: Any
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
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10.0)
                    continue
            # A killed backend is not always reported at once: probe now and then too.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), timeout=2.0)
            if not self._lost.is_set() and self._conn is not None:
                try:
                    await asyncio.wait_for(self._conn.fetchval("SELECT 1"), timeout=2.0)
                    continue
                except Exception as exc:  # noqa: BLE001 - any failed probe means reconnect
                    log.warning("LISTEN connection probe failed", error=str(exc) or repr(exc))
            self._metrics.listen_reconnects.inc()
            log.warning("LISTEN connection lost; reconnecting")
            await self.close()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), timeout=2.0)
        elif conn is not None:
            conn.terminate()


class Daemon:
    """`dripd run`: one process, one pool, one listener, one worker, control socket and HTTP."""

    def __init__(
        self, config: Config, *, clock: Clock | None = None, env: Mapping[str, str] | None = None
    ) -> None:
        if not config.database.dsn:
            raise ConfigError("database.dsn: no database; set DRIPD_DSN or database.dsn")
        self.config = config
        self.clock = clock or SystemClock()
        self._env = dict(os.environ if env is None else env)
        self.metrics = Metrics()
        self.daemon_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._started = time.monotonic()
        self._stop = asyncio.Event()
        self._due_backlog = 0
        self.worker: Worker | None = None
        self.pool: store.Pool | None = None
        self.ready = asyncio.Event()
        self.draining = False

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self, *, install_signals: bool = True) -> None:
        """Run until request_stop() (or SIGTERM/SIGINT), then stop cleanly."""
        cfg = self.config
        vault = Vault.from_env(self._env) if self._env.get(ENV_VAR) else None
        pool = await store.create_pool(
            cfg.database.dsn,
            min_size=cfg.database.pool_min,
            max_size=cfg.database.pool_max,
            timeout=cfg.connect_timeout.total_seconds(),
        )
        self.pool = pool
        adapters = AdapterSet(vault)
        hooks = HookSet(
            pool=pool,
            vault=vault,
            policy=NetPolicy(
                allow_http=cfg.hooks.allow_http, allowed_networks=cfg.allowed_networks
            ),
        )
        tasks: list[asyncio.Task[Any]] = []
        control: ControlServer | None = None
        http: HttpServer | None = None
        listener: Listener | None = None
        loop = asyncio.get_running_loop()
        try:
            async with store.acquire(pool) as conn:
                with store.translated():
                    await migrate.require_current(conn)
            await adapters.load(await store.load_adapters(pool))
            hooks.preload(await store.active_hooks(pool))
            rules = build_rules(cfg, pool=pool, vault=vault)
            pipeline = Pipeline(
                clock=self.clock,
                metrics=self.metrics,
                resolve=adapters.resolve,
                hooks=hooks.for_step,
                rules=rules,
                policy=Policy(
                    max_attempts=cfg.worker.max_attempts,
                    retry_base=cfg.retry_base,
                    retry_max=cfg.retry_max,
                    message_id_domain=cfg.email.message_id_domain,
                ),
            )
            worker = Worker(
                pool=pool,
                clock=self.clock,
                metrics=self.metrics,
                pipeline=pipeline,
                settings=Settings(
                    daemon_id=self.daemon_id,
                    batch_size=cfg.worker.batch_size,
                    concurrency=cfg.worker.concurrency,
                    lease=cfg.lease,
                    poll_interval=cfg.poll_interval,
                    record_linger=cfg.record_linger,
                    zone_of=rules.zone_of,
                ),
            )
            self.worker = worker

            async def reload_adapters() -> None:
                try:
                    await adapters.load(await store.load_adapters(pool))
                    log.debug("adapters reloaded", count=len(adapters))
                except DripdError as exc:
                    log.warning("adapter reload failed", error=exc.message)

            def on_adapters(_payload: str) -> None:
                task = asyncio.create_task(reload_adapters())
                tasks.append(task)
                task.add_done_callback(tasks.remove)

            listener = Listener(
                cfg.database.dsn,
                {"dripd_due": lambda _p: worker.wake(), "dripd_adapters": on_adapters},
                self.metrics,
                on_reconnect=worker.wake,
            )
            control = ControlServer(cfg.control.socket, int(cfg.control.mode, 8), self.handle)
            await control.start()
            if cfg.http.enabled:
                context = HttpContext(
                    pool=pool, config=cfg, clock=self.clock, metrics=self.metrics, vault=vault
                )
                http = HttpServer(
                    build_app(
                        metrics=self.metrics,
                        readiness=self.readiness,
                        routes=http_routes(context),
                    )
                )
                host, port = cfg.http_host_port
                await http.start(host, port)
            if install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, self.request_stop)
            tasks += [
                asyncio.create_task(listener.run(), name="listener"),
                asyncio.create_task(self._stats(pool), name="stats"),
                asyncio.create_task(self._poll_adapters(reload_adapters), name="adapters"),
            ]
            tasks.append(asyncio.create_task(self._housekeeping(pool), name="housekeeping"))
            if cfg.thresholds.enabled:
                watch = watch_thresholds(
                    pool, cfg.thresholds, clock=self.clock, metrics=self.metrics
                )
                tasks.append(asyncio.create_task(watch, name="thresholds"))
            work = asyncio.create_task(worker.run(), name="worker")
            log.info(
                "dripd running",
                daemon=self.daemon_id,
                version=__version__,
                control=cfg.control.socket,
                http=cfg.http.listen if http else None,
            )
            self.ready.set()
            stop = asyncio.create_task(self._stop.wait())
            tasks.append(stop)
            await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                work.result()  # a crashed worker is a crashed daemon
            log.info("stopping: finishing in-flight sends", in_flight=worker.in_flight)
            await worker.stop(loop.time() + cfg.shutdown_timeout.total_seconds())
            await work
            if rules.limiter is not None:
                await rules.limiter.give_back()  # unspent tokens return to the other daemons
            log.info("stopped", daemon=self.daemon_id)
        finally:
            if install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if http is not None:
                await http.stop()
            if control is not None:
                await control.close()
            if listener is not None:
                await listener.close()
            await adapters.aclose()
            await hooks.aclose()
            await pool.close()

    async def _stats(self, pool: store.Pool) -> None:
        interval = self.config.stats_interval.total_seconds()
        analyze_every = self.config.analyze_interval
        while True:
            now = self.clock.now()
            if analyze_every:
                try:
                    if await store.analyze_queue_if_stale(
                        pool, min_age=analyze_every, now=datetime.now(UTC)
                    ):
                        log.info("analyzed dripd.step_executions (statistics were stale)")
                except DripdError as exc:
                    log.warning("ANALYZE of the queue table failed", error=exc.message)
            try:
                due, oldest = await store.backlog(pool, now)
            except DripdError as exc:
                log.warning("backlog query failed", error=exc.message)
            else:
                self._due_backlog = due
                self.metrics.due_backlog.set(due)
                self.metrics.oldest_due_age.set(
                    max((now - oldest).total_seconds(), 0.0) if oldest else 0.0
                )
            await asyncio.sleep(interval)

    async def _housekeeping(self, pool: store.Pool) -> None:
        """Hourly: drop rate-limit windows and idempotency keys nobody needs any more."""
        rates = RateTable(self.config.rate_limits)
        while True:
            now = self.clock.now()
            try:
                await limits.purge(pool, now - rates.longest_window - _HOUSEKEEPING)
                await intake.purge_idempotency(pool, now - _IDEMPOTENCY_KEPT)
                await store.purge_quota_ledger(pool, now - _QUOTA_KEPT)
            except DripdError as exc:
                log.warning("housekeeping failed", error=exc.message)
            await asyncio.sleep(_HOUSEKEEPING.total_seconds())

    async def _poll_adapters(self, reload: Any) -> None:
        # NOTIFY dripd_adapters is the fast path; this catches a missed one.
        while True:
            await asyncio.sleep(self.config.poll_interval.total_seconds())
            await reload()

    async def readiness(self) -> dict[str, Any]:
        if self.pool is None:
            return {"ready": False, "database": "not connected"}
        try:
            async with store.acquire(self.pool) as conn:
                with store.translated():
                    await migrate.require_current(conn)
        except DatabaseError as exc:
            return {"ready": False, "database": "unreachable", "error": exc.message}
        except DripdError as exc:
            return {"ready": False, "database": "ok", "schema": exc.message}
        return {"ready": True, "database": "ok", "schema": "current"}

    def status(self) -> dict[str, Any]:
        worker = self.worker
        return {
            "version": __version__,
            "daemon": self.daemon_id,
            "uptime_s": round(time.monotonic() - self._started, 3),
            "in_flight": worker.in_flight if worker else 0,
            "due_backlog": self._due_backlog,
            "paused": worker.paused if worker else False,
            "draining": self.draining,
        }

    async def handle(self, cmd: str, args: dict[str, Any]) -> Any:
        """The control socket's commands."""
        worker = self.worker
        assert worker is not None
        assert self.pool is not None
        if cmd == "status":
            return self.status()
        if cmd == "pause":
            worker.pause()
            return self.status()
        if cmd == "resume":
            self.draining = False
            worker.resume()
            return self.status()
        if cmd == "drain":
            self.draining = True
            worker.pause()
            await worker.drained()
            return self.status()
        if cmd == "replay":
            raw = args.get("execution_id")
            try:
                execution_id = uuid.UUID(str(raw))
            except ValueError as exc:
                raise ConfigError(f"execution_id: {raw!r} is not a UUID") from exc
            result = await replay(
                self.pool, tenant=ALL_TENANTS, execution_id=execution_id, now=self.clock.now()
            )
            worker.wake()
            return result.to_dict()
        if cmd == "resume-adapter":
            name, tenant = args.get("name"), args.get("tenant")
            if not isinstance(name, str) or not name:
                raise ConfigError("name: the adapter to resume")
            if tenant is not None and (not isinstance(tenant, str) or not tenant):
                raise ConfigError("tenant: a tenant key, or absent for a global adapter")
            row = await store.resume_adapter(self.pool, tenant, name, self.clock.now())
            if row is None:
                raise NotFound(f"no adapter {name!r} for tenant {tenant or '(global)'}")
            if row["was_paused"] is not None:
                log.warning(
                    "adapter resumed by an operator",
                    adapter=name,
                    tenant=tenant,
                    was_paused=row["was_paused"],
                )
            worker.wake()
            return {"adapter": name, "tenant_key": tenant, "was_paused": row["was_paused"]}
        raise NotFound(
            f"unknown command {cmd!r}; commands: status, pause, resume, drain, replay, "
            "resume-adapter"
        )
