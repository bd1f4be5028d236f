"""End to end: `dripd run` as real subprocesses, a real Postgres and a real SMTP sink on loopback.

The daemons are started, signalled (SIGTERM, SIGKILL) and driven through the control socket,
the CLI and HTTP; the database and the sink are the only witnesses. Time is real here (the
daemon is another process), so delays are kept to a second or two and every wait polls.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import asyncpg
import httpx
import pytest
from support import (
    SmtpSink,
    add_adapter,
    apply_text,
    free_port,
    one_email,
    smtp_config,
    wait_for,
    write_config,
)

from dripd import api
from dripd.control import request
from dripd.errors import DripdError

pytestmark = pytest.mark.slow

KEY = "hello"
DOMAIN = "dripd.local"


# --- the daemon as a subprocess ---------------------------------------------------------------


def _daemon_env() -> dict[str, str]:
    """The test's environment minus what would point the daemon elsewhere."""
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
            sys.executable, "-m", "dripd.cli", "run", "--config", str(self.config),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=self._stderr, env={**_daemon_env(), **self.env},
        )  # fmt: skip
        if ready:
            await self.wait_ready()
        return self

    async def wait_ready(self, timeout: float = 20.0) -> dict[str, Any]:
        async def answers() -> dict[str, Any] | None:
            assert self.proc is not None
            if self.proc.returncode is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.proc.returncode} while starting\n{self.tail()}"
                )
            try:
                status: dict[str, Any] = await request(self.socket, "status", timeout=2.0)
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
        async with httpx.AsyncClient(timeout=5.0) as client:
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


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # pytest's tmp_path can exceed the ~107-byte limit of AF_UNIX paths.
    with tempfile.TemporaryDirectory(prefix="dripd-e2e-") as tmp:
        yield Path(tmp)


