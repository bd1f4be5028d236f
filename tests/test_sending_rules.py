"""Sending rules through the daemon with a moved clock: windows, step rules, bounces,
thresholds, quotas (the lead-drip scenario) and one-click unsubscribe."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path

import asyncpg
import httpx
import pytest
from support import (
    SmtpSink,
    add_adapter,
    apply_text,
    enroll_at,
    executions,
    free_port,
    has_status,
    outbox_adapters,
    outbox_messages,
    quiet,
    running_daemon,
    smtp_config,
    wait_for,
)

from dripd import api
from dripd.channels.credentials import generate_key
from dripd.cli import main
from dripd.clock import ManualClock
from dripd.config import Thresholds
from dripd.control import request
from dripd.engine.thresholds import check_thresholds
from dripd.errors import DripdError
from dripd.metrics import Metrics

# Saturday 2026-03-07 15:00 UTC (10:00 in New York, EST; the clocks change on Sunday).
SATURDAY = datetime(2026, 3, 7, 15, 0, tzinfo=UTC)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(SATURDAY)


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    s = SmtpSink(unknown=frozenset({"gone@example.com"})).start()
    yield s
    s.stop()


@pytest.fixture
async def outbox(pool: asyncpg.Pool, tmp_path: Path) -> Path:
    return await outbox_adapters(pool, tmp_path / "outbox.jsonl")


# -- send windows --------------------------------------------------------------------------------

WINDOWED = """
[sequence]
key = "windowed"
window = { days = "mon-fri", hours = "09:00-17:00" }

[[steps]]
key = "hello"
channel = "email"
subject = "Hello"
text = "Hi"

[[steps]]
key = "ping"
channel = "webhook"
to = "https://hooks.example.com/x"
body = "{}"

[[steps]]
key = "late_sms"
channel = "sms"
window = { days = "daily", hours = "20:00-22:00" }
body = "Evening"
"""


async def test_windows_defer_to_the_next_local_opening_with_a_spread(
    dsn: str, pool: asyncpg.Pool, clock: ManualClock, outbox: Path, tmp_path: Path
) -> None:
    await apply_text(pool, WINDOWED)
    async with running_daemon(dsn, tmp_path, clock=clock) as daemon:
        e = await enroll_at(
            pool, clock, "windowed", "ny", timezone="America/New_York", phone="+12025550143"
        )
        await quiet(pool, clock)
        (row,) = await executions(pool)
        assert (row["status"], row["reason"], row["attempt"]) == ("scheduled", "outside_window", 0)
        # Monday 09:00 in New York is already EDT (UTC-4): 13:00 UTC, plus a spread < 10m.
        opening = datetime(2026, 3, 9, 13, 0, tzinfo=UTC)
        assert opening <= row["due_at"] < opening + timedelta(minutes=10)
        clock.set(row["due_at"] - timedelta(seconds=1))
        await quiet(pool, clock)
        assert outbox_messages(outbox) == []
        clock.set(row["due_at"])
        # The email goes out; the webhook step follows at once: the sequence's window is
        # for human channels only.
        await wait_for(lambda: len(outbox_messages(outbox)) == 2)
        await quiet(pool, clock)
        sms = next(r for r in await executions(pool) if r["step_key"] == "late_sms")
        # The step's own window: 20:00 EDT = 00:00 UTC the next day.
        evening = datetime(2026, 3, 10, 0, 0, tzinfo=UTC)
        assert evening <= sms["due_at"] < evening + timedelta(minutes=10)
        clock.set(sms["due_at"])
        await wait_for(lambda: len(outbox_messages(outbox)) == 3)
        await wait_for(lambda: has_status(pool, e.id, "completed"))
        deferred = daemon.metrics.deferrals.labels(reason="outside_window")._value.get()
    assert deferred == 2
    assert [m["channel"] for m in outbox_messages(outbox)] == ["email", "webhook", "sms"]


SHORT_WINDOW = """
[sequence]
key = "short_window"

