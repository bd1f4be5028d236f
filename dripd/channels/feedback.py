"""Provider feedback in: what a provider's webhook receiver is given and returns.

`POST /webhooks/{provider}/{adapter}` (dripd.http.webhooks) reads the body (at most
`MAX_BODY_BYTES`, else 413), builds an `InboundRequest` and calls the adapter's `Receiver`.
The receiver verifies the request exactly as the provider signs it and raises `Unverified`
(401, nothing written) when it does not hold, or is older than the replay window; then it
maps the payload to `FeedbackEvent`s, or raises `BadPayload` (400). The route records the
events (dripd.db.feedback): each is deduplicated by (adapter, `event_id`), correlated to its
execution, stored as a message event, and a permanent bounce, a complaint or an unsubscribe
suppresses the address.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, Protocol

from dripd.errors import DripdError

if TYPE_CHECKING:
    import httpx

__all__ = [
    "FEEDBACK_TYPES",
    "MAX_BODY_BYTES",
    "BadPayload",
    "FeedbackEvent",
    "InboundRequest",
    "Receiver",
    "ReceiverContext",
    "Unverified",
    "check_window",
    "digest_id",
    "equal",
]

#: Webhook bodies above this are answered 413 before anything reads them.
MAX_BODY_BYTES: Final = 1024 * 1024

#: The message event types a provider's feedback maps to.
FEEDBACK_TYPES: Final = frozenset(
    {
        "delivered",
        "opened",
        "clicked",
        "bounced",
        "complained",
        "unsubscribed",
        "replied",
        "deferred",
        "failed",
    }
)


class Unverified(DripdError):
    """The request is not provably the provider's (signature, credentials, replay window):
    401, and nothing is written. The message says why, never a secret."""

    code = "unverified"


class BadPayload(DripdError):
    """The request is the provider's but its body cannot be read: 400."""

    code = "bad_payload"


@dataclass(frozen=True, slots=True, kw_only=True)
class InboundRequest:
    """One webhook request as the receiver needs it.

    `url`: the URL as the provider called it (config `webhooks.public_url` + path and query
    when set, else what the request said), for signatures over the URL (Twilio).
    `headers`: names lowercased; a name sent twice keeps its values joined by ", ".
    `form`: the decoded `application/x-www-form-urlencoded` body, keys to lists of values
    (empty for other bodies).
    """

    url: str
    headers: Mapping[str, str]
    body: bytes
    received_at: datetime
    form: Mapping[str, Sequence[str]] = field(default_factory=dict)

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()


@dataclass(frozen=True, slots=True, kw_only=True)
class FeedbackEvent:
    """What became of a message, as the provider reported it.

    `type`: one of FEEDBACK_TYPES. `event_id`: the provider's id of this event (SendGrid's
    `sg_event_id`, Mailgun's `id`, SNS's `MessageId`, …); where the provider gives none, a
    digest of the event's own fields (`digest_id`), so a redelivery is the same id.
    Correlation: `execution_id` when the provider echoed dripd's metadata back, else
    `provider_message_id` as the send stored it. `recipient`: the address the event is
    about (a suppression needs it when the execution is unknown). `permanent`: for a
    bounce, a hard one (suppress). `reason`: the provider's short reason or code.
    `data`: a few fields worth keeping (the clicked URL, the SMTP status), no secrets.
    """

    type: str
    event_id: str
    provider_message_id: str | None = None
    execution_id: uuid.UUID | None = None
    recipient: str | None = None
    channel: str | None = None  # None: the adapter's channel
    permanent: bool = False
    reason: str | None = None
    occurred_at: datetime | None = None
    data: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.type not in FEEDBACK_TYPES:
            raise ValueError(f"unknown feedback type {self.type!r}")
        if not self.event_id:
            raise ValueError("a feedback event needs an event_id")


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceiverContext:
    """What the daemon gives a receiver: `replay_window` (config `webhooks.replay_window`;
    a signed timestamp older or newer than this is refused), `transport` for the receiver's
    own HTTP calls (SNS signing certificates, subscription confirmation)."""

    replay_window: timedelta = timedelta(minutes=5)
    transport: httpx.AsyncBaseTransport | None = None


class Receiver(Protocol):
    """A provider's webhook receiver for one adapter (built by `ProviderSpec.receiver`)."""

    async def receive(self, request: InboundRequest) -> Sequence[FeedbackEvent]:
        """Verify `request` (Unverified) and map it to events (BadPayload); [] when the
        request carries nothing to record (a subscription confirmation, a status dripd
        does not track)."""
        ...

    async def aclose(self) -> None:
        """Release what the receiver holds (an HTTP client)."""
        ...


def check_window(signed_at: datetime, now: datetime, window: timedelta, what: str) -> None:
    """Unverified unless `signed_at` is within `window` of `now` (either side: clocks
    differ), so a captured request cannot be replayed later."""
    if abs(now - signed_at) > window:
        raise Unverified(
            f"{what} timestamp {signed_at.isoformat()} is outside the replay window "
            f"of {int(window.total_seconds())} s"
        )


def equal(a: str | bytes, b: str | bytes) -> bool:
    """Constant-time comparison of two signatures or secrets."""
    left = a.encode() if isinstance(a, str) else a
    right = b.encode() if isinstance(b, str) else b
    return hmac.compare_digest(left, right)


def digest_id(*parts: object) -> str:
    """A stable event id from an event's own fields, for providers that send none."""
    text = "\x1f".join("" if p is None else str(p) for p in parts)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()
