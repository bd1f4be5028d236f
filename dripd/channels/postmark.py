"""The `postmark` provider: email through Postmark's API, one message per request
(`POST /email`) or up to 500 (`POST /email/batch`), and Postmark's webhooks in.

Followed: postmarkapp.com/developer/api/email-api (fields, the batch endpoint),
/developer/api/overview (HTTP statuses, the ErrorCode list), /developer/webhooks/* (the
Delivery, Bounce, SpamComplaint, Open, Click and SubscriptionChange payloads, and HTTP basic
auth as the webhooks' only protection). See providers.md §1.

What goes out (PascalCase JSON, header `X-Postmark-Server-Token`):

    From           the step's `from`, else the adapter's `from`
    To             the recipient as one mailbox (`"Name" <addr>`)
    ReplyTo        the step's `reply_to`
    Headers        the step's extra headers (List-Unsubscribe…), then `X-Dripd-Message-Id`
                   (dripd's Message-ID: Postmark writes its own Message-ID header) and
                   `X-Dripd-Idempotency-Key`, as `[{"Name", "Value"}]`
    Metadata       `dripd_execution` (the execution id, echoed back by every webhook) and the
                   message's metadata (enrollment_id, sequence_key, step_key, tenant_key)
    MessageStream  config `message_stream` (default `outbound`)
    Tag, TrackOpens, TrackLinks  from the config, when set

Postmark has no idempotency key: a send retried after a lost answer may go out twice.

Sizes (providers.md §1: 10 MB for one message, 50 MB for a batch request): each message is
encoded once; one larger than MAX_MESSAGE_BYTES is refused (PermanentError, not sent), and a
batch is split into as many `/email/batch` requests as keep each under MAX_BATCH_BYTES. A
batch request Postmark still refuses whole as too large (HTTP 413) is sent again one message
at a time (`POST /email`), each with its own result.

ErrorCodes (each batch element has its own; a single send carries it in a 422):

    0                              accepted: Receipt(MessageID)
    406 inactive recipient         PermanentError(bounce): the address is suppressed
    10, 400, 401, 405, 412, 413    AdapterError: the token, the sender signature or the
                                   account is refused; every message would be (400 and
                                   401 for a step's own `from`: PermanentError, that
                                   message only)
    any other (300 invalid request, 402/403/409 bad JSON, 411 attachment…)  PermanentError
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Final

import httpx
import msgspec

from dripd.channels.base import (
    AdapterError,
    ChannelContext,
    ChannelError,
    Message,
    PermanentError,
    Receipt,
    TransientError,
    mailbox_header,
)
from dripd.channels.feedback import (
    BadPayload,
    FeedbackEvent,
    InboundRequest,
    ReceiverContext,
    Unverified,
    decode_json,
    digest_id,
    equal,
    iso_time,
    parse_uuid,
)
from dripd.channels.http import (
    HTTP_CONFIG_KEYS,
    HttpProvider,
    check_http_config,
    clip,
    config_bool,
    config_str,
    credential_str,
    error_for_status,
    json_body,
    json_str,
)
from dripd.channels.mime import IDEMPOTENCY_HEADER
from dripd.channels.spec import ProviderSpec
from dripd.errors import ConfigError
from dripd.model import Adapter

__all__ = [
    "CONFIG_KEYS",
    "MAX_BATCH",
    "MAX_BATCH_BYTES",
    "MAX_MESSAGE_BYTES",
    "MESSAGE_ID_HEADER",
    "PostmarkChannel",
    "PostmarkReceiver",
    "check",
    "from_adapter",
    "receiver",
]

CONFIG_KEYS: Final = HTTP_CONFIG_KEYS | {"message_stream", "track_opens", "track_links", "tag"}
CREDENTIAL_KEYS: Final = frozenset({"server_token", "webhook_username", "webhook_password"})
TRACK_LINKS: Final = ("None", "HtmlAndText", "HtmlOnly", "TextOnly")
DEFAULT_STREAM: Final = "outbound"

#: The most messages one `POST /email/batch` may carry.
MAX_BATCH: Final = 500
#: The largest message sent (its JSON): Postmark takes at most 10 MB per message.
MAX_MESSAGE_BYTES: Final = 10 * 1024 * 1024
#: The largest `/email/batch` body sent: Postmark takes at most 50 MB, this keeps a margin.
MAX_BATCH_BYTES: Final = 45 * 1024 * 1024
#: Where dripd's own Message-ID goes: Postmark sets the Message-ID header itself.
MESSAGE_ID_HEADER: Final = "X-Dripd-Message-Id"
#: The execution id in `Metadata`; every webhook about the message echoes it back.
EXECUTION_KEY: Final = "dripd_execution"

# ErrorCode 406: "You tried to send to a recipient that has been marked as inactive"
# (hard bounce, spam complaint, manual suppression).
_INACTIVE_RECIPIENT: Final = 406
# Bad or missing token (10), sender signature not found (400) or not confirmed (401), not
# allowed to send (405), account pending (412), account may not send (413).
_ACCOUNT_CODES: Final = frozenset({10, 400, 401, 405, 412, 413})
# Sender signature not found (400) or not confirmed (401): the adapter's `from` is refused
# for every message, a step's own `from` only for that step's.
_SENDER_CODES: Final = frozenset({400, 401})
# Postmark's metadata limits: 10 fields, names up to 20 characters, values up to 80.
_METADATA_FIELDS: Final = 10
_METADATA_KEY: Final = 20
_METADATA_VALUE: Final = 80

# Bounce types (the Bounce API's `Type`) that say the address itself is dead. Postmark also
# marks such an address `Inactive`, which counts as permanent whatever the type.
_HARD_BOUNCES: Final = frozenset({"HardBounce", "BadEmailAddress", "ManuallyDeactivated"})
# Bounce records that report no delivery failure: nothing to record.
_NOT_BOUNCES: Final = frozenset(
    {"Subscribe", "AutoResponder", "AddressChange", "OpenRelayTest", "ChallengeVerification"}
)


def check(config: Mapping[str, Any], credentials: Mapping[str, Any]) -> None:
    """Registry hook: ConfigError naming the key if these maps are not a `postmark` adapter."""
    check_http_config(config)
    config_str(config, "from", required=True)
    config_str(config, "message_stream", max_length=100)
    config_str(config, "tag", max_length=1000)
    config_bool(config, "track_opens", provider="postmark")
    track_links = config.get("track_links")
    if track_links is not None and track_links not in TRACK_LINKS:
        raise ConfigError(
            f"postmark adapter config `track_links` must be one of {', '.join(TRACK_LINKS)}"
        )
    credential_str(credentials, "server_token", required=True)
    _webhook_credentials(credentials)


def _webhook_credentials(credentials: Mapping[str, Any]) -> tuple[str, str] | None:
    username = credential_str(credentials, "webhook_username")
    password = credential_str(credentials, "webhook_password")
    if (username is None) != (password is None):
        raise ConfigError(
            "postmark adapter credentials `webhook_username` and `webhook_password` go "
            "together: give both or neither"
        )
    if username is None or password is None:
        return None
    if ":" in username:
        # RFC 7617 §2: the user-id of HTTP basic auth cannot hold a colon.
        raise ConfigError("postmark adapter credential `webhook_username` must not contain ':'")
    return username, password


def from_adapter(adapter: Adapter, context: ChannelContext | None = None) -> PostmarkChannel:
    """Registry factory: the channel with its pooled client (nothing is sent yet)."""
    return PostmarkChannel(adapter, context)


class PostmarkChannel(HttpProvider):
    """Sends through Postmark's API; a BatchChannel (`send_batch`, at most `max_batch`)."""

    provider = "postmark"
    default_base_url = "https://api.postmarkapp.com"
    max_batch = MAX_BATCH

    def __init__(self, adapter: Adapter, context: ChannelContext | None = None) -> None:
        config = adapter.config
        token = credential_str(adapter.credentials, "server_token", required=True) or ""
        super().__init__(
            adapter,
            context,
            headers={"X-Postmark-Server-Token": token, "Accept": "application/json"},
        )
        self.sender = str(config["from"])
        self.stream = str(config.get("message_stream") or DEFAULT_STREAM)
        self.tag: str | None = config.get("tag")
        self.track_opens: bool | None = config.get("track_opens")
        self.track_links: str | None = config.get("track_links")

    async def send(self, message: Message) -> Receipt:
        """Deliver `message` with `POST /email`: Receipt(MessageID), or the error its
        ErrorCode or HTTP status maps to (see the module docstring). PermanentError,
        nothing sent, when it cannot be built or is larger than MAX_MESSAGE_BYTES."""
        return await self._send_one(self.encode(message), own_sender=self._own_sender(message))

    async def _send_one(self, content: bytes, *, own_sender: bool) -> Receipt:
        response = await self._post("/email", content)
        data = json_body(response)
        if response.status_code != httpx.codes.OK:
            raise _request_error(response, data, own_sender=own_sender)
        if not isinstance(data, dict):
            # Postmark refuses with a 422, never a 200: this one was taken, its id unread
            # (the webhooks still correlate through the Metadata's execution id).
            return Receipt()
        result = _result(data, own_sender=own_sender)
        if isinstance(result, ChannelError):
            raise result
        return result

    async def send_batch(self, messages: Sequence[Message]) -> list[Receipt | ChannelError]:
        """Deliver up to `max_batch` messages with `POST /email/batch` (a bare JSON array),
        in as many requests as keep each body under MAX_BATCH_BYTES: one result per
        message, in order, each read from its own element's ErrorCode, so a 406 fails only
        its own message. A message that cannot be built or is larger than MAX_MESSAGE_BYTES
        gets its PermanentError and is not sent. When a whole request fails (timeouts, 429,
        5xx, an answer that does not account for every message: TransientError; 401, an
        account ErrorCode: AdapterError), its messages and those of the requests after it
        (not sent) get that error; the results of requests already answered stand. A
        request refused whole as too large (HTTP 413) is sent again one message at a time.
        """
        results: list[Receipt | ChannelError | None] = [None] * len(messages)
        encoded: list[tuple[int, bytes]] = []
        for position, message in enumerate(messages):
            try:
                encoded.append((position, self.encode(message)))
            except PermanentError as exc:
                results[position] = exc
        failure: ChannelError | None = None
        for chunk in _chunks(encoded, MAX_BATCH_BYTES):
            answered: list[Receipt | ChannelError] = []
            if failure is None:
                try:
                    answered = await self._send_chunk(messages, chunk)
                except (TransientError, AdapterError) as exc:
                    failure = exc
            if failure is not None:
                answered = [failure] * len(chunk)
            for (position, _), result in zip(chunk, answered, strict=True):
                results[position] = result
        return [result for result in results if result is not None]

    async def _send_chunk(
        self, messages: Sequence[Message], chunk: Sequence[tuple[int, bytes]]
    ) -> list[Receipt | ChannelError]:
        """One `/email/batch` request for `chunk` (positions in `messages`, encoded): one
        result per element. Raises TransientError or AdapterError when the whole request
        failed."""
        response = await self._post("/email/batch", _array(part for _, part in chunk))
        data = json_body(response)
        if response.status_code == httpx.codes.REQUEST_ENTITY_TOO_LARGE and len(chunk) > 1:
            return await self._one_by_one(messages, chunk)
        if response.status_code != httpx.codes.OK:
            error = _request_error(response, data, own_sender=False)
            if isinstance(error, TransientError | AdapterError):
                raise error
            return [error] * len(chunk)
        if not isinstance(data, list) or len(data) != len(chunk):
            # Some of these may have gone out; without their MessageIDs the retry may send
            # them twice, which is still better than losing the others.
            count = len(data) if isinstance(data, list) else "no"
            raise TransientError(
                f"postmark: the batch answer holds {count} results for {len(chunk)} messages"
            )
        return [
            _element_result(element, own_sender=self._own_sender(messages[position]))
            for (position, _), element in zip(chunk, data, strict=True)
        ]

    async def _one_by_one(
        self, messages: Sequence[Message], chunk: Sequence[tuple[int, bytes]]
    ) -> list[Receipt | ChannelError]:
        """`chunk` sent one message per `POST /email`, each with its own result; after an
        error that would fail every send (AdapterError, a provider-wide TransientError)
        the rest are not sent and get that error."""
        results: list[Receipt | ChannelError] = []
        failure: ChannelError | None = None
        for position, part in chunk:
            if failure is not None:
                results.append(failure)
                continue
            try:
                results.append(
                    await self._send_one(part, own_sender=self._own_sender(messages[position]))
                )
            except ChannelError as exc:
                results.append(exc)
                if isinstance(exc, AdapterError) or (
                    isinstance(exc, TransientError) and exc.provider_wide
                ):
                    failure = exc
        return results

    def encode(self, message: Message) -> bytes:
        """The JSON of `message` for `/email` (one element of a batch). PermanentError
        when it cannot be built or is larger than MAX_MESSAGE_BYTES."""
        content = msgspec.json.encode(self.payload(message))
        if len(content) > MAX_MESSAGE_BYTES:
            raise PermanentError(
                f"postmark: the message is {len(content) / 1024 / 1024:.1f} MiB; Postmark takes "
                f"at most 10 MB per message (MAX_MESSAGE_BYTES {MAX_MESSAGE_BYTES} bytes)"
            )
        return content

    def payload(self, message: Message) -> dict[str, Any]:
        """The JSON object Postmark's `/email` takes for `message` (one element of a batch).
        PermanentError when the message has neither a text nor an HTML body."""
        body: dict[str, Any] = {
            "From": message.sender or self.sender,
            "To": mailbox_header(message.to_name, message.to),
        }
        if message.subject is not None:
            body["Subject"] = message.subject
        text = message.text if message.text is not None else message.body
        if text is not None:
            body["TextBody"] = text
        if message.html is not None:
            body["HtmlBody"] = message.html
        if text is None and message.html is None:
            raise PermanentError("postmark: the message has neither a text nor an HTML body")
        if message.reply_to:
            body["ReplyTo"] = message.reply_to
        body["Headers"] = _headers(message)
        if self.tag is not None:
            body["Tag"] = self.tag
        if self.track_opens is not None:
            body["TrackOpens"] = self.track_opens
        if self.track_links is not None:
            body["TrackLinks"] = self.track_links
        body["Metadata"] = _metadata(message)
        body["MessageStream"] = self.stream
        return body

    def _own_sender(self, message: Message) -> bool:
        return message.sender is not None and message.sender != self.sender

    async def _post(self, path: str, content: bytes) -> httpx.Response:
        return await self.request(
            "POST", path, content=content, headers={"Content-Type": "application/json"}
        )


