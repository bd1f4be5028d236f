"""Shared test helpers: an SMTP sink on loopback, sequences, adapters and daemon configs."""

from __future__ import annotations

import asyncio
import contextlib
import email
import gc
import json
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path
from typing import IO, Any

import asyncpg
import httpx
import msgspec
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

from dripd import api
from dripd.channels.credentials import Vault
from dripd.config import from_dict
from dripd.control import request
from dripd.db import store
from dripd.engine.adapters import adapter_aad
from dripd.engine.daemon import Daemon
from dripd.errors import DripdError
from dripd.sequences import load_text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def stop_controller(controller: Controller) -> None:
    """Stop an aiosmtpd server, and collect what its thread's loop left behind.

    aiosmtpd stops its loop before a client transport that is still closing has been
    released; collected later, during some other test, its ResourceWarning would fail
    that test. Collect it here, where it belongs, and ignore only that.
    """
    controller.stop()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


class _TrackedSMTP(SMTP):
    """aiosmtpd's SMTP session, telling its sink which client ports are connected."""

    def __init__(self, handler: Any, *, sink: SmtpSink, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._sink = sink
        self._peer_port: int | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        if peer is not None and self._peer_port is None:
            self._peer_port = int(peer[1])
            with self._sink.lock:
                self._sink.sessions[self._peer_port] += 1

    def connection_lost(self, error: Exception | None) -> None:
        # aiosmtpd cancels the session's handler here (or at EOF, before): once a session
        # is gone, it can never accept another message.
        super().connection_lost(error)
        if self._peer_port is not None:
            with self._sink.lock:
                self._sink.sessions[self._peer_port] -= 1
                if self._sink.sessions[self._peer_port] <= 0:
                    del self._sink.sessions[self._peer_port]
            self._peer_port = None


class _TrackingController(Controller):
    def __init__(self, sink: SmtpSink, **kwargs: Any) -> None:
        super().__init__(sink, **kwargs)
        self._sink = sink

    def factory(self) -> SMTP:
        return _TrackedSMTP(self.handler, sink=self._sink, **self.SMTP_kwargs)


@dataclass
class SmtpSink:
    """An aiosmtpd server that keeps every message it accepts (thread-safe).

    `delay` makes it a slow relay: each DATA waits that long before it is accepted (an
    asyncio sleep in the sink's own loop thread, so only that session waits). A client
    that goes away meanwhile never gets its message accepted. `on_accept` is called in
    the sink's thread with the new count after each accepted message (to signal a daemon
    at an exact point of a run). `stop()` then `start()` takes the relay down and brings
    it back on the same port.
    """

    messages: list[EmailMessage] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    reply: str | None = None  # e.g. "451 try later" to refuse DATA
    unknown: frozenset[str] = frozenset()  # addresses refused at RCPT TO with 550 (bounces)
    arrivals: list[float] = field(default_factory=list)  # time.time() of each accepted message
    delay: float = 0.0  # seconds each DATA waits before it is accepted
    on_accept: Callable[[int], None] | None = None
    # Open SMTP sessions by the client's port (a client closes and reconnects freely).
    sessions: Counter[int] = field(default_factory=Counter)
    controller: Controller | None = None
    port: int = 0

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if address.lower() in self.unknown:
            return "550 5.1.1 No such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.reply:
            return self.reply
        if self.delay:
            await asyncio.sleep(self.delay)
        raw = envelope.content if isinstance(envelope.content, bytes) else envelope.content.encode()
        msg = email.message_from_bytes(raw, policy=default_policy)
        assert isinstance(msg, EmailMessage)
        with self.lock:
            self.messages.append(msg)
            self.arrivals.append(time.time())
            count = len(self.messages)
        if self.on_accept is not None:
            self.on_accept(count)
        return "250 OK"

    def start(self, port: int | None = None) -> SmtpSink:
        self.port = port or self.port or free_port()
        self.controller = _TrackingController(self, hostname="127.0.0.1", port=self.port)
        self.controller.start()
        return self

    def stop(self) -> None:
        if self.controller is not None:
            stop_controller(self.controller)
            self.controller = None
            with self.lock:
                self.sessions.clear()  # the loop that served them is gone

    @property
    def up(self) -> bool:
        return self.controller is not None

    def open_ports(self) -> set[int]:
        """The client ports of the SMTP sessions open now."""
        with self.lock:
            return set(self.sessions)

    def message_ids(self) -> list[str]:
        with self.lock:
            return [str(m["Message-ID"]) for m in self.messages]

    def count(self) -> int:
        with self.lock:
            return len(self.messages)


async def apply_text(db: asyncpg.Connection | asyncpg.Pool, text: str) -> store.Applied:
    """Apply one sequence file's text, as `dripd apply` does."""
    spec = load_text(text, source="test.toml")
    async with store.transaction(db) as conn:
        return await store.apply_version(conn, spec, now=datetime.now(UTC))


async def add_adapter(
    db: asyncpg.Connection | asyncpg.Pool,
    *,
    name: str,
    channel: str,
    provider: str,
    config: dict[str, Any],
    credentials: dict[str, Any] | None = None,
    vault: Vault | None = None,
    tenant: str | None = None,
    default: bool = True,
) -> uuid.UUID:
    adapter_id = uuid.uuid4()
    blob = vault.encrypt(credentials, aad=adapter_aad(adapter_id)) if credentials else None
    async with store.transaction(db) as conn:
        await store.insert_adapter(
            conn,
            adapter_id=adapter_id,
            tenant=tenant,
            name=name,
            channel=channel,
            provider=provider,
            config=config,
            credentials=blob,
            is_default=default,
            now=datetime.now(UTC),
        )
    return adapter_id


def smtp_config(port: int, **extra: Any) -> dict[str, Any]:
    """An `smtp` adapter's config for a sink on loopback; `extra` adds or overrides keys
    (e.g. `pool_size`, `timeout`)."""
    return {
        "host": "127.0.0.1",
        "port": port,
        "tls": "none",
        "timeout": 5,
        "from": "drip@example.com",
        **extra,
    }


ONE_EMAIL = """
[sequence]
key = "{key}"

[[steps]]
key = "hello"
channel = "email"
subject = "Hello {{{{ first_name }}}}"
text = "Hi {{{{ first_name }}}}"
"""


def one_email(key: str = "hello") -> str:
    return ONE_EMAIL.format(key=key)


def toml_value(value: Any) -> str:
    """`value` as a TOML value (strings, numbers, booleans, lists and inline tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return (
            "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
        )
    raise TypeError(f"no TOML form for {value!r}")


def write_config(
    path: Path,
    *,
    dsn: str,
    socket_path: Path,
    http_port: int | None = None,
    sections: Mapping[str, Mapping[str, Any]] | None = None,
    **worker: Any,
) -> Path:
    """A daemon config file for subprocess tests: `worker` keys, and other `sections`."""
    lines = [
        "[database]",
        f'dsn = "{dsn}"',
        "pool_min = 1",
        "pool_max = 4",
        "",
        "[control]",
        f'socket = "{socket_path}"',
        "",
        "[http]",
    ]
    if http_port is None:
        lines.append("enabled = false")
    else:
        # One listener for the public routes and the admin ones (health, metrics).
        lines.append(f'listen = "127.0.0.1:{http_port}"')
        lines.append(f'admin_listen = "127.0.0.1:{http_port}"')
    lines += ["", "[worker]"]
    for key, value in worker.items():
        lines.append(f"{key} = {toml_value(value)}")
    for name, keys in (sections or {}).items():
        lines += ["", f"[{name}]"]
        lines += [f"{key} = {toml_value(value)}" for key, value in keys.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


async def wait_for(predicate: Any, *, timeout: float = 30.0, interval: float = 0.05) -> Any:
    """Poll `predicate` (sync or async) until it returns something truthy."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def running_daemon(
    dsn: str,
    tmp_path: Path,
    *,
    clock: Any = None,
    env: dict[str, str] | None = None,
    sections: dict[str, Any] | None = None,
    **worker: Any,
) -> AsyncIterator[Daemon]:
    """`dripd run` in this event loop (no signal handlers), stopped and awaited on exit.
    `sections` adds config sections (e.g. hooks); `worker` sets worker keys. An `http`
    section with a `listen` address and no `admin_listen` gets one listener for both (the
    default admin address, 127.0.0.1:8026, would be shared by every test)."""
    sections = dict(sections or {})
    if "listen" in sections.get("http", {}):
        sections["http"] = {"admin_listen": sections["http"]["listen"], **sections["http"]}
    cfg = from_dict(
        {
            "database": {"dsn": dsn, "pool_min": 1, "pool_max": 4},
            "control": {"socket": str(tmp_path / "control.sock")},
            "http": {"enabled": False},
            "worker": {"poll_interval": "1h", **worker},
            **sections,
        }
    )
    daemon = Daemon(cfg, clock=clock, env=env or {})
    task = asyncio.create_task(daemon.run(install_signals=False))
    ready = asyncio.create_task(daemon.ready.wait())
    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        ready.cancel()
        task.result()
    try:
        yield daemon
    finally:
        daemon.request_stop()
        await asyncio.wait_for(task, timeout=30)


