"""The Python API against a real database: transactions, idempotency, tenant scope, states."""

from __future__ import annotations

import uuid

import asyncpg
import pytest
from support import apply_text, one_email

from dripd import api
from dripd.errors import ConfigError, Conflict, NotFound


async def test_enroll_commits_and_rolls_back_with_the_callers_transaction(
    conn: asyncpg.Connection,
) -> None:
    await apply_text(conn, one_email("welcome"))
    await conn.execute("CREATE TABLE signups (email text primary key)")

    tx = conn.transaction()
    await tx.start()
    await conn.execute("INSERT INTO signups VALUES ('a@example.com')")
    rolled = await api.enroll(
        conn,
        tenant=None,
        sequence_key="welcome",
        subscriber_id="a",
        data={"email": "a@example.com"},
    )
    await tx.rollback()
    assert await conn.fetchval("SELECT count(*) FROM dripd.enrollments") == 0
    assert await conn.fetchval("SELECT count(*) FROM dripd.step_executions") == 0

    async with conn.transaction():
        await conn.execute("INSERT INTO signups VALUES ('a@example.com')")
        kept = await api.enroll(
            conn,
            tenant=None,
            sequence_key="welcome",
            subscriber_id="a",
            data={"email": "a@example.com"},
        )
    assert kept.id != rolled.id
    assert await conn.fetchval("SELECT count(*) FROM dripd.enrollments") == 1
    assert await conn.fetchval("SELECT count(*) FROM dripd.step_executions") == 1


async def test_enrolling_twice_returns_the_existing_enrollment(pool: asyncpg.Pool) -> None:
    await apply_text(pool, one_email("welcome"))
    first = await api.enroll(
        pool,
        tenant=None,
        sequence_key="welcome",
        subscriber_id="a",
        data={"email": "a@example.com", "first_name": "A"},
    )
    again = await api.enroll(
        pool,
        tenant=None,
        sequence_key="welcome",
        subscriber_id="a",
        data={"email": "other@example.com"},
    )
    assert first.created is True
    assert again.created is False
    assert again.id == first.id
    assert again.data == {"email": "a@example.com", "first_name": "A"}
    assert first.next_step == "hello"
    assert await pool.fetchval("SELECT count(*) FROM dripd.step_executions") == 1


async def test_reenroll_policy_never_refuses_a_second_enrollment(pool: asyncpg.Pool) -> None:
    await apply_text(pool, one_email("welcome"))
    first = await api.enroll(pool, tenant=None, sequence_key="welcome", subscriber_id="a")
    await api.unenroll(pool, tenant=None, enrollment_id=first.id)
    with pytest.raises(Conflict, match="reenroll policy is 'never'"):
        await api.enroll(pool, tenant=None, sequence_key="welcome", subscriber_id="a")
    assert await pool.fetchval("SELECT count(*) FROM dripd.enrollments") == 1


async def test_reenroll_always_allows_a_new_enrollment(pool: asyncpg.Pool) -> None:
    await apply_text(
        pool,
        one_email("welcome").replace('key = "welcome"', 'key = "welcome"\nreenroll = "always"'),
    )
    first = await api.enroll(pool, tenant=None, sequence_key="welcome", subscriber_id="a")
    await api.unenroll(pool, tenant=None, enrollment_id=first.id)
    second = await api.enroll(pool, tenant=None, sequence_key="welcome", subscriber_id="a")
    assert second.id != first.id
    assert second.created


async def test_tenant_scope_is_enforced(pool: asyncpg.Pool) -> None:
    await apply_text(pool, one_email("welcome"))  # a global sequence
    await apply_text(
        pool,
        one_email("acme-only").replace('key = "acme-only"', 'key = "acme-only"\ntenant = "acme"'),
    )
    acme = await api.enroll(pool, tenant="acme", sequence_key="welcome", subscriber_id="a")
    assert acme.tenant_key == "acme"  # a global sequence serves a tenant, which owns the enrollment
    with pytest.raises(NotFound):
        await api.get_enrollment(pool, tenant="globex", enrollment_id=acme.id)
    with pytest.raises(NotFound):
        await api.get_enrollment(pool, tenant=None, enrollment_id=acme.id)
    with pytest.raises(NotFound, match="no sequence 'acme-only' for tenant globex"):
        await api.enroll(pool, tenant="globex", sequence_key="acme-only", subscriber_id="a")
    with pytest.raises(NotFound):
        await api.pause(pool, tenant="globex", enrollment_id=acme.id)
    got = await api.get_enrollment(pool, tenant="acme", enrollment_id=acme.id)
    assert got.status == "active"


