"""A shared rate limit as a receiver sees it: two daemons send through one SMTP adapter, and
the sink counts arrivals in every sliding window.

What dripd guarantees (dripd.rules.limiter): the tokens granted in any `span` consecutive
slices (one `period`) never pass the limit, so a receiver never counts more than the limit
in a window while the delays from a token's slice to the message's arrival differ by no
more than the bucket's `tolerance`. The test records each message's slice and arrival and
checks both: the first exactly, the second in windows shortened by however much a loaded
machine made the delays differ beyond the tolerance (on an idle machine, the full window).
Nothing here depends on how fast the machine is."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

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
from dripd.engine.pipeline import Pipeline
from dripd.rules.limiter import Bucket, Limiter

LIMIT, WINDOW, MESSAGES = 5, 2.0, 40
BUCKET = Bucket(key="rate:adapter:smtp", limit=LIMIT, window=timedelta(seconds=WINDOW))


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


def record_token_slices(monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """execution id → the start (epoch seconds) of the slice whose token its send spent."""
    slices: dict[str, float] = {}
    delivering: dict[asyncio.Task[Any] | None, str] = {}
    real_deliver, real_take = Pipeline._deliver, Limiter.take

    async def deliver(self: Pipeline, p: Any) -> Any:
        delivering[asyncio.current_task()] = str(p.execution.id)
        try:
            return await real_deliver(self, p)
        finally:
            delivering.pop(asyncio.current_task(), None)

    async def take(self: Limiter, buckets: Sequence[Bucket], now: datetime) -> datetime | None:
        retry_at = await real_take(self, buckets, now)
        if retry_at is None:  # granted: the tokens are those of the hold's current slice
            (bucket,) = buckets
            hold = self._holds[(bucket.key, bucket.slice)]
            slices[delivering[asyncio.current_task()]] = hold.at.timestamp()
        return retry_at

    monkeypatch.setattr(Pipeline, "_deliver", deliver)
    monkeypatch.setattr(Limiter, "take", take)
    return slices


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_two_daemons_never_deliver_more_than_the_limit_in_any_window(
    dsn: str, pool: asyncpg.Pool, sink: SmtpSink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slices = record_token_slices(monkeypatch)
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
    arrived = {
        str(m["Message-ID"]).strip("<>").split(".")[0]: at
        for m, at in zip(sink.messages, sink.arrivals, strict=True)
    }
    assert arrived.keys() == slices.keys()
    # The two daemons together: no period of slices granted more than the limit.
    assert busiest(list(slices.values()), BUCKET.period.total_seconds()) <= LIMIT
    # As the receiver counts: every arrival starts a window, none holds more than the limit.
    # The delay from a token's slice to the arrival covers the rest of the slice, the send
    # and a loaded machine's scheduling; the limiter keeps `tolerance` for its differences.
    delays = [arrived[e] - slices[e] for e in slices]
    spread = max(delays) - min(delays)
    excess = max(0.0, spread - BUCKET.tolerance.total_seconds())
    print(f"\ndelays from slice to arrival: {min(delays):.3f}-{max(delays):.3f}s")
    assert busiest(sink.arrivals, WINDOW - excess) <= LIMIT, sorted(sink.arrivals)
    # Waiting for the limit spent no attempt.
    attempts = await pool.fetch("SELECT DISTINCT attempt FROM dripd.step_executions")
    assert [r["attempt"] for r in attempts] == [0]