[[steps]]
key = "hello"
channel = "email"
window = { hours = "09:00-09:05" }
subject = "Hello"
text = "Hi"
"""


async def test_a_window_shorter_than_the_spread_sends_every_row_when_it_first_opens(
    dsn: str, pool: asyncpg.Pool, clock: ManualClock, outbox: Path, tmp_path: Path
) -> None:
    # The report: "09:00-09:05" with the default 10-minute spread sent 0 of 6 in 3 days; the
    # rows spread past 09:05 found the window closed and deferred again, day after day.
    await apply_text(pool, SHORT_WINDOW)
    async with running_daemon(dsn, tmp_path, clock=clock) as daemon:
        for n in range(6):
            await enroll_at(pool, clock, "short_window", f"s{n}", timezone="America/New_York")
        await quiet(pool, clock)
        # Sunday 2026-03-08, the day New York springs forward: 09:00 EDT is 13:00 UTC.
        opening = datetime(2026, 3, 8, 13, 0, tzinfo=UTC)
        closing = opening + timedelta(minutes=5)
        due = sorted(row["due_at"] for row in await executions(pool))
        assert len(due) == 6
        assert opening <= due[0] <= due[-1] < closing
        clock.set(closing - timedelta(microseconds=1))
        await wait_for(lambda: len(outbox_messages(outbox)) == 6)
        await quiet(pool, clock)
        deferred = daemon.metrics.deferrals.labels(reason="outside_window")._value.get()
    assert deferred == 6


# -- per-step rules ------------------------------------------------------------------------------

STEP_RULES = """
[sequence]
key = "checked"

[[steps]]
key = "verified_only"
channel = "email"
require_verified = true
subject = "For verified people"
text = "Hi"

[[steps]]
key = "short_sms"
channel = "sms"
max_length = 20
body = "{{ message }}"
on_failure = "continue"

[[steps]]
key = "maybe_subject"
channel = "email"
subject = "{{ subject | default: '' }}"
text = "Hi"
"""


async def test_step_rules_skip_unverified_and_fail_long_sms_and_empty_fields(
    dsn: str, pool: asyncpg.Pool, clock: ManualClock, outbox: Path, tmp_path: Path
) -> None:
    await apply_text(pool, STEP_RULES)
    clock.set(datetime(2026, 3, 9, 15, 0, tzinfo=UTC))
    async with running_daemon(dsn, tmp_path, clock=clock):
        e = await enroll_at(pool, clock, "checked", "u", phone="+12025550143", message="x" * 21)
        await wait_for(lambda: has_status(pool, e.id, "failed"))
    rows = {r["step_key"]: r for r in await executions(pool)}
    assert (rows["verified_only"]["status"], rows["verified_only"]["reason"]) == (
        "skipped",
        "unverified",
    )
    assert rows["short_sms"]["status"] == "failed"
    assert (
        "sms_too_long: the body has 21 characters, the limit is 20"
        in rows["short_sms"]["last_error"]
    )
    assert rows["short_sms"]["attempt"] == 0  # permanent: not retried
    assert rows["maybe_subject"]["status"] == "failed"
    assert "rendered subject empty" in rows["maybe_subject"]["last_error"]
    assert outbox_messages(outbox) == []


# -- bounces and thresholds ----------------------------------------------------------------------


async def test_a_hard_bounce_suppresses_the_address(
    dsn: str, pool: asyncpg.Pool, clock: ManualClock, sink: SmtpSink, tmp_path: Path
) -> None:
    await apply_text(pool, ONE_EMAIL)
    await add_adapter(
        pool, name="smtp", channel="email", provider="smtp", config=smtp_config(sink.port)
    )
    async with running_daemon(dsn, tmp_path, clock=clock):
        e = await enroll_at(pool, clock, "one", "gone")
        await wait_for(lambda: has_status(pool, e.id, "failed"))
    (row,) = await executions(pool)
    assert row["status"] == "failed"
    assert "550" in row["last_error"]
    event = await pool.fetchrow("SELECT type, recipient FROM dripd.message_events")
    assert (event["type"], event["recipient"]) == ("bounced", "gone@example.com")
    suppression = await pool.fetchrow("SELECT * FROM dripd.suppressions")
    assert (suppression["address"], suppression["reason"], suppression["source"]) == (
        "gone@example.com",
        "bounce",
        "provider",
    )


ONE_EMAIL = """
[sequence]
key = "one"
reenroll = "always"

