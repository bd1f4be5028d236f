"""Store functions of the HTTP API: bearer tokens (only their SHA-256 kept), idempotency keys."""

from __future__ import annotations

import base64
import hashlib
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec

from dripd.db import store
from dripd.errors import Refused

#: Every API token starts with this, so a leaked one is easy to recognise (and to scan for).
TOKEN_PREFIX = "dripd_"  # noqa: S105 - a public prefix, not a secret


@dataclass(frozen=True, slots=True)
class Statements:
    claim_idempotency: str
    find_idempotency: str
    find_token: str
    finish_idempotency: str
    insert_token: str
    list_tokens: str
    purge_idempotency: str
    revoke_token: str


Q = store.load_statements(Statements, Path(__file__).with_name("sql") / "intake")


@dataclass(frozen=True, slots=True, kw_only=True)
class Token:
    """An API token as stored: never the token itself, never its hash."""

    id: uuid.UUID
    tenant_key: str | None
    name: str
    created_at: datetime
    revoked_at: datetime | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "tenant_key": self.tenant_key,
            "name": self.name,
            "created_at": self.created_at.isoformat(),
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
        }


def _header_fields(text: str) -> dict[str, str]:
    return {str(k): str(v) for k, v in msgspec.json.decode(text, type=dict[str, str]).items()}


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredResponse:
    """The first response to an idempotency key, and what identified its request."""

    method: str
    path: str
    request_hash: bytes = field(metadata={"convert": bytes})
    status: int
    body: bytes = field(metadata={"convert": bytes})
    headers: dict[str, str] = field(metadata={"convert": _header_fields})
    created_at: datetime


def new_token() -> str:
    """A fresh bearer token: the prefix and 32 random bytes, URL-safe base64."""
    raw = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")
    return TOKEN_PREFIX + raw


def hash_token(token: str) -> bytes:
    """The SHA-256 under which a token is stored and looked up."""
    return hashlib.sha256(token.encode()).digest()


async def create_token(
    db: store.Executor, *, tenant: str | None, name: str, now: datetime
) -> tuple[str, Token]:
    """Create a token; the token itself is returned here once and never stored."""
    token = new_token()
    with store.translated():
        async with store.acquire(db) as conn:
            row = await conn.fetchrow(Q.insert_token, tenant, name, hash_token(token), now)
    return token, store.from_record(Token, row)


async def find_token(db: store.Executor, token_hash: bytes) -> Token | None:
    """The token stored under `token_hash`, revoked or not."""
    with store.translated():
        async with store.acquire(db) as conn:
            row = await conn.fetchrow(Q.find_token, token_hash)
    return None if row is None else store.from_record(Token, row)


async def list_tokens(db: store.Executor, tenant: str | None, *, all_tenants: bool) -> list[Token]:
    """The tokens of one scope (`tenant=None`: the global ones), or of every scope."""
    with store.translated():
        async with store.acquire(db) as conn:
            rows = await conn.fetch(Q.list_tokens, tenant, all_tenants)
    return [store.from_record(Token, r) for r in rows]


async def revoke_token(db: store.Executor, token_id: uuid.UUID, now: datetime) -> Token | None:
    """Revoke a token (again: a no-op that keeps the first time); None if there is none."""
    with store.translated():
        async with store.acquire(db) as conn:
            row = await conn.fetchrow(Q.revoke_token, token_id, now)
    return None if row is None else store.from_record(Token, row)


async def claim_idempotency(
    conn: store.Connection,
    *,
    token_id: uuid.UUID | None,
    key: str,
    method: str,
    path: str,
    request_hash: bytes,
    now: datetime,
) -> StoredResponse | None:
    """Take `key` for this request inside the caller's transaction, or find who took it.
    `token_id` is the token the key belongs to, None for a public route's (one namespace).

    None: the key is ours; a request with the same key waits until our transaction ends
    and then finds our response (if we committed) or takes the key itself (if we rolled
    back). Otherwise the stored response of the request that took it first.
    """
    for _ in range(3):
        if await conn.fetchval(Q.claim_idempotency, token_id, key, method, path, request_hash, now):
            return None
        # A separate statement: its snapshot, unlike the INSERT's, sees the row whose
        # transaction the INSERT waited for.
        row = await conn.fetchrow(Q.find_idempotency, token_id, key)
        if row is not None:
            return store.from_record(StoredResponse, row)
        # Purged between the two statements: take it again.
    raise Refused(f"idempotency key {key!r} could not be taken")


async def finish_idempotency(
    conn: store.Connection,
    *,
    token_id: uuid.UUID | None,
    key: str,
    status: int,
    body: bytes,
    headers: Mapping[str, str],
) -> None:
    """Store the response to a key taken with `claim_idempotency`, in the same transaction:
    its status, body and header fields."""
    fields = msgspec.json.encode(dict(headers)).decode()
    await conn.execute(Q.finish_idempotency, token_id, key, status, body, fields)


async def purge_idempotency(db: store.Executor, before: datetime) -> int:
    """Forget the keys taken before `before` (callers keep them 24 h); how many were removed."""
    with store.translated():
        async with store.acquire(db) as conn:
            status: str = await conn.execute(Q.purge_idempotency, before)
    return int(status.rsplit(" ", 1)[-1])
