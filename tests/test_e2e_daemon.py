"""End to end: `dripd run` as real subprocesses, a real Postgres and a real SMTP sink on loopback.

The daemons are started, signalled (SIGTERM, SIGKILL) and driven through the control socket,
the CLI and HTTP; the database and the sink are the only witnesses. Time is real here (the
daemon is another process), so no test decides anything by how long something took: each
waits for a state (in the database, at the sink, in the daemon's status) with a generous
deadline that only says "it never happened", and a signal meant for a given point of a run
is sent from the sink's thread as that point is reached.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from support import (
    DaemonProc,
    Launch,
    SmtpSink,
    add_adapter,
    all_sent,
    apply_text,
    check_duplicates_bounded,
    check_sink_against,
    daemon_env,
    duplicates,
    enroll_many,
    enrollment_statuses,
    expected_message_ids,
    free_port,
    held_by,
    message_id,
    one_email,
    sent_by,
    settle,
    smtp_config,
    statuses,
    tails,
    tcp_ports,
    unrecorded,
    wait_for,
)

from dripd.control import request

pytestmark = pytest.mark.slow

KEY = "hello"


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


class SignalAt:
    """A sink `on_accept` hook: send `sig` to `pid` once, as the `count`-th message is
    accepted. It runs in the sink's thread, so the run is at exactly that point however slow
    the test's own loop is; `sent_at` is the time.monotonic() of the signal."""

    def __init__(self, pid: int, count: int, sig: int = signal.SIGKILL) -> None:
        self.pid, self.count, self.sig = pid, count, sig
        self.sent_at: float | None = None
        self._fired = threading.Event()

    def __call__(self, accepted: int) -> None:
        if accepted >= self.count and not self._fired.is_set():
            self._fired.set()
            self.sent_at = time.monotonic()
            os.kill(self.pid, self.sig)


# --- the database side ------------------------------------------------------------------------


async def setup_sequence(pool: asyncpg.Pool, smtp_port: int, **smtp: Any) -> None:
    # A client timeout far beyond any wait here: on a loaded machine a slow reply must not
    # turn into a retry (and a duplicate) that no test meant.
    smtp.setdefault("timeout", 60)
    await apply_text(pool, one_email(KEY))
    await add_adapter(pool, name="smtp", channel="email", provider="smtp",
                      config=smtp_config(smtp_port, **smtp))  # fmt: skip


# --- 1. two daemons, one backlog --------------------------------------------------------------


@pytest.mark.timeout(180)
async def test_two_daemons_share_one_backlog_exactly_once(
    pool: asyncpg.Pool, sink: GatedSink, launch: Launch
) -> None:
    n = 2000
    # The sink holds every message until both daemons hold rows: neither can finish the
    # backlog before the other has started, however unevenly the machine runs them. A held
    # message is accepted on release; a long client timeout keeps the sender waiting for it.
    sink.hold, sink.refuse_held = True, False
    await setup_sequence(pool, sink.port, timeout=120)
    await enroll_many(pool, n)
    a, b = launch("a", http=True), launch("b", http=True)
    await asyncio.gather(a.start(ready=False), b.start(ready=False))
    await asyncio.gather(a.wait_ready(), b.wait_ready())

    async def both_hold_rows() -> bool:
        return bool(await held_by(pool, a.pid)) and bool(await held_by(pool, b.pid))

    try:
        await wait_for(both_hold_rows, timeout=60, interval=0.05)
    except AssertionError:
        raise AssertionError(f"not both claimed: {await statuses(pool)}\n{tails(a, b)}") from None
    sink.hold = False

    try:
        await wait_for(lambda: all_sent(pool, n), timeout=120, interval=0.2)
    except AssertionError:
        raise AssertionError(f"not all sent: {await statuses(pool)}\n{tails(a, b)}") from None
    assert await enrollment_statuses(pool) == {"completed": n}
    by_a, by_b = sent_by(await a.metrics()), sent_by(await b.metrics())
    events = await pool.fetchval("SELECT count(*) FROM dripd.message_events WHERE type = 'sent'")

    a.signal(signal.SIGTERM)
    b.signal(signal.SIGTERM)
    codes = await asyncio.gather(a.wait(60), b.wait(60))
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