[[steps]]
key = "hello"
channel = "email"
subject = "Hello"
text = "Hi"
"""


async def test_a_bounce_threshold_pauses_the_adapter_until_an_operator_resumes_it(
    dsn: str, pool: asyncpg.Pool, clock: ManualClock, outbox: Path, tmp_path: Path
) -> None:
    await apply_text(pool, ONE_EMAIL)
    adapter_id = await pool.fetchval(
        "SELECT id FROM dripd.channel_adapters WHERE name = 'email-out'"
    )
    await pool.execute(
        "INSERT INTO dripd.message_events (adapter_id, type, occurred_at) "
        "SELECT $1, CASE WHEN n <= 3 THEN 'bounced' ELSE 'sent' END, $2 "
        "FROM generate_series(1, 103) AS n",
        adapter_id,
        clock.now() - timedelta(hours=1),
    )
    metrics = Metrics()
    limits = Thresholds(min_volume=100)
    # 3 bounces of 100 sent: 3 % ≥ 2 %.
    assert await check_thresholds(pool, limits, clock=clock, metrics=metrics) == ["email-out"]
    assert await check_thresholds(pool, limits, clock=clock, metrics=metrics) == []
    reason = await pool.fetchval(
        "SELECT paused_reason FROM dripd.channel_adapters WHERE id = $1", adapter_id
    )
    assert reason == "bounce rate 3/100 = 3.00%, threshold 2.00%"
    assert metrics.adapter_paused.labels(adapter="email-out")._value.get() == 1

    async with running_daemon(dsn, tmp_path, clock=clock) as daemon:
        e = await enroll_at(pool, clock, "one", "p")
        # A paused adapter's lane is not claimed: its rows wait untouched, no deferral churns.
        await wait_for(lambda: daemon.worker is not None and daemon.worker.idle)
        row = (await executions(pool))[-1]
        assert (row["status"], row["attempt"], row["reason"]) == ("scheduled", 0, None)
        deferred = "SELECT count(*) FROM dripd.message_events WHERE type = 'deferred'"
        assert await pool.fetchval(deferred) == 0
        assert outbox_messages(outbox) == []
        socket_path = daemon.config.control.socket
        with pytest.raises(DripdError, match="no adapter 'nope'"):
            await request(socket_path, "resume-adapter", {"name": "nope"})
        # `dripd ctl resume-adapter NAME` (the CLI runs its own event loop: a thread).
        argv = ["ctl", "--socket", socket_path, "resume-adapter", "email-out"]
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert await asyncio.to_thread(main, argv) == 0
        assert json.loads(out.getvalue())["was_paused"] == reason
        await wait_for(lambda: has_status(pool, e.id, "completed"))
    assert len(outbox_messages(outbox)) == 1


async def _deferred(pool: asyncpg.Pool, reason: str) -> asyncpg.Record | None:
    rows = await executions(pool)
    if rows and rows[-1]["status"] == "scheduled" and rows[-1]["reason"] == reason:
        return rows[-1]
    return None


# -- quotas: the lead-drip scenario --------------------------------------------------------------

LEAD_DRIP = """
[sequence]
key = "lead-drip"

[[steps]]
key = "m1"
channel = "email"
subject = "1"
text = "Hi"
""" + "".join(
    f"""
