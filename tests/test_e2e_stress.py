"""Delivery under stress, end to end: `dripd run` subprocesses against a slow SMTP relay, a
relay that goes down, a daemon SIGKILLed while it holds rows, a Postgres server restarted
under the daemon, and a daemon whose host clock is an hour ahead.

The database and the sink are the witnesses; nothing here is decided by how long something
took. Every wait is for a state, with a deadline that only says "it never happened". The
relay is slow on purpose (`SmtpSink.delay`, per message, inside its own loop thread), so
that a backlog takes several leases to send.
"""

from __future__ import annotations

import asyncio
import glob
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import asyncpg
import msgspec
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
    duplicated,
    enroll_many,
    enrollment_statuses,
    expected_message_ids,
    held_by,
    launcher,
    one_email,
    sent_by,
    settle,
    settled_rows,
    smtp_config,
    statuses,
    tails,
    unrecorded,
    wait_for,
)

from dripd import config as dripd_config
from dripd.db.cluster import ThrowawayCluster
from dripd.db.migrate import migrate

pytestmark = pytest.mark.slow

KEY = "hello"
DELAY = 0.05  # seconds the slow relay takes per message
POOL_SIZE = 2  # the SMTP adapter's connections: its capacity
LEASE = timedelta(seconds=3)

T = TypeVar("T")


@pytest.fixture
def relay() -> Iterator[SmtpSink]:
    """A slow SMTP relay on loopback."""
    sink = SmtpSink(delay=DELAY).start()
    try:
        yield sink
    finally:
        sink.stop()


async def setup_relay(pool: asyncpg.Pool, port: int) -> None:
    """The one-email sequence, sent through an `smtp` adapter of `POOL_SIZE` connections. The
    client's timeout is far beyond any wait here: a slow reply is never a retry."""
    await apply_text(pool, one_email(KEY))
    await add_adapter(pool, name="smtp", channel="email", provider="smtp",
                      config=smtp_config(port, pool_size=POOL_SIZE, timeout=60))  # fmt: skip


async def until_settled(
    pool: asyncpg.Pool, *procs: DaemonProc, timeout: float = 150
) -> dict[str, int]:
    """Executions by status, once every one has an outcome that stays."""
    try:
        counts: dict[str, int] = await wait_for(lambda: settled_rows(pool), timeout=timeout,
                                                interval=0.2)  # fmt: skip
    except AssertionError:
        raise AssertionError(f"still running: {await statuses(pool)}\n{tails(*procs)}") from None
    return counts


async def attempts(pool: asyncpg.Pool) -> Counter[int]:
    """How many executions have spent how many attempts."""
    rows = await pool.fetch("SELECT attempt FROM dripd.step_executions")
    return Counter(r["attempt"] for r in rows)


async def clean_send(pool: asyncpg.Pool, d: DaemonProc, *, start: int) -> int:
    """Send one message with nothing else queued (the relay up, nothing held): the `attempt`
    a first try that nothing disturbed leaves on its execution."""
    await enroll_many(pool, 1, start=start, key=KEY)
    try:
        await wait_for(lambda: all_sent(pool, start + 1), timeout=60)
    except AssertionError:
        raise AssertionError(f"{await statuses(pool)}\n{d.tail()}") from None
    value: int = await pool.fetchval(
        "SELECT e.attempt FROM dripd.step_executions e JOIN dripd.enrollments en "
        "ON en.id = e.enrollment_id WHERE en.subscriber_id = $1",
        f"s{start}",
    )
    return value


async def stop(*procs: DaemonProc) -> None:
    for proc in procs:
        proc.signal(signal.SIGTERM)
    for proc in procs:
        assert await proc.wait(60) == 0, proc.tail()


# --- a. a slow relay: the backlog outlasts many leases -------------------------------------------


