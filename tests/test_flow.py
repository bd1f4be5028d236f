"""Flow logic through the daemon with a moved clock: timing, waits, events, conditions, exits."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest
import structlog.testing
from support import (
    apply_text,
    enroll_at,
    enrollment_status,
    executions,
    has_status,
    outbox_adapters,
    outbox_messages,
    quiet,
    running_daemon,
    wait_for,
)

from dripd import api
from dripd.clock import ManualClock
from dripd.db import store
from dripd.errors import Conflict, DatabaseError

# Monday 2026-03-02 12:00 UTC: a week before New York's spring change (2026-03-08).
START = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
async def outbox(pool: asyncpg.Pool, tmp_path: Path) -> Path:
    return await outbox_adapters(pool, tmp_path / "outbox.jsonl")


def steps_sent(outbox: Path, subscriber: str | None = None) -> list[str]:
    return [
        m["metadata"]["step_key"]
        for m in outbox_messages(outbox)
        if subscriber is None or m["to"] == subscriber
    ]


def event(pool: asyncpg.Pool, clock: ManualClock, who: str, key: str, **kw: Any) -> Any:
    return api.track_event(pool, tenant=None, subscriber_id=who, key=key, now=clock.now(), **kw)


# -- timing ------------------------------------------------------------------------------------

AT_AND_CRON = """
[sequence]
key = "timed"
timezone = "Europe/Berlin"

[[steps]]
key = "hello"
channel = "email"
at = "09:30"
subject = "Hello"
text = "Hi"

[[steps]]
key = "next_day"
channel = "email"
after = "1d"
at = "09:30"
subject = "Day two"
text = "Hi"

[[steps]]
key = "monday"
channel = "email"
cron = "0 9 * * MON"
subject = "Weekly"
text = "Hi"
"""


async def test_at_and_cron_steps_fall_due_at_local_times_across_dst(
    dsn: str, pool: asyncpg.Pool, clock: ManualClock, outbox: Path, tmp_path: Path
) -> None:
    await apply_text(pool, AT_AND_CRON)
    # Saturday 2026-03-07 15:00 UTC: New York is on EST (UTC-5) and changes on Sunday.
    clock.set(datetime(2026, 3, 7, 15, 0, tzinfo=UTC))
    ny = await enroll_at(pool, clock, "timed", "ny", timezone="America/New_York")
    berlin = await enroll_at(pool, clock, "timed", "berlin")  # the sequence's zone
    rows = {r["enrollment_id"]: r for r in await executions(pool)}
    # 09:30 EST has passed (10:00 local): the next 09:30 is Sunday's, already EDT (UTC-4).
    assert rows[ny.id]["due_at"] == datetime(2026, 3, 8, 13, 30, tzinfo=UTC)
    # 16:00 in Berlin (UTC+1): Sunday 09:30 CET.
    assert rows[berlin.id]["due_at"] == datetime(2026, 3, 8, 8, 30, tzinfo=UTC)

    async with running_daemon(dsn, tmp_path, clock=clock):
        clock.set(datetime(2026, 3, 8, 13, 30, tzinfo=UTC))
        await wait_for(lambda: len(outbox_messages(outbox)) == 2)
        await quiet(pool, clock)
        nexts = {
            r["enrollment_id"]: r["due_at"]
            for r in await executions(pool)
            if r["step_key"] == "next_day"
        }
        # A day after the send (13:30 UTC Sunday), then the first 09:30 local at or after
        # it: exactly Monday 09:30 EDT in New York; Monday 14:30 CET in Berlin is past it.
        assert nexts[ny.id] == datetime(2026, 3, 9, 13, 30, tzinfo=UTC)
        assert nexts[berlin.id] == datetime(2026, 3, 10, 8, 30, tzinfo=UTC)

        clock.set(datetime(2026, 3, 10, 13, 30, tzinfo=UTC))
        await wait_for(lambda: len(outbox_messages(outbox)) == 4)
        await quiet(pool, clock)
        mondays = {
            r["enrollment_id"]: r["due_at"]
            for r in await executions(pool)
            if r["step_key"] == "monday"
        }
        # The next Monday 09:00 local: New York on EDT, Berlin still on CET (changes 03-29).
        assert mondays[ny.id] == datetime(2026, 3, 16, 13, 0, tzinfo=UTC)
        assert mondays[berlin.id] == datetime(2026, 3, 16, 8, 0, tzinfo=UTC)
        clock.set(datetime(2026, 3, 16, 13, 0, tzinfo=UTC))
        await wait_for(lambda: len(outbox_messages(outbox)) == 6)
        await wait_for(lambda: has_status(pool, ny.id, "completed"))
    assert steps_sent(outbox, "ny@example.com") == ["hello", "next_day", "monday"]


# -- waiting for an event ----------------------------------------------------------------------

ACTIVATION = """
[sequence]
key = "activation"