def _array(parts: Iterable[bytes]) -> bytes:
    """The JSON array of the encoded elements `parts`."""
    return b"[" + b",".join(parts) + b"]"


def _chunks(
    encoded: Sequence[tuple[int, bytes]], limit: int
) -> Iterator[Sequence[tuple[int, bytes]]]:
    """`encoded` in order, cut into runs whose JSON array is at most `limit` bytes (a lone
    element larger than that still goes alone)."""
    start, size = 0, 2
    for n, (_, part) in enumerate(encoded):
        if n > start and size + 1 + len(part) > limit:
            yield encoded[start:n]
            start, size = n, 2
        size += len(part) + (1 if n > start else 0)
    if start < len(encoded):
        yield encoded[start:]


def _headers(message: Message) -> list[dict[str, str]]:
    ours = {MESSAGE_ID_HEADER: message.message_id, IDEMPOTENCY_HEADER: message.idempotency_key}
    reserved = {name.lower() for name in ours}
    headers = [
        {"Name": name, "Value": value}
        for name, value in message.headers.items()
        if name.lower() not in reserved
    ]
    headers.extend({"Name": name, "Value": value} for name, value in ours.items())
    return headers


def _metadata(message: Message) -> dict[str, str]:
    """`dripd_execution` first, then the message's metadata within Postmark's limits (a
    name too long or repeated is left out, a value too long is cut)."""
    metadata = {EXECUTION_KEY: str(message.execution_id)}
    seen = {EXECUTION_KEY}
    for key, value in message.metadata.items():
        if len(metadata) >= _METADATA_FIELDS:
            break
        if len(key) > _METADATA_KEY or key.lower() in seen:
            continue
        seen.add(key.lower())
        metadata[key] = value[:_METADATA_VALUE]
    return metadata


