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
class _StoredOf:
    execution_id: uuid.UUID
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


#: A link to store: (execution id, tenant, destination, code or None, short URL, track).
LinkRow = tuple[uuid.UUID, str | None, str, str | None, str, bool]


async def insert_links(
    db: store.Executor, provider: Literal["dripd", "webhook"], rows: Sequence[LinkRow]
) -> dict[tuple[uuid.UUID, str], str]:
    """Store `provider` links of one or more executions in one statement (destinations
    distinct per execution; `webhook` links have no code). Returns the stored short URL of
    every (execution id, destination) given: the new one, or the one a previous or
    concurrent attempt stored (its row is kept, one per (execution, provider, destination)).

    Raises CodeTaken when a code is another link's (insert again with new codes), other
    DripdErrors when the database fails."""
    with store.translated():
        async with store.acquire(db) as conn:
            try:
                stored = await conn.fetch(
                    Q.insert_links,
                    [r[0] for r in rows],
                    [r[1] for r in rows],
                    provider,
                    [r[2] for r in rows],
                    [r[3] for r in rows],
                    [r[4] for r in rows],
                    [r[5] for r in rows],
                )
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name == CODE_KEY:
                    raise CodeTaken() from exc
                raise
    return {
        (r.execution_id, r.destination): r.short_url
        for r in (store.from_record(_StoredOf, row) for row in stored)
    }


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