async def executions(db: asyncpg.Connection | asyncpg.Pool) -> list[asyncpg.Record]:
    """Every execution with its step key, oldest first."""
    async with store.acquire(db) as conn:
        rows: list[asyncpg.Record] = await conn.fetch(
            "SELECT e.*, s.key AS step_key FROM dripd.step_executions e "
            "JOIN dripd.steps s ON s.id = e.step_id ORDER BY e.created_at, s.position"
        )
        return rows


async def outbox_adapters(pool: asyncpg.Pool, path: Path) -> Path:
    """Default `outbox` adapters for email, sms and webhook, all writing to `path`."""
    for channel in ("email", "sms", "webhook"):
        config = {"path": str(path), "from": "drips@example.com"}
        await add_adapter(
            pool, name=f"{channel}-out", channel=channel, provider="outbox", config=config
        )
    return path


def outbox_messages(path: Path) -> list[dict[str, Any]]:
    """The messages an `outbox` adapter wrote to `path`, oldest first."""
    if not path.exists():
        return []
    return [msgspec.json.decode(line) for line in path.read_text().splitlines()]


async def quiet(pool: asyncpg.Pool, clock: Any) -> None:
    """Wait until nothing due at the (manual) clock's time is left unclaimed or in flight."""

    async def check() -> bool:
        n = await pool.fetchval(
            "SELECT count(*) FROM dripd.step_executions "
            "WHERE status = 'claimed' OR (status = 'scheduled' AND due_at <= $1)",
            clock.now(),
        )
        return int(n) == 0

    await wait_for(check)


