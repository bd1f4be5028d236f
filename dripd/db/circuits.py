"""Adapters' circuit breakers in Postgres: the shared open and half-open states, the probe claim."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from dripd.db import store
from dripd.rules.breaker import CircuitRow, CircuitState

__all__ = ["NOTIFY_PREFIX", "close", "load", "probe", "trip"]

#: The payload prefix of the NOTIFY dripd_adapters a circuit change sends.
NOTIFY_PREFIX = "circuit:"


@dataclass(frozen=True, slots=True)
class Queries:
    """The statements of sql/circuits/."""

    load: str
    trip: str
    probe: str
    close: str
    notify: str


Q = store.load_statements(Queries, Path(__file__).with_name("sql") / "circuits")


def _row(record: Mapping[str, Any]) -> CircuitRow:
    return CircuitRow(
        adapter_id=record["id"],
        tenant_key=record["tenant_key"],
        name=record["name"],
        state=CircuitState(record["circuit_state"]),
        opened_at=record["circuit_opened_at"],
        retry_at=record["circuit_retry_at"],
        open_for=record["circuit_open_for"],
        reason=record["circuit_reason"],
        probe_by=record["circuit_probe_by"],
        probe_until=record["circuit_probe_until"],
    )


async def load(db: store.Executor) -> list[CircuitRow]:
    """Every enabled adapter's circuit that is not closed (an adapter not listed is closed)."""
    with store.translated():
        async with store.acquire(db) as conn:
            records = await conn.fetch(Q.load)
    return [_row(r) for r in records]


async def trip(
    db: store.Executor,
    adapter_id: uuid.UUID,
    *,
    now: datetime,
    retry_at: datetime,
    open_for: timedelta,
    reason: str,
    by: str,
) -> CircuitRow | None:
    """Open the circuit of `adapter_id` until `retry_at` (backoff `open_for`) with `reason`: a
    closed one, or a half-open one whose probe daemon `by` holds. Returns the opened row and
    NOTIFYs dripd_adapters in the same transaction; None when nothing changed (another daemon
    opened it first or took the probe over, or the adapter is gone or disabled)."""
    async with store.transaction(db) as conn:
        record = await conn.fetchrow(Q.trip, adapter_id, now, retry_at, open_for, reason, by)
        if record is None:
            return None
        await conn.execute(Q.notify, f"{NOTIFY_PREFIX}{adapter_id}")
    return _row(record)


async def probe(
    db: store.Executor,
    adapter_ids: Sequence[uuid.UUID],
    *,
    now: datetime,
    until: datetime,
    by: str,
) -> list[CircuitRow]:
    """Take, for daemon `by` until `until`, the probe of each circuit among `adapter_ids` that
    lets one go at `now` (open past its retry_at, or half-open past its prober's lease), in one
    UPDATE; returns the rows taken (half-open, probed by `by`). Across every daemon calling it
    at once, each probe goes to exactly one."""
    if not adapter_ids:
        return []
    with store.translated():
        async with store.acquire(db) as conn:
            records = await conn.fetch(Q.probe, list(adapter_ids), now, by, until)
    return [_row(r) for r in records]


async def close(db: store.Executor, adapter_id: uuid.UUID, *, by: str) -> CircuitRow | None:
    """Close the circuit of `adapter_id` whose probe daemon `by` holds (the probe went
    through). Returns the closed row and NOTIFYs dripd_adapters in the same transaction; None
    when `by` does not hold its probe (any more)."""
    async with store.transaction(db) as conn:
        record = await conn.fetchrow(Q.close, adapter_id, by)
        if record is None:
            return None
        await conn.execute(Q.notify, f"{NOTIFY_PREFIX}{adapter_id}")
    return _row(record)
