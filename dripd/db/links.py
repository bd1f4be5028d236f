"""Short links of sent messages (table dripd.short_links), and clicks on dripd's own."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final, Literal

import asyncpg

from dripd.db import store
from dripd.errors import Conflict

_SQL_DIR = Path(__file__).with_name("sql") / "links"

#: The unique constraint on dripd's codes (Postgres names a column's UNIQUE so).
CODE_KEY: Final = "short_links_code_key"


@dataclass(frozen=True, slots=True)
class LinkQueries:
    """The statements of this module, one file each in sql/links/."""

    links_for: str
    insert_links: str
    click: str


Q = store.load_statements(LinkQueries, _SQL_DIR)


class CodeTaken(Conflict):
    """A new link's code is another link's already: make new codes and insert again."""


@dataclass(frozen=True, slots=True, kw_only=True)
class _Stored:
    destination: str
    short_url: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Click:
    """A click on a known code: where it redirects, and whether a `clicked` event was written."""

    destination: str
    recorded: bool


async def links_for(
    db: store.Executor,
    execution_id: uuid.UUID,
    provider: Literal["dripd", "webhook"],
    destinations: Sequence[str],
) -> dict[str, str]:
    """The short URL (value) of each of `destinations` (key) that execution `execution_id`
    has a `provider` link for already; others are left out. Raises DripdError when the
    database fails."""
    with store.translated():
        async with store.acquire(db) as conn:
            rows = await conn.fetch(Q.links_for, execution_id, provider, list(destinations))
    return _urls(rows)


async def insert_dripd_links(
    db: store.Executor,
    execution_id: uuid.UUID,
    tenant: str | None,
    rows: Sequence[tuple[str, str, str, bool]],
) -> dict[str, str]:
    """Store dripd's links `(destination, code, short_url, track)` of an execution, in one
    statement; destinations must be distinct. Returns the stored short URL of every
    destination given: the new one, or the one a previous or concurrent attempt stored
    (its row is kept, one per (execution, provider, destination)).

    Raises CodeTaken when a code is another link's (insert again with new codes), other
    DripdErrors when the database fails."""
    return await _insert(
        db,
        execution_id,
        tenant,
        "dripd",
        [d for d, _, _, _ in rows],
        [c for _, c, _, _ in rows],
        [u for _, _, u, _ in rows],
        [t for _, _, _, t in rows],
    )


async def insert_webhook_links(
    db: store.Executor,
    execution_id: uuid.UUID,
    tenant: str | None,
    rows: Sequence[tuple[str, str, bool]],
) -> dict[str, str]:
    """`insert_dripd_links` for the `webhook` shortener's links `(destination, short_url,
    track)`, which have no code. Raises DripdError when the database fails."""
    return await _insert(
        db,
        execution_id,
        tenant,
        "webhook",
        [d for d, _, _ in rows],
        [None] * len(rows),
        [u for _, u, _ in rows],
        [t for _, _, t in rows],
    )


async def _insert(
    db: store.Executor,
    execution_id: uuid.UUID,
    tenant: str | None,
    provider: str,
    destinations: list[str],
    codes: list[str | None],
    urls: list[str],
    tracks: list[bool],
) -> dict[str, str]:
    with store.translated():
        async with store.acquire(db) as conn:
            try:
                stored = await conn.fetch(
                    Q.insert_links,
                    execution_id,
                    tenant,
                    provider,
                    destinations,
                    codes,
                    urls,
                    tracks,
                )
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name == CODE_KEY:
                    raise CodeTaken() from exc
                raise
    return _urls(stored)


async def click(db: store.Executor, code: str, *, now: datetime, record: bool) -> Click | None:
    """Follow dripd's short link `code`, in one statement: None when no link has it, else
    its destination; with `record`, a tracked link (not a `src` one) also gets a `clicked`
    message event on its execution, at `now`, with `data.url` the destination (every click
    counts: two clicks are two events). Raises DripdError when the database fails."""
    with store.translated():
        async with store.acquire(db) as conn:
            row = await conn.fetchrow(Q.click, code, now, record)
    return None if row is None else store.from_record(Click, row)


def _urls(rows: Sequence[asyncpg.Record]) -> dict[str, str]:
    return {r.destination: r.short_url for r in (store.from_record(_Stored, row) for row in rows)}