@pytest.fixture
async def launch(dsn: str, tmp_path: Path, sockdir: Path) -> AsyncIterator[Launch]:
    """A factory of daemon subprocesses on this test's database; all are killed at the end."""
    made: list[DaemonProc] = []

    def make(name: str = "d", *, http: bool = False, **worker: Any) -> DaemonProc:
        socket_path = sockdir / f"{name}.sock"
        http_port = free_port() if http else None
        config = write_config(
            tmp_path / f"{name}.toml", dsn=dsn, socket_path=socket_path, http_port=http_port,
            **worker,
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


class GatedSink(SmtpSink):
    """A sink that, while `hold` is set, keeps each DATA waiting; once let go, a held message
    is refused (`refuse_held`, as when its sender has given up) or accepted."""

    hold: bool = False
    refuse_held: bool = True
    waiting: int = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if not self.hold:
            return await super().handle_DATA(server, session, envelope)
        self.waiting += 1
        try:
            # `hold` is flipped from the test's thread: no asyncio.Event across loops.
            while self.hold:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        finally:
            self.waiting -= 1
        if self.refuse_held:
            return "451 held and refused"
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
def sink() -> Iterator[GatedSink]:
    s = GatedSink().start()
    try:
        yield s
    finally:
        s.hold = False
        s.stop()


def tails(*procs: DaemonProc) -> str:
    return "\n".join(p.tail() for p in procs)


# --- the database side ------------------------------------------------------------------------


async def setup_sequence(pool: asyncpg.Pool, smtp_port: int) -> None:
    await apply_text(pool, one_email(KEY))
    await add_adapter(pool, name="smtp", channel="email", provider="smtp",
                      config=smtp_config(smtp_port))  # fmt: skip


def subscriber(n: int) -> dict[str, Any]:
    return {"email": f"s{n}@example.com", "first_name": f"S{n}"}


async def enroll_many(pool: asyncpg.Pool, count: int, *, start: int = 0) -> None:
    """Enroll subscribers s{start}…s{start+count-1}, a few at a time over the pool."""
    gate = asyncio.Semaphore(4)

    async def one(n: int) -> None:
        async with gate:
            await api.enroll(pool, tenant=None, sequence_key=KEY, subscriber_id=f"s{n}",
                             data=subscriber(n))  # fmt: skip

    await asyncio.gather(*(one(n) for n in range(start, start + count)))


async def statuses(pool: asyncpg.Pool) -> dict[str, int]:
    rows = await pool.fetch("SELECT status, count(*) AS n FROM dripd.step_executions GROUP BY 1")
    return {r["status"]: r["n"] for r in rows}


async def enrollment_statuses(pool: asyncpg.Pool) -> dict[str, int]:
    rows = await pool.fetch("SELECT status, count(*) AS n FROM dripd.enrollments GROUP BY 1")
    return {r["status"]: r["n"] for r in rows}


async def all_sent(pool: asyncpg.Pool, count: int) -> bool:
    return await statuses(pool) == {"sent": count}


async def expected_message_ids(pool: asyncpg.Pool) -> dict[str, str]:
    """Recipient → the Message-ID its (only) execution must carry."""
    rows = await pool.fetch(
        """SELECT en.data->>'email' AS email, e.id, e.replay
           FROM dripd.step_executions e JOIN dripd.enrollments en ON en.id = e.enrollment_id"""
    )
    return {r["email"]: f"<{r['id']}.{r['replay']}@{DOMAIN}>" for r in rows}


def duplicates(sink: SmtpSink) -> int:
    ids = sink.message_ids()
    return len(ids) - len(set(ids))


def check_sink_against(sink: SmtpSink, expected: dict[str, str]) -> None:
    """Every recipient got at least one message, and every copy carries its execution's ids."""
    with sink.lock:
        seen = [(str(m["To"]), str(m["Message-ID"]), str(m["X-Dripd-Idempotency-Key"]))
                for m in sink.messages]  # fmt: skip
    got = {to for to, _, _ in seen}
    assert got == set(expected), f"missing: {sorted(set(expected) - got)[:10]}"
    for to, message_id, key in seen:
        assert message_id == expected[to], (to, message_id, expected[to])
        execution_id, replay = message_id.strip("<>").split("@")[0].split(".")
        assert key == f"{execution_id}:{replay}"


def sent_by(metrics: dict[str, float]) -> float:
    return sum(
        v for k, v in metrics.items()
        if k.startswith("dripd_executions_total{") and 'outcome="sent"' in k
    )  # fmt: skip


# --- 1. two daemons, one backlog --------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_two_daemons_share_one_backlog_exactly_once(
    pool: asyncpg.Pool, sink: SmtpSink, launch: Launch
) -> None:
    n = 2000
    await setup_sequence(pool, sink.port)
    await enroll_many(pool, n)
    a, b = launch("a", http=True), launch("b", http=True)
    await asyncio.gather(a.start(ready=False), b.start(ready=False))
    await asyncio.gather(a.wait_ready(), b.wait_ready())

    try:
        await wait_for(lambda: all_sent(pool, n), timeout=60, interval=0.2)
    except AssertionError:
        raise AssertionError(f"not all sent: {await statuses(pool)}\n{tails(a, b)}") from None
    assert await enrollment_statuses(pool) == {"completed": n}
    by_a, by_b = sent_by(await a.metrics()), sent_by(await b.metrics())
    events = await pool.fetchval("SELECT count(*) FROM dripd.message_events WHERE type = 'sent'")

    a.signal(signal.SIGTERM)
    b.signal(signal.SIGTERM)
    codes = await asyncio.gather(a.wait(20), b.wait(20))
    assert codes == [0, 0], tails(a, b)

    # Both have exited: nothing more can arrive.
    ids = sink.message_ids()
    assert len(ids) == n, f"{len(ids) - len(set(ids))} duplicates"
    assert set(ids) == set((await expected_message_ids(pool)).values())
    assert events == n
    assert by_a + by_b == n
    print(f"\ntwo daemons: a sent {by_a:.0f}, b sent {by_b:.0f}")
    assert by_a > 0, tails(a)
    assert by_b > 0, tails(b)


# --- 2. SIGKILL mid-run, restart, repeat ------------------------------------------------------