[[steps]]
key = "hello"
channel = "email"
subject = "Welcome"
text = "Hi"

[[steps]]
key = "wait_activation"
wait_for = { event = "activated", timeout = "3d", on_timeout = "reminder" }

[[steps]]
key = "congrats"
channel = "email"
subject = "Congrats on {{ plan | default: 'your plan' }}"
text = "Well done"

[[steps]]
key = "pro_tips"
channel = "email"
subject = "Pro tips"
text = "Tips"

[[steps]]
key = "reminder"
channel = "email"
subject = "Need a hand?"
text = "Reply to this mail"

[[transitions]]
from = "wait_activation"
to = "pro_tips"
when = "event.data.plan == 'pro'"
priority = 1

[[transitions]]
from = "wait_activation"
to = "congrats"
when = "event.key == 'activated'"
priority = 2

[[transitions]]
from = "congrats"

[[transitions]]
from = "pro_tips"
"""


async def test_a_wait_is_released_by_its_event_in_the_event_transaction(
    dsn: str, pool: asyncpg.Pool, clock: ManualClock, outbox: Path, tmp_path: Path
) -> None:
    await apply_text(pool, ACTIVATION)
    async with running_daemon(dsn, tmp_path, clock=clock):
        basic = await enroll_at(pool, clock, "activation", "basic")
        pro = await enroll_at(pool, clock, "activation", "pro")
        await wait_for(lambda: len(outbox_messages(outbox)) == 2)
        await quiet(pool, clock)
        waiting = [r for r in await executions(pool) if r["step_key"] == "wait_activation"]
        assert {r["due_at"] for r in waiting} == {START + timedelta(days=3)}
        assert {r["waiting_for"] for r in waiting} == {"activated"}

        clock.advance(timedelta(hours=5))
        released = await event(pool, clock, "basic", "activated")
        assert len(released.released) == 1
        # Released in the event's own transaction: due now, carrying the event.
        row = await pool.fetchrow(
            "SELECT due_at, event_id FROM dripd.step_executions WHERE id = $1",
            released.released[0],
        )
        assert row["event_id"] == released.id
        assert row["due_at"] == clock.now()
        await event(pool, clock, "pro", "activated", data={"plan": "pro"})
        await wait_for(lambda: has_status(pool, basic.id, "completed"))
        await wait_for(lambda: has_status(pool, pro.id, "completed"))
    assert steps_sent(outbox, "basic@example.com") == ["hello", "congrats"]
    assert steps_sent(outbox, "pro@example.com") == ["hello", "pro_tips"]
    done = [r for r in await executions(pool) if r["step_key"] == "wait_activation"]
    assert {(r["status"], r["reason"]) for r in done} == {("done", "event:activated")}
    # A wait sends nothing, so it writes no message event.
    types = await pool.fetch("SELECT DISTINCT type FROM dripd.message_events")
    assert [r["type"] for r in types] == ["sent"]


async def test_a_wait_times_out_to_its_on_timeout_step(
    dsn: str, pool: asyncpg.Pool, clock: ManualClock, outbox: Path, tmp_path: Path
) -> None:
    await apply_text(pool, ACTIVATION)
    async with running_daemon(dsn, tmp_path, clock=clock):
        e = await enroll_at(pool, clock, "activation", "slow")
        await wait_for(lambda: len(outbox_messages(outbox)) == 1)
        await quiet(pool, clock)
        clock.advance(timedelta(days=3) - timedelta(seconds=1))
        await quiet(pool, clock)
        assert len(outbox_messages(outbox)) == 1
        clock.advance(timedelta(seconds=1))
        await wait_for(lambda: len(outbox_messages(outbox)) == 2)
        await wait_for(lambda: has_status(pool, e.id, "completed"))
        # An event after the timeout finds nothing waiting.
        late = await event(pool, clock, "slow", "activated")
        assert late.released == []
    assert steps_sent(outbox) == ["hello", "reminder"]
    wait = next(r for r in await executions(pool) if r["step_key"] == "wait_activation")
    assert (wait["status"], wait["reason"]) == ("done", "wait_timeout")


TIMEOUT_BY_TRANSITIONS = """
[sequence]
key = "nudge"
on_no_match = "{on_no_match}"