@pytest.mark.timeout(240)
async def test_sigkill_mid_run_and_restart_loses_nothing(
    pool: asyncpg.Pool, sink: SmtpSink, launch: Launch
) -> None:
    n = 1500
    rng = random.Random()
    await setup_sequence(pool, sink.port)
    await enroll_many(pool, n)
    d = launch("d", lease="2s")
    await d.start(ready=False)

    at_kills: list[tuple[int, int, int]] = []  # (rows left claimed, of them delivered, unrecorded)
    bound: set[str] = set()  # delivered but not recorded `sent` at some kill
    for low, high in ((0.05, 0.25), (0.35, 0.55), (0.65, 0.8)):
        at = rng.randint(int(n * low), int(n * high))
        sink.on_accept = SignalAt(d.pid, at)  # SIGKILL as the at-th message is accepted
        try:
            code = await d.wait(120)
        except AssertionError:
            raise AssertionError(
                f"stalled before {at} messages: {await statuses(pool)}\n{d.tail()}"
            ) from None
        sink.on_accept = None
        assert code == -signal.SIGKILL, d.tail()
        # What the dead daemon had already sent is in the sink's sockets: let it land.
        await settle(sink)
        assert sink.count() < n, "the kill came after everything was sent; raise n"
        claimed = await pool.fetch(
            "SELECT id, replay FROM dripd.step_executions WHERE status = 'claimed'"
        )
        delivered = set(sink.message_ids())
        lost = await unrecorded(pool, sink)
        bound |= lost
        at_kills.append(
            (len(claimed), sum(message_id(r["id"], r["replay"]) in delivered for r in claimed),
             len(lost))
        )  # fmt: skip
        await d.start(ready=False)

    try:
        await wait_for(lambda: all_sent(pool, n), timeout=120, interval=0.2)
    except AssertionError:
        raise AssertionError(f"not all sent: {await statuses(pool)}\n{d.tail()}") from None
    d.signal(signal.SIGTERM)
    assert await d.wait(60) == 0, d.tail()

    assert await enrollment_statuses(pool) == {"completed": n}
    check_sink_against(sink, await expected_message_ids(pool))
    attempts = await pool.fetchval("SELECT max(attempt) FROM dripd.step_executions")
    print(
        f"\nSIGKILL x3: (claimed, of them delivered, delivered-but-unrecorded) at each kill "
        f"{at_kills}, {duplicates(sink)} duplicate deliveries (same Message-ID), "
        f"max attempt {attempts}"
    )
    # A resend only ever repeats a message delivered but not yet recorded when its daemon died.
    check_duplicates_bounded(sink, bound)


# --- 3. SIGTERM mid-run -----------------------------------------------------------------------