[[steps]]
key = "m{n}"
channel = "email"
after = "1d"
subject = "{n}"
text = "Hi"
"""
    for n in range(2, 6)
)


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_lead_drip_quota_sends_exactly_the_cap_each_day_and_drops_nothing(
    dsn: str, pool: asyncpg.Pool, outbox: Path, tmp_path: Path
) -> None:
    clock = ManualClock(datetime(2026, 3, 2, 10, 0, tzinfo=UTC))
    await apply_text(pool, LEAD_DRIP)
    quota = {"scope": "sequence", "key": "lead-drip", "limit": 100, "period": "day"}
    leads = 300
    async with running_daemon(
        dsn, tmp_path, clock=clock, sections={"quotas": [quota]}, batch_size=50
    ):
        for n in range(leads):
            await enroll_at(pool, clock, "lead-drip", f"lead{n:03}")
        day = datetime(2026, 3, 2, tzinfo=UTC)
        for _ in range(20):
            for hour in (10, 13, 23):
                clock.set(day + timedelta(hours=hour))
                await quiet(pool, clock)
            day += timedelta(days=1)
            if len(outbox_messages(outbox)) == leads * 5:
                break
    # The daemon's clock is the witness: when each send was recorded.
    rows = await pool.fetch(
        "SELECT m.recipient, m.occurred_at, s.key FROM dripd.message_events AS m "
        "JOIN dripd.step_executions AS e ON e.id = m.execution_id "
        "JOIN dripd.steps AS s ON s.id = e.step_id WHERE m.type = 'sent' ORDER BY m.occurred_at"
    )
    assert len(rows) == len(outbox_messages(outbox)) == leads * 5  # nothing dropped
    per_day = Counter(r["occurred_at"].date() for r in rows)
    assert set(per_day.values()) == {100}, per_day  # exactly the cap, every calendar day
    by_lead: dict[str, list[asyncpg.Record]] = {}
    for r in rows:
        by_lead.setdefault(r["recipient"], []).append(r)
    for to, sends in by_lead.items():
        assert [r["key"] for r in sends] == ["m1", "m2", "m3", "m4", "m5"], to  # in order
        times = [r["occurred_at"] for r in sends]
        assert all(b - a >= timedelta(days=1) for a, b in pairwise(times)), to
    used = await pool.fetch("SELECT used FROM dripd.quota_ledger")
    assert {r["used"] for r in used} == {100}


# -- one-click unsubscribe -----------------------------------------------------------------------


async def test_lifecycle_email_carries_rfc8058_headers_and_one_click_suppresses(
    dsn: str, pool: asyncpg.Pool, clock: ManualClock, sink: SmtpSink, tmp_path: Path
) -> None:
    again = '[[steps]]\nkey = "again"\nchannel = "email"\nafter = "1d"\nsubject = "A"\ntext = "Hi"'
    await apply_text(pool, ONE_EMAIL + again)
    await add_adapter(
        pool, name="smtp", channel="email", provider="smtp", config=smtp_config(sink.port)
    )
    port = free_port()
    env = {"DRIPD_ENCRYPTION_KEY": generate_key()}
    sections = {
        "http": {"enabled": True, "listen": f"127.0.0.1:{port}"},
        "unsubscribe": {"base_url": "https://mail.example.com/", "mailto": "unsub@example.com"},
    }
    async with running_daemon(dsn, tmp_path, clock=clock, env=env, sections=sections):
        e = await enroll_at(pool, clock, "one", "reader")
        await wait_for(lambda: sink.count() == 1)
        mail = sink.messages[0]
        assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        header = str(mail["List-Unsubscribe"])
        found = re.fullmatch(
            r"<https://mail\.example\.com/u/([A-Za-z0-9_-]+)>, <mailto:unsub@example\.com>", header
        )
        assert found, header
        token = found.group(1)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            bad = await client.post(f"/u/{token[:-2]}xx", data={"List-Unsubscribe": "One-Click"})
            assert bad.status_code == 400
            assert await pool.fetchval("SELECT count(*) FROM dripd.suppressions") == 0
            ok = await client.post(f"/u/{token}", data={"List-Unsubscribe": "One-Click"})
            assert ok.status_code == 200
        row = await pool.fetchrow("SELECT address, reason FROM dripd.suppressions")
        assert (row["address"], row["reason"]) == ("reader@example.com", "unsubscribe")
        await quiet(pool, clock)
        clock.advance(timedelta(days=1))
        await wait_for(lambda: has_status(pool, e.id, "completed"))
    assert sink.count() == 1
    again = next(r for r in await executions(pool) if r["step_key"] == "again")
    assert (again["status"], again["reason"]) == ("skipped", "suppressed")


async def test_a_reported_complaint_suppresses_and_counts_towards_the_threshold(
    dsn: str, pool: asyncpg.Pool, clock: ManualClock, outbox: Path, tmp_path: Path
) -> None:
    await apply_text(pool, ONE_EMAIL)
    async with running_daemon(dsn, tmp_path, clock=clock):
        e = await enroll_at(pool, clock, "one", "Grumpy")
        await wait_for(lambda: has_status(pool, e.id, "completed"))
    (row,) = await executions(pool)
    assert await api.report(pool, tenant=None, execution_id=row["id"], type="complained")
    assert not await api.report(pool, tenant="other", execution_id=row["id"], type="complained")
    types = [
        r["type"] for r in await pool.fetch("SELECT type FROM dripd.message_events ORDER BY id")
    ]
    assert types == ["sent", "complained"]
    suppression = await pool.fetchrow("SELECT address, reason, source FROM dripd.suppressions")
    assert tuple(suppression) == ("grumpy@example.com", "complaint", "report")
    metrics = Metrics()
    one_in_one = Thresholds(min_volume=1)
    assert await check_thresholds(pool, one_in_one, clock=clock, metrics=metrics) == ["email-out"]


async def test_gathered_quota_reservations_grant_exactly_the_cap_across_daemons(
    dsn: str, pool: asyncpg.Pool
) -> None:
    from dripd.engine.ledger import DbLedger
    from dripd.rules.quota import QuotaBucket

    day = datetime(2026, 3, 2, tzinfo=UTC)
    global_cap = QuotaBucket(key="quota:global", limit=100, period_start=day, period_end=day)
    sequence_cap = QuotaBucket(key="quota:seq", limit=70, period_start=day, period_end=day)
    pools = [await asyncpg.create_pool(dsn, min_size=1, max_size=3) for _ in range(3)]
    try:
        ledgers = [DbLedger(p) for p in pools]
        both = await asyncio.gather(
            *(ledgers[n % 3].reserve([global_cap, sequence_cap]) for n in range(150))
        )
        only_global = await asyncio.gather(
            *(ledgers[n % 3].reserve([global_cap]) for n in range(150))
        )
    finally:
        for p in pools:
            await p.close()
    assert sum(both) == 70  # the fuller bucket decides, for every bucket of the reservation
    assert sum(only_global) == 30
    used = {r["bucket"]: r["used"] for r in await pool.fetch("SELECT * FROM dripd.quota_ledger")}
    assert used == {"quota:global": 100, "quota:seq": 70}
    await DbLedger(pool).release([global_cap])
    assert (
        await pool.fetchval("SELECT used FROM dripd.quota_ledger WHERE bucket = 'quota:global'")
        == 99
    )


SMS_ONLY = """
[sequence]
key = "texts"