async def enrollment_status(pool: asyncpg.Pool, enrollment_id: uuid.UUID) -> tuple[str, str | None]:
    row = await pool.fetchrow(
        "SELECT status, status_reason FROM dripd.enrollments WHERE id = $1", enrollment_id
    )
    return row["status"], row["status_reason"]


async def has_status(pool: asyncpg.Pool, enrollment_id: uuid.UUID, expected: str) -> bool:
    return (await enrollment_status(pool, enrollment_id))[0] == expected


def enroll_at(pool: asyncpg.Pool, clock: Any, key: str, who: str, **data: Any) -> Any:
    """Enroll subscriber `who` (email who@example.com plus `data`) at the clock's time."""
    return api.enroll(
        pool,
        tenant=None,
        sequence_key=key,
        subscriber_id=who,
        data={"email": f"{who}@example.com", **data},
        now=clock.now(),
    )


# --- `dripd run` as a subprocess (the end-to-end suites) ---------------------------------------

MESSAGE_ID_DOMAIN = "dripd.local"  # config email.message_id_domain's default


def daemon_env() -> dict[str, str]:
    """The test's environment minus what would point a daemon or the CLI elsewhere."""
    env = dict(os.environ)
    for name in ("DRIPD_DSN", "DRIPD_CONFIG", "DRIPD_ENCRYPTION_KEY"):
        env.pop(name, None)
    return env