[[steps]]
key = "hello"
channel = "email"
subject = "Welcome"
text = "Hi"

[[steps]]
key = "wait_activation"
wait_for = {{ event = "activated", timeout = "1d" }}

[[steps]]
key = "congrats"
channel = "email"
subject = "Congrats"
text = "Well done"

[[steps]]
key = "nudge"
channel = "email"
subject = "Still there?"
text = "Activate your account"

[[transitions]]
from = "wait_activation"
to = "congrats"
when = "event.key == 'activated'"
priority = 1
{fallback}
[[transitions]]
from = "congrats"

[[transitions]]
from = "nudge"
"""

FALLBACK = """
[[transitions]]
from = "wait_activation"
to = "nudge"
priority = 2
"""
PRO_ONLY = FALLBACK.replace("priority = 2", "priority = 2\nwhen = \"event.data.plan == 'pro'\"")


@pytest.mark.parametrize(
    ("fallback", "on_no_match", "sent", "status", "reason"),
    [
        # The case: no on_timeout, so the transitions run with `event` null and the
        # catch-all sends the nudge, not the next step by position ("congrats").
        (FALLBACK, "complete", ["hello", "nudge"], "completed", "completed"),
        # No transition matches a null event: the version's on_no_match decides.
        (PRO_ONLY, "complete", ["hello"], "completed", "no_matching_transition"),
        (PRO_ONLY, "fail", ["hello"], "failed", "no_matching_transition"),
    ],
    ids=["catch-all", "no-match-completes", "no-match-fails"],
)
async def test_a_timed_out_wait_without_on_timeout_takes_its_transitions(
    dsn: str,
    pool: asyncpg.Pool,
    clock: ManualClock,
    outbox: Path,
    tmp_path: Path,
    fallback: str,
    on_no_match: str,
    sent: list[str],
    status: str,
    reason: str,
) -> None:
    await apply_text(
        pool, TIMEOUT_BY_TRANSITIONS.format(fallback=fallback, on_no_match=on_no_match)
    )
    async with running_daemon(dsn, tmp_path, clock=clock):
        e = await enroll_at(pool, clock, "nudge", "never")
        await wait_for(lambda: len(outbox_messages(outbox)) == 1)
        await quiet(pool, clock)
        clock.advance(timedelta(days=1))
        await wait_for(lambda: has_status(pool, e.id, status))
    assert steps_sent(outbox) == sent
    row = await pool.fetchrow("SELECT status_reason FROM dripd.enrollments WHERE id = $1", e.id)
    assert row["status_reason"] == reason
    wait = next(r for r in await executions(pool) if r["step_key"] == "wait_activation")
    assert (wait["status"], wait["reason"]) == ("done", "wait_timeout")


async def test_event_and_timeout_racing_give_exactly_one_path_per_enrollment(
    dsn: str, pool: asyncpg.Pool, clock: ManualClock, outbox: Path, tmp_path: Path
) -> None:
    await apply_text(pool, ACTIVATION)
    people = [f"r{n}" for n in range(40)]
    async with running_daemon(dsn, tmp_path, clock=clock, batch_size=7):
        ids = [(await enroll_at(pool, clock, "activation", who)).id for who in people]
        await wait_for(lambda: len(outbox_messages(outbox)) == len(people))
        await quiet(pool, clock)
        clock.advance(timedelta(days=3))  # every wait times out now...
        results = await asyncio.gather(  # ...while the events arrive
            *(event(pool, clock, who, "activated") for who in people)
        )
        for e in ids:
            await wait_for(lambda e=e: has_status(pool, e, "completed"))
    by_who: dict[str, list[str]] = {}
    for m in outbox_messages(outbox):
        by_who.setdefault(m["to"], []).append(m["metadata"]["step_key"])
    paths = {tuple(v) for v in by_who.values()}
    assert paths <= {("hello", "congrats"), ("hello", "reminder")}
    assert len(by_who) == len(people)
    released = sum(len(r.released) for r in results)
    congrats = sum(1 for v in by_who.values() if v[-1] == "congrats")
    assert congrats == released  # an event that released a wait decided that path
    waits = [r for r in await executions(pool) if r["step_key"] == "wait_activation"]
    assert len(waits) == len(people)


async def test_an_event_committed_while_its_wait_is_claimed_still_decides_the_path(
    dsn: str, pool: asyncpg.Pool, clock: ManualClock, outbox: Path, tmp_path: Path
) -> None:
    # The race above, made certain: the claim of a timed-out wait locks the row's newest
    # version, which an event released (event_id set) after the claim's snapshot was
    # taken, so the claim's own read of dripd.events cannot see that event. A trigger
    # plays the event's part, inside the claim: its insert is equally invisible to the
    # statement. The claim read the event as null, and the subscriber got the timeout.
    await apply_text(pool, ACTIVATION)
    async with running_daemon(dsn, tmp_path, clock=clock):
        e = await enroll_at(pool, clock, "activation", "late")
        await wait_for(lambda: len(outbox_messages(outbox)) == 1)
        await quiet(pool, clock)
        await pool.execute(LATE_EVENT_TRIGGER)
        clock.advance(timedelta(days=3))  # the wait times out: the daemon claims it
        await wait_for(lambda: has_status(pool, e.id, "completed"))
    assert steps_sent(outbox) == ["hello", "congrats"]
    released = await pool.fetchval("SELECT count(*) FROM dripd.events WHERE key = 'activated'")
    assert released == 1


LATE_EVENT_TRIGGER = """
CREATE FUNCTION public.late_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status = 'scheduled' AND NEW.status = 'claimed'
       AND NEW.waiting_for IS NOT NULL AND NEW.event_id IS NULL THEN
        INSERT INTO dripd.events (subscriber_id, key)
        SELECT en.subscriber_id, NEW.waiting_for FROM dripd.enrollments AS en
        WHERE en.id = NEW.enrollment_id
        RETURNING id INTO NEW.event_id;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER late_event BEFORE UPDATE ON dripd.step_executions
    FOR EACH ROW EXECUTE FUNCTION public.late_event();