[[steps]]
key = "text"
channel = "sms"
body = "Hi"
"""


async def test_suppressions_match_any_spelling_of_a_phone_number(
    dsn: str, pool: asyncpg.Pool, clock: ManualClock, outbox: Path, tmp_path: Path
) -> None:
    await apply_text(pool, SMS_ONLY)
    clock.set(datetime(2026, 3, 9, 15, 0, tzinfo=UTC))
    stored = await api.suppress(pool, tenant=None, channel="sms", address="(202) 555-0143")
    assert stored.address == "+12025550143"
    berlin = await api.suppress(
        pool, tenant=None, channel="sms", address="030 1234567", default_region="DE"
    )
    assert berlin.address == "+49301234567"
    async with running_daemon(
        dsn, tmp_path, clock=clock, sections={"recipients": {"default_region": "DE"}}
    ):
        blocked = await enroll_at(pool, clock, "texts", "a", phone="+1 202 555 0143")
        local = await enroll_at(pool, clock, "texts", "b", phone="030 1234567")
        fine = await enroll_at(pool, clock, "texts", "c", phone="0151 23456789")
        for e in (blocked, local, fine):
            await wait_for(lambda e=e: has_status(pool, e.id, "completed"))
    rows = {r["enrollment_id"]: r for r in await executions(pool)}
    assert (rows[blocked.id]["status"], rows[blocked.id]["reason"]) == ("skipped", "suppressed")
    assert (rows[local.id]["status"], rows[local.id]["reason"]) == ("skipped", "suppressed")
    assert rows[fine.id]["status"] == "sent"
    # The provider gets the number in E.164, read in the configured region.
    assert [m["to"] for m in outbox_messages(outbox)] == ["+4915123456789"]