def _result(data: Mapping[str, Any], *, own_sender: bool) -> Receipt | ChannelError:
    """One message's result from its `{ErrorCode, Message, MessageID, …}`."""
    code = data.get("ErrorCode")
    message_id = json_str(data, "MessageID")
    if code == 0 and message_id:
        return Receipt(provider_message_id=message_id)
    return _code_error(code, json_str(data, "Message") or "", own_sender=own_sender)


def _element_result(element: Any, *, own_sender: bool) -> Receipt | ChannelError:
    if isinstance(element, ChannelError):
        return element
    if not isinstance(element, dict):
        return TransientError("postmark: the batch answer holds an element that is not an object")
    return _result(element, own_sender=own_sender)


def _code_error(code: Any, text: str, *, own_sender: bool) -> ChannelError:
    """The error for a non-zero Postmark ErrorCode (see the module docstring).
    `own_sender`: the message is from the step's own `from`, not the adapter's: a sender
    signature refused (400, 401) fails that message only."""
    described = f"postmark: ErrorCode {code}" + (f": {clip(text)}" if text else "")
    if code == _INACTIVE_RECIPIENT:
        return PermanentError(described, bounce=True)
    if code in _SENDER_CODES and own_sender:
        return PermanentError(f"{described} (the step's `from`)")
    if code in _ACCOUNT_CODES:
        return AdapterError(described)
    if code == 0:
        return TransientError("postmark: ErrorCode 0 but no MessageID in the answer")
    return PermanentError(described)


