"""The per-adapter circuit breaker: its state machine, shared by daemons through a real Postgres."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import datetime, timedelta
from functools import partial
from typing import Any

import asyncpg
import pytest
from structlog.testing import capture_logs
from support import add_adapter

from dripd import config
from dripd.clock import ManualClock
from dripd.db import circuits
from dripd.errors import ConfigError
from dripd.metrics import Metrics
from dripd.rules.breaker import Breaker, CircuitState, scrub

SECRET = "hunter2-Zq8"


def make_breaker(
    pool: asyncpg.Pool,
    clock: ManualClock,
    daemon_id: str,
    *,
    metrics: Metrics | None = None,
    seed: int = 7,
    **settings: Any,
) -> Breaker:
    return Breaker(
        load=partial(circuits.load, pool),
        trip=partial(circuits.trip, pool),
        probe=partial(circuits.probe, pool),
        close=partial(circuits.close, pool),
        clock=clock,
        settings=config.Circuit(**settings),
        metrics=metrics,
        daemon_id=daemon_id,
        rng=random.Random(seed),
    )


async def relay(pool: asyncpg.Pool, name: str = "relay", tenant: str | None = None) -> uuid.UUID:
    return await add_adapter(
        pool,
        name=name,
        channel="email",
        provider="outbox",
        config={"path": "/nonexistent/outbox.jsonl", "from": "drip@example.com"},
        tenant=tenant,
        default=False,
    )


async def row(pool: asyncpg.Pool, adapter_id: uuid.UUID) -> asyncpg.Record:
    record = await pool.fetchrow(
        "SELECT circuit_state, circuit_opened_at, circuit_retry_at, circuit_open_for,"
        " circuit_reason, circuit_probe_by, circuit_probe_until"
        " FROM dripd.channel_adapters WHERE id = $1",
        adapter_id,
    )
    assert record is not None
    return record


async def trip(breaker: Breaker, adapter_id: uuid.UUID, now: datetime, n: int = 3) -> datetime:
    retry_at = now
    for _ in range(n):
        retry_at = await breaker.record_failure(adapter_id, now, "connection refused")
    return retry_at


def metric(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


async def test_the_circuit_opens_after_n_provider_wide_failures(pool: asyncpg.Pool) -> None:
    adapter_id = await relay(pool, tenant="acme")
    clock = ManualClock()
    metrics = Metrics()
    breaker = make_breaker(pool, clock, "d1", metrics=metrics, failures=3, open_for="10s")
    now = clock.now()

    for n in (1, 2):
        retry_at = await breaker.record_failure(adapter_id, now, "connection refused")
        # Still closed: the execution comes back after a second or so, and nothing is shared.
        assert now + timedelta(seconds=0.8 * n) <= retry_at <= now + timedelta(seconds=1.2 * n)
        assert breaker.budget(adapter_id, now) is None
        assert (await row(pool, adapter_id))["circuit_state"] == "closed"

    with capture_logs() as logs:
        retry_at = await breaker.record_failure(adapter_id, now, "smtp relay: connection refused")

    stored = await row(pool, adapter_id)
    assert stored["circuit_state"] == "open"
    assert stored["circuit_opened_at"] == now
    assert stored["circuit_retry_at"] == retry_at
    assert stored["circuit_open_for"] == timedelta(seconds=10)
    assert stored["circuit_reason"] == "smtp relay: connection refused"
    assert now + timedelta(seconds=8) <= retry_at <= now + timedelta(seconds=12)
    assert breaker.budget(adapter_id, now) == 0
    assert breaker.retry_at(adapter_id) == retry_at
    assert breaker.wake_at() == retry_at
    [opened] = [e for e in logs if e["event"] == "circuit opened"]
    assert opened["log_level"] == "warning"
    assert opened["adapter"] == "acme/relay"
    assert metric(metrics, "dripd_circuit_state", adapter="acme/relay") == 1
    assert metric(metrics, "dripd_circuit_transitions_total", adapter="acme/relay", to="open") == 1
    [status] = breaker.status()
    assert status["adapter"] == "acme/relay"
    assert status["adapter_id"] == str(adapter_id)
    assert (status["state"], status["reason"]) == ("open", "smtp relay: connection refused")
    assert status["since"] == now.isoformat()
    assert status["retry_at"] == retry_at.isoformat()


async def test_a_success_in_between_starts_the_count_over(pool: asyncpg.Pool) -> None:
    adapter_id = await relay(pool)
    clock = ManualClock()
    breaker = make_breaker(pool, clock, "d1", failures=3)
    now = clock.now()
    for _ in range(3):
        await breaker.record_failure(adapter_id, now, "timed out")
        await breaker.record_failure(adapter_id, now, "timed out")
        await breaker.record_success(adapter_id, now)
    assert breaker.budget(adapter_id, now) is None
    assert breaker.status() == []
    assert (await row(pool, adapter_id))["circuit_state"] == "closed"


async def test_failures_at_the_same_time_open_the_circuit_once(pool: asyncpg.Pool) -> None:
    adapter_id = await relay(pool)
    clock = ManualClock()
    metrics = Metrics()
    breaker = make_breaker(pool, clock, "d1", metrics=metrics, failures=3)
    now = clock.now()
    answers = await asyncio.gather(
        *(breaker.record_failure(adapter_id, now, "connection reset") for _ in range(20))
    )
    retry_at = (await row(pool, adapter_id))["circuit_retry_at"]
    assert metric(metrics, "dripd_circuit_transitions_total", adapter="relay", to="open") == 1
    # The two failures before the third retry soon; every later one waits for the circuit.
    assert sorted(answers)[2:] == [retry_at] * 18


async def test_an_open_circuit_defers_every_daemon_without_counting(pool: asyncpg.Pool) -> None:
    adapter_id = await relay(pool)
    clock = ManualClock()
    a = make_breaker(pool, clock, "a")
    b = make_breaker(pool, clock, "b", seed=8)
    now = clock.now()
    retry_at = await trip(a, adapter_id, now)
    assert b.budget(adapter_id, now) is None  # b has not heard yet
    await b.poll(now)
    assert b.budget(adapter_id, now) == 0
    assert b.retry_at(adapter_id) == retry_at
    clock.advance(1)
    assert await b.record_failure(adapter_id, clock.now(), "timed out") == retry_at
    assert (await row(pool, adapter_id))["circuit_reason"] == "connection refused"


async def test_only_one_daemon_of_many_gets_the_probe(pool: asyncpg.Pool) -> None:
    adapter_id = await relay(pool)
    clock = ManualClock()
    daemons = [make_breaker(pool, clock, f"d{n}", seed=n) for n in range(6)]
    retry_at = await trip(daemons[0], adapter_id, clock.now())

    clock.set(retry_at - timedelta(milliseconds=1))
    await asyncio.gather(*(d.poll(clock.now()) for d in daemons))
    assert [d.budget(adapter_id, clock.now()) for d in daemons] == [0] * 6

    clock.set(retry_at)
    await asyncio.gather(*(d.poll(clock.now()) for d in daemons))
    budgets = [d.budget(adapter_id, clock.now()) for d in daemons]
    assert sorted(budgets) == [0] * 5 + [1]
    prober = daemons[budgets.index(1)]
    stored = await row(pool, adapter_id)
    assert stored["circuit_state"] == "half_open"
    assert stored["circuit_probe_by"] == f"d{budgets.index(1)}"
    assert stored["circuit_probe_until"] == retry_at + timedelta(seconds=30)

    # One send: the probe is handed out once.
    assert prober.take_probe(adapter_id, clock.now())
    assert prober.budget(adapter_id, clock.now()) == 0
    assert not prober.take_probe(adapter_id, clock.now())
    prober.release_probe(adapter_id)  # its row was not sent after all
    assert prober.budget(adapter_id, clock.now()) == 1


async def test_the_probes_success_closes_the_circuit_for_every_daemon(pool: asyncpg.Pool) -> None:
    adapter_id = await relay(pool)
    clock = ManualClock()
    metrics = Metrics()
    a = make_breaker(pool, clock, "a", metrics=metrics)
    b = make_breaker(pool, clock, "b")
    retry_at = await trip(b, adapter_id, clock.now())
    await a.poll(clock.now())
    clock.set(retry_at)
    await a.poll(clock.now())
    await b.poll(clock.now())
    assert (a.budget(adapter_id, clock.now()), b.budget(adapter_id, clock.now())) == (1, 0)
    assert [s["state"] for s in a.status()] == ["half_open"]
    assert metric(metrics, "dripd_circuit_state", adapter="relay") == 2

    # A success that is not the probe's (b holds none) closes nothing.
    await b.record_success(adapter_id, clock.now())
    assert (await row(pool, adapter_id))["circuit_state"] == "half_open"

    assert a.take_probe(adapter_id, clock.now())
    clock.advance(2)
    with capture_logs() as logs:
        await a.record_success(adapter_id, clock.now())
    stored = await row(pool, adapter_id)
    assert stored["circuit_state"] == "closed"
    assert stored["circuit_reason"] is None
    assert stored["circuit_probe_by"] is None
    assert a.budget(adapter_id, clock.now()) is None
    assert a.status() == []
    assert [e["event"] for e in logs] == ["circuit closed"]
    assert metric(metrics, "dripd_circuit_state", adapter="relay") == 0
    assert metric(metrics, "dripd_circuit_transitions_total", adapter="relay", to="closed") == 1
    assert metric(metrics, "dripd_circuit_transitions_total", adapter="relay", to="half_open") == 1

    assert b.budget(adapter_id, clock.now()) == 0  # until it polls
    await b.poll(clock.now())
    assert b.budget(adapter_id, clock.now()) is None
    assert b.retry_at(adapter_id) is None


async def test_a_failed_probe_doubles_the_backoff_up_to_the_cap(pool: asyncpg.Pool) -> None:
    adapter_id = await relay(pool)
    clock = ManualClock()
    breaker = make_breaker(pool, clock, "d1", open_for="5s", max_open_for="30s")
    opened_at = clock.now()
    retry_at = await trip(breaker, adapter_id, opened_at)
    backoffs = []
    for _ in range(5):
        clock.set(retry_at)
        await breaker.poll(clock.now())
        assert breaker.take_probe(adapter_id, clock.now())
        now = clock.now()
        retry_at = await breaker.record_failure(adapter_id, now, "421 service not available")
        stored = await row(pool, adapter_id)
        assert stored["circuit_state"] == "open"
        assert stored["circuit_opened_at"] == opened_at  # open since the first trip
        assert stored["circuit_retry_at"] == retry_at
        assert stored["circuit_probe_by"] is None
        open_for = stored["circuit_open_for"]
        assert open_for * 0.8 <= retry_at - now <= open_for * 1.2
        assert breaker.budget(adapter_id, now) == 0
        backoffs.append(open_for.total_seconds())
    assert backoffs == [10, 20, 30, 30, 30]

    # Recovery starts the backoff over.
    clock.set(retry_at)
    await breaker.poll(clock.now())
    await breaker.record_success(adapter_id, clock.now())
    await trip(breaker, adapter_id, clock.now())
    assert (await row(pool, adapter_id))["circuit_open_for"] == timedelta(seconds=5)


async def test_a_dead_probers_lease_runs_out_and_another_daemon_probes(
    pool: asyncpg.Pool,
) -> None:
    adapter_id = await relay(pool)
    clock = ManualClock()
    dead = make_breaker(pool, clock, "dead", probe_timeout="20s")
    live = make_breaker(pool, clock, "live", probe_timeout="20s")
    retry_at = await trip(live, adapter_id, clock.now())
    clock.set(retry_at)
    await dead.poll(clock.now())  # it takes the probe, and then is never heard of again
    assert dead.take_probe(adapter_id, clock.now())

    clock.advance(19)
    await live.poll(clock.now())
    assert live.budget(adapter_id, clock.now()) == 0
    assert live.retry_at(adapter_id) == retry_at + timedelta(seconds=20)  # the lease's end

    clock.advance(1)
    await live.poll(clock.now())
    assert live.budget(adapter_id, clock.now()) == 1
    stored = await row(pool, adapter_id)
    assert (stored["circuit_state"], stored["circuit_probe_by"]) == ("half_open", "live")

    # The late prober's word no longer counts: only the probe's holder decides.
    await dead.record_success(adapter_id, clock.now())
    assert (await row(pool, adapter_id))["circuit_probe_by"] == "live"
    assert dead.budget(adapter_id, clock.now()) == 0
    deferred_to = await dead.record_failure(adapter_id, clock.now(), "timed out")
    assert deferred_to == clock.now() + timedelta(seconds=20)  # the live probe's lease
    assert (await row(pool, adapter_id))["circuit_state"] == "half_open"

    await live.record_success(adapter_id, clock.now())
    assert (await row(pool, adapter_id))["circuit_state"] == "closed"


async def test_opening_notifies_every_daemon(pool: asyncpg.Pool, dsn: str) -> None:
    adapter_id = await relay(pool)
    clock = ManualClock()
    breaker = make_breaker(pool, clock, "d1")
    listener = await asyncpg.connect(dsn)
    payloads: asyncio.Queue[str] = asyncio.Queue()
    try:
        await listener.add_listener("dripd_adapters", lambda *args: payloads.put_nowait(args[-1]))
        retry_at = await trip(breaker, adapter_id, clock.now())
        assert await asyncio.wait_for(payloads.get(), 10) == f"circuit:{adapter_id}"
        clock.set(retry_at)
        await breaker.poll(clock.now())
        await breaker.record_success(adapter_id, clock.now())
        assert await asyncio.wait_for(payloads.get(), 10) == f"circuit:{adapter_id}"
    finally:
        await listener.close()


@pytest.mark.parametrize(
    "error",
    [
        f"smtp://mailer:{SECRET}@relay.example.com:587: connection refused",
        f"POST failed: 503, Authorization: Bearer {SECRET}",
        f"login failed (password={SECRET})",
        f'{{"api_key": "{SECRET}", "error": "upstream timeout"}}',
        f"x-api-key: {SECRET}\nserver said 502",
    ],
)
async def test_a_circuits_reason_never_contains_a_credential(
    pool: asyncpg.Pool, error: str
) -> None:
    adapter_id = await relay(pool)
    clock = ManualClock()
    breaker = make_breaker(pool, clock, "d1", failures=1)
    with capture_logs() as logs:
        await breaker.record_failure(adapter_id, clock.now(), error)
    reason = (await row(pool, adapter_id))["circuit_reason"]
    assert reason
    assert SECRET not in reason
    assert "***" in reason
    assert SECRET not in str(breaker.status())
    assert SECRET not in str(logs)


def test_scrub_keeps_an_ordinary_error_and_bounds_its_length() -> None:
    plain = "smtp 127.0.0.1:2525: connection failed: [Errno 111] Connect call failed"
    assert scrub(plain) == plain
    assert scrub("535 5.7.8 Authentication credentials invalid").endswith("credentials invalid")
    assert len(scrub("x" * 5000)) == 500
    assert scrub("a\n  b") == "a b"


async def test_a_disabled_or_unknown_adapter_never_opens(pool: asyncpg.Pool) -> None:
    adapter_id = await relay(pool)
    await pool.execute(
        "UPDATE dripd.channel_adapters SET enabled = false WHERE id = $1", adapter_id
    )
    clock = ManualClock()
    breaker = make_breaker(pool, clock, "d1", failures=1)
    now = clock.now()
    for target in (adapter_id, uuid.uuid4()):
        retry_at = await breaker.record_failure(target, now, "connection refused")
        assert now < retry_at <= now + timedelta(seconds=6)
        assert breaker.budget(target, now) is None
    assert (await row(pool, adapter_id))["circuit_state"] == "closed"


async def test_the_schema_refuses_an_inconsistent_circuit(pool: asyncpg.Pool) -> None:
    adapter_id = await relay(pool)
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute(
            "UPDATE dripd.channel_adapters SET circuit_state = 'open' WHERE id = $1", adapter_id
        )
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute(
            "UPDATE dripd.channel_adapters SET circuit_state = 'ajar' WHERE id = $1", adapter_id
        )


def test_circuit_config_defaults_and_checks() -> None:
    section = config.from_dict({}).circuit
    assert (section.failures, section.open_for, section.max_open_for, section.probe_timeout) == (
        3,
        "5s",
        "5m",
        "30s",
    )
    for bad, message in [
        ({"failures": 0}, "circuit.failures"),
        ({"open_for": "soon"}, "circuit.open_for"),
        ({"open_for": "0s"}, "circuit.open_for"),
        ({"open_for": "1m", "max_open_for": "30s"}, "circuit.max_open_for"),
        ({"probe_timeout": "100ms"}, "circuit.probe_timeout"),
        ({"probes": 2}, "circuit.probes: unknown key"),
    ]:
        with pytest.raises(ConfigError, match=message):
            config.from_dict({"circuit": bad})


def test_the_states_mirror_the_schema() -> None:
    assert {s.value for s in CircuitState} == {"closed", "open", "half_open"}
