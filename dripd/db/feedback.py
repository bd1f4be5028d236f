"""Feedback on sent messages (bounces, complaints, unsubscribes, opens …) as message events."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final

from dripd.db import store
from dripd.errors import ConfigError
from dripd.model import MessageEventType

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
