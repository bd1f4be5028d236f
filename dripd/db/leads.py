"""The leads tables: insert a lead (a duplicate email, phone or mailbox named), link its
enrollments, confirm or expire a pending lead, and the shared budgets of lead posts."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path

import asyncpg

from dripd.db import store
from dripd.errors import ConfigError

_SQL_DIR = Path(__file__).with_name("sql") / "leads"

# The unique index that refused an insert, and the field of the lead it guards (the mailbox
# is the email's: `victim+1@` is a duplicate of `victim@`).
_FIELD_OF_INDEX = {
    "leads_email_uq": "email",
    "leads_phone_uq": "phone",
    "leads_mailbox_uq": "email",
}


class LeadStatus(StrEnum):
    """A lead's state, as `dripd.leads.status` spells it."""

    PENDING = "pending"  # waits for its confirmation (double opt-in)
    ACTIVE = "active"  # in the lead sequence
    EXPIRED = "expired"  # never confirmed


@dataclass(frozen=True, slots=True, kw_only=True)
class LeadRow:
    """A lead as stored."""

    id: uuid.UUID
    tenant_key: str | None
    name: str
    email: str | None
    phone: str | None
    notes: str | None
    mailbox: str | None
    status: LeadStatus
    enrollment_id: uuid.UUID | None
    confirm_enrollment_id: uuid.UUID | None
    confirm_expires_at: datetime | None
    confirmed_at: datetime | None
    created_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class ExpiredLead:
    """A pending lead that just expired, and its enrollment in the confirmation sequence."""

    id: uuid.UUID
    tenant_key: str | None
    confirm_enrollment_id: uuid.UUID | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Budget:
    """The answer of `take_budget`: whether the post was taken, else when to try again."""

    taken: bool
    retry_at: datetime | None


@dataclass(frozen=True, slots=True)
class LeadQueries:
    """The statements of this module, one file each in sql/leads/."""

    activate_lead: str
    expire_due: str
    expire_lead: str
    expire_matching: str
    insert_lead: str
    lock_lead: str
    mailbox_leads: str
    purge_budgets: str
    set_confirm_enrollment: str
    set_lead_enrollment: str
    take_budget: str


Q = store.load_statements(LeadQueries, _SQL_DIR)


class DuplicateLead(ConfigError):
    """A lead with this email or phone already exists in the tenant."""

    def __init__(self, field: str) -> None:
        super().__init__(f"{field}: a lead with this {field} already exists")
        self.field = field


def _lead(row: asyncpg.Record) -> LeadRow:
    values = dict(row.items())
    values["status"] = LeadStatus(values["status"])
    return store.from_record(LeadRow, values)


async def insert_lead(
    conn: store.Connection,
    *,
    tenant: str | None,
    name: str,
    email: str | None,
    phone: str | None,
    notes: str | None,
    mailbox: str | None,
    confirm_expires_at: datetime | None,
    now: datetime,
) -> LeadRow:
    """Insert a lead, pending when it has a `confirm_expires_at`, else active; DuplicateLead
    names the field (email or phone) another live lead holds (a mailbox is the email's).

    A refused insert aborts the caller's transaction (or savepoint), which must roll back.
    """
    status = LeadStatus.ACTIVE if confirm_expires_at is None else LeadStatus.PENDING
    try:
        row = await conn.fetchrow(
            Q.insert_lead,
            tenant,
            name,
            email,
            phone,
            notes,
            now,
            mailbox,
            status.value,
            confirm_expires_at,
        )
    except asyncpg.UniqueViolationError as exc:
        field = _FIELD_OF_INDEX.get(exc.constraint_name or "")
        if field is None:
            raise
        raise DuplicateLead(field) from exc
    return _lead(row)


async def set_lead_enrollment(
    conn: store.Connection, lead_id: uuid.UUID, enrollment_id: uuid.UUID
) -> LeadRow:
    row = await conn.fetchrow(Q.set_lead_enrollment, lead_id, enrollment_id)
    assert row is not None, "the lead was inserted in this transaction"
    return _lead(row)


async def set_confirm_enrollment(
    conn: store.Connection, lead_id: uuid.UUID, enrollment_id: uuid.UUID
) -> LeadRow:
    row = await conn.fetchrow(Q.set_confirm_enrollment, lead_id, enrollment_id)
    assert row is not None, "the lead was inserted in this transaction"
    return _lead(row)


async def expire_matching(
    conn: store.Connection,
    *,
    tenant: str | None,
    mailbox: str | None,
    email: str | None,
    phone: str | None,
    now: datetime,
) -> list[ExpiredLead]:
    """Expire the tenant's pending leads past their expiry that hold this mailbox, email or
    phone (so a new lead may take them); the leads expired."""
    rows = await conn.fetch(Q.expire_matching, tenant, mailbox, email, phone, now)
    return [store.from_record(ExpiredLead, r) for r in rows]


async def expire_due(conn: store.Connection, now: datetime) -> list[ExpiredLead]:
    """Expire every pending lead past its expiry; the leads expired."""
    rows = await conn.fetch(Q.expire_due, now)
    return [store.from_record(ExpiredLead, r) for r in rows]


async def mailbox_leads(
    conn: store.Connection, *, tenant: str | None, mailbox: str, since: datetime
) -> list[datetime]:
    """When the tenant's leads of `mailbox` created after `since` were created, newest first."""
    rows = await conn.fetch(Q.mailbox_leads, tenant, mailbox, since)
    return [r["created_at"] for r in rows]


async def lock_lead(
    conn: store.Connection, lead_id: uuid.UUID, tenant: str | None
) -> LeadRow | None:
    """The tenant's lead, locked until the transaction ends; None if there is none."""
    row = await conn.fetchrow(Q.lock_lead, lead_id, tenant)
    return None if row is None else _lead(row)


async def activate_lead(
    conn: store.Connection, lead_id: uuid.UUID, *, enrollment_id: uuid.UUID, now: datetime
) -> LeadRow:
    """Mark a pending lead (locked by `lock_lead`) confirmed and in the lead sequence."""
    row = await conn.fetchrow(Q.activate_lead, lead_id, now, enrollment_id)
    assert row is not None, "the caller holds the pending lead's lock"
    return _lead(row)


async def expire_lead(conn: store.Connection, lead_id: uuid.UUID) -> LeadRow | None:
    """Mark a pending lead expired; None when it was not pending."""
    row = await conn.fetchrow(Q.expire_lead, lead_id)
    return None if row is None else _lead(row)


async def take_budget(
    db: store.Executor, *, client: str, limit: int, window: timedelta, now: datetime
) -> Budget:
    """Take one post of `client`'s budget (at most `limit` in any interval of `window`),
    shared by every daemon on the database. Raises DripdError when the database fails."""
    with store.translated():
        async with store.acquire(db) as conn:
            row = await conn.fetchrow(Q.take_budget, client, now, limit, window)
    assert row is not None
    return Budget(taken=row["taken"], retry_at=row["retry_at"])


async def purge_budgets(db: store.Executor, before: datetime) -> int:
    """Forget the budgets whose newest post is older than `before`; how many were removed."""
    with store.translated():
        async with store.acquire(db) as conn:
            status: str = await conn.execute(Q.purge_budgets, before)
    return int(status.rsplit(" ", 1)[-1])