async def test_bad_input_gets_a_clear_error(pool: asyncpg.Pool) -> None:
    await apply_text(pool, one_email("welcome"))
    with pytest.raises(ConfigError, match="subscriber_id"):
        await api.enroll(pool, tenant=None, sequence_key="welcome", subscriber_id=" ")
    with pytest.raises(ConfigError, match=r"data\.timezone: 'Mars/Base' is not a known"):
        await api.enroll(
            pool,
            tenant=None,
            sequence_key="welcome",
            subscriber_id="a",
            data={"timezone": "Mars/Base"},
        )
    with pytest.raises(ConfigError, match="tenant: must be a non-empty string"):
        await api.enroll(pool, tenant="", sequence_key="welcome", subscriber_id="a")
    with pytest.raises(ConfigError, match="tenant"):
        await api.track_event(pool, tenant=" ", subscriber_id="a", key="k")
    with pytest.raises(NotFound, match="no sequence 'nope'"):
        await api.enroll(pool, tenant=None, sequence_key="nope", subscriber_id="a")
    with pytest.raises(ConfigError, match="reason"):
        await api.suppress(pool, tenant=None, channel="email", address="a@x.io", reason="bored")
    with pytest.raises(NotFound):
        await api.get_enrollment(pool, tenant=None, enrollment_id=uuid.uuid4())
    assert await pool.fetchval("SELECT count(*) FROM dripd.enrollments") == 0


async def test_state_moves_are_checked(pool: asyncpg.Pool) -> None:
    await apply_text(pool, one_email("welcome"))
    e = await api.enroll(pool, tenant=None, sequence_key="welcome", subscriber_id="a")
    with pytest.raises(Conflict, match="is active; cannot move it to active"):
        await api.resume(pool, tenant=None, enrollment_id=e.id)
    paused = await api.pause(pool, tenant=None, enrollment_id=e.id)
    assert paused.status == "paused"
    assert paused.next_step == "hello"  # held, not cancelled
    held = await pool.fetchrow("SELECT due_at, held_due_at FROM dripd.step_executions")
    assert held["held_due_at"] is not None
    assert held["due_at"].year == 9999  # 'infinity': never claimable while paused
    cancelled = await api.unenroll(pool, tenant=None, enrollment_id=e.id)
    assert cancelled.status == "cancelled"
    assert cancelled.next_step is None
    with pytest.raises(Conflict, match="is cancelled"):
        await api.pause(pool, tenant=None, enrollment_id=e.id)


async def test_track_event_is_idempotent_by_id(pool: asyncpg.Pool) -> None:
    one = await api.track_event(
        pool,
        tenant="acme",
        subscriber_id="a",
        key="activated",
        data={"plan": "pro"},
        idempotency_id="evt-1",
    )
    two = await api.track_event(
        pool, tenant="acme", subscriber_id="a", key="activated", idempotency_id="evt-1"
    )
    other_tenant = await api.track_event(
        pool, tenant="globex", subscriber_id="a", key="activated", idempotency_id="evt-1"
    )
    untagged = [
        await api.track_event(pool, tenant="acme", subscriber_id="a", key="x") for _ in range(2)
    ]
    assert one.created
    assert not two.created
    assert two.id == one.id
    assert other_tenant.created
    assert other_tenant.id != one.id
    assert untagged[0].id != untagged[1].id
    assert await pool.fetchval("SELECT count(*) FROM dripd.events") == 4


async def test_suppress_normalizes_any_spelling(pool: asyncpg.Pool) -> None:
    first = await api.suppress(pool, tenant=None, channel="email", address="  Ada@Example.COM ")
    again = await api.suppress(pool, tenant=None, channel="email", address="ada@example.com")
    phone = await api.suppress(pool, tenant="acme", channel="sms", address="+1 (555) 010-0001")
    assert first.address == "ada@example.com"
    assert first.created
    assert not again.created
    assert phone.address == "+15550100001"
    assert await pool.fetchval("SELECT count(*) FROM dripd.suppressions") == 2