"""


async def test_a_paused_wait_released_by_an_event_continues_on_resume(
    dsn: str, pool: asyncpg.Pool, clock: ManualClock, outbox: Path, tmp_path: Path
) -> None:
    await apply_text(pool, ACTIVATION)
    async with running_daemon(dsn, tmp_path, clock=clock):
        e = await enroll_at(pool, clock, "activation", "p")
        await wait_for(lambda: len(outbox_messages(outbox)) == 1)
        await quiet(pool, clock)
        await api.pause(pool, tenant=None, enrollment_id=e.id, now=clock.now())
        clock.advance(timedelta(days=1))
        result = await event(pool, clock, "p", "activated")
        assert len(result.released) == 1
        clock.advance(timedelta(days=5))  # past the timeout: the event already won
        await quiet(pool, clock)
        assert len(outbox_messages(outbox)) == 1  # paused: nothing moves
        await api.resume(pool, tenant=None, enrollment_id=e.id, now=clock.now())
        await wait_for(lambda: has_status(pool, e.id, "completed"))
    assert steps_sent(outbox) == ["hello", "congrats"]


# -- entry, exit, re-entry ---------------------------------------------------------------------

ONBOARDING = """
[sequence]
key = "onboarding"
reenroll = "{reenroll}"
entry_events = ["signed_up"]
exit_events = ["purchased"]

