"""The composition root: creates every resource of `dripd run`, runs it, and closes it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from functools import partial
from typing import Any
from urllib.parse import quote

import anyio
import structlog

from dripd import __version__, logs
from dripd.api import ALL_TENANTS, expire_leads, replay
from dripd.channels import registry
from dripd.channels.base import ChannelContext
from dripd.channels.credentials import ENV_VAR, Vault
from dripd.channels.feedback import ReceiverContext
from dripd.clock import Clock, DatabaseClock, SystemClock
from dripd.config import Config
from dripd.control import ControlServer
from dripd.control import Limits as ControlLimits
from dripd.db import circuits, feedback, intake, limits, migrate, store
from dripd.db import leads as lead_store
from dripd.db.listener import Listener
from dripd.engine import descriptors
from dripd.engine.adapters import AdapterSet, adapter_aad
from dripd.engine.held import Signal
from dripd.engine.hookset import HookSet
from dripd.engine.links import LinkMaker
from dripd.engine.pipeline import Pipeline, Policy
from dripd.engine.rulebook import build_rules, short_base_url, short_linking
from dripd.engine.thresholds import watch_thresholds
from dripd.engine.worker import Settings, Worker
from dripd.errors import ConfigError, DatabaseError, DripdError, NotFound
from dripd.http.app import ADMIN_MAX_CONNECTIONS, HttpServer, Limits, build_app, public_app
from dripd.http.context import HttpContext
from dripd.http.routes import admin_routes, http_routes
from dripd.inputs import check_optional, check_text
from dripd.metrics import Metrics
from dripd.model import Adapter
from dripd.netguard import NetPolicy
from dripd.rules.breaker import Breaker
from dripd.rules.limiter import RateTable

log = structlog.get_logger("dripd.daemon")

_HOUSEKEEPING = timedelta(hours=1)
# How often the shared circuit states are read when no NOTIFY says they changed.
_CIRCUIT_POLL = timedelta(seconds=5)
# A host clock further than this from the database's is worth an operator's attention.
_SKEW_WARNING = timedelta(seconds=2)
_IDEMPOTENCY_KEPT = timedelta(hours=24)  # an Idempotency-Key is honoured this long
_QUOTA_KEPT = timedelta(days=3)  # ledger rows of periods long over


@contextlib.contextmanager
def _one_error() -> Iterator[None]:
    """Raise a task group's only error as itself (a ConfigError stays one for the CLI's exit
    code and message); several errors stay grouped."""
    try:
        yield
    except BaseExceptionGroup as group:
        errors = _leaves(group)
        if len(errors) == 1:
            raise errors[0] from None
        raise


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return found


class Daemon:
    """`dripd run`: one process, one pool, one listener, one worker, control socket and HTTP."""

    def __init__(
        self, config: Config, *, clock: Clock | None = None, env: Mapping[str, str] | None = None
    ) -> None:
        if not config.database.dsn:
            raise ConfigError("database.dsn: no database; set DRIPD_DSN or database.dsn")
        self.config = config
        # The database's clock unless a test injects one: set when run() has synced it.
        self.clock: Clock = clock or SystemClock()
        self._own_clock = clock is None
        self._skew_warned_at: float | None = None
        self._skew = timedelta(0)
        self._env = dict(os.environ if env is None else env)
        self.metrics = Metrics()
        self.daemon_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._started = time.monotonic()
        self._stop = asyncio.Event()
        self._due_backlog = 0
        self.worker: Worker | None = None
        self.breaker: Breaker | None = None
        self.pool: store.Pool | None = None
        self.ready = asyncio.Event()
        self.draining = False

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self, *, install_signals: bool = True) -> None:
        """Run until request_stop() (or SIGTERM/SIGINT), then stop cleanly.

        First a ConfigError if the connections the configuration allows would not fit
        RLIMIT_NOFILE (the soft limit is raised to the hard one if that is needed)."""
        raised = descriptors.fit(self.config)
        if raised is not None:
            log.info("raised the soft RLIMIT_NOFILE", old=raised[0], new=raised[1])
        # asyncio logs a failed accept (EMFILE…) once per pending connection: thousands a
        # second under a flood. This handler logs them at most every 10 s, with a count.
        loop = asyncio.get_running_loop()
        accept_errors = logs.AcceptErrors(10.0)
        accept_errors.install(loop)
        try:
            await self._run(install_signals=install_signals)
        finally:
            accept_errors.uninstall(loop)

    async def _run(self, *, install_signals: bool) -> None:
        cfg = self.config
        registry.load_entry_points()  # custom providers, each logged; ConfigError: exit 2
        vault = Vault.from_env(self._env) if self._env.get(ENV_VAR) else None
        pool = await store.create_pool(
            cfg.database.dsn,
            min_size=cfg.database.pool_min,
            max_size=cfg.database.pool_max,
            timeout=cfg.connect_timeout.total_seconds(),
        )
        self.pool = pool
        net_policy = NetPolicy(
            allow_http=cfg.hooks.allow_http, allowed_networks=cfg.allowed_networks
        )
        adapters = AdapterSet(
            vault,
            context=partial(self._channel_context, pool, vault, net_policy),
            receiver_context=ReceiverContext(replay_window=cfg.webhooks._duration("replay_window")),
        )
        hooks = HookSet(pool=pool, vault=vault, policy=net_policy)
        links = LinkMaker(
            pool=pool, settings=cfg.short_links, base_url=short_base_url(cfg), metrics=self.metrics
        )
        try:
            async with store.acquire(pool) as conn:
                with store.translated():
                    await migrate.require_current(conn)
                    self._check_double_opt_in(vault)
                    await self._check_lead_sequences(conn)
            if self._own_clock:
                clock = DatabaseClock(partial(store.db_now, pool))
                await self._sync_clock(clock)
                self.clock = clock
            await adapters.load(await store.load_adapters(pool))
            hooks.preload(await store.active_hooks(pool))
            hooks.preload_templates(await store.active_templates(pool))
            breaker = Breaker(
                load=partial(circuits.load, pool),
                trip=partial(circuits.trip, pool),
                probe=partial(circuits.probe, pool),
                close=partial(circuits.close, pool),
                clock=self.clock,
                settings=cfg.circuit,
                metrics=self.metrics,
                daemon_id=self.daemon_id,
            )
            self.breaker = breaker
            await breaker.poll(self.clock.now())
            rules = replace(
                build_rules(cfg, pool=pool, vault=vault),
                breaker=breaker,
                python_template=hooks.template,
                short_links=short_linking(cfg, links),
            )
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
            adapters_changed, circuits_changed = Signal(), Signal()

            async def reload_adapters() -> None:
                """Reload the adapters whenever they change (NOTIFY, the slow poll)."""
                while True:
                    await adapters_changed.wait()
                    adapters_changed.clear()
                    try:
                        await adapters.load(await store.load_adapters(pool))
                        log.debug("adapters reloaded", count=len(adapters))
                    except DripdError as exc:
                        log.warning("adapter reload failed", error=exc.message)
                        continue
                    worker.adapters_changed()

            def on_adapters(payload: str) -> None:
                # A circuit's change needs only the breaker's state, not the adapters'.
                if payload.startswith(circuits.NOTIFY_PREFIX):
                    circuits_changed.set()
                else:
                    adapters_changed.set()
                    circuits_changed.set()

            control = ControlServer(
                cfg.control.socket,
                int(cfg.control.mode, 8),
                self.handle,
                limits=ControlLimits.of(cfg),
            )
            http: list[tuple[HttpServer, tuple[str, int]]] = []
            if cfg.http.enabled:
                context = HttpContext(
                    pool=pool,
                    config=cfg,
                    clock=self.clock,
                    metrics=self.metrics,
                    vault=vault,
                    webhooks=adapters,
                )
                http = self._http_servers(context)
            # The task group owns every background task; cancelling it at stop ends them
            # all, the servers after a graceful shutdown of their own. A task's own error
            # (a taken `http.listen`, a crashed worker) leaves it as itself, not in a group.
            with _one_error():
                async with anyio.create_task_group() as tg:
                    await tg.start(control.serve)
                    for server, (host, port) in http:
                        await tg.start(server.serve, host, port)
                    listener = Listener(
                        cfg.database.dsn,
                        {
                            "dripd_due": lambda _p: worker.wake(),
                            "dripd_adapters": on_adapters,
                        },
                        self.metrics,
                        on_reconnect=worker.wake,
                    )
                    if install_signals:
                        tg.start_soon(self._signals)
                    tg.start_soon(listener.run, name="listener")
                    tg.start_soon(self._stats, pool, name="stats")
                    tg.start_soon(reload_adapters, name="adapters")
                    tg.start_soon(self._poll_adapters, adapters_changed, name="adapter-poll")
                    tg.start_soon(self._watch_circuits, breaker, circuits_changed, name="circuits")
                    tg.start_soon(self._housekeeping, pool, name="housekeeping")
                    if cfg.thresholds.enabled:
                        tg.start_soon(
                            partial(
                                watch_thresholds,
                                pool,
                                cfg.thresholds,
                                clock=self.clock,
                                metrics=self.metrics,
                            ),
                            name="thresholds",
                        )
                    tg.start_soon(worker.run, name="worker")  # a crashed worker crashes the daemon
                    log.info(
                        "dripd running",
                        daemon=self.daemon_id,
                        version=__version__,
                        control=cfg.control.socket,
                        http=cfg.http.listen if http else None,
                        admin=cfg.http.admin_listen if len(http) > 1 else None,
                    )
                    self.ready.set()
                    await self._stop.wait()
                    log.info("stopping: finishing in-flight sends", in_flight=worker.in_flight)
                    await worker.stop(anyio.current_time() + cfg.shutdown_timeout.total_seconds())
                    if rules.limiter is not None:
                        await rules.limiter.give_back()  # unspent tokens return to the others
                    tg.cancel_scope.cancel()
            log.info("stopped", daemon=self.daemon_id)
        finally:
            with anyio.CancelScope(shield=True):
                await adapters.aclose()
                await hooks.aclose()
                await links.aclose()
                await pool.close()

    def _check_double_opt_in(self, vault: Vault | None) -> None:
        """With `leads.double_opt_in`: a ConfigError without DRIPD_ENCRYPTION_KEY (the
        confirmation links are sealed with it, as unsubscribe links are)."""
        cfg = self.config
        if cfg.leads.enabled and cfg.leads.double_opt_in and vault is None:
            raise ConfigError(
                f"leads.double_opt_in: needs {ENV_VAR} (confirmation links are sealed with "
                "it, as unsubscribe links are)"
            )

    async def _check_lead_sequences(self, conn: store.Connection) -> None:
        """Say at start when the lead form is served but `leads.sequence` (or, with double
        opt-in, `leads.confirm_sequence`) names no sequence with an active version. The
        daemon still starts: it sends every other sequence, and `dripd apply` may add the
        sequence at any time; until then each lead is answered 503 ("try again later"),
        stored nowhere, and logged."""
        cfg = self.config
        if not (cfg.leads.enabled and cfg.http.enabled):
            return
        keys = {"leads.sequence": cfg.leads.sequence}
        if cfg.leads.double_opt_in:
            keys["leads.confirm_sequence"] = cfg.leads.confirm_sequence
        tenant = cfg.leads.tenant or None
        for key, sequence in keys.items():
            found = await store.find_sequence(conn, tenant, sequence)
            if found is not None and None not in (found.version_id, found.first_step_id):
                continue
            log.error(
                f"{key} names no sequence with an active version: every lead is refused "
                "(503, try again later) until `dripd apply` adds it",
                key=key,
                sequence=sequence,
                tenant=tenant,
                problem="no such sequence" if found is None else "no active version",
            )

    def _http_servers(self, context: HttpContext) -> list[tuple[HttpServer, tuple[str, int]]]:
        """The public listener (`http.listen`) and the admin one (`http.admin_listen`: health,
        metrics and the API document), with the address of each; one listener serving both
        when the two keys are the same string, none for admin when `http.admin_listen` is
        ""."""
        cfg = self.config
        public, admin = http_routes(context), admin_routes(context)
        if cfg.http.admin_listen == cfg.http.listen:
            app = build_app(
                metrics=self.metrics, readiness=self.readiness, routes=[*public, *admin]
            )
            return [(HttpServer(app, limits=Limits.of(cfg)), cfg.http_host_port)]
        servers = [(HttpServer(public_app(public), limits=Limits.of(cfg)), cfg.http_host_port)]
        if (address := cfg.admin_host_port) is not None:
            app = build_app(metrics=self.metrics, readiness=self.readiness, routes=admin)
            limits = Limits.of(cfg, max_connections=ADMIN_MAX_CONNECTIONS)
            servers.append((HttpServer(app, limits=limits, key="http.admin_listen"), address))
        return servers

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
            async for _ in received:
                self.request_stop()

    async def _sync_clock(self, clock: DatabaseClock) -> None:
        """Read the database's clock; warn (at most every 10 minutes) when this host's
        disagrees by more than `_SKEW_WARNING`."""
        skew = self._skew = await clock.sync()
        self.metrics.clock_skew.set(skew.total_seconds())
        if abs(skew) < _SKEW_WARNING:
            self._skew_warned_at = None
            return
        now = time.monotonic()
        if self._skew_warned_at is None or now - self._skew_warned_at >= 600:
            self._skew_warned_at = now
            log.warning(
                "clock skew: this host's clock disagrees with the database's; dripd keeps "
                "time by the database (fix the host's NTP)",
                skew_s=round(skew.total_seconds(), 3),
            )

    async def _stats(self, pool: store.Pool) -> None:
        interval = self.config.stats_interval.total_seconds()
        analyze_every = self.config.analyze_interval
        while True:
            if isinstance(self.clock, DatabaseClock):
                try:
                    await self._sync_clock(self.clock)
                except DripdError as exc:
                    log.warning("reading the database's clock failed", error=exc.message)
            now = self.clock.now()
            if analyze_every:
                try:
                    if await store.analyze_queue_if_stale(pool, min_age=analyze_every, now=now):
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
            await anyio.sleep(interval)

    def _channel_context(
        self, pool: store.Pool, vault: Vault | None, net_policy: NetPolicy, adapter: Adapter
    ) -> ChannelContext:
        """What a channel gets from the daemon: the pool (pubsub), the network policy of
        user-configured URLs, the public URL of its webhook, and a way to store rotated
        credentials (OAuth refresh tokens), sealed as `dripd adapter add` seals them."""
        base = self.config.webhooks.public_url.rstrip("/")
        webhook_url = None
        if base:
            webhook_url = f"{base}/webhooks/{adapter.provider}/{adapter.name}"
            if adapter.tenant_key:
                webhook_url += f"?tenant={quote(adapter.tenant_key, safe='')}"

        async def save_credentials(credentials: Mapping[str, Any]) -> None:
            if vault is None:
                raise ConfigError(f"cannot store credentials: {ENV_VAR} is not set")
            blob = vault.encrypt(dict(credentials), aad=adapter_aad(adapter.id))
            async with store.transaction(pool) as conn:
                await store.set_credentials(conn, adapter.id, blob, self.clock.now())

        return ChannelContext(
            pool=pool,
            net_policy=net_policy,
            webhook_url=webhook_url,
            save_credentials=save_credentials,
        )

    async def _housekeeping(self, pool: store.Pool) -> None:
        """Hourly: drop rate-limit windows, lead budgets and idempotency keys nobody needs
        any more, and expire the pending leads past their confirmation's expiry."""
        rates = RateTable(self.config.rate_limits)
        lead_window = max(self.config.leads.form_rate[1], self.config.leads.api_rate[1])
        while True:
            now = self.clock.now()
            try:
                await limits.purge(pool, now - rates.longest_window - _HOUSEKEEPING)
                await lead_store.purge_budgets(pool, now - lead_window)
                await expire_leads(pool, now=now)
                await intake.purge_idempotency(pool, now - _IDEMPOTENCY_KEPT)
                await store.purge_quota_ledger(pool, now - _QUOTA_KEPT)
                await feedback.purge_provider_events(
                    pool, now - self.config.webhooks._duration("retention")
                )
            except DripdError as exc:
                log.warning("housekeeping failed", error=exc.message)
            await anyio.sleep(_HOUSEKEEPING.total_seconds())

    async def _poll_adapters(self, changed: Signal) -> None:
        # NOTIFY dripd_adapters is the fast path; this catches a missed one.
        while True:
            await anyio.sleep(self.config.poll_interval.total_seconds())
            changed.set()

    async def _watch_circuits(self, breaker: Breaker, changed: Signal) -> None:
        """Keep the breaker's view of the shared circuits current: on NOTIFY, every few
        seconds, and when an open circuit lets a probe go; then wake the worker, whose
        claim gives an adapter's lane budget by its circuit."""
        assert self.worker is not None
        while True:
            with anyio.move_on_after(_CIRCUIT_POLL.total_seconds()):
                async with anyio.create_task_group() as tg:

                    async def notified() -> None:
                        await changed.wait()
                        tg.cancel_scope.cancel()

                    async def probe_due(at: datetime) -> None:
                        await self.clock.sleep_until(at)
                        tg.cancel_scope.cancel()

                    tg.start_soon(notified)
                    if (at := breaker.wake_at()) is not None:
                        tg.start_soon(probe_due, at)
            changed.clear()
            try:
                await breaker.poll(self.clock.now())
            except DripdError as exc:
                log.warning("reading the circuit breakers failed", error=exc.message)
                await anyio.sleep(1.0)
                continue
            self.worker.wake()

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
            "circuits": self.breaker.status() if self.breaker else [],
            "clock_skew_s": round(self._skew.total_seconds(), 3),
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
            check_text(name, field="name", kind="adapter")  # the limits of every surface
            check_optional(tenant, field="tenant")
            row = await store.resume_adapter(self.pool, tenant, name, self.clock.now())
            if row is None:
                raise NotFound(f"no adapter {name!r} for tenant {tenant or '(global)'}")
            if row.was_paused is not None:
                log.warning(
                    "adapter resumed by an operator",
                    adapter=name,
                    tenant=tenant,
                    was_paused=row.was_paused,
                )
            worker.wake()
            return {"adapter": name, "tenant_key": tenant, "was_paused": row.was_paused}
        raise NotFound(
            f"unknown command {cmd!r}; commands: status, pause, resume, drain, replay, "
            "resume-adapter"
        )
