"""The daemon in-process with a moved clock: scheduling, outcomes, retries, gates, replay."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import anyio
import asyncpg
import msgspec
import pytest
from support import (
    SmtpSink,
    add_adapter,
    apply_text,
    executions,
    free_port,
    running_daemon,
    smtp_config,
    wait_for,
)

from dripd import api
from dripd.channels.credentials import Vault, generate_key
from dripd.clock import ManualClock
from dripd.control import request
from dripd.db import store
from dripd.engine.daemon import Daemon

DRIP = """
[sequence]
key = "drip"

[[steps]]
key = "hello"
channel = "email"
subject = "Hello {{ first_name }}"
text = "Hi {{ first_name }}{% if plan == 'pro' %}, pro{% endif %}"

[[steps]]
key = "tips"
channel = "email"
after = "1d"
subject = "Tips"
html = "<p>Tips for {{ first_name | upcase }}</p>"

[[steps]]
key = "check"
channel = "sms"
after = "2d"
body = "How is it going, {{ first_name }}?"
"""

ADA = {"email": "Ada@Example.com", "phone": "+15550100001", "first_name": "Ada", "plan": "pro"}


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    s = SmtpSink().start()
    yield s
    s.stop()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


async def _adapters(pool: asyncpg.Pool, smtp_port: int, tmp_path: Path) -> Path:
    outbox = tmp_path / "outbox.jsonl"
    await add_adapter(
        pool, name="smtp", channel="email", provider="smtp", config=smtp_config(smtp_port)
    )
    await add_adapter(
        pool, name="sms-outbox", channel="sms", provider="outbox", config={"path": str(outbox)}
    )
    return outbox


async def _enroll_ada(
    pool: asyncpg.Pool, smtp_port: int, tmp_path: Path, clock: ManualClock
) -> api.Enrollment:
    """The drip applied, its adapters added, and subscriber "a" (Ada) enrolled now."""
    await apply_text(pool, DRIP)
    await _adapters(pool, smtp_port, tmp_path)
    return await api.enroll(
        pool, tenant=None, sequence_key="drip", subscriber_id="a", data=ADA, now=clock.now()
    )


async def _status(pool: asyncpg.Pool, enrollment_id: uuid.UUID) -> str:
    return str(
        await pool.fetchval("SELECT status FROM dripd.enrollments WHERE id = $1", enrollment_id)
    )


def _has_status(pool: asyncpg.Pool, enrollment_id: uuid.UUID, status: str):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        return await _status(pool, enrollment_id) == status

    return check


def _execution_in(pool: asyncpg.Pool, *statuses: str):  # type: ignore[no-untyped-def]
    async def check() -> list[asyncpg.Record]:
        rows = await executions(pool)
        settled = all(r["status"] != "claimed" for r in rows)
        return rows if rows and settled and rows[-1]["status"] in statuses else []

    return check


async def _rows(pool: asyncpg.Pool, n: int) -> bool:
    rows = await executions(pool)
    return len(rows) == n and all(r["status"] != "claimed" for r in rows)


async def _settled(pool: asyncpg.Pool) -> bool:
    n = await pool.fetchval("SELECT count(*) FROM dripd.step_executions WHERE status='claimed'")
    return int(n) == 0


async def test_a_sequence_runs_end_to_end_with_a_moved_clock(
    dsn: str, pool: asyncpg.Pool, sink: SmtpSink, clock: ManualClock, tmp_path: Path
) -> None:
    await apply_text(pool, DRIP)
    outbox = await _adapters(pool, sink.port, tmp_path)
    async with running_daemon(dsn, tmp_path, clock=clock):
        e = await api.enroll(
            pool, tenant=None, sequence_key="drip", subscriber_id="u1", data=ADA, now=clock.now()
        )
        await wait_for(lambda: sink.count() == 1)
        first = sink.messages[0]
        assert first["Subject"] == "Hello Ada"
        assert first["To"] == "Ada@example.com"  # the local part as written, the domain as sent
        assert first.get_content().strip() == "Hi Ada, pro"
        rows = await wait_for(_execution_in(pool, "scheduled"))
        assert [r["status"] for r in rows] == ["sent", "scheduled"]
        assert rows[1]["due_at"] == rows[0]["finished_at"] + timedelta(days=1)
        assert first["Message-ID"] == f"<{rows[0]['id']}.0@dripd.local>"
        assert first["X-Dripd-Idempotency-Key"] == f"{rows[0]['id']}:0"

        clock.advance(timedelta(hours=23, minutes=59))
        await wait_for(lambda: _settled(pool))
        assert sink.count() == 1  # not due yet: the claim never takes a row early
        clock.advance(timedelta(minutes=1))
        await wait_for(lambda: sink.count() == 2)
        assert "Tips for ADA" in sink.messages[1].get_body(("html",)).get_content()
        await wait_for(lambda: _rows(pool, 3))  # recorded before the clock moves on

        clock.advance(timedelta(days=2))
        await wait_for(_has_status(pool, e.id, "completed"))
    lines = outbox.read_text().splitlines()
    assert len(lines) == 1
    sms = msgspec.json.decode(lines[0])
    assert sms["to"] == "+15550100001"
    assert sms["body"] == "How is it going, Ada?"
    events = await pool.fetch("SELECT type FROM dripd.message_events ORDER BY id")
    assert [r["type"] for r in events] == ["sent", "sent", "sent"]
    reason = await pool.fetchval("SELECT status_reason FROM dripd.enrollments")
    assert reason == "completed"


async def test_unenrolled_or_suppressed_before_the_send_is_skipped_with_a_reason(
    dsn: str, pool: asyncpg.Pool, sink: SmtpSink, clock: ManualClock, tmp_path: Path
) -> None:
    await apply_text(pool, DRIP)
    await _adapters(pool, sink.port, tmp_path)
    a = await api.enroll(
        pool,
        tenant=None,
        sequence_key="drip",
        subscriber_id="a",
        data={**ADA, "email": "a@example.com"},
        now=clock.now(),
    )
    b = await api.enroll(
        pool,
        tenant=None,
        sequence_key="drip",
        subscriber_id="b",
        data={**ADA, "email": "B@Example.com "},
        now=clock.now(),
    )
    await api.unenroll(pool, tenant=None, enrollment_id=a.id, now=clock.now())
    await api.suppress(pool, tenant=None, channel="email", address="b@example.com")
    async with running_daemon(dsn, tmp_path, clock=clock):
        await wait_for(_has_status(pool, b.id, "active"))
        await wait_for(lambda: _count(pool, "skipped", 2))
    assert sink.count() == 0
    rows = {r["enrollment_id"]: r for r in await executions(pool)}
    assert rows[a.id]["status"] == "skipped"
    assert rows[a.id]["reason"] == "unenrolled"
    first_b = next(r for r in await executions(pool) if r["enrollment_id"] == b.id)
    assert first_b["status"] == "skipped"
    assert first_b["reason"] == "suppressed"
    # A suppressed recipient's enrollment moves on (the SMS step may still reach them).
    assert [r["step_key"] for r in await executions(pool) if r["enrollment_id"] == b.id] == [
        "hello",
        "tips",
    ]
    reasons = await pool.fetch("SELECT type, reason FROM dripd.message_events ORDER BY id")
    assert {(r["type"], r["reason"]) for r in reasons} == {
        ("skipped", "unenrolled"),
        ("skipped", "suppressed"),
    }


async def test_unenrolled_after_the_claim_is_skipped_by_the_gate(
    dsn: str, pool: asyncpg.Pool, sink: SmtpSink, clock: ManualClock, tmp_path: Path
) -> None:
    e = await _enroll_ada(pool, sink.port, tmp_path, clock)
    # The race: the enrollment ends after its row was scheduled but the row stays pending
    # (as when another daemon already holds it); the gate must still refuse the send.
    await pool.execute("UPDATE dripd.enrollments SET status='cancelled', ended_at=now()")
    async with running_daemon(dsn, tmp_path, clock=clock):
        rows = await wait_for(_execution_in(pool, "skipped"))
    assert rows[0]["reason"] == "enrollment_cancelled"
    assert len(rows) == 1  # nothing follows an ended enrollment
    assert sink.count() == 0
    assert await _status(pool, e.id) == "cancelled"


async def _count(pool: asyncpg.Pool, status: str, n: int) -> bool:
    got = await pool.fetchval("SELECT count(*) FROM dripd.step_executions WHERE status=$1", status)
    return int(got) >= n


async def test_a_template_error_fails_the_step_and_its_policy_applies(
    dsn: str, pool: asyncpg.Pool, sink: SmtpSink, clock: ManualClock, tmp_path: Path
) -> None:
    await apply_text(pool, DRIP)
    await apply_text(
        pool,
        DRIP.replace('key = "drip"', 'key = "lenient"').replace(
            'key = "hello"\n', 'key = "hello"\non_failure = "continue"\n'
        ),
    )
    await _adapters(pool, sink.port, tmp_path)
    # No first_name: the strict template refuses to render an undefined variable.
    strict = await api.enroll(
        pool,
        tenant=None,
        sequence_key="drip",
        subscriber_id="s",
        data={"email": "s@example.com"},
        now=clock.now(),
    )
    lenient = await api.enroll(
        pool,
        tenant=None,
        sequence_key="lenient",
        subscriber_id="l",
        data={"email": "l@example.com"},
        now=clock.now(),
    )
    async with running_daemon(dsn, tmp_path, clock=clock):
        await wait_for(_has_status(pool, strict.id, "failed"))
        await wait_for(lambda: _count(pool, "scheduled", 1))
    rows = await executions(pool)
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 2
    assert all("'first_name' is undefined" in r["last_error"] for r in failed)
    assert all(r["last_error"].startswith("template error in step 'hello'") for r in failed)
    assert sink.count() == 0
    assert await _status(pool, lenient.id) == "active"
    assert [r["step_key"] for r in rows if r["enrollment_id"] == lenient.id] == ["hello", "tips"]
    reason = await pool.fetchval(
        "SELECT status_reason FROM dripd.enrollments WHERE id=$1", strict.id
    )
    assert reason == "step 'hello' failed"


async def test_smtp_down_opens_the_circuit_spends_no_attempt_and_a_probe_delivers(
    dsn: str, pool: asyncpg.Pool, clock: ManualClock, tmp_path: Path
) -> None:
    port = free_port()
    e = await _enroll_ada(pool, port, tmp_path, clock)
    circuit = {"circuit": {"failures": 3, "open_for": "1m", "max_open_for": "10m"}}
    async with running_daemon(dsn, tmp_path, clock=clock, sections=circuit) as daemon:
        # The relay refuses connections: the provider's failure, not the message's. Each
        # one defers the row without spending an attempt, until the third opens the circuit.
        for failures in (1, 2, 3):
            await wait_for(lambda n=failures: _deferrals(pool, n))
            row = (await executions(pool))[0]
            assert (row["status"], row["attempt"], row["reason"]) == (
                "scheduled",
                0,
                "provider_unavailable",
            )
            assert "connect" in row["last_error"].lower()
            if failures < 3:
                assert row["due_at"] - clock.now() <= timedelta(seconds=5)
                clock.set(row["due_at"])
        [opened] = daemon.status()["circuits"]
        assert (opened["adapter"], opened["state"]) == ("smtp", "open")
        assert "connect" in opened["reason"].lower()
        # Held back until the circuit lets a probe go (open_for ±20 %), claimed no sooner.
        assert timedelta(seconds=45) <= row["due_at"] - clock.now() <= timedelta(seconds=75)
        sink = SmtpSink().start(port)
        try:
            clock.advance(timedelta(seconds=75))  # the probe: one daemon sends one row
            await wait_for(lambda: sink.count() == 1)
        finally:
            sink.stop()
        await wait_for(_execution_in(pool, "scheduled"))
        await wait_for(lambda: daemon.status()["circuits"] == [])
    rows = await executions(pool)
    assert rows[0]["status"] == "sent"
    assert rows[0]["attempt"] == 0  # the outage spent none of the message's attempts
    assert await _status(pool, e.id) == "active"
    states = await pool.fetchval(
        "SELECT circuit_state FROM dripd.channel_adapters WHERE name = 'smtp'"
    )
    assert states == "closed"


async def _deferrals(pool: asyncpg.Pool, n: int) -> bool:
    count = await pool.fetchval("SELECT count(*) FROM dripd.message_events WHERE type = 'deferred'")
    row = await pool.fetchrow("SELECT status FROM dripd.step_executions")
    return int(count) == n and row is not None and row["status"] == "scheduled"


async def test_a_message_refused_for_now_spends_its_attempts_then_the_enrollment_fails(
    dsn: str, pool: asyncpg.Pool, clock: ManualClock, tmp_path: Path
) -> None:
    # 451 to DATA: this message is refused for now (the relay is up): a retry spends an
    # attempt, and the circuit never opens.
    sink = SmtpSink(reply="451 4.7.1 try again later").start()
    try:
        e = await _enroll_ada(pool, sink.port, tmp_path, clock)
        async with running_daemon(
            dsn, tmp_path, clock=clock, retry_base="10s", max_attempts=3
        ) as daemon:
            for attempt in (1, 2):
                await wait_for(lambda a=attempt: _attempt(pool, a))
                assert daemon.status()["circuits"] == []
                clock.advance(timedelta(minutes=5))
            await wait_for(_has_status(pool, e.id, "failed"))
    finally:
        sink.stop()
    rows = await executions(pool)
    assert len(rows) == 1
    assert rows[0]["status"] == "failed"
    assert rows[0]["attempt"] == 3
    assert rows[0]["last_error"].startswith("gave up after 3 attempts")
    assert "451" in rows[0]["last_error"]
    types = [
        r["type"] for r in await pool.fetch("SELECT type FROM dripd.message_events ORDER BY id")
    ]
    assert types == ["deferred", "deferred", "failed"]


def _claims(daemon: Daemon) -> float:
    return daemon.metrics.registry.get_sample_value("dripd_claim_duration_seconds_count") or 0.0


async def _attempt(pool: asyncpg.Pool, n: int) -> bool:
    row = await pool.fetchrow("SELECT status, attempt FROM dripd.step_executions")
    return row is not None and row["status"] == "scheduled" and row["attempt"] == n


async def test_replay_resends_a_failed_execution_with_a_new_message_id(
    dsn: str, pool: asyncpg.Pool, sink: SmtpSink, clock: ManualClock, tmp_path: Path
) -> None:
    await apply_text(pool, DRIP)
    await _adapters(pool, sink.port, tmp_path)
    e = await api.enroll(
        pool,
        tenant=None,
        sequence_key="drip",
        subscriber_id="a",
        data={"email": "a@example.com"},
        now=clock.now(),
    )
    async with running_daemon(dsn, tmp_path, clock=clock) as daemon:
        await wait_for(_has_status(pool, e.id, "failed"))
        failed = (await executions(pool))[0]
        # Fix the data, then replay through the control socket.
        await pool.execute('UPDATE dripd.enrollments SET data = data || \'{"first_name": "A"}\'')
        result = await request(
            daemon.config.control.socket, "replay", {"execution_id": str(failed["id"])}
        )
        assert result["replay"] == 1
        assert result["advances"] is True
        await wait_for(lambda: sink.count() == 1)
        await wait_for(_execution_in(pool, "scheduled"))
        with pytest.raises(Exception, match="only a failed execution can be replayed"):
            await request(
                daemon.config.control.socket, "replay", {"execution_id": str(failed["id"])}
            )
    assert sink.messages[0]["Message-ID"] == f"<{failed['id']}.1@dripd.local>"
    assert sink.messages[0]["X-Dripd-Idempotency-Key"] == f"{failed['id']}:1"
    assert await _status(pool, e.id) == "active"


async def test_a_lost_lease_is_claimed_again_and_a_late_record_changes_nothing(
    dsn: str, pool: asyncpg.Pool, sink: SmtpSink, clock: ManualClock, tmp_path: Path
) -> None:
    await _enroll_ada(pool, sink.port, tmp_path, clock)
    # A daemon that died holding the row: claimed, its lease running for another minute.
    dead_token = uuid.uuid4()
    await pool.execute(
        "UPDATE dripd.step_executions SET status='claimed', claim_token=$1, lease_until=$2",
        dead_token,
        clock.now() + timedelta(minutes=1),
    )
    async with running_daemon(dsn, tmp_path, clock=clock) as daemon:
        await wait_for(lambda: daemon.worker is not None and daemon.worker.idle)
        assert sink.count() == 0  # claimed by the dead daemon until its lease runs out
        clock.advance(timedelta(minutes=1))
        await wait_for(lambda: sink.count() == 1)
        await wait_for(_execution_in(pool, "scheduled"))
    first = (await executions(pool))[0]
    assert first["attempt"] == 1  # a lease that ran out spends an attempt
    # The dead daemon wakes up and tries to record: its token no longer matches.

    async with store.acquire(pool) as conn:
        await store.init_connection(conn)
        owned = await store.record(
            conn,
            [
                store.RecordRow(
                    id=first["id"],
                    token=dead_token,
                    status="failed",
                    error="late",
                    finished_at=clock.now(),
                    event_type="failed",
                )
            ],
            notify_before=None,
        )
        await conn.reload_schema_state()
    assert owned == set()
    assert (await executions(pool))[0]["status"] == "sent"


async def test_paused_enrollment_holds_its_step_and_resume_honours_the_delay(
    dsn: str, pool: asyncpg.Pool, sink: SmtpSink, clock: ManualClock, tmp_path: Path
) -> None:
    e = await _enroll_ada(pool, sink.port, tmp_path, clock)
    async with running_daemon(dsn, tmp_path, clock=clock):
        await wait_for(lambda: sink.count() == 1)
        await wait_for(_execution_in(pool, "scheduled"))
        paused = await api.pause(pool, tenant=None, enrollment_id=e.id, now=clock.now())
        assert paused.status == "paused"
        clock.advance(timedelta(days=3))
        await wait_for(lambda: _settled(pool))
        assert sink.count() == 1
        resumed = await api.resume(pool, tenant=None, enrollment_id=e.id, now=clock.now())
        assert resumed.next_step == "tips"
        await wait_for(lambda: sink.count() == 2)  # its delay ran out while paused: due at once


async def test_paused_after_scheduling_is_held_not_sent_and_not_spun(
    dsn: str, pool: asyncpg.Pool, sink: SmtpSink, clock: ManualClock, tmp_path: Path
) -> None:
    e = await _enroll_ada(pool, sink.port, tmp_path, clock)
    # The race: paused while its row was already being claimed (so pause could not hold it).
    await pool.execute("UPDATE dripd.enrollments SET status = 'paused'")
    async with running_daemon(dsn, tmp_path, clock=clock) as daemon:
        held = await wait_for(lambda: _held(pool))
        claims = _claims(daemon)
        assert held["status"] == "scheduled"
        assert held["attempt"] == 0  # a defer spends no attempt
        assert sink.count() == 0
        await api.resume(pool, tenant=None, enrollment_id=e.id, now=clock.now())
        await wait_for(lambda: sink.count() == 1)
    assert _claims(daemon) <= claims + 2  # held at 'infinity', not claimed over and over
    reasons = await pool.fetch("SELECT type, reason FROM dripd.message_events ORDER BY id")
    assert [(r["type"], r["reason"]) for r in reasons] == [
        ("deferred", "enrollment_paused"),
        ("sent", None),
    ]


async def _held(pool: asyncpg.Pool) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await pool.fetchrow(
        "SELECT * FROM dripd.step_executions WHERE held_due_at IS NOT NULL"
    )
    return row


async def test_encrypted_smtp_credentials_authenticate_through_the_daemon(
    dsn: str, pool: asyncpg.Pool, clock: ManualClock, tmp_path: Path
) -> None:
    from aiosmtpd.smtp import AuthResult

    key = generate_key()
    vault = Vault.from_text(key)
    seen: list[tuple[str, str]] = []

    def authenticator(server, session, envelope, mechanism, auth_data):  # type: ignore[no-untyped-def]
        seen.append((auth_data.login.decode(), auth_data.password.decode()))
        return AuthResult(success=auth_data.password == b"s3cret")

    sink = SmtpSink()
    sink.port = free_port()
    from aiosmtpd.controller import Controller

    sink.controller = Controller(
        sink,
        hostname="127.0.0.1",
        port=sink.port,
        authenticator=authenticator,
        auth_require_tls=False,
    )
    sink.controller.start()
    try:
        await apply_text(pool, DRIP)
        await add_adapter(
            pool,
            name="smtp",
            channel="email",
            provider="smtp",
            config=smtp_config(sink.port),
            credentials={"username": "drip", "password": "s3cret"},
            vault=vault,
        )
        await api.enroll(
            pool, tenant=None, sequence_key="drip", subscriber_id="a", data=ADA, now=clock.now()
        )
        async with running_daemon(dsn, tmp_path, clock=clock, env={"DRIPD_ENCRYPTION_KEY": key}):
            await wait_for(lambda: sink.count() == 1)
    finally:
        sink.stop()
    assert seen == [("drip", "s3cret")]
    raw = await pool.fetchval("SELECT credentials FROM dripd.channel_adapters")
    assert b"s3cret" not in raw
    assert b"drip" not in raw


BRANCHING = """
[sequence]
key = "branch"