@dataclass
class DaemonProc:
    """One `dripd run --config …` subprocess; restartable, its stderr appended to one file."""

    name: str
    config: Path
    log: Path
    socket: str
    http_port: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    # Run under this command prefix (e.g. ["faketime", "+1h"]); empty: directly.
    wrapper: list[str] = field(default_factory=list)
    proc: asyncio.subprocess.Process | None = None
    starts: int = 0
    _stderr: IO[bytes] | None = field(default=None, repr=False)

    async def start(self, *, ready: bool = True) -> DaemonProc:
        assert self.proc is None or self.proc.returncode is not None, "already running"
        if self._stderr is None:
            self._stderr = self.log.open("ab")
        self.starts += 1
        self._stderr.write(f"--- start #{self.starts} ---\n".encode())
        self._stderr.flush()
        self.proc = await asyncio.create_subprocess_exec(
            *self.wrapper, sys.executable, "-m", "dripd.cli", "run", "--config", str(self.config),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=self._stderr, env={**daemon_env(), **self.env},
        )  # fmt: skip
        if ready:
            await self.wait_ready()
        return self

    async def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        async def answers() -> dict[str, Any] | None:
            assert self.proc is not None
            if self.proc.returncode is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.proc.returncode} while starting\n{self.tail()}"
                )
            try:
                status: dict[str, Any] = await request(self.socket, "status", timeout=5.0)
            except DripdError:
                return None
            return status

        try:
            status: dict[str, Any] = await wait_for(answers, timeout=timeout)
        except AssertionError as exc:
            raise AssertionError(f"{self.name} not ready: {exc}\n{self.tail()}") from None
        return status

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float) -> int:
        """Wait for the process to exit (and reap it); a deadline, not an expectation."""
        assert self.proc is not None
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"{self.name} still running after {timeout}s\n{self.tail()}"
            ) from None

    async def kill(self) -> int:
        """SIGKILL and reap."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.kill()
        return await self.proc.wait()

    def tail(self, lines: int = 40) -> str:
        if self._stderr is not None:
            self._stderr.flush()
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return f"[{self.name}: no log]"
        return f"--- {self.name} stderr (last {lines} lines) ---\n" + "\n".join(
            text.splitlines()[-lines:]
        )

    async def metrics(self) -> dict[str, float]:
        """`/metrics`, as {'name{labels}': value}."""
        assert self.http_port is not None
        async with httpx.AsyncClient(timeout=30.0) as client:
            response = await client.get(f"http://127.0.0.1:{self.http_port}/metrics")
        response.raise_for_status()
        values: dict[str, float] = {}
        for line in response.text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    async def close(self) -> None:
        if self.running:
            await self.kill()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


Launch = Callable[..., DaemonProc]


@contextlib.contextmanager
def socket_dir() -> Iterator[Path]:
    """A short temporary directory for control sockets: pytest's tmp_path can exceed the
    ~107-byte limit of AF_UNIX paths."""
    with tempfile.TemporaryDirectory(prefix="dripd-e2e-") as tmp:
        yield Path(tmp)


@contextlib.asynccontextmanager
async def launcher(dsn: str, tmp_path: Path, sockdir: Path) -> AsyncIterator[Launch]:
    """A factory of daemon subprocesses on database `dsn`; all are killed on exit.

    `make(name, http=False, sections=None, **worker)`: `worker` sets `[worker]` keys and
    `sections` other config sections."""
    made: list[DaemonProc] = []

    def make(
        name: str = "d",
        *,
        http: bool = False,
        sections: Mapping[str, Mapping[str, Any]] | None = None,
        **worker: Any,
    ) -> DaemonProc:
        socket_path = sockdir / f"{name}.sock"
        http_port = free_port() if http else None
        config = write_config(
            tmp_path / f"{name}.toml", dsn=dsn, socket_path=socket_path, http_port=http_port,
            sections=sections, **worker,
        )  # fmt: skip
        proc = DaemonProc(
            name=name, config=config, log=tmp_path / f"{name}.stderr",
            socket=str(socket_path), http_port=http_port,
        )  # fmt: skip
        made.append(proc)
        return proc

    try:
        yield make
    finally:
        for proc in made:
            await proc.close()


def tails(*procs: DaemonProc) -> str:
    return "\n".join(p.tail() for p in procs)


def sent_by(metrics: dict[str, float]) -> float:
    """Executions a daemon sent, from its `/metrics`."""
    return sum(
        v for k, v in metrics.items()
        if k.startswith("dripd_executions_total{") and 'outcome="sent"' in k
    )  # fmt: skip


# --- the database as the witness ---------------------------------------------------------------


def subscriber(n: int) -> dict[str, Any]:
    return {"email": f"s{n}@example.com", "first_name": f"S{n}"}


async def enroll_many(
    pool: asyncpg.Pool, count: int, *, start: int = 0, key: str = "hello", atomic: bool = False
) -> None:
    """Enroll subscribers s{start}…s{start+count-1} into sequence `key`: a few at a time over
    the pool, or, `atomic`, in one transaction (the whole backlog appears at once)."""
    if atomic:
        async with pool.acquire() as conn, conn.transaction():
            for n in range(start, start + count):
                await api.enroll(conn, tenant=None, sequence_key=key, subscriber_id=f"s{n}",
                                 data=subscriber(n))  # fmt: skip
        return
    gate = asyncio.Semaphore(4)

    async def one(n: int) -> None:
        async with gate:
            await api.enroll(pool, tenant=None, sequence_key=key, subscriber_id=f"s{n}",
                             data=subscriber(n))  # fmt: skip

    await asyncio.gather(*(one(n) for n in range(start, start + count)))


async def statuses(pool: asyncpg.Pool) -> dict[str, int]:
    """Executions by status."""
    rows = await pool.fetch("SELECT status, count(*) AS n FROM dripd.step_executions GROUP BY 1")
    return {r["status"]: r["n"] for r in rows}


async def enrollment_statuses(pool: asyncpg.Pool) -> dict[str, int]:
    rows = await pool.fetch("SELECT status, count(*) AS n FROM dripd.enrollments GROUP BY 1")
    return {r["status"]: r["n"] for r in rows}


async def all_sent(pool: asyncpg.Pool, count: int) -> bool:
    return await statuses(pool) == {"sent": count}


async def settled_rows(pool: asyncpg.Pool) -> dict[str, int] | None:
    """Executions by status once none is scheduled or claimed (every one has an outcome
    that stays); None while some are still to run."""
    counts = await statuses(pool)
    return None if counts.get("scheduled") or counts.get("claimed") else counts


def message_id(execution_id: uuid.UUID | str, replay: int) -> str:
    """The Message-ID an execution's email carries."""
    return f"<{execution_id}.{replay}@{MESSAGE_ID_DOMAIN}>"