[[steps]]
key = "hello"
channel = "email"
subject = "Hello {{{{ first_name | default: 'there' }}}}"
text = "Hi"

[[steps]]
key = "nudge"
channel = "email"
after = "2d"
subject = "Still there?"
text = "Hi"
"""


async def test_entry_event_enrolls_with_its_data_and_exit_event_ends_the_enrollment(
    dsn: str, pool: asyncpg.Pool, clock: ManualClock, outbox: Path, tmp_path: Path
) -> None:
    await apply_text(pool, ONBOARDING.format(reenroll="after_exit"))
    async with running_daemon(dsn, tmp_path, clock=clock):
        first = await event(
            pool, clock, "u1", "signed_up", data={"email": "u1@example.com", "first_name": "Ann"}
        )
        assert len(first.enrolled) == 1
        await wait_for(lambda: len(outbox_messages(outbox)) == 1)
        assert outbox_messages(outbox)[0]["subject"] == "Hello Ann"
        await quiet(pool, clock)

        again = await event(pool, clock, "u1", "signed_up")
        assert again.enrolled == []
        assert again.not_enrolled == [{"sequence": "onboarding", "reason": "already enrolled"}]

        goal = await event(pool, clock, "u1", "purchased")
        assert goal.exited == first.enrolled
        assert await enrollment_status(pool, first.enrolled[0]) == (
            "exited",
            "exit_event:purchased",
        )
        nudge = next(r for r in await executions(pool) if r["step_key"] == "nudge")
        assert (nudge["status"], nudge["reason"]) == ("cancelled", "exited")
        clock.advance(timedelta(days=3))
        await quiet(pool, clock)
        assert len(outbox_messages(outbox)) == 1  # the cancelled nudge never goes out

        # after_exit: an exited subscriber may come back.
        back = await event(pool, clock, "u1", "signed_up", data={"email": "u1@example.com"})
        assert len(back.enrolled) == 1
        await wait_for(lambda: len(outbox_messages(outbox)) == 2)


async def test_reenroll_never_refuses_an_entry_event_and_enroll_names_the_policy(
    dsn: str, pool: asyncpg.Pool, clock: ManualClock, outbox: Path
) -> None:
    await apply_text(pool, ONBOARDING.format(reenroll="never"))
    first = await event(pool, clock, "u2", "signed_up", data={"email": "u2@example.com"})
    await event(pool, clock, "u2", "purchased")
    again = await event(pool, clock, "u2", "signed_up")
    assert again.enrolled == []
    (refusal,) = again.not_enrolled
    assert refusal["sequence"] == "onboarding"
    assert "reenroll policy is 'never'" in refusal["reason"]
    with pytest.raises(Conflict, match="reenroll policy is 'never'"):
        await enroll_at(pool, clock, "onboarding", "u2")
    # The refused entry left nothing behind; the event itself is recorded.
    assert await pool.fetchval("SELECT count(*) FROM dripd.enrollments") == 1
    assert await pool.fetchval("SELECT count(*) FROM dripd.events") == 3
    assert first.enrolled


async def test_an_event_with_an_idempotency_id_acts_once(
    pool: asyncpg.Pool, clock: ManualClock, outbox: Path
) -> None:
    await apply_text(pool, ONBOARDING.format(reenroll="always"))
    one = await event(pool, clock, "u3", "signed_up", idempotency_id="evt-1")
    two = await event(pool, clock, "u3", "signed_up", idempotency_id="evt-1")
    assert two.id == one.id
    assert two.created is False
    assert two.enrolled == []
    assert await pool.fetchval("SELECT count(*) FROM dripd.events") == 1
    assert await pool.fetchval("SELECT count(*) FROM dripd.enrollments") == 1


# -- conditions --------------------------------------------------------------------------------

BRANCHES = """
[sequence]
key = "branches"
on_no_match = "{on_no_match}"

[[steps]]
key = "hello"
channel = "email"
subject = "Hello"
text = "Hi"