[[steps]]
key = "hello"
channel = "sms"
body = "hello"

[[steps]]
key = "free_offer"
channel = "sms"
body = "upgrade?"

[[steps]]
key = "pro_tips"
channel = "sms"
body = "pro tips"

[[transitions]]
from = "hello"
to = "pro_tips"
when = "data.plan == 'pro' and data.seats >= 5"
priority = 1

[[transitions]]
from = "hello"
to = "free_offer"
when = "data.plan == 'free'"
priority = 2

[[transitions]]
from = "free_offer"

[[transitions]]
from = "pro_tips"
"""


async def _path(pool: asyncpg.Pool, enrollment_id: uuid.UUID) -> list[str]:
    rows = await executions(pool)
    return [r["step_key"] for r in rows if r["enrollment_id"] == enrollment_id]


async def test_transitions_pick_the_first_match_and_no_match_completes(
    dsn: str, pool: asyncpg.Pool, clock: ManualClock, tmp_path: Path
) -> None:
    await apply_text(pool, BRANCHING)
    await add_adapter(
        pool,
        name="sms",
        channel="sms",
        provider="outbox",
        config={"path": str(tmp_path / "out.jsonl")},
    )
    people = {
        "pro": {"plan": "pro", "seats": 10},
        "small-pro": {"plan": "pro", "seats": 2},  # matches nothing
        "free": {"plan": "free"},
        "typo": {"plan": "pro", "seats": "ten"},  # a type error: fails closed
    }
    ids = {}
    for name, data in people.items():
        e = await api.enroll(
            pool,
            tenant=None,
            sequence_key="branch",
            subscriber_id=name,
            data={"phone": "+15550100001", **data},
            now=clock.now(),
        )
        ids[name] = e.id
    async with running_daemon(dsn, tmp_path, clock=clock) as daemon:
        for name in people:
            await wait_for(lambda n=name: _ended(pool, ids[n]))
        errors = daemon.metrics.registry.get_sample_value("dripd_condition_errors_total")
    assert await _path(pool, ids["pro"]) == ["hello", "pro_tips"]
    assert await _path(pool, ids["free"]) == ["hello", "free_offer"]
    assert await _path(pool, ids["small-pro"]) == ["hello"]
    assert await _path(pool, ids["typo"]) == ["hello"]
    reasons = {
        name: await pool.fetchval(
            "SELECT status || ':' || status_reason FROM dripd.enrollments WHERE id = $1", i
        )
        for name, i in ids.items()
    }
    assert reasons == {
        "pro": "completed:completed",
        "free": "completed:completed",
        "small-pro": "completed:no_matching_transition",
        "typo": "completed:no_matching_transition",
    }
    assert errors == 1.0


async def _ended(pool: asyncpg.Pool, enrollment_id: uuid.UUID) -> bool:
    return await _status(pool, enrollment_id) != "active"


async def test_a_stop_waits_for_the_batch_being_recorded_before_giving_rows_back(
    dsn: str,
    pool: asyncpg.Pool,
    sink: SmtpSink,
    clock: ManualClock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # CI saw it: SIGTERM while the recorder was writing a batch; the stop found the buffer
    # empty, released the rows of that batch (already sent) and the write then found
    # their claims gone: "lease lost", and the next daemon sent them again.
    order: list[str] = []
    writing, gate = anyio.Event(), anyio.Event()
    real_record, real_release = store.record, store.release

    async def gated_record(*args: object, **kwargs: object) -> set[uuid.UUID]:
        order.append("record")
        writing.set()
        await gate.wait()
        owned = await real_record(*args, **kwargs)  # type: ignore[arg-type]
        order.append("recorded")
        return owned

    async def noted_release(*args: object, **kwargs: object) -> int:
        order.append("release")
        return await real_release(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "record", gated_record)
    monkeypatch.setattr(store, "release", noted_release)
    enrollment = await _enroll_ada(pool, sink.port, tmp_path, clock)
    async with running_daemon(dsn, tmp_path, clock=clock) as daemon:
        await writing.wait()  # the first step is sent; its outcome is being written
        daemon.request_stop()
        await anyio.wait_all_tasks_blocked()  # the stop has gone as far as it can
        gate.set()
    assert order == ["record", "recorded"]
    rows = await executions(pool)
    assert [r["status"] for r in rows] == ["sent", "scheduled"]
    assert await _status(pool, enrollment.id) == "active"
    assert sink.count() == 1
