"""The leads table: insert a lead (a duplicate email or phone named), link its enrollment."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import asyncpg

from dripd.db import store
from dripd.errors import ConfigError

_SQL_DIR = Path(__file__).with_name("sql") / "leads"

# The unique index that refused an insert, and the field of the lead it guards.
_FIELD_OF_INDEX = {"leads_email_uq": "email", "leads_phone_uq": "phone"}


@dataclass(frozen=True, slots=True, kw_only=True)
class LeadRow:
    """A lead as stored."""

    id: uuid.UUID
    tenant_key: str | None
    name: str
    email: str | None
    phone: str | None
    notes: str | None
    enrollment_id: uuid.UUID | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class LeadQueries:
    """The statements of this module, one file each in sql/leads/."""

    insert_lead: str
    set_lead_enrollment: str


Q = store.load_statements(LeadQueries, _SQL_DIR)


class DuplicateLead(ConfigError):
    """A lead with this email or phone already exists in the tenant."""

    def __init__(self, field: str) -> None:
        super().__init__(f"{field}: a lead with this {field} already exists")
        self.field = field


async def insert_lead(
    conn: store.Connection,
    *,
    tenant: str | None,
    name: str,
    email: str | None,
    phone: str | None,
    notes: str | None,
    now: datetime,
) -> LeadRow:
    """Insert a lead; DuplicateLead names the field (email or phone) another lead holds.

    A refused insert aborts the caller's transaction, which must then roll back.
    """
    try:
        row = await conn.fetchrow(Q.insert_lead, tenant, name, email, phone, notes, now)
    except asyncpg.UniqueViolationError as exc:
        field = _FIELD_OF_INDEX.get(exc.constraint_name or "")
        if field is None:
            raise
        raise DuplicateLead(field) from exc
    return store.from_record(LeadRow, row)


async def set_lead_enrollment(
    conn: store.Connection, lead_id: uuid.UUID, enrollment_id: uuid.UUID
) -> LeadRow:
    row = await conn.fetchrow(Q.set_lead_enrollment, lead_id, enrollment_id)
    assert row is not None, "the lead was inserted in this transaction"
    return store.from_record(LeadRow, row)