[[steps]]
key = "pro_only"
channel = "email"
when = "data.plan == 'pro'"
subject = "For pros"
text = "Hi"

[[steps]]
key = "route"

[[steps]]
key = "engaged"
channel = "email"
subject = "You are active"
text = "Hi"

[[transitions]]
from = "route"
to = "engaged"
when = "events.opened_app.count >= 2 and events.opened_app.last_at > now - 1d"

[[transitions]]
from = "engaged"
"""


async def test_step_conditions_skip_and_transitions_read_event_statistics(
    dsn: str, pool: asyncpg.Pool, clock: ManualClock, outbox: Path, tmp_path: Path
) -> None:
    await apply_text(pool, BRANCHES.format(on_no_match="complete"))
    for _ in range(2):
        await event(pool, clock, "active", "opened_app")
    await event(pool, clock, "quiet", "opened_app")
    async with running_daemon(dsn, tmp_path, clock=clock):
        active = await enroll_at(pool, clock, "branches", "active", plan="pro")
        quiet_one = await enroll_at(pool, clock, "branches", "quiet", plan="free")
        await wait_for(lambda: has_status(pool, active.id, "completed"))
        await wait_for(lambda: has_status(pool, quiet_one.id, "completed"))
    assert steps_sent(outbox, "active@example.com") == ["hello", "pro_only", "engaged"]
    assert steps_sent(outbox, "quiet@example.com") == ["hello"]
    skipped = [r for r in await executions(pool) if r["status"] == "skipped"]
    assert [(r["step_key"], r["reason"]) for r in skipped] == [("pro_only", "condition_false")]
    assert await enrollment_status(pool, quiet_one.id) == ("completed", "no_matching_transition")


async def test_no_matching_transition_can_fail_the_enrollment(
    dsn: str, pool: asyncpg.Pool, clock: ManualClock, outbox: Path, tmp_path: Path
) -> None:
    await apply_text(pool, BRANCHES.format(on_no_match="fail"))
    async with running_daemon(dsn, tmp_path, clock=clock):
        e = await enroll_at(pool, clock, "branches", "nobody")
        await wait_for(lambda: has_status(pool, e.id, "failed"))
    assert await enrollment_status(pool, e.id) == ("failed", "no_matching_transition")


async def test_a_condition_that_cannot_be_evaluated_fails_closed_and_is_counted(
    dsn: str, pool: asyncpg.Pool, clock: ManualClock, outbox: Path, tmp_path: Path
) -> None:
    await apply_text(
        pool,
        """
[sequence]
key = "typed"

[[steps]]
key = "maybe"
channel = "email"
when = "data.age > 30"
subject = "Hi"
text = "Hi"
""",
    )
    async with running_daemon(dsn, tmp_path, clock=clock) as daemon:
        e = await enroll_at(pool, clock, "typed", "t", age="forty")
        await wait_for(lambda: has_status(pool, e.id, "completed"))
        assert daemon.metrics.condition_errors._value.get() == 1
    (row,) = await executions(pool)
    assert (row["status"], row["reason"]) == ("skipped", "condition_false")
    assert outbox_messages(outbox) == []


# -- hooks through the daemon ------------------------------------------------------------------

HOOKED = """
[sequence]
key = "hooked"

[hooks.plan]
python = "hookmods:{fn}"
timeout = "2s"