@pytest.mark.timeout(240)
async def test_slow_relay_sends_every_message_once_on_its_first_try(
    pool: asyncpg.Pool, relay: SmtpSink, launch: Launch
) -> None:
    await setup_relay(pool, relay.port)
    d = launch("d", lease=f"{LEASE.seconds}s")
    await d.start()
    clean = await clean_send(pool, d, start=0)

    # One lease covers lease / delay × pool = 120 sends: the backlog is five leases long.
    n = 5 * int(LEASE.total_seconds() / DELAY * POOL_SIZE)
    await enroll_many(pool, n, start=1, key=KEY, atomic=True)
    counts = await until_settled(pool, d)
    spent = await attempts(pool)
    print(
        f"\nslow relay: {counts}; {relay.count()} delivered for {n + 1} executions, "
        f"{len(duplicated(relay))} duplicated, attempts {dict(spent)} (a clean send: {clean})"
    )
    assert counts == {"sent": n + 1}, d.tail()
    await stop(d)

    assert await enrollment_statuses(pool) == {"completed": n + 1}
    dups = duplicated(relay)  # the daemon has exited: nothing more can arrive
    assert not dups, f"{len(dups)} messages delivered more than once"
    ids = relay.message_ids()
    assert sorted(ids) == sorted((await expected_message_ids(pool)).values())
    # No row was claimed again behind its live holder's back (that spends an attempt).
    assert spent == {clean: n + 1}, spent


# --- b. two daemons; one is SIGKILLed while it holds rows --------------------------------------


@pytest.mark.timeout(240)
async def test_sigkilled_daemon_rows_come_back_and_the_survivor_sends_them(
    pool: asyncpg.Pool, relay: SmtpSink, launch: Launch
) -> None:
    n = 600
    await setup_relay(pool, relay.port)
    await enroll_many(pool, n, key=KEY, atomic=True)
    a = launch("a", lease=f"{LEASE.seconds}s")
    b = launch("b", lease=f"{LEASE.seconds}s", http=True)
    await a.start()
    await b.start()

    async def both_busy() -> bool:
        return relay.count() >= 20 and bool(await held_by(pool, a.pid))

    # Freeze `a` (SIGSTOP) to read what it holds at the moment it stops acting; a moment
    # where it holds nothing is let go and another one taken.
    held: list[asyncpg.Record] = []
    stopped_at = datetime.now(UTC)
    for _ in range(50):
        try:
            await wait_for(both_busy, timeout=60, interval=0.02)
        except AssertionError:
            raise AssertionError(f"{await statuses(pool)}\n{tails(a, b)}") from None
        stopped_at = datetime.now(UTC)
        os.kill(a.pid, signal.SIGSTOP)
        held = await held_by(pool, a.pid)
        if held:
            break
        os.kill(a.pid, signal.SIGCONT)
    assert held, "a never held rows when stopped"
    os.kill(a.pid, signal.SIGKILL)
    assert await a.wait(60) == -signal.SIGKILL
    # Short leases, renewed while held: none reaches past one lease after its holder died.
    latest = max(r["lease_until"] for r in held)
    soonest = min(r["lease_until"] for r in held)
    print(
        f"\nSIGKILL: a held {len(held)} rows, leases ending {soonest - stopped_at} to "
        f"{latest - stopped_at} after it stopped"
    )
    assert latest <= stopped_at + LEASE + timedelta(seconds=1), (latest, stopped_at)

    await settle(relay, alive=[b])
    bound = await unrecorded(pool, relay)
    counts = await until_settled(pool, b)
    print(f"after: {counts}; {relay.count()} delivered, {len(duplicated(relay))} duplicated")
    assert counts == {"sent": n}, tails(a, b)
    assert b.running, b.tail()
    by_b = sent_by(await b.metrics())
    await stop(b)

    assert await enrollment_statuses(pool) == {"completed": n}
    # The rows the dead daemon held were finished (by the survivor: the only daemon left).
    finished = await pool.fetch(
        "SELECT id, status FROM dripd.step_executions WHERE id = ANY($1::uuid[])",
        [r["id"] for r in held],
    )
    assert {r["status"] for r in finished} == {"sent"}
    assert by_b > 0
    check_sink_against(relay, await expected_message_ids(pool))
    dups = check_duplicates_bounded(relay, bound)
    print(
        f"survivor sent {by_b:.0f}; {len(dups)} duplicated, bound {len(bound)} "
        f"(delivered but unrecorded at the kill); attempts {dict(await attempts(pool))}"
    )


# --- c. the relay is down for a while, then back --------------------------------------------


def circuit_keys(**wanted: str) -> dict[str, dict[str, str]]:
    """A `[circuit]` section with those of `wanted` that this daemon's config knows."""
    circuit = getattr(dripd_config, "Circuit", None)
    sections = {f.name for f in msgspec.structs.fields(dripd_config.Config)}
    if circuit is None or "circuit" not in sections:
        return {}
    known = {f.name for f in msgspec.structs.fields(circuit)}
    keys = {k: v for k, v in wanted.items() if k in known}
    return {"circuit": keys} if keys else {}


