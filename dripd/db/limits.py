"""Shared rate-limit slices in Postgres: leasing tokens of a budget, returning them, purging."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from dripd.db import store
from dripd.rules.limiter import Grant, Request, Unused


@dataclass(frozen=True, slots=True)
class Queries:
    """The statements of sql/limits/."""

    acquire: str
    release: str
    purge: str


Q = store.load_statements(Queries, Path(__file__).with_name("sql") / "limits")


async def acquire(db: store.Executor, requests: Sequence[Request]) -> list[Grant]:
    """Lease tokens for every request in one statement (see `Request`); returns a `Grant`
    per request, in request order: up to `want` tokens, never so many that `span`
    consecutive slices of the bucket would grant more than `limit` across every daemon (0
    when the bucket is spent). Each request's `back` tokens are given back first. A
    (bucket, slice) appears once (ValueError otherwise)."""
    if not requests:
        return []
    keys = [(r.bucket, r.slice) for r in requests]
    if len(set(keys)) != len(keys):
        raise ValueError("acquire: each (bucket, slice) may be requested once")
    with store.translated():
        async with store.acquire(db) as conn:
            rows = await conn.fetch(
                Q.acquire,
                [r.bucket for r in requests],
                [r.slice for r in requests],
                [r.at for r in requests],
                [r.want for r in requests],
                [r.limit for r in requests],
                [r.span for r in requests],
                [r.back_at for r in requests],
                [r.back for r in requests],
            )
    grants = {
        (row["bucket"], row["slice"]): Grant(
            granted=int(row["last_grant"]),
            start_at=row["start_at"],
            grants=tuple(int(g) for g in row["grants"]),
        )
        for row in rows
    }
    return [grants[key] for key in keys]


async def release(db: store.Executor, unused: Sequence[Unused]) -> None:
    """Give back unspent tokens to the slices they were leased in (see `Unused`)."""
    if not unused:
        return
    with store.translated():
        async with store.acquire(db) as conn:
            await conn.execute(
                Q.release,
                [u.bucket for u in unused],
                [u.slice for u in unused],
                [u.at for u in unused],
                [u.count for u in unused],
            )


async def purge(db: store.Executor, before: datetime) -> int:
    """Delete the rows of buckets whose newest slice ended before `before`; returns how
    many went.

    Rows carry no window length: pass `now - RateTable.longest_window` (or earlier), so that
    every row deleted belongs to a bucket that limits nothing any more.
    """
    with store.translated():
        async with store.acquire(db) as conn:
            status: str = await conn.execute(Q.purge, before)
    return int(status.rsplit(" ", 1)[-1])
