"""Shared rate-limit windows in Postgres: leasing slices of a budget, returning them, purging."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from dripd.db import store


@dataclass(frozen=True, slots=True)
class Queries:
    """The statements of sql/limits/."""

    acquire: str
    release: str
    purge: str


Q = store.load_statements(Queries, Path(__file__).with_name("sql") / "limits")


async def acquire(
    db: store.Executor, requests: Sequence[tuple[str, datetime, int, int]]
) -> list[int]:
    """Lease tokens for (bucket, window start, want, limit) requests in one statement; returns
    what each was granted, in request order: up to `want`, never more than the window has left
    of `limit` across every daemon (0 when it is spent). A (bucket, window start) appears once."""
    if not requests:
        return []
    keys = [(r[0], r[1]) for r in requests]
    if len(set(keys)) != len(keys):
        raise ValueError("acquire: each (bucket, window start) may be requested once")
    buckets, starts, wants, limits = (list(column) for column in zip(*requests, strict=True))
    with store.translated():
        async with store.acquire(db) as conn:
            rows = await conn.fetch(Q.acquire, buckets, starts, wants, limits)
    granted = {(r["bucket"], r["window_start"]): int(r["last_grant"]) for r in rows}
    return [granted[key] for key in keys]


async def release(db: store.Executor, unused: Sequence[tuple[str, datetime, int]]) -> None:
    """Give back unspent tokens, as (bucket, window start, count), to their windows."""
    if not unused:
        return
    buckets, starts, counts = (list(column) for column in zip(*unused, strict=True))
    with store.translated():
        async with store.acquire(db) as conn:
            await conn.execute(Q.release, buckets, starts, counts)


async def purge(db: store.Executor, before: datetime) -> int:
    """Delete the rows of windows that started before `before`; returns how many went.

    Rows carry no window length: pass `now - RateTable.longest_window` (or earlier), so that
    every row deleted belongs to a window that has ended.
    """
    with store.translated():
        async with store.acquire(db) as conn:
            status: str = await conn.execute(Q.purge, before)
    return int(status.rsplit(" ", 1)[-1])