async def outage_met(pool: asyncpg.Pool) -> bool:
    """Some execution has been tried against the down relay."""
    return bool(
        await pool.fetchval(
            """SELECT EXISTS (SELECT 1 FROM dripd.step_executions
                              WHERE last_error IS NOT NULL OR status = 'failed')
                   OR EXISTS (SELECT 1 FROM dripd.message_events
                              WHERE type IN ('deferred', 'failed'))"""
        )
    )


@pytest.mark.timeout(240)
async def test_relay_outage_spends_no_attempt_and_loses_nothing(
    pool: asyncpg.Pool, launch: Launch
) -> None:
    relay = SmtpSink().start()
    try:
        await setup_relay(pool, relay.port)
        # Retries 1–2 s apart, three at most: without a breaker the outage outlasts them all.
        d = launch(
            "d", retry_base="1s", retry_max="2s", max_attempts=3,
            sections=circuit_keys(open_for="1s", max_open_for="3s"),
        )  # fmt: skip
        await d.start()
        clean = await clean_send(pool, d, start=0)

        relay.stop()
        began = time.monotonic()
        # 30 messages fall due during the outage, in three waves.
        for wave in range(3):
            await enroll_many(pool, 10, start=1 + 10 * wave, key=KEY, atomic=True)
            if wave == 0:
                try:
                    await wait_for(lambda: outage_met(pool), timeout=60)
                except AssertionError:
                    raise AssertionError(f"{await statuses(pool)}\n{d.tail()}") from None
            # The outage's length is the scenario (long beside the retry span), not a
            # measurement: load only makes it longer.
            await asyncio.sleep(max(0.0, began + 5 * (wave + 1) - time.monotonic()))
        during = await statuses(pool)
        relay.start()  # back, on the same port

        counts = await until_settled(pool, d)
        spent = await attempts(pool)
        print(
            f"\nrelay outage: during {during}; after {counts}; {relay.count()} delivered, "
            f"{len(duplicated(relay))} duplicated; attempts {dict(spent)} (a clean send: "
            f"{clean})"
        )
        assert counts == {"sent": 31}, d.tail()
        await stop(d)
    finally:
        relay.stop()

    assert await enrollment_statuses(pool) == {"completed": 31}
    assert not duplicated(relay)
    check_sink_against(relay, await expected_message_ids(pool))
    assert spent == {clean: 31}, spent  # the outage spent no attempt


# --- d. the Postgres server restarts under the daemon ----------------------------------------


_CONNECTION_ERRORS = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.ConnectionDoesNotExistError,
)


async def through_restarts(make: Callable[[], Awaitable[T]], timeout: float = 60) -> T:
    """`make()`, tried again while the server is away."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await make()
        except _CONNECTION_ERRORS:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


@pytest.fixture
async def own_server() -> AsyncIterator[tuple[ThrowawayCluster, str]]:
    """A Postgres server of this test's own (it will be restarted), with a migrated database."""
    cluster = ThrowawayCluster()
    admin = await cluster.start()
    try:
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute("CREATE DATABASE dripd_restart")
        finally:
            await conn.close()
        dsn = admin.rsplit("/", 1)[0] + "/dripd_restart"
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        yield cluster, dsn
    finally:
        await cluster.stop()


@pytest.mark.timeout(300)
async def test_postgres_restarts_mid_run_lose_nothing(
    own_server: tuple[ThrowawayCluster, str], relay: SmtpSink, tmp_path: Path, sockdir: Path
) -> None:
    cluster, dsn = own_server
    n = 600
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
    try:
        async with launcher(dsn, tmp_path, sockdir) as launch:
            await setup_relay(pool, relay.port)
            await enroll_many(pool, n, key=KEY, atomic=True)
            d = launch("d", http=True)
            await d.start()

            bound: set[str] = set()  # delivered but not recorded `sent` around some restart
            at_restarts: list[tuple[int, int]] = []
            for share in (0.2, 0.45, 0.7):
                try:
                    await wait_for(lambda s=share: relay.count() >= n * s, timeout=120,
                                   interval=0.02)  # fmt: skip
                except AssertionError:
                    raise AssertionError(
                        f"{await through_restarts(lambda: statuses(pool))}\n{d.tail()}"
                    ) from None
                before = await through_restarts(lambda: unrecorded(pool, relay))
                await asyncio.to_thread(cluster.restart_sync)
                after = await through_restarts(lambda: unrecorded(pool, relay))
                bound |= before | after
                at_restarts.append((len(before), len(after)))

            try:
                counts = await through_restarts(lambda: until_settled(pool, d), timeout=180)
            finally:
                print(
                    f"\npostgres restarts: delivered-but-unrecorded (before, after) each "
                    f"{at_restarts}; {relay.count()} delivered, "
                    f"{len(duplicated(relay))} duplicated"
                )
            assert counts == {"sent": n}, d.tail()
            assert d.running, d.tail()  # it rode the restarts out
            await stop(d)

            assert await enrollment_statuses(pool) == {"completed": n}
            check_sink_against(relay, await expected_message_ids(pool))
            dups = check_duplicates_bounded(relay, bound)
            print(f"duplicates {len(dups)} (bound {len(bound)})")
    finally:
        await pool.close()