@pytest.mark.timeout(120)
async def test_sigkill_mid_run_and_restart_loses_nothing(
    pool: asyncpg.Pool, sink: SmtpSink, launch: Launch
) -> None:
    n = 1500
    rng = random.Random()
    await setup_sequence(pool, sink.port)
    await enroll_many(pool, n)
    d = launch("d", lease="2s")
    await d.start(ready=False)

    orphaned: list[tuple[int, int]] = []  # (rows left claimed, of which already delivered)
    for low, high in ((0.05, 0.25), (0.35, 0.55), (0.65, 0.8)):
        at = rng.randint(int(n * low), int(n * high))
        try:
            await wait_for(lambda at=at: sink.count() >= at, timeout=30, interval=0.01)
        except AssertionError:
            raise AssertionError(
                f"stalled before {at} messages: {await statuses(pool)}\n{d.tail()}"
            ) from None
        await d.kill()
        assert sink.count() < n, "the kill came after everything was sent; raise n"
        claimed = await pool.fetch(
            "SELECT id, replay FROM dripd.step_executions WHERE status = 'claimed'"
        )
        delivered = set(sink.message_ids())
        orphaned.append(
            (len(claimed), sum(f"<{r['id']}.{r['replay']}@{DOMAIN}>" in delivered for r in claimed))
        )
        await d.start(ready=False)

    try:
        await wait_for(lambda: all_sent(pool, n), timeout=60, interval=0.2)
    except AssertionError:
        raise AssertionError(f"not all sent: {await statuses(pool)}\n{d.tail()}") from None
    d.signal(signal.SIGTERM)
    assert await d.wait(20) == 0, d.tail()

    assert await enrollment_statuses(pool) == {"completed": n}
    check_sink_against(sink, await expected_message_ids(pool))
    dups = duplicates(sink)
    attempts = await pool.fetchval("SELECT max(attempt) FROM dripd.step_executions")
    print(
        f"\nSIGKILL x3: (claimed, of them delivered) at each kill {orphaned}, "
        f"{dups} duplicate deliveries "
        f"(same Message-ID), max attempt {attempts}"
    )


# --- 3. SIGTERM mid-run -----------------------------------------------------------------------