@pytest.mark.timeout(180)
async def test_sigterm_mid_run_exits_cleanly_and_loses_nothing(
    pool: asyncpg.Pool, sink: SmtpSink, launch: Launch
) -> None:
    n = 1000
    await setup_sequence(pool, sink.port)
    await enroll_many(pool, n)
    # Small batches, so that SIGTERM finds work both in flight and not yet claimed; a
    # shutdown timeout no in-flight send can outlast, so that every one is finished.
    d = launch("d", shutdown_timeout="60s", batch_size=50, concurrency=50)
    await d.start(ready=False)
    term = SignalAt(d.pid, n // 5, signal.SIGTERM)
    sink.on_accept = term
    code = await d.wait(120)
    assert term.sent_at is not None, f"exited before SIGTERM\n{d.tail()}"
    elapsed = time.monotonic() - term.sent_at
    assert code == 0, d.tail()
    print(f"\nSIGTERM mid-run: exited 0 in {elapsed:.2f}s")
    left = await statuses(pool)
    assert "claimed" not in left, f"{left}\n{d.tail()}"
    assert left.get("scheduled", 0) > 0, "SIGTERM came after everything was sent; raise n"
    # Everything it delivered is recorded: nothing is left for a resend.
    assert await unrecorded(pool, sink) == set(), d.tail()
    assert '"stopped"' in d.log.read_text() or "stopped" in d.tail(), d.tail()

    # A second daemon finishes the rest.
    e = launch("e")
    await e.start(ready=False)
    try:
        await wait_for(lambda: all_sent(pool, n), timeout=120, interval=0.2)
    except AssertionError:
        raise AssertionError(f"not all sent: {await statuses(pool)}\n{e.tail()}") from None
    e.signal(signal.SIGTERM)
    assert await e.wait(60) == 0, e.tail()
    check_sink_against(sink, await expected_message_ids(pool))
    # A clean stop finishes or releases every send it holds: no resend, no duplicate.
    assert duplicates(sink) == 0


@pytest.mark.timeout(180)
async def test_sigterm_with_hung_sends_exits_by_shutdown_timeout_and_releases(
    pool: asyncpg.Pool, launch: Launch
) -> None:
    held = GatedSink()
    held.hold = True
    held.start()
    try:
        n = 50
        # The client would wait 600 s for the held sends: a daemon that exits within the
        # deadline below can only have given them up at its shutdown timeout.
        await setup_sequence(pool, held.port, timeout=600)
        await enroll_many(pool, n)
        d = launch("d", shutdown_timeout="2s")
        await d.start()
        await wait_for(lambda: held.waiting >= 1, timeout=60)
        claimed = (await statuses(pool)).get("claimed", 0)
        assert claimed > 0

        d.signal(signal.SIGTERM)
        started = time.monotonic()
        code = await d.wait(60)
        elapsed = time.monotonic() - started
        assert code == 0, d.tail()
        assert held.hold  # nothing held was ever let go: it gave up on those sends
        # It waited out its shutdown timeout (measured from before the signal, so load can
        # only lengthen it) before giving up.
        assert elapsed >= 1.5, f"took {elapsed:.1f}s\n{d.tail()}"
        print(f"\nSIGTERM with {claimed} hung sends: exited 0 in {elapsed:.2f}s")
        # The sends it gave up on were released, not left for the lease to expire.
        left = await statuses(pool)
        assert left == {"scheduled": n}, f"{left}\n{d.tail()}"
        assert await pool.fetchval("SELECT max(attempt) FROM dripd.step_executions") == 0

        held.hold = False
        await d.start(ready=False)
        try:
            await wait_for(lambda: all_sent(pool, n), timeout=120, interval=0.2)
        except AssertionError:
            raise AssertionError(f"not all sent: {await statuses(pool)}\n{d.tail()}") from None
        d.signal(signal.SIGTERM)
        assert await d.wait(60) == 0, d.tail()
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


@pytest.mark.timeout(180)
async def test_listen_connection_killed_reconnects_and_notify_still_wakes(
    pool: asyncpg.Pool, sink: SmtpSink, launch: Launch
) -> None:
    await setup_sequence(pool, sink.port)
    # Only NOTIFY (and the timer to a known due time) can wake this daemon.
    d = launch("d", http=True, poll_interval="1h")
    await d.start()
    first = await wait_for(lambda: listen_backends(pool), timeout=60)
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
    await wait_for(lambda: sink.count() >= 1, timeout=60)

    killed = await pool.fetchval("SELECT pg_terminate_backend($1)", first[0])
    assert killed

    async def reconnected() -> bool:
        m = await d.metrics()
        pids = await listen_backends(pool)
        return m.get("dripd_listen_reconnects_total", 0) >= 1 and bool(pids) and pids != first

    try:
        await wait_for(reconnected, timeout=60, interval=0.1)
    except AssertionError:
        raise AssertionError(f"the listener did not come back\n{d.tail()}") from None

    await enroll_many(pool, 1, start=1)
    try:
        await wait_for(lambda: sink.count() >= 2, timeout=60)
    except AssertionError:
        raise AssertionError(f"NOTIFY after reconnect did not wake\n{d.tail()}") from None
    await wait_for(lambda: all_sent(pool, 2), timeout=60)
    assert (await d.metrics())["dripd_listen_reconnects_total"] >= 1
    d.signal(signal.SIGTERM)
    assert await d.wait(60) == 0, d.tail()


# --- 5. the SMTP server is down ----------------------------------------------------------------


async def one_execution(pool: asyncpg.Pool) -> asyncpg.Record:
    row = await pool.fetchrow(
        """SELECT e.*, en.status AS enrollment_status
           FROM dripd.step_executions e JOIN dripd.enrollments en ON en.id = e.enrollment_id"""
    )
    assert row is not None
    return row


@pytest.mark.timeout(180)
async def test_smtp_down_then_up_defers_without_attempts_then_delivers(
    pool: asyncpg.Pool, launch: Launch
) -> None:
    port = free_port()  # nothing listens here yet
    await setup_sequence(pool, port)
    # No slow poll: only the daemon's timers (the retry's due time, the circuit's probe)
    # may bring the row back. A refused connection is the relay's failure, not the
    # message's: it spends no attempt, however long the relay stays down.
    d = launch(
        "d",
        http=True,
        retry_base="1s",
        retry_max="2s",
        max_attempts=2,
        poll_interval="1h",
        sections={"circuit": {"failures": 2, "open_for": "1s", "max_open_for": "2s"}},
    )
    await d.start()
    await enroll_many(pool, 1)

    async def circuit_open() -> dict[str, Any] | None:
        status = await ctl(d, "status")
        return status if status["circuits"] else None

    try:
        status = await wait_for(circuit_open, timeout=60, interval=0.1)
    except AssertionError:
        raise AssertionError(f"{dict(await one_execution(pool))}\n{d.tail()}") from None
    [circuit] = status["circuits"]
    assert circuit["adapter"] == "smtp"
    assert "connection failed" in circuit["reason"]
    row = await one_execution(pool)
    assert (row["status"], row["attempt"], row["reason"]) == (
        "scheduled",
        0,
        "provider_unavailable",
    ), dict(row)
    # Far longer than max_attempts retries would have taken: still no attempt spent.
    await wait_for(lambda: _deferrals_at_least(pool, 6), timeout=60)
    assert (await one_execution(pool))["attempt"] == 0

    sink = SmtpSink().start(port)
    try:
        try:
            await wait_for(lambda: sink.count() >= 1, timeout=60)
        except AssertionError:
            raise AssertionError(f"{dict(await one_execution(pool))}\n{d.tail()}") from None
        await wait_for(lambda: all_sent(pool, 1), timeout=60)
        row = await one_execution(pool)
        assert row["attempt"] == 0, dict(row)
        assert row["enrollment_status"] == "completed"
        assert sink.count() == 1
        kinds = await pool.fetch("SELECT type FROM dripd.message_events ORDER BY id")
        assert [k["type"] for k in kinds][-1] == "sent"
        assert (await ctl(d, "status"))["circuits"] == []  # the probe closed it
        metrics = await d.metrics()
        assert metrics.get('dripd_circuit_transitions_total{adapter="smtp",to="closed"}') == 1
        d.signal(signal.SIGTERM)
        assert await d.wait(60) == 0, d.tail()
    finally:
        sink.stop()


async def _deferrals_at_least(pool: asyncpg.Pool, n: int) -> bool:
    count = await pool.fetchval("SELECT count(*) FROM dripd.message_events WHERE type = 'deferred'")
    return int(count) >= n


@pytest.mark.timeout(180)
async def test_a_relay_that_refuses_the_message_fails_it_after_max_attempts(
    pool: asyncpg.Pool, launch: Launch
) -> None:
    # The relay is up and answers 451 to this message every time: the message's failure,
    # so attempts are spent and the execution fails; the circuit never opens.
    sink = SmtpSink(reply="451 4.3.0 try again later").start()
    try:
        await setup_sequence(pool, sink.port)
        d = launch("d", retry_base="1s", max_attempts=3, poll_interval="1h")
        await d.start()
        await enroll_many(pool, 1)

        async def failed() -> asyncpg.Record | None:
            row = await one_execution(pool)
            return row if row["status"] == "failed" else None

        try:
            row = await wait_for(failed, timeout=90, interval=0.05)
        except AssertionError:
            raise AssertionError(f"{dict(await one_execution(pool))}\n{d.tail()}") from None
        assert row["attempt"] == 3, dict(row)
        assert "gave up after 3 attempts" in row["last_error"], dict(row)
        assert "451" in row["last_error"], dict(row)
        assert await enrollment_statuses(pool) == {"failed": 1}
        events = await pool.fetch("SELECT type FROM dripd.message_events ORDER BY id")
        assert [e["type"] for e in events] == ["deferred", "deferred", "failed"], events
        assert (await ctl(d, "status"))["circuits"] == []
        d.signal(signal.SIGTERM)
        assert await d.wait(60) == 0, d.tail()
    finally:
        sink.stop()


# --- 6. the control socket and `dripd ctl` ----------------------------------------------------


async def ctl(d: DaemonProc, *command: str, json_flag: bool = True) -> dict[str, Any]:
    flags = ["--json"] if json_flag else []
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dripd.cli", "ctl", "--socket", d.socket, *command, *flags,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=daemon_env(),
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, f"ctl {command}: {proc.returncode} {err.decode()}\n{d.tail()}"
    result: dict[str, Any] = json.loads(out)
    return result


@pytest.mark.timeout(180)
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
        seen = await wait_for(lambda: _backlog_at_least(d, 3), timeout=60)
    except AssertionError:
        raise AssertionError(d.tail()) from None
    assert seen["paused"] is True
    assert seen["in_flight"] == 0
    assert sink.count() == 0
    assert await statuses(pool) == {"scheduled": 3}

    resumed = await ctl(d, "resume")
    assert resumed["paused"] is False
    await wait_for(lambda: all_sent(pool, 3), timeout=60)
    assert sink.count() == 3

    # Drain while sends are in flight: it waits for them, then nothing more is claimed.
    sink.hold, sink.refuse_held = True, False
    n = 20
    await enroll_many(pool, n, start=3)
    await wait_for(lambda: sink.waiting >= 1, timeout=60)
    draining = asyncio.create_task(ctl(d, "drain"))
    try:
        # The daemon is draining (paused, work in flight) and `ctl drain` has not returned.
        pending = await wait_for(lambda: _status_if(d, paused=True), timeout=60)
        assert 1 <= pending["in_flight"] <= 8, pending  # at most `concurrency`
        assert not draining.done()
        sink.hold = False
        drained = await asyncio.wait_for(draining, 60)
    finally:
        sink.hold = False
        if not draining.done():
            draining.cancel()
    assert drained["in_flight"] == 0, drained
    assert drained["paused"] is True
    # What was in flight (however much it had claimed when paused) is recorded, the rest
    # still waits, unclaimed.
    k = sink.count() - 3
    assert 1 <= k <= 8, k
    assert await statuses(pool) == {"sent": 3 + k, "scheduled": n - k}
    seen = await wait_for(lambda: _backlog_at_least(d, n - k), timeout=60)
    assert (seen["paused"], seen["in_flight"]) == (True, 0), seen
    assert sink.count() == 3 + k

    assert (await ctl(d, "resume"))["paused"] is False
    await wait_for(lambda: all_sent(pool, n + 3), timeout=60)
    assert sink.count() == n + 3
    assert duplicates(sink) == 0
    d.signal(signal.SIGTERM)
    assert await d.wait(60) == 0, d.tail()


async def _status_if(d: DaemonProc, **want: Any) -> dict[str, Any] | None:
    status: dict[str, Any] = await request(d.socket, "status")
    return status if all(status[k] == v for k, v in want.items()) else None


async def _backlog_at_least(d: DaemonProc, n: int) -> dict[str, Any] | None:
    status: dict[str, Any] = await request(d.socket, "status")
    return status if status["due_backlog"] >= n else None


# --- 7. the database connections die mid-run -----------------------------------------------


@pytest.mark.timeout(240)
async def test_every_database_connection_killed_mid_run_loses_nothing(
    pool: asyncpg.Pool, sink: GatedSink, launch: Launch
) -> None:
    n = 1500
    await setup_sequence(pool, sink.port)
    await enroll_many(pool, n)
    # Small batches so that the kills land while claims and records are in progress.
    d = launch("d", batch_size=50, concurrency=100, lease="3s", poll_interval="1s")
    await d.start()
    kills = 0
    bound: set[str] = set()  # delivered but not recorded `sent` right after some kill
    for _ in range(3):
        await wait_for(lambda target=(kills + 1) * n // 5: sink.count() >= target, timeout=120,
                       interval=0.01)  # fmt: skip
        # Every connection of the daemon (pool and listener), told apart by its client port.
        killed = await pool.fetchval(
            """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
               WHERE datname = current_database() AND client_port = ANY($1::int[])""",
            sorted(tcp_ports(d.pid)),
        )  # fmt: skip
        bound |= await unrecorded(pool, sink)
        kills += 1
        assert killed >= 1
    try:
        await wait_for(lambda: all_sent(pool, n), timeout=120, interval=0.2)
    except AssertionError:
        raise AssertionError(f"not all sent: {await statuses(pool)}\n{d.tail()}") from None
    assert d.running, d.tail()  # the daemon rode it out: no crash, no restart
    check_sink_against(sink, await expected_message_ids(pool))
    print(
        f"\nkilled every connection {kills} times: {duplicates(sink)} duplicate(s), "
        f"{len(bound)} delivered-but-unrecorded right after the kills"
    )
    # A resend only ever repeats a message whose outcome was in flight when its connection
    # died.
    check_duplicates_bounded(sink, bound)
    d.signal(signal.SIGTERM)
    assert await d.wait(60) == 0, d.tail()


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
timeout = "30s"

[[steps]]
key = "hello"
channel = "email"
subject = "Welcome, {{{{ hooks.crm.tier }}}} member"
text = "Hi"

[[steps]]
key = "wait_activation"
wait_for = {{ event = "activated", timeout = "1h", on_timeout = "reminder" }}

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
        stderr=asyncio.subprocess.PIPE, env={**daemon_env(), **env},
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(stdin), 30)
    assert proc.returncode == 0, f"dripd {argv}: {proc.returncode} {err.decode()}"
    result: dict[str, Any] = json.loads(out)
    return result