# --- e. a daemon whose host clock is an hour ahead -------------------------------------------

SKEW = """
[sequence]
key = "skew"

[[steps]]
key = "first"
channel = "email"
after = "0s"
subject = "First"
text = "Hi {{ first_name }}"

[[steps]]
key = "second"
channel = "email"
after = "30m"
subject = "Second"
text = "Hi again {{ first_name }}"
"""


def _libfaketime() -> str | None:
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1"))
    return found[0] if found else None


def install_faketime() -> str:
    """Debian's libfaketime (package `faketime`), installed when missing, as root or with
    passwordless sudo; otherwise fail and say how."""
    found = _libfaketime()
    if found:
        return found
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    apt = [*sudo, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-q"]
    for command in ([*apt, "update"], [*apt, "install", "-y", "faketime"]):
        try:
            subprocess.run(command, check=True, capture_output=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as exc:
            pytest.fail(
                f"libfaketime is needed (this test runs a daemon with its clock an hour ahead) "
                f"and could not be installed ({exc}); run `apt-get install -y faketime` as root."
            )
    found = _libfaketime()
    if not found:
        pytest.fail("the faketime package is installed but libfaketimeMT.so.1 is not found")
    return found


def skewed(d: DaemonProc, library: str, offset: str = "+1h") -> DaemonProc:
    """Run `d` with its host clock `offset` away (libfaketime; the monotonic clock is kept,
    as a host whose wall clock is wrong has it)."""
    d.env = {**d.env, "LD_PRELOAD": library, "FAKETIME": offset,
             "FAKETIME_DONT_FAKE_MONOTONIC": "1"}  # fmt: skip
    return d


async def setup_skew(pool: asyncpg.Pool, port: int) -> None:
    await apply_text(pool, SKEW)
    await add_adapter(pool, name="smtp", channel="email", provider="smtp",
                      config=smtp_config(port, pool_size=POOL_SIZE, timeout=60))  # fmt: skip


def subjects_to(sink: SmtpSink, who: str) -> list[str]:
    with sink.lock:
        return [str(m["Subject"]) for m in sink.messages if m["To"] == f"{who}@example.com"]


async def second_step(pool: asyncpg.Pool, who: str) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await pool.fetchrow(
        """SELECT e.status, e.due_at FROM dripd.step_executions e
           JOIN dripd.steps s ON s.id = e.step_id
           JOIN dripd.enrollments en ON en.id = e.enrollment_id
           WHERE s.key = 'second' AND en.subscriber_id = $1""",
        who,
    )
    return row


async def skew_seen(d: DaemonProc) -> float | None:
    """The clock skew the daemon reports in its metrics, if it does."""
    return (await d.metrics()).get("dripd_clock_skew_seconds")


LATER = """
[sequence]
key = "later"

[[steps]]
key = "only"
channel = "email"
after = "30m"
subject = "Later"
text = "Hi {{ first_name }}"
"""


async def db_now(pool: asyncpg.Pool) -> datetime:
    value: datetime = await pool.fetchval("SELECT clock_timestamp()")
    return value


@pytest.mark.timeout(240)
async def test_daemon_with_its_clock_an_hour_ahead_sends_nothing_early_and_warns(
    pool: asyncpg.Pool, launch: Launch
) -> None:
    library = install_faketime()
    sink = SmtpSink().start()
    try:
        await setup_skew(pool, sink.port)
        await apply_text(pool, LATER)
        d = skewed(launch("d", http=True, poll_interval="1s"), library)
        await d.start()
        # Due in 30 minutes by every clock but the daemon's host's.
        await enroll_many(pool, 1, start=100, key="later")
        enrolled_at = await db_now(pool)
        await enroll_many(pool, 1, start=0, key="skew")
        try:
            await wait_for(lambda: second_step(pool, "s0"), timeout=60)  # first sent, recorded
        except AssertionError:
            raise AssertionError(f"{await statuses(pool)}\n{d.tail()}") from None
        seen_at = await db_now(pool)
        assert subjects_to(sink, "s0") == ["First"]

        # Seconds of daemon activity after s0's second step exists: later enrollments' first
        # steps, a second apart, each sent by a claim round that could have taken s0's second
        # step (and the 'later' one) along if its idea of "now" were the host's.
        for who in range(1, 5):
            began = time.monotonic()
            await enroll_many(pool, 1, start=who, key="skew")
            try:
                await wait_for(lambda w=who: subjects_to(sink, f"s{w}"), timeout=60)
            except AssertionError:
                raise AssertionError(f"{await statuses(pool)}\n{d.tail()}") from None
            await asyncio.sleep(max(0.0, began + 1.0 - time.monotonic()))
        second = await second_step(pool, "s0")
        assert second is not None
        later = await pool.fetchval(
            "SELECT e.status FROM dripd.step_executions e JOIN dripd.enrollments en "
            "ON en.id = e.enrollment_id WHERE en.subscriber_id = 's100'"
        )
        print(
            f"\nskewed clock: s0's second step {second['status']}, due "
            f"{second['due_at'] - seen_at} after its first was recorded; the 'later' step "
            f"{later}; skew reported {await skew_seen(d)}; sink {sink.count()}"
        )
        assert subjects_to(sink, "s100") == [], "a step due in 30 minutes was sent at once"
        assert later == "scheduled", later
        assert subjects_to(sink, "s0") == ["First"], "the second step was sent 30 minutes early"
        assert second["status"] == "scheduled", dict(second)
        # Scheduled 30 minutes after the first step by the database's clock, not the host's.
        after = timedelta(minutes=30)
        slack = timedelta(seconds=2)
        assert enrolled_at + after - slack <= second["due_at"] <= seen_at + after + slack, (
            f"due {second['due_at'] - seen_at} after the first step was recorded"
        )

        def warned() -> bool:
            text = d.log.read_text(errors="replace").lower()
            return "clock" in text and "skew" in text

        try:
            await wait_for(warned, timeout=60, interval=0.2)
        except AssertionError:
            raise AssertionError(f"no clock-skew warning in the log\n{d.tail()}") from None
        await stop(d)
    finally:
        sink.stop()


@pytest.mark.timeout(240)
async def test_daemon_with_its_clock_an_hour_ahead_takes_no_live_lease(
    pool: asyncpg.Pool, relay: SmtpSink, launch: Launch
) -> None:
    library = install_faketime()
    n = 200
    await setup_relay(pool, relay.port)
    normal = launch("normal", lease=f"{LEASE.seconds}s", http=True)
    await normal.start()
    clean = await clean_send(pool, normal, start=0)
    await enroll_many(pool, n, start=1, key=KEY, atomic=True)
    try:
        await wait_for(lambda: held_by(pool, normal.pid), timeout=60, interval=0.02)
    except AssertionError:
        raise AssertionError(f"{await statuses(pool)}\n{normal.tail()}") from None
    ahead = skewed(launch("ahead", lease=f"{LEASE.seconds}s", http=True), library)
    await ahead.start()

    counts = await until_settled(pool, normal, ahead)
    by_normal, by_ahead = sent_by(await normal.metrics()), sent_by(await ahead.metrics())
    spent = await attempts(pool)
    print(
        f"\nskewed neighbour: {counts}; normal sent {by_normal:.0f}, ahead sent "
        f"{by_ahead:.0f}; {len(duplicated(relay))} duplicated; attempts {dict(spent)} "
        f"(a clean send: {clean})"
    )
    assert counts == {"sent": n + 1}, tails(normal, ahead)
    await stop(normal, ahead)
    dups = duplicated(relay)
    assert not dups, f"{len(dups)} messages sent twice: the skewed daemon took live leases"
    # A row taken from its live holder is claimed again, which spends an attempt.
    assert spent == {clean: n + 1}, spent
    check_sink_against(relay, await expected_message_ids(pool))