@pytest.mark.timeout(90)
async def test_sigterm_mid_run_exits_cleanly_and_loses_nothing(
    pool: asyncpg.Pool, sink: SmtpSink, launch: Launch
) -> None:
    n = 1000
    await setup_sequence(pool, sink.port)
    await enroll_many(pool, n)
    # Small batches, so that SIGTERM finds work both in flight and not yet claimed.
    d = launch("d", shutdown_timeout="3s", batch_size=50, concurrency=50)
    await d.start(ready=False)
    await wait_for(lambda: sink.count() >= n // 5, timeout=30, interval=0.01)

    d.signal(signal.SIGTERM)
    started = time.monotonic()
    code = await d.wait(15)
    elapsed = time.monotonic() - started
    assert code == 0, d.tail()
    assert elapsed < 3 + 2, f"took {elapsed:.1f}s\n{d.tail()}"
    print(f"\nSIGTERM mid-run: exited 0 in {elapsed:.2f}s")
    left = await statuses(pool)
    assert "claimed" not in left, f"{left}\n{d.tail()}"
    assert left.get("scheduled", 0) > 0, "SIGTERM came after everything was sent; raise n"
    assert left.get("sent", 0) >= sink.count() - duplicates(sink)
    assert '"stopped"' in d.log.read_text() or "stopped" in d.tail(), d.tail()

    # A second daemon finishes the rest.
    e = launch("e")
    await e.start(ready=False)
    try:
        await wait_for(lambda: all_sent(pool, n), timeout=30, interval=0.2)
    except AssertionError:
        raise AssertionError(f"not all sent: {await statuses(pool)}\n{e.tail()}") from None
    e.signal(signal.SIGTERM)
    assert await e.wait(20) == 0, e.tail()
    check_sink_against(sink, await expected_message_ids(pool))
    # A clean stop finishes or releases every send it holds: no resend, no duplicate.
    assert duplicates(sink) == 0


@pytest.mark.timeout(90)
async def test_sigterm_with_hung_sends_exits_by_shutdown_timeout_and_releases(
    pool: asyncpg.Pool, launch: Launch
) -> None:
    held = GatedSink()
    held.hold = True
    held.start()
    try:
        n = 50
        await setup_sequence(pool, held.port)
        await enroll_many(pool, n)
        d = launch("d", shutdown_timeout="2s")
        await d.start()
        await wait_for(lambda: held.waiting >= 1, timeout=20)
        claimed = (await statuses(pool)).get("claimed", 0)
        assert claimed > 0

        d.signal(signal.SIGTERM)
        started = time.monotonic()
        code = await d.wait(15)
        elapsed = time.monotonic() - started
        assert code == 0, d.tail()
        assert 1.5 < elapsed < 2 + 2, f"took {elapsed:.1f}s\n{d.tail()}"
        print(f"\nSIGTERM with {claimed} hung sends: exited 0 in {elapsed:.2f}s")
        # The sends it gave up on were released, not left for the lease to expire.
        left = await statuses(pool)
        assert left == {"scheduled": n}, f"{left}\n{d.tail()}"
        assert await pool.fetchval("SELECT max(attempt) FROM dripd.step_executions") == 0

        held.hold = False
        await d.start(ready=False)
        try:
            await wait_for(lambda: all_sent(pool, n), timeout=30, interval=0.2)
        except AssertionError:
            raise AssertionError(f"not all sent: {await statuses(pool)}\n{d.tail()}") from None
        d.signal(signal.SIGTERM)
        assert await d.wait(20) == 0, d.tail()
        check_sink_against(held, await expected_message_ids(pool))
        assert duplicates(held) == 0
    finally:
        held.hold = False
        held.stop()


# --- 4. the LISTEN connection is killed -------------------------------------------------------


async def listen_backends(pool: asyncpg.Pool) -> list[int]:
    """Backends of this database that are a daemon's LISTEN connection.

    Without an application_name, the listener is told apart by its last statement: `LISTEN …`
    right after connecting, then the `SELECT 1` liveness probe it runs every 2 s. Pool
    connections end each use with asyncpg's reset (`… UNLISTEN *; RESET ALL;`).
    """
    rows = await pool.fetch(
        """SELECT pid FROM pg_stat_activity
           WHERE datname = current_database() AND pid <> pg_backend_pid()
             AND backend_type = 'client backend' AND state = 'idle'
             AND (query LIKE 'LISTEN %' OR query = 'SELECT 1')"""
    )
    return [r["pid"] for r in rows]


@pytest.mark.timeout(60)
async def test_listen_connection_killed_reconnects_and_notify_still_wakes(
    pool: asyncpg.Pool, sink: SmtpSink, launch: Launch
) -> None:
    await setup_sequence(pool, sink.port)
    # Only NOTIFY (and the timer to a known due time) can wake this daemon.
    d = launch("d", http=True, poll_interval="1h")
    await d.start()
    first = await wait_for(lambda: listen_backends(pool), timeout=10)
    assert len(first) == 1, first
    print(
        "\nLISTEN backend:",
        dict(
            await pool.fetchrow(
                "SELECT pid, backend_type, state, query FROM pg_stat_activity WHERE pid = $1",
                first[0],
            )
        ),
    )
    await enroll_many(pool, 1, start=0)
    await wait_for(lambda: sink.count() >= 1, timeout=10)

    killed = await pool.fetchval("SELECT pg_terminate_backend($1)", first[0])
    assert killed

    async def reconnected() -> bool:
        m = await d.metrics()
        pids = await listen_backends(pool)
        return m.get("dripd_listen_reconnects_total", 0) >= 1 and bool(pids) and pids != first

    try:
        await wait_for(reconnected, timeout=15, interval=0.1)
    except AssertionError:
        raise AssertionError(f"the listener did not come back\n{d.tail()}") from None

    await enroll_many(pool, 1, start=1)
    try:
        await wait_for(lambda: sink.count() >= 2, timeout=10)
    except AssertionError:
        raise AssertionError(f"NOTIFY after reconnect did not wake\n{d.tail()}") from None
    await wait_for(lambda: all_sent(pool, 2), timeout=5)
    assert (await d.metrics())["dripd_listen_reconnects_total"] >= 1
    d.signal(signal.SIGTERM)
    assert await d.wait(20) == 0, d.tail()


# --- 5. the SMTP server is down ----------------------------------------------------------------


async def one_execution(pool: asyncpg.Pool) -> asyncpg.Record:
    row = await pool.fetchrow(
        """SELECT e.*, en.status AS enrollment_status
           FROM dripd.step_executions e JOIN dripd.enrollments en ON en.id = e.enrollment_id"""
    )
    assert row is not None
    return row


@pytest.mark.timeout(60)
async def test_smtp_down_then_up_retries_and_delivers(pool: asyncpg.Pool, launch: Launch) -> None:
    port = free_port()  # nothing listens here yet
    await setup_sequence(pool, port)
    # No slow poll: only the daemon's timer to the retry's due time may bring the retry back.
    d = launch("d", retry_base="1s", max_attempts=3, poll_interval="1h")
    await d.start()
    await enroll_many(pool, 1)

    async def retrying() -> asyncpg.Record | None:
        row = await one_execution(pool)
        return row if row["attempt"] >= 1 and row["status"] == "scheduled" else None

    try:
        row = await wait_for(retrying, timeout=10, interval=0.02)
    except AssertionError:
        raise AssertionError(f"{dict(await one_execution(pool))}\n{d.tail()}") from None
    assert row["attempt"] == 1, dict(row)
    assert row["last_error"] is not None
    assert "connection failed" in row["last_error"], dict(row)
    assert row["reason"] == "retry"

    sink = SmtpSink().start(port)
    try:
        try:
            await wait_for(lambda: sink.count() >= 1, timeout=10)
        except AssertionError:
            raise AssertionError(f"{dict(await one_execution(pool))}\n{d.tail()}") from None
        await wait_for(lambda: all_sent(pool, 1), timeout=5)
        row = await one_execution(pool)
        assert row["attempt"] <= 2, dict(row)  # at most 3 tries: attempt counts the failed ones
        assert row["enrollment_status"] == "completed"
        assert sink.count() == 1
        kinds = await pool.fetch("SELECT type FROM dripd.message_events ORDER BY id")
        assert [k["type"] for k in kinds][-1] == "sent"
        assert "deferred" in [k["type"] for k in kinds]
        d.signal(signal.SIGTERM)
        assert await d.wait(20) == 0, d.tail()
    finally:
        sink.stop()


@pytest.mark.timeout(60)
async def test_smtp_never_up_fails_after_max_attempts(pool: asyncpg.Pool, launch: Launch) -> None:
    await setup_sequence(pool, free_port())  # nothing ever listens here
    # No slow poll: only the daemon's timer to the retry's due time may bring the retry back.
    d = launch("d", retry_base="1s", max_attempts=3, poll_interval="1h")
    await d.start()
    await enroll_many(pool, 1)

    async def failed() -> asyncpg.Record | None:
        row = await one_execution(pool)
        return row if row["status"] == "failed" else None

    try:
        row = await wait_for(failed, timeout=15, interval=0.05)
    except AssertionError:
        raise AssertionError(f"{dict(await one_execution(pool))}\n{d.tail()}") from None
    assert row["attempt"] == 3, dict(row)
    assert "gave up after 3 attempts" in row["last_error"], dict(row)
    assert await enrollment_statuses(pool) == {"failed": 1}
    events = await pool.fetch("SELECT type FROM dripd.message_events ORDER BY id")
    assert [e["type"] for e in events] == ["deferred", "deferred", "failed"], events
    d.signal(signal.SIGTERM)
    assert await d.wait(20) == 0, d.tail()


# --- 6. the control socket and `dripd ctl` ----------------------------------------------------


async def ctl(d: DaemonProc, *command: str, json_flag: bool = True) -> dict[str, Any]:
    flags = ["--json"] if json_flag else []
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dripd.cli", "ctl", "--socket", d.socket, *command, *flags,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_daemon_env(),
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, f"ctl {command}: {proc.returncode} {err.decode()}\n{d.tail()}"
    result: dict[str, Any] = json.loads(out)
    return result


@pytest.mark.timeout(90)
async def test_ctl_status_pause_resume_drain(
    pool: asyncpg.Pool, sink: GatedSink, launch: Launch
) -> None:
    await setup_sequence(pool, sink.port)
    d = launch("d", stats_interval="100ms", concurrency=8)
    await d.start()

    # `dripd ctl status` prints JSON even without --json: scripts rely on it.
    status = await ctl(d, "status", json_flag=False)
    assert {"version", "uptime_s", "in_flight", "due_backlog", "paused"} <= set(status), status
    assert status["paused"] is False
    assert status["in_flight"] == 0
    assert status["uptime_s"] >= 0

    assert (await ctl(d, "pause"))["paused"] is True
    await enroll_many(pool, 3)
    # The daemon sees the backlog (its stats loop counts it) and still claims nothing.
    try:
        seen = await wait_for(lambda: _backlog_at_least(d, 3), timeout=10)
    except AssertionError:
        raise AssertionError(d.tail()) from None
    assert seen["paused"] is True
    assert seen["in_flight"] == 0
    assert sink.count() == 0
    assert await statuses(pool) == {"scheduled": 3}

    resumed = await ctl(d, "resume")
    assert resumed["paused"] is False
    await wait_for(lambda: all_sent(pool, 3), timeout=10)
    assert sink.count() == 3

    # Drain while sends are in flight: it waits for them, then nothing more is claimed.
    sink.hold, sink.refuse_held = True, False
    n = 20
    await enroll_many(pool, n, start=3)
    await wait_for(lambda: sink.waiting >= 1, timeout=10)
    draining = asyncio.create_task(ctl(d, "drain"))
    try:
        # The daemon is draining (paused, work in flight) and `ctl drain` has not returned.
        pending = await wait_for(lambda: _status_if(d, paused=True), timeout=15)
        assert pending["in_flight"] == 8, pending  # concurrency
        assert not draining.done()
        sink.hold = False
        drained = await asyncio.wait_for(draining, 15)
    finally:
        sink.hold = False
        if not draining.done():
            draining.cancel()
    assert drained["in_flight"] == 0, drained
    assert drained["paused"] is True
    # What was in flight is recorded, the rest still waits, unclaimed.
    assert await statuses(pool) == {"sent": 3 + 8, "scheduled": n - 8}
    assert sink.count() == 3 + 8
    seen = await wait_for(lambda: _backlog_at_least(d, n - 8), timeout=10)
    assert (seen["paused"], seen["in_flight"]) == (True, 0), seen
    assert sink.count() == 3 + 8

    assert (await ctl(d, "resume"))["paused"] is False
    await wait_for(lambda: all_sent(pool, n + 3), timeout=15)
    assert sink.count() == n + 3
    assert duplicates(sink) == 0
    d.signal(signal.SIGTERM)
    assert await d.wait(20) == 0, d.tail()


async def _status_if(d: DaemonProc, **want: Any) -> dict[str, Any] | None:
    status: dict[str, Any] = await request(d.socket, "status")
    return status if all(status[k] == v for k, v in want.items()) else None


async def _backlog_at_least(d: DaemonProc, n: int) -> dict[str, Any] | None:
    status: dict[str, Any] = await request(d.socket, "status")
    return status if status["due_backlog"] >= n else None


# --- 7. the database connections die mid-run -----------------------------------------------


@pytest.mark.timeout(90)
async def test_every_database_connection_killed_mid_run_loses_nothing(
    pool: asyncpg.Pool, sink: GatedSink, launch: Launch
) -> None:
    n = 1500
    await setup_sequence(pool, sink.port)
    await enroll_many(pool, n)
    # Small batches so that the kills land while claims and records are in progress.
    d = launch("d", batch_size=50, concurrency=100, lease="3s", poll_interval="1s")
    await d.start()
    database = await pool.fetchval("SELECT current_database()")
    kills = 0
    for _ in range(3):
        await wait_for(lambda target=(kills + 1) * n // 5: sink.count() >= target, timeout=30,
                       interval=0.01)  # fmt: skip
        killed = await pool.fetchval(
            """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
               WHERE datname = $1 AND pid <> pg_backend_pid()
                 AND application_name NOT LIKE 'pytest%'
                 AND pid NOT IN (SELECT pid FROM pg_stat_activity WHERE query LIKE '%pg_terminate%')
            """,
            database,
        )  # fmt: skip
        kills += 1
        assert killed >= 1
    try:
        await wait_for(lambda: all_sent(pool, n), timeout=60, interval=0.2)
    except AssertionError:
        raise AssertionError(f"not all sent: {await statuses(pool)}\n{d.tail()}") from None
    assert d.running, d.tail()  # the daemon rode it out: no crash, no restart
    check_sink_against(sink, await expected_message_ids(pool))
    print(f"\nkilled every connection {kills} times: {duplicates(sink)} duplicate(s)")
    d.signal(signal.SIGTERM)
    assert await d.wait(20) == 0, d.tail()


# --- flow: entry and exit events, a wait released or timed out, a signed HTTP hook ---------

FLOW = """
[sequence]
key = "trial"
entry_events = ["signed_up"]
exit_events = ["purchased"]

[hooks.crm]
url = "http://127.0.0.1:{port}/tier/{{{{ subscriber_id }}}}"
auth = {{ type = "bearer", secret = "crm_token" }}
signing_secret = "crm_signing"
timeout = "2s"

[[steps]]
key = "hello"
channel = "email"
subject = "Welcome, {{{{ hooks.crm.tier }}}} member"
text = "Hi"

[[steps]]
key = "wait_activation"
wait_for = {{ event = "activated", timeout = "2s", on_timeout = "reminder" }}

[[steps]]
key = "congrats"
channel = "email"
subject = "Activated"
text = "Well done"

[[steps]]
key = "reminder"
channel = "email"
subject = "Need a hand?"
text = "Hi"

[[transitions]]
from = "congrats"
"""


async def cli(*argv: str, env: dict[str, str], stdin: bytes | None = None) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dripd.cli", *argv, "--json",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**_daemon_env(), **env},
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(stdin), 30)
    assert proc.returncode == 0, f"dripd {argv}: {proc.returncode} {err.decode()}"
    result: dict[str, Any] = json.loads(out)
    return result


