"""Provider feedback in: what a provider's webhook receiver is given and returns.

`POST /webhooks/{provider}/{adapter}` (dripd.http.webhooks) reads the body (at most
`MAX_BODY_BYTES`, else 413), builds an `InboundRequest` and calls the adapter's `Receiver`.
The receiver verifies the request exactly as the provider signs it and raises `Unverified`
(401, nothing written) when it does not hold, or is older than the replay window; then it
maps the payload to `FeedbackEvent`s, or raises `BadPayload` (400). The route records the
events (dripd.db.feedback): each is deduplicated by (adapter, `event_id`), correlated to its
execution, stored as a message event, and a permanent bounce, a complaint or an unsubscribe
suppresses the address.

Below the protocol, what receivers share to verify and read a payload: HMAC-SHA256 in hex,
the JSON body, ids, times and texts of events, and the SMS/WhatsApp opt-out keywords.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, Protocol

import msgspec

from dripd.errors import DripdError

if TYPE_CHECKING:
    import httpx

__all__ = [
    "FEEDBACK_TYPES",
    "MAX_BODY_BYTES",
    "MAX_REPLY",
    "OPT_OUT_KEYWORDS",
    "BadPayload",
    "FeedbackEvent",
    "InboundRequest",
    "Receiver",
    "ReceiverContext",
    "Unverified",
    "check_window",
    "decode_json",
    "decode_object",
    "digest_id",
    "epoch_text",
    "epoch_time",
    "equal",
    "hmac_sha256_hex",
    "inbound_message",
    "iso_time",
    "keyword",
    "parse_uuid",
    "scalar_text",
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
    # The one-time value the provider signed the request with (Mailgun's `token`): a
    # request whose nonce was recorded before is a replay and records nothing.
    nonce: str | None = None

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


def hmac_sha256_hex(key: str | bytes, data: bytes) -> str:
    """The hex HMAC-SHA256 of `data` under `key` (a str is UTF-8 encoded): the signature of
    Mailgun, MailerSend and Meta's webhooks."""
    secret = key.encode() if isinstance(key, str) else key
    return hmac.new(secret, data, hashlib.sha256).hexdigest()


# Reading payloads ---------------------------------------------------------------------------


def decode_json(body: bytes, what: str) -> Any:
    """The JSON document `body` holds; BadPayload "`what` is not JSON" otherwise (`what`
    names the body, e.g. "postmark webhook body")."""
    try:
        return msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError):  # RecursionError: nested too deep
        raise BadPayload(f"{what} is not JSON (or nested too deep)") from None


def decode_object(body: bytes, what: str) -> dict[str, Any]:
    """The JSON object `body` holds; BadPayload naming `what` when it is not JSON or not an
    object."""
    payload = decode_json(body, what)
    if not isinstance(payload, dict):
        raise BadPayload(f"{what} is not a JSON object")
    return payload


def parse_uuid(value: object) -> uuid.UUID | None:
    """`value` as a UUID (an execution id a provider echoed back), or None when it is not a
    string holding one."""
    if not isinstance(value, str):
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def scalar_text(value: object) -> str | None:
    """A JSON scalar of an event as text: a string stripped (None when blank), a number
    written out; None for anything else."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def epoch_time(value: object) -> datetime | None:
    """Epoch seconds given as a JSON number (an event's `timestamp`) as an aware UTC time;
    None for anything else, a negative number, or one from 1e11 on (the year 5138)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1e11:
        return datetime.fromtimestamp(value, UTC)
    return None


def epoch_text(value: object) -> datetime | None:
    """Epoch seconds written as at most 12 ASCII digits (a signed timestamp, WhatsApp's
    `timestamp`) as an aware UTC time; None for anything else, or a time past the year
    9999."""
    if not (isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 12):
        return None
    try:
        return datetime.fromtimestamp(int(value), UTC)
    except (OverflowError, ValueError, OSError):
        return None


def iso_time(value: object, *, naive_utc: bool = False) -> datetime | None:
    """An ISO 8601 time as an aware datetime, its offset kept; None when `value` is not one.
    A time without an offset is None, or UTC with `naive_utc`."""
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    if when.tzinfo is None:
        return when.replace(tzinfo=UTC) if naive_utc else None
    return when


# Inbound SMS and WhatsApp -------------------------------------------------------------------

#: The part of an inbound message kept in its event (characters).
MAX_REPLY: Final = 1000

#: The opt-out keywords (Twilio's defaults, from its Advanced Opt-Out tutorial: STOP,
#: UNSUBSCRIBE, END, QUIT, STOPALL, REVOKE, OPTOUT, CANCEL), which dripd also applies to
#: WhatsApp. A message that is only the keyword, in any case, with white space around it,
#: opts out; "STOP PLEASE" does not.
OPT_OUT_KEYWORDS: Final = frozenset(
    {"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT"}
)


def keyword(body: str) -> str:
    """An inbound message as a keyword: the text without surrounding white space, in upper
    case (Twilio matches keywords that way)."""
    return body.strip().upper()


def inbound_message(
    body: str, *, opted_out: bool = False, data: Mapping[str, Any] | None = None, **fields: Any
) -> FeedbackEvent:
    """The event of an inbound SMS or WhatsApp message: `unsubscribed` when it is an opt-out
    keyword (or the provider says it opted out: `opted_out`), else `replied`, with `data`
    added. Either keeps the first MAX_REPLY characters of `body` in its data. `fields`: the
    event's own (event_id, recipient, channel, occurred_at)."""
    word = keyword(body)
    kept: dict[str, Any] = {"body": body[:MAX_REPLY]}
    if opted_out or word in OPT_OUT_KEYWORDS:
        said = word if word in OPT_OUT_KEYWORDS else "opt-out"
        return FeedbackEvent(
            type="unsubscribed", reason=f"inbound {said} keyword", data=kept, **fields
        )
    return FeedbackEvent(type="replied", data={**kept, **(data or {})}, **fields)