[[steps]]
key = "offer"
channel = "email"
when = "hooks.plan.plan == 'pro'"
subject = "Offer for {{{{ hooks.plan.plan }}}} ({{{{ hooks.plan.step }}}})"
text = "Hi"
max_attempts = 2
"""


async def test_a_python_hook_feeds_the_step_condition_and_the_template(
    dsn: str, pool: asyncpg.Pool, clock: ManualClock, outbox: Path, tmp_path: Path
) -> None:
    await apply_text(pool, HOOKED.format(fn="plan_for"))
    async with running_daemon(dsn, tmp_path, clock=clock) as daemon:
        pro = await enroll_at(pool, clock, "hooked", "pro", plan="pro")
        free = await enroll_at(pool, clock, "hooked", "free", plan="free")
        await wait_for(lambda: has_status(pool, pro.id, "completed"))
        await wait_for(lambda: has_status(pool, free.id, "completed"))
        calls = daemon.metrics.hook_calls.labels(kind="python", result="ok")._value.get()
    assert [m["subject"] for m in outbox_messages(outbox)] == ["Offer for pro (offer/email)"]
    free_row = next(r for r in await executions(pool) if r["enrollment_id"] == free.id)
    assert (free_row["status"], free_row["reason"]) == ("skipped", "condition_false")
    assert calls == 2  # once per execution, though the step reads it three times


async def test_a_failing_hook_is_retried_then_fails_the_step_naming_the_hook(
    dsn: str, pool: asyncpg.Pool, clock: ManualClock, outbox: Path, tmp_path: Path
) -> None:
    await apply_text(pool, HOOKED.format(fn="raises"))
    async with running_daemon(dsn, tmp_path, clock=clock, retry_base="1m"):
        e = await enroll_at(pool, clock, "hooked", "h", plan="pro")
        row = await wait_for(_one_with(pool, "scheduled", attempt=1))
        assert "hook 'plan' (hookmods:raises) raised ValueError: no plan for h" in row["last_error"]
        clock.advance(timedelta(minutes=2))
        await wait_for(lambda: has_status(pool, e.id, "failed"))
    (row,) = await executions(pool)
    assert row["status"] == "failed"
    assert row["last_error"].startswith("gave up after 2 attempts: hook 'plan'")
    assert outbox_messages(outbox) == []


PLAIN = """
[sequence]
key = "plain"

[[steps]]
key = "hi"
channel = "email"
subject = "Hi"
text = "Hi"
"""


async def test_a_failed_read_gives_the_batch_back_before_any_of_it_is_sent(
    dsn: str,
    pool: asyncpg.Pool,
    clock: ManualClock,
    outbox: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The batch's suppression check fails after a step with hooks was already queued: that
    # one went out, the batch was given back, and it went out again.
    real, calls = store.suppressed, []

    async def fails_first(*args: Any, **kwargs: Any) -> Any:
        calls.append(len(args[1]))
        if len(calls) == 1:
            await anyio.wait_all_tasks_blocked()  # whatever was handed on has gone as far
            raise DatabaseError("connection lost")
        return await real(*args, **kwargs)

    monkeypatch.setattr(store, "suppressed", fails_first)
    await apply_text(pool, HOOKED.format(fn="plan_for"))
    await apply_text(pool, PLAIN)
    pro = await enroll_at(pool, clock, "hooked", "pro", plan="pro")
    plain = await enroll_at(pool, clock, "plain", "plain")
    async with running_daemon(dsn, tmp_path, clock=clock):
        await wait_for(lambda: has_status(pool, pro.id, "completed"))
        await wait_for(lambda: has_status(pool, plain.id, "completed"))
    assert calls[0] == 1  # the batch's check: the plain step (the hooked one checks its own)
    assert sorted(m["to"] for m in outbox_messages(outbox)) == [
        "plain@example.com",
        "pro@example.com",
    ]


def _one_with(pool: asyncpg.Pool, status: str, *, attempt: int):  # type: ignore[no-untyped-def]
    async def check() -> asyncpg.Record | None:
        rows = await executions(pool)
        if len(rows) == 1 and rows[0]["status"] == status and rows[0]["attempt"] == attempt:
            return rows[0]
        return None

    return check


async def test_python_hooks_are_imported_at_start_and_a_broken_one_is_named(
    dsn: str, pool: asyncpg.Pool, clock: ManualClock, tmp_path: Path
) -> None:
    await apply_text(pool, HOOKED.format(fn="no_such_function"))
    with structlog.testing.capture_logs() as logs:
        async with running_daemon(dsn, tmp_path, clock=clock):
            pass
    (entry,) = [e for e in logs if e["event"] == "python hook cannot be loaded"]
    assert entry["log_level"] == "error"
    assert entry["hook"] == "plan"
    assert "hookmods:no_such_function" in entry["error"]