async def subjects(sink: SmtpSink, to: str) -> list[str]:
    return [str(m["Subject"]) for m in sink.messages if m["To"] == to]


@pytest.mark.timeout(120)
async def test_flow_end_to_end_through_dripd_run(
    dsn: str, pool: asyncpg.Pool, sink: GatedSink, launch: Launch, tmp_path: Path
) -> None:
    from standardwebhooks import Webhook
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from dripd.channels.credentials import generate_key
    from dripd.http.app import HttpServer

    env = {"DRIPD_ENCRYPTION_KEY": generate_key(), "DRIPD_DSN": dsn}
    signing = (await cli("secret", "generate", "crm_signing", env=env))["value"]
    await cli("secret", "set", "crm_token", env=env, stdin=b"tok-123\n")
    calls: list[str] = []

    async def tier(request: Request) -> Response:
        body = await request.body()
        Webhook(signing).verify(body, dict(request.headers), json_parse=False)  # raises: 500
        if request.headers.get("authorization") != "Bearer tok-123":
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        calls.append(request.path_params["who"])
        return JSONResponse({"tier": "gold"})

    server = HttpServer(Starlette(routes=[Route("/tier/{who}", tier)]), graceful_timeout=1.0)
    await server.start("127.0.0.1", 0)
    try:
        flow = tmp_path / "trial.toml"
        flow.write_text(FLOW.format(port=server.port))
        await cli("apply", str(flow), env=env)
        await add_adapter(
            pool, name="smtp", channel="email", provider="smtp", config=smtp_config(sink.port)
        )
        d = launch("d")
        d.env = env
        with d.config.open("a") as f:
            f.write('\n[hooks]\nallow_http = true\nallowed_networks = ["127.0.0.1/32"]\n')
        refused = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dripd.cli", "hook", "test", "trial", "crm",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**_daemon_env(), **env},
        )  # fmt: skip
        _, err = await refused.communicate()
        assert refused.returncode == 1  # the default policy: https and public addresses only
        assert "URL scheme 'http' is not allowed" in err.decode()
        tested = await cli(
            "hook", "test", "trial", "crm", "--subscriber", "probe", "--config", str(d.config),
            env=env,
        )  # fmt: skip
        assert tested == {"hook": "crm", "result": {"tier": "gold"}}
        await d.start()
        for who in ("ann", "bob", "cid"):
            data = json.dumps({"email": f"{who}@example.com"})
            done = await cli("event", who, "signed_up", "--data", data, env=env)
            assert len(done["enrolled"]) == 1, done
        await wait_for(lambda: sink.count() == 3, timeout=20)
        assert await subjects(sink, "ann@example.com") == ["Welcome, gold member"]
        assert sorted(calls) == ["ann", "bob", "cid", "probe"]

        activated = await cli("event", "ann", "activated", "--id", "act-1", env=env)
        assert len(activated["released"]) == 1, activated
        again = await cli("event", "ann", "activated", "--id", "act-1", env=env)
        assert again["created"] is False
        goal = await cli("event", "cid", "purchased", env=env)
        assert len(goal["exited"]) == 1, goal

        # bob never activates: after the 2s timeout he gets the reminder.
        await wait_for(lambda: sink.count() == 5, timeout=20)
        assert await subjects(sink, "ann@example.com") == ["Welcome, gold member", "Activated"]
        assert await subjects(sink, "bob@example.com") == ["Welcome, gold member", "Need a hand?"]
        assert await subjects(sink, "cid@example.com") == ["Welcome, gold member"]
        rows = await pool.fetch(
            "SELECT subscriber_id, status, status_reason FROM dripd.enrollments "
            "ORDER BY subscriber_id"
        )
        assert [(r["subscriber_id"], r["status"], r["status_reason"]) for r in rows] == [
            ("ann", "completed", "completed"),
            ("bob", "completed", "completed"),
            ("cid", "exited", "exit_event:purchased"),
        ]
        d.signal(signal.SIGTERM)
        assert await d.wait(30) == 0
        log = d.log.read_text()
        assert "tok-123" not in log
        assert signing not in log
    finally:
        await server.stop()