def execution_of(mid: str) -> uuid.UUID:
    """The execution id inside a Message-ID."""
    return uuid.UUID(mid.strip("<>").split("@")[0].split(".")[0])


async def expected_message_ids(pool: asyncpg.Pool) -> dict[str, str]:
    """Recipient → the Message-ID its (only) execution must carry."""
    rows = await pool.fetch(
        """SELECT en.data->>'email' AS email, e.id, e.replay
           FROM dripd.step_executions e JOIN dripd.enrollments en ON en.id = e.enrollment_id"""
    )
    return {r["email"]: message_id(r["id"], r["replay"]) for r in rows}


def duplicates(sink: SmtpSink) -> int:
    ids = sink.message_ids()
    return len(ids) - len(set(ids))


def duplicated(sink: SmtpSink) -> dict[str, int]:
    """Message-IDs the sink accepted more than once, with how often."""
    return {mid: n for mid, n in Counter(sink.message_ids()).items() if n > 1}


def check_sink_against(sink: SmtpSink, expected: dict[str, str]) -> None:
    """Every recipient got at least one message, and every copy carries its execution's ids."""
    with sink.lock:
        seen = [(str(m["To"]), str(m["Message-ID"]), str(m["X-Dripd-Idempotency-Key"]))
                for m in sink.messages]  # fmt: skip
    got = {to for to, _, _ in seen}
    assert got == set(expected), f"missing: {sorted(set(expected) - got)[:10]}"
    for to, mid, key in seen:
        assert mid == expected[to], (to, mid, expected[to])
        execution_id, replay = mid.strip("<>").split("@")[0].split(".")
        assert key == f"{execution_id}:{replay}"


