"""Feedback on sent messages (bounces, complaints, unsubscribes, opens …) as message events:
reported through the API, or sent by a provider's webhook (`ingest`)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import structlog

from dripd.addresses import InvalidAddress, normalize
from dripd.channels.feedback import FeedbackEvent
from dripd.db import store
from dripd.errors import ConfigError
from dripd.inputs import storable, storable_json
from dripd.model import Adapter, MessageEventType

log = structlog.get_logger("dripd.feedback")

_SQL_DIR = Path(__file__).with_name("sql") / "feedback"

# The message event types that report what happened to a message after its send.
FEEDBACK_TYPES: Final = frozenset(
    {
        MessageEventType.BOUNCED,
        MessageEventType.COMPLAINED,
        MessageEventType.UNSUBSCRIBED,
        MessageEventType.DELIVERED,
        MessageEventType.OPENED,
        MessageEventType.CLICKED,
        MessageEventType.REPLIED,
    }
)


@dataclass(frozen=True, slots=True)
class FeedbackQueries:
    """The statements of this module, one file each in sql/feedback/."""

    record_feedback: str
    seen_event: str
    execution_by_id: str
    execution_by_message: str
    insert_provider_event: str
    purge_provider_events: str


Q = store.load_statements(FeedbackQueries, _SQL_DIR)


@dataclass(frozen=True, slots=True, kw_only=True)
class Recorded:
    """A feedback event written, with the message's channel and (normalized) recipient."""

    event_id: int
    channel: str | None
    recipient: str | None


async def record_feedback(
    db: store.Executor,
    *,
    tenant: str | None,
    execution_id: uuid.UUID,
    type: str,
    reason: str | None,
    now: datetime,
    once: bool = False,
) -> Recorded | None:
    """Record a `type` message event on the message execution `execution_id` sent, with the
    execution's channel, provider, adapter, recipient, provider message id and enrollment.

    Returns None, recording nothing, when no such execution exists in the tenant scope
    (`tenant` None: a global one), or when `once` is set and the execution already has an
    event of this type (an unsubscribe counts once; opens and clicks may repeat).
    Raises ConfigError for a type that is not feedback (see FEEDBACK_TYPES).
    """
    if type not in FEEDBACK_TYPES:
        raise ConfigError(
            f"type: {type!r} is not a feedback event; use one of "
            f"{', '.join(sorted(FEEDBACK_TYPES))}"
        )
    with store.translated():
        async with store.acquire(db) as conn:
            row = await conn.fetchrow(
                Q.record_feedback, tenant, execution_id, type, reason, now, once
            )
    if row is None:
        return None
    return store.from_record(Recorded, row)


#: The suppression reason each kind of feedback adds (a bounce only when permanent).
SUPPRESSES: Final = {"bounced": "bounce", "complained": "complaint", "unsubscribed": "unsubscribe"}


@dataclass(slots=True)
class Ingested:
    """What one webhook request changed: events recorded (matched to an execution or not),
    redeliveries ignored, and addresses suppressed."""

    recorded: int = 0
    matched: int = 0
    duplicates: int = 0
    suppressed: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class _Sent:
    id: uuid.UUID
    tenant_key: str | None
    enrollment_id: uuid.UUID
    channel: str | None
    recipient: str | None
    provider_message_id: str | None


async def ingest(
    db: store.Executor, *, adapter: Adapter, events: Sequence[FeedbackEvent], now: datetime
) -> Ingested:
    """Record a provider's feedback events for `adapter`, all in one transaction.

    Each event is recorded once per (adapter, event id): a redelivery changes nothing; a
    request whose `nonce` (a provider's one-time signing token) was seen before records
    nothing at all, so a captured signature cannot carry other events. An event is
    matched to the execution this adapter sent (by dripd's execution id when the provider
    echoed it, else by the provider's message id) and stored as a message event of it, or
    stored unmatched, with the adapter's tenant, when no execution is found. A permanent
    bounce, a complaint or an unsubscribe suppresses the address (the event's, else the
    execution's) in the execution's tenant scope, through the one address normalizer.
    Raises DripdError when the database fails (the provider retries the whole request).
    """
    result = Ingested()
    async with store.transaction(db) as conn:
        replayed = set()
        for nonce in sorted({e.nonce for e in events if e.nonce}):
            key = storable(f"nonce:{nonce}")[:512]
            if await conn.fetchval(Q.seen_event, adapter.id, key, now) is None:
                replayed.add(nonce)
        for event in events:
            if event.nonce in replayed:
                result.duplicates += 1  # a signed request seen before, whatever it now says
                continue
            event_id = storable(event.event_id)[:512]
            fresh = await conn.fetchval(Q.seen_event, adapter.id, event_id, now)
            if fresh is None:
                result.duplicates += 1
                continue
            message_id = _storable(event.provider_message_id)
            sent = await _execution(conn, adapter, event.execution_id, message_id)
            channel = event.channel or (sent.channel if sent else None) or adapter.channel
            recipient = _storable(event.recipient)
            address = _address(channel, recipient) or (
                _address(channel, sent.recipient) if sent else None
            )
            tenant = sent.tenant_key if sent else adapter.tenant_key
            data: dict[str, Any] = storable_json(dict(event.data))
            reason = _storable(event.reason)
            if event.type == "bounced":
                data["permanent"] = event.permanent
                kind = "permanent" if event.permanent else "temporary"
                reason = f"{kind}: {reason}" if reason else kind
            await conn.fetchval(
                Q.insert_provider_event,
                tenant,
                sent.id if sent else None,
                sent.enrollment_id if sent else None,
                event.type,
                channel,
                adapter.provider,
                adapter.id,
                address or recipient or (sent.recipient if sent else None),
                reason[:500] if reason else None,
                message_id or (sent.provider_message_id if sent else None),
                store.encode_json(data),
                event.occurred_at or now,
                event_id,
            )
            result.recorded += 1
            result.matched += sent is not None
            suppression = SUPPRESSES.get(event.type)
            if event.type == "bounced" and not event.permanent:
                suppression = None
            if suppression and address:
                row = await store.insert_suppression(
                    conn,
                    tenant=tenant,
                    channel=channel,
                    address=address,
                    reason=suppression,
                    source=f"{adapter.provider} webhook",
                    now=now,
                )
                result.suppressed += row.created
    return result


async def _execution(
    conn: Any, adapter: Adapter, execution_id: uuid.UUID | None, message_id: str | None
) -> _Sent | None:
    row = None
    if execution_id is not None:
        row = await conn.fetchrow(Q.execution_by_id, adapter.id, execution_id)
    if row is None and message_id:
        row = await conn.fetchrow(Q.execution_by_message, adapter.id, message_id)
    return store.from_record(_Sent, row) if row is not None else None


def _storable(text: str | None) -> str | None:
    """A provider's text as Postgres can store it (NUL and lone surrogates replaced)."""
    return None if text is None else storable(text)


def _address(channel: str, text: str | None) -> str | None:
    """`text` in its one spelling for `channel`, or None when it cannot be read as one."""
    if not text:
        return None
    try:
        return normalize(channel, text)
    except InvalidAddress:
        log.warning("feedback names an address that cannot be read", channel=channel)
        return None


async def purge_provider_events(db: store.Executor, before: datetime) -> int:
    """Forget provider event ids received before `before`; how many were removed."""
    with store.translated():
        async with store.acquire(db) as conn:
            status = await conn.execute(Q.purge_provider_events, before)
    return int(status.rsplit(" ", 1)[-1])
