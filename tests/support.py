"""Shared test helpers: an SMTP sink on loopback, sequences, adapters and daemon configs."""

from __future__ import annotations

import asyncio
import contextlib
import email
import gc
import socket
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
from aiosmtpd.controller import Controller

from dripd import api
from dripd.channels.credentials import Vault
from dripd.config import from_dict
from dripd.db import store
from dripd.engine.adapters import adapter_aad
from dripd.engine.daemon import Daemon
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


@dataclass
class SmtpSink:
    """An aiosmtpd server that keeps every message it accepts (thread-safe)."""

    messages: list[EmailMessage] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    reply: str | None = None  # e.g. "451 try later" to refuse DATA
    unknown: frozenset[str] = frozenset()  # addresses refused at RCPT TO with 550 (bounces)
    arrivals: list[float] = field(default_factory=list)  # time.time() of each accepted message
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
        raw = envelope.content if isinstance(envelope.content, bytes) else envelope.content.encode()
        msg = email.message_from_bytes(raw, policy=default_policy)
        assert isinstance(msg, EmailMessage)
        with self.lock:
            self.messages.append(msg)
            self.arrivals.append(time.time())
        return "250 OK"

    def start(self, port: int | None = None) -> SmtpSink:
        self.port = port or self.port or free_port()
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self.controller.start()
        return self

    def stop(self) -> None:
        if self.controller is not None:
            stop_controller(self.controller)
            self.controller = None

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


def smtp_config(port: int) -> dict[str, Any]:
    return {
        "host": "127.0.0.1",
        "port": port,
        "tls": "none",
        "timeout": 5,
        "from": "drip@example.com",
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


def write_config(
    path: Path, *, dsn: str, socket_path: Path, http_port: int | None = None, **worker: Any
) -> Path:
    """A daemon config file for subprocess tests."""
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
        lines.append(f'listen = "127.0.0.1:{http_port}"')
    lines += ["", "[worker]"]
    for key, value in worker.items():
        lines.append(f"{key} = {value!r}".replace("'", '"'))
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
    `sections` adds config sections (e.g. hooks); `worker` sets worker keys."""
    cfg = from_dict(
        {
            "database": {"dsn": dsn, "pool_min": 1, "pool_max": 4},
            "control": {"socket": str(tmp_path / "control.sock")},
            "http": {"enabled": False},
            "worker": {"poll_interval": "1h", **worker},
            **(sections or {}),
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
