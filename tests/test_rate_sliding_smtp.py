"""A shared rate limit as a receiver sees it: two daemons send through one SMTP adapter, and
the sink counts arrivals in every sliding window."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
from support import (
    SmtpSink,
    add_adapter,
    apply_text,
    one_email,
    running_daemon,
    smtp_config,
    wait_for,
)

from dripd import api

# A 2 s window leaves 200 ms for sends to arrive unevenly (a 1 s window leaves 100 ms): on a
# loaded machine, the in-process sink has seen sends arrive up to half a second late.
LIMIT, WINDOW, MESSAGES = 5, 2.0, 40


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    s = SmtpSink().start()
    yield s
    s.stop()


def busiest(arrivals: list[float], length: float) -> int:
    """The most arrivals in any interval [t, t + length) that starts at an arrival."""
    times = sorted(arrivals)
    most, end = 0, 0
    for start, t in enumerate(times):
        while end < len(times) and times[end] < t + length:
            end += 1
        most = max(most, end - start)
    return most


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_two_daemons_never_deliver_more_than_the_limit_in_any_window(
    dsn: str, pool: asyncpg.Pool, sink: SmtpSink, tmp_path: Path
) -> None:
    await apply_text(pool, one_email("hello"))
    await add_adapter(
        pool, name="smtp", channel="email", provider="smtp", config=smtp_config(sink.port)
    )
    sections = {"rate_limits": {"adapter": {"smtp": f"{LIMIT}/{WINDOW:g}s"}}}
    for n in range(MESSAGES):
        await api.enroll(
            pool,
            tenant=None,
            sequence_key="hello",
            subscriber_id=f"s{n:02}",
            data={"email": f"s{n:02}@example.com", "first_name": "Ann"},
            now=datetime.now(UTC),
        )
    async with contextlib.AsyncExitStack() as stack:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            await stack.enter_async_context(
                running_daemon(dsn, tmp_path / name, sections=sections, concurrency=20)
            )
        await wait_for(lambda: sink.count() == MESSAGES, timeout=120)
    assert sink.count() == MESSAGES
    # Every arrival starts a window: none holds more than the limit.
    assert busiest(sink.arrivals, WINDOW) <= LIMIT, sorted(sink.arrivals)
    # Waiting for the limit spent no attempt.
    attempts = await pool.fetch("SELECT DISTINCT attempt FROM dripd.step_executions")
    assert [r["attempt"] for r in attempts] == [0]