# --- a shared rate limit: three daemons, one budget, counted at the SMTP sink ----------------


@pytest.mark.timeout(120)
async def test_three_daemons_never_exceed_a_shared_rate_limit(
    pool: asyncpg.Pool, sink: GatedSink, launch: Launch
) -> None:
    limit, window, total = 10, 2, 60
    await setup_sequence(pool, sink.port)
    await enroll_many(pool, total)
    daemons = []
    for name in ("a", "b", "c"):
        d = launch(name, concurrency=20)
        with d.config.open("a") as f:
            f.write(f'\n[rate_limits]\nadapter = {{ smtp = "{limit}/{window}s" }}\n')
        daemons.append(d)
    await asyncio.gather(*(d.start() for d in daemons))
    try:
        await wait_for(lambda: all_sent(pool, total), timeout=60)
    except AssertionError:
        raise AssertionError(tails(*daemons)) from None
    assert sink.count() == total
    # Count arrivals per window as the receiver sees them (windows align to the epoch).
    per_window = Counter(int(t // window) for t in sink.arrivals)
    assert max(per_window.values()) <= limit, sorted(per_window.items())
    assert len(per_window) >= total // limit  # it took at least that many windows
    # Deferring for the limit never spent an attempt.
    limited = await pool.fetchval(
        "SELECT count(*) FROM dripd.message_events WHERE type = 'deferred' "
        "AND reason = 'rate_limited'"
    )
    assert limited > 0, "no execution was ever rate limited"
    attempts = await pool.fetch("SELECT DISTINCT attempt FROM dripd.step_executions")
    assert [r["attempt"] for r in attempts] == [0]
    for d in daemons:
        d.signal(signal.SIGTERM)
    assert [await d.wait(30) for d in daemons] == [0, 0, 0]