async def subjects(sink: SmtpSink, to: str) -> list[str]:
    with sink.lock:
        return [str(m["Subject"]) for m in sink.messages if m["To"] == to]


async def _equal(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def waiting(pool: asyncpg.Pool) -> dict[str, Any]:
    """Subscriber → the id of their execution waiting for an event, not yet released."""
    rows = await pool.fetch(
        """SELECT en.subscriber_id, e.id FROM dripd.step_executions e
           JOIN dripd.enrollments en ON en.id = e.enrollment_id
           WHERE e.status = 'scheduled' AND e.waiting_for IS NOT NULL AND e.event_id IS NULL"""
    )
    return {r["subscriber_id"]: r["id"] for r in rows}


@pytest.mark.timeout(240)
async def test_flow_end_to_end_through_dripd_run(
    dsn: str, pool: asyncpg.Pool, sink: GatedSink, launch: Launch, tmp_path: Path
) -> None:
    import anyio
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
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, "127.0.0.1", 0)
        flow = tmp_path / "trial.toml"
        flow.write_text(FLOW.format(port=server.port))
        await cli("apply", str(flow), env=env)
        await add_adapter(
            pool, name="smtp", channel="email", provider="smtp", config=smtp_config(sink.port)
        )
        # A slow poll too, in case the nudge below is missed: it only decides how soon.
        d = launch(
            "d",
            poll_interval="2s",
            sections={"hooks": {"allow_http": True, "allowed_networks": ["127.0.0.1/32"]}},
        )
        d.env = env
        refused = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dripd.cli", "hook", "test", "trial", "crm",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**daemon_env(), **env},
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

        # Each is waiting for `activated` (its first email sent and recorded).
        async def all_waiting() -> bool:
            return set(await waiting(pool)) == {"ann", "bob", "cid"}

        try:
            await wait_for(all_waiting, timeout=60)
        except AssertionError:
            raise AssertionError(f"{await statuses(pool)}\n{d.tail()}") from None
        assert sink.count() == 3
        assert await subjects(sink, "ann@example.com") == ["Welcome, gold member"]
        assert sorted(calls) == ["ann", "bob", "cid", "probe"]

        activated = await cli("event", "ann", "activated", "--id", "act-1", env=env)
        assert len(activated["released"]) == 1, activated
        again = await cli("event", "ann", "activated", "--id", "act-1", env=env)
        assert again["created"] is False
        goal = await cli("event", "cid", "purchased", env=env)
        assert len(goal["exited"]) == 1, goal

        # bob never activates. The wait's timeout (1h, so that nothing the test does can race
        # it) comes now: the test moves his row's due time, as the clock would, and nudges.
        await wait_for(lambda: sink.count() == 4, timeout=60)  # ann's "Activated"
        bob = (await waiting(pool))["bob"]
        await pool.execute(
            "UPDATE dripd.step_executions SET due_at = now() "
            "WHERE id = $1 AND status = 'scheduled'",
            bob,
        )
        await pool.execute("SELECT pg_notify('dripd_due', '')")
        try:
            await wait_for(lambda: sink.count() == 5, timeout=60)
        except AssertionError:
            raise AssertionError(f"{await statuses(pool)}\n{d.tail()}") from None
        assert await subjects(sink, "ann@example.com") == ["Welcome, gold member", "Activated"]
        assert await subjects(sink, "bob@example.com") == ["Welcome, gold member", "Need a hand?"]
        assert await subjects(sink, "cid@example.com") == ["Welcome, gold member"]
        expected = [
            ("ann", "completed", "completed"),
            ("bob", "completed", "completed"),
            ("cid", "exited", "exit_event:purchased"),
        ]

        async def ended() -> list[tuple[str, str, str]]:
            rows = await pool.fetch(
                "SELECT subscriber_id, status, status_reason FROM dripd.enrollments "
                "ORDER BY subscriber_id"
            )
            return [(r["subscriber_id"], r["status"], r["status_reason"]) for r in rows]

        # The last send is recorded a moment after the sink has it.
        try:
            await wait_for(lambda: _equal(ended(), expected), timeout=60)
        except AssertionError:
            assert await ended() == expected, d.tail()
        d.signal(signal.SIGTERM)
        assert await d.wait(60) == 0, d.tail()
        log = d.log.read_text()
        assert "tok-123" not in log
        assert signing not in log
        tg.cancel_scope.cancel()