async def unrecorded(pool: asyncpg.Pool, sink: SmtpSink) -> set[str]:
    """Message-IDs the sink has accepted whose executions are not recorded `sent`: the only
    messages that a crash (or a lost connection) now may send a second time."""
    delivered = set(sink.message_ids())
    sent = {
        r["id"]
        for r in await pool.fetch("SELECT id FROM dripd.step_executions WHERE status = 'sent'")
    }
    return {mid for mid in delivered if execution_of(mid) not in sent}


def check_duplicates_bounded(sink: SmtpSink, bound: set[str]) -> dict[str, int]:
    """Every message accepted twice was one delivered but not recorded at a crash (`bound`,
    the union of `unrecorded` taken at each); returns the duplicates."""
    dups = duplicated(sink)
    beyond = sorted(set(dups) - bound)
    assert not beyond, (
        f"{len(beyond)} message(s) delivered more than once that were not delivered-but-"
        f"unrecorded at any kill (of {len(dups)} duplicated, bound {len(bound)}): {beyond[:5]}"
    )
    return dups


async def held_by(pool: asyncpg.Pool, pid: int) -> list[asyncpg.Record]:
    """The rows a daemon process holds (`claimed_by` is host:pid:random), with their leases."""
    rows: list[asyncpg.Record] = await pool.fetch(
        """SELECT id, replay, attempt, lease_until, claimed_by FROM dripd.step_executions
           WHERE status = 'claimed' AND split_part(claimed_by, ':', -2) = $1""",
        str(pid),
    )
    return rows


# --- which process owns which SMTP session -----------------------------------------------------


def tcp_ports(pid: int) -> set[int]:
    """The local ports of the TCP sockets that process `pid` has open (Linux /proc)."""
    inodes: set[str] = set()
    with contextlib.suppress(FileNotFoundError, ProcessLookupError, PermissionError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
    ports: set[int] = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, PermissionError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


async def settle(sink: SmtpSink, *, alive: Iterable[DaemonProc] = (), timeout: float = 60) -> None:
    """Wait until the sink can accept nothing more from dead daemons: every SMTP session still
    open belongs to a daemon in `alive`. Call it after a killed daemon has been reaped (its
    sockets are closed then, and the sink sees each session end)."""
    procs = list(alive)

    def done() -> bool:
        live: set[int] = set()
        for proc in procs:
            if proc.running:
                live |= tcp_ports(proc.pid)
        return sink.open_ports() <= live

    await wait_for(done, timeout=timeout, interval=0.05)