def _request_error(response: httpx.Response, data: Any, *, own_sender: bool) -> ChannelError:
    """The error for a whole request's answer that is not a 200: a 422 by its ErrorCode,
    any other status by `error_for_status` (401 pauses the adapter, 408/429/5xx retry)."""
    code = data.get("ErrorCode") if isinstance(data, dict) else None
    message = json_str(data, "Message") or ""
    if response.status_code == httpx.codes.UNPROCESSABLE_ENTITY and isinstance(code, int) and code:
        return _code_error(code, message, own_sender=own_sender)
    if isinstance(code, int):
        return error_for_status("postmark", response, f"ErrorCode {code}: {message}")
    return error_for_status("postmark", response)


# Feedback in -------------------------------------------------------------------------------


def receiver(adapter: Adapter, context: ReceiverContext) -> PostmarkReceiver:
    """Registry hook: the adapter's webhook receiver."""
    return PostmarkReceiver(adapter, context)


class PostmarkReceiver:
    """Verifies Postmark's webhooks by HTTP basic auth and maps their records to events.

    Postmark signs nothing: the only proof a request is Postmark's is the user name and
    password the operator put in the webhook URL (`https://user:pass@host/…`), which
    Postmark sends as `Authorization: Basic …`. Both are compared in constant time. An
    adapter without `webhook_username`/`webhook_password` refuses every request.

    No replay window: a record carries no time of sending, only when its event happened
    (`BouncedAt`, `DeliveredAt`, `ReceivedAt`, `ChangedAt`), and Postmark retries a failed
    post for about 10.5 hours (1 min … 6 h apart). A window on the event's time would
    refuse those retries, and the event would be lost. A replayed request records nothing
    new: every event is deduplicated by its id (the bounce `ID`, else a digest of the
    record's type, MessageID, recipient and time).
    """

    def __init__(self, adapter: Adapter, context: ReceiverContext | None = None) -> None:
        self._credentials = _webhook_credentials(adapter.credentials)
        self._adapter = adapter.name

    async def receive(self, request: InboundRequest) -> list[FeedbackEvent]:
        """Verify the basic auth (Unverified), then map the record (a JSON object; a JSON
        array of them is taken too) to events; BadPayload when the body is not JSON."""
        self._verify(request)
        payload = decode_json(request.body, "postmark webhook body")
        records = payload if isinstance(payload, list) else [payload]
        events: list[FeedbackEvent] = []
        for record in records:
            if not isinstance(record, dict):
                raise BadPayload("postmark webhook body is not a JSON object")
            event = _event(record)
            if event is not None:
                events.append(event)
        return events

    async def aclose(self) -> None:
        return None

    def _verify(self, request: InboundRequest) -> None:
        if self._credentials is None:
            raise Unverified(
                f"postmark adapter {self._adapter!r} has no `webhook_username` and "
                "`webhook_password` credentials, so no webhook can be verified: set them "
                "and put them in the webhook URL at Postmark (https://user:pass@host/…)"
            )
        scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() != "basic" or not token:
            raise Unverified("postmark webhook without HTTP basic credentials")
        try:
            decoded = base64.b64decode(token.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise Unverified("postmark webhook basic credentials are not readable") from None
        username, _, password = decoded.partition(":")
        expected_username, expected_password = self._credentials
        # Both compared, always: the time taken says nothing about which one differs.
        same_user = equal(username, expected_username)
        same_password = equal(password, expected_password)
        if not (same_user and same_password):
            raise Unverified("postmark webhook basic credentials do not match the adapter's")


def _event(record: Mapping[str, Any]) -> FeedbackEvent | None:
    """The event for one Postmark webhook record, or None for records dripd keeps no
    event of (a reactivation, an auto-reply, an unknown record type)."""
    kind = json_str(record, "RecordType")
    message_id = json_str(record, "MessageID") or json_str(record, "MessageId")
    common: dict[str, Any] = {
        "provider_message_id": message_id,
        "execution_id": _execution(record),
    }
    match kind:
        case "Delivery":
            recipient = json_str(record, "Recipient")
            at = json_str(record, "DeliveredAt")
            return FeedbackEvent(
                type="delivered",
                event_id=digest_id("postmark", kind, message_id, recipient, at),
                recipient=recipient,
                occurred_at=iso_time(at),
                data=_keep(details=json_str(record, "Details")),
                **common,
            )
        case "Bounce" | "SpamComplaint":
            return _bounce(kind, record, common)
        case "Open":
            recipient = json_str(record, "Recipient")
            at = json_str(record, "ReceivedAt")
            return FeedbackEvent(
                type="opened",
                event_id=digest_id("postmark", kind, message_id, recipient, at),
                recipient=recipient,
                occurred_at=iso_time(at),
                data=_keep(first_open=record.get("FirstOpen")),
                **common,
            )
        case "Click":
            recipient = json_str(record, "Recipient")
            at = json_str(record, "ReceivedAt")
            link = json_str(record, "OriginalLink")
            return FeedbackEvent(
                type="clicked",
                event_id=digest_id("postmark", kind, message_id, recipient, at, link),
                recipient=recipient,
                occurred_at=iso_time(at),
                data=_keep(url=link),
                **common,
            )
        case "SubscriptionChange":
            return _subscription_change(record, common)
        case _:
            return None


def _bounce(kind: str, record: Mapping[str, Any], common: dict[str, Any]) -> FeedbackEvent | None:
    bounce_type = json_str(record, "Type") or ""
    if bounce_type in _NOT_BOUNCES:
        return None
    recipient = json_str(record, "Email")
    at = json_str(record, "BouncedAt")
    bounce_id = record.get("ID")
    if isinstance(bounce_id, int) and not isinstance(bounce_id, bool):
        # Bounces and spam complaints share Postmark's bounce ids.
        event_id = f"postmark-bounce:{bounce_id}"
    else:
        event_id = digest_id("postmark", kind, common["provider_message_id"], recipient, at)
    data = _keep(type=bounce_type or None, type_code=record.get("TypeCode"))
    if kind == "SpamComplaint" or bounce_type == "SpamComplaint":
        return FeedbackEvent(
            type="complained",
            event_id=event_id,
            recipient=recipient,
            reason=bounce_type or kind,
            occurred_at=iso_time(at),
            data=data,
            **common,
        )
    if bounce_type == "Unsubscribe":
        return FeedbackEvent(
            type="unsubscribed",
            event_id=event_id,
            recipient=recipient,
            reason=clip(json_str(record, "Description") or bounce_type),
            occurred_at=iso_time(at),
            data=data,
            **common,
        )
    description = json_str(record, "Details") or json_str(record, "Description") or bounce_type
    return FeedbackEvent(
        type="bounced",
        event_id=event_id,
        recipient=recipient,
        permanent=bounce_type in _HARD_BOUNCES or record.get("Inactive") is True,
        reason=clip(description) or None,
        occurred_at=iso_time(at),
        data=data,
        **common,
    )


def _subscription_change(record: Mapping[str, Any], common: dict[str, Any]) -> FeedbackEvent | None:
    """A suppression added by hand or by the recipient (Postmark's unsubscribe link) is an
    unsubscribe. Suppressions added for a hard bounce or a spam complaint are left out:
    the Bounce and SpamComplaint webhooks report those (with Postmark's bounce id), and
    recording them twice would count them twice. A reactivation is not recorded."""
    if record.get("SuppressSending") is not True:
        return None
    reason = json_str(record, "SuppressionReason")
    if reason in ("HardBounce", "SpamComplaint"):
        return None
    recipient = json_str(record, "Recipient")
    at = json_str(record, "ChangedAt")
    return FeedbackEvent(
        type="unsubscribed",
        event_id=digest_id(
            "postmark", "SubscriptionChange", common["provider_message_id"], recipient, at
        ),
        recipient=recipient,
        reason=reason,
        occurred_at=iso_time(at),
        data=_keep(origin=json_str(record, "Origin")),
        **common,
    )


def _execution(record: Mapping[str, Any]) -> uuid.UUID | None:
    metadata = record.get("Metadata")
    return parse_uuid(metadata.get(EXECUTION_KEY)) if isinstance(metadata, dict) else None


def _keep(**fields: Any) -> dict[str, Any]:
    kept: dict[str, Any] = {}
    for key, value in fields.items():
        if isinstance(value, str):
            kept[key] = clip(value)
        elif value is not None:
            kept[key] = value
    return kept


SPEC = ProviderSpec(
    name="postmark",
    channels=frozenset({"email"}),
    config_keys=CONFIG_KEYS,
    required_config=frozenset({"from"}),
    credential_keys=CREDENTIAL_KEYS,
    required_credentials=frozenset({"server_token"}),
    factory=from_adapter,
    check=check,
    # The webhook user name is chosen by the operator and may be an ordinary word: found
    # whole in every encoding, but not by fragment in plain text.
    identifier_keys=frozenset({"webhook_username"}),
    receiver=receiver,
)