# --- a shared rate limit: three daemons, one budget, counted at the SMTP sink ----------------


def stamped_at(message: Any) -> float:
    """When the sender stamped a message (its Date header, whole seconds, truncated)."""
    return email.utils.parsedate_to_datetime(str(message["Date"])).timestamp()


@pytest.mark.timeout(180)
async def test_three_daemons_never_exceed_a_shared_rate_limit(
    pool: asyncpg.Pool, sink: GatedSink, launch: Launch
) -> None:
    limit, window, total = 10, 2, 60
    await setup_sequence(pool, sink.port)
    await enroll_many(pool, total)
    daemons = [
        launch(name, concurrency=20,
               sections={"rate_limits": {"adapter": {"smtp": f"{limit}/{window}s"}}})
        for name in ("a", "b", "c")
    ]  # fmt: skip
    await asyncio.gather(*(d.start() for d in daemons))
    try:
        await wait_for(lambda: all_sent(pool, total), timeout=120)
    except AssertionError:
        raise AssertionError(tails(*daemons)) from None
    assert sink.count() == total
    # Count sends per window (windows align to the epoch) by when each was stamped: the
    # sender writes the Date header as it sends, after the limiter granted the send. Arrival
    # times would not do: on a loaded machine a send granted at a window's end may arrive in
    # the next. Whole seconds suffice, since windows start on whole seconds.
    with sink.lock:
        per_window = Counter(int(stamped_at(m) // window) for m in sink.messages)
    assert max(per_window.values()) <= limit, sorted(per_window.items())
    assert len(per_window) >= total // limit  # it took at least that many windows
    # The daemons claimed only what the limit let them send: the backlog was not claimed
    # and deferred over and over (before lanes: more deferrals than sends). A deferral
    # left is a race between daemons, and spends no attempt.
    limited = await pool.fetchval(
        "SELECT count(*) FROM dripd.message_events WHERE type = 'deferred' "
        "AND reason = 'rate_limited'"
    )
    assert limited <= total // 10, limited
    attempts = await pool.fetch("SELECT DISTINCT attempt FROM dripd.step_executions")
    assert [r["attempt"] for r in attempts] == [0]
    for d in daemons:
        d.signal(signal.SIGTERM)
    assert [await d.wait(60) for d in daemons] == [0, 0, 0]
