"""The `sendgrid` provider: email through SendGrid's v3 Mail Send API, and its Signed Event
Webhook in.

Outbound (providers.md §2; twilio/sendgrid-oai `tsg_mail_v3.yaml`): one
`POST /v3/mail/send` per message, `Authorization: Bearer <api_key>`, a JSON body with one
personalization whose `custom_args` carry `dripd_execution` (the execution id), so every
event SendGrid reports names its execution. 202 is the only success (200 is sandbox mode:
nothing queued); the `X-Message-Id` answer header is the provider message id.

No batching: one request may carry 1000 personalizations, but SendGrid validates the request
as a whole (one malformed address is a 400 for all of them) and answers with one
`X-Message-Id`, so one bad recipient would fail the others and no message would get its own
result (providers.md §14).

Inbound (SendGrid "Getting Started with the Event Webhook Security Features"): the body is a
JSON array of events, signed with ECDSA P-256 / SHA-256 over the
`X-Twilio-Email-Event-Webhook-Timestamp` header followed by the raw body; the signature is
the base64 DER in `X-Twilio-Email-Event-Webhook-Signature`, verified against the adapter's
`webhook_public_key` (the base64 DER SubjectPublicKeyInfo SendGrid shows, or PEM).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from typing import Any, Final

import httpx
import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from dripd import addresses
from dripd.channels import mime
from dripd.channels.base import (
    ChannelContext,
    ChannelError,
    Message,
    PermanentError,
    Receipt,
    TransientError,
)
from dripd.channels.feedback import (
    BadPayload,
    FeedbackEvent,
    InboundRequest,
    ReceiverContext,
    Unverified,
    check_window,
    decode_json,
    digest_id,
    epoch_text,
    epoch_time,
    parse_uuid,
    scalar_text,
)
from dripd.channels.http import (
    HTTP_CONFIG_KEYS,
    MAX_RETRY_AFTER,
    HttpProvider,
    check_http_config,
    config_choice,
    config_str,
    credential_str,
    detail,
    error_for_status,
    json_body,
    retry_after,
    string_list,
)
from dripd.channels.spec import ProviderSpec
from dripd.clock import Clock, SystemClock
from dripd.errors import ConfigError
from dripd.model import Adapter

__all__ = [
    "CONFIG_KEYS",
    "SPEC",
    "SendgridChannel",
    "SendgridReceiver",
    "check",
    "load_public_key",
    "map_event",
    "message_id_key",
]

CONFIG_KEYS: Final = HTTP_CONFIG_KEYS | {"region", "categories", "asm_group_id", "ip_pool_name"}

#: The API host per `region` (twilio/sendgrid-oai `tsg_mail_v3.yaml` servers).
REGIONS: Final = {"global": "https://api.sendgrid.com", "eu": "https://api.eu.sendgrid.com"}
SEND_PATH: Final = "/v3/mail/send"

#: The custom argument that carries the execution id (and comes back in every event).
EXECUTION_ARG: Final = "dripd_execution"

#: Headers the `headers` object may not set (tsg_mail_v3.yaml): dripd carries To, From,
#: Subject and Reply-To in their own fields; the rest are SendGrid's or the MIME writer's.
RESERVED_HEADERS: Final = frozenset(
    {
        "x-sg-id",
        "x-sg-eid",
        "received",
        "dkim-signature",
        "content-type",
        "content-transfer-encoding",
        "to",
        "from",
        "subject",
        "reply-to",
        "cc",
        "bcc",
    }
)

SIGNATURE_HEADER: Final = "x-twilio-email-event-webhook-signature"
TIMESTAMP_HEADER: Final = "x-twilio-email-event-webhook-timestamp"

MAX_CATEGORIES: Final = 10
MAX_CATEGORY_LENGTH: Final = 255
# Below this an `X-RateLimit-Reset` reads as seconds to wait rather than an epoch time.
_EPOCH_FLOOR: Final = 1_000_000_000
_MAX_REASON: Final = 300

# `dropped` reasons (SendGrid's Event Webhook reference) that say the address will never
# take mail from this account: (event type, permanent).
_DROPPED: Final = {
    "bounced address": ("bounced", True),
    "invalid": ("bounced", True),
    "unsubscribed address": ("unsubscribed", False),
    "spam reporting address": ("complained", False),
}
_SIMPLE: Final = {
    "delivered": "delivered",
    "open": "opened",
    "click": "clicked",
    "deferred": "deferred",
    "spamreport": "complained",
    "spam_report": "complained",
    "unsubscribe": "unsubscribed",
    "group_unsubscribe": "unsubscribed",
}


def check(config: Mapping[str, Any], credentials: Mapping[str, Any]) -> None:
    """Registry hook: ConfigError naming the key when these maps are not a `sendgrid`
    adapter (the config's `region`, `categories`, `asm_group_id`, `ip_pool_name`, `from`;
    the `api_key`; a `webhook_public_key` that is not an ECDSA P-256 public key)."""
    check_http_config(config)
    _settings(config)
    credential_str(credentials, "api_key", required=True)
    key = _public_key_text(credentials)
    if key is not None:
        load_public_key(key)


def _public_key_text(credentials: Mapping[str, Any]) -> str | None:
    """The `webhook_public_key` credential's text (a PEM block spans lines)."""
    return credential_str(credentials, "webhook_public_key", multiline=True)


def _settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The body fields the adapter's config adds to every send, checked."""
    config_choice(config, "region", REGIONS, "global")
    extra: dict[str, Any] = {}
    categories = config.get("categories")
    if categories is not None:
        if not string_list(
            categories, most=MAX_CATEGORIES, longest=MAX_CATEGORY_LENGTH, distinct=True
        ):
            raise ConfigError(
                f"adapter config `categories` must be a list of 1 to {MAX_CATEGORIES} distinct "
                f"non-empty strings of at most {MAX_CATEGORY_LENGTH} characters"
            )
        extra["categories"] = list(categories)
    group = config.get("asm_group_id")
    if group is not None:
        if isinstance(group, bool) or not isinstance(group, int) or group < 1:
            raise ConfigError(
                "adapter config `asm_group_id` must be a positive integer (a SendGrid "
                "unsubscribe group id)"
            )
        extra["asm"] = {"group_id": group}
    pool = config_str(config, "ip_pool_name", max_length=64)
    if pool is not None:
        if len(pool) < 2:
            raise ConfigError("adapter config `ip_pool_name` must be 2 to 64 characters")
        extra["ip_pool_name"] = pool
    return extra


def _mailbox(text: str, where: str) -> dict[str, str]:
    """`{email, name?}` for `text` (`addr` or `Name <addr>`); ConfigError naming `where`."""
    read = addresses.recipient("email", text, field=where)
    box = {"email": read.address}
    if read.display_name:
        box["name"] = read.display_name
    return box


def load_public_key(text: str) -> ec.EllipticCurvePublicKey:
    """The Signed Event Webhook's verification key from `text`: base64 of the DER
    SubjectPublicKeyInfo (what SendGrid's settings page shows), or a PEM block.
    ConfigError (naming the credential, never quoting it) unless it is a P-256 key."""
    try:
        if "-----BEGIN" in text:
            key = serialization.load_pem_public_key(text.strip().encode())
        else:
            der = base64.b64decode("".join(text.split()), validate=True)
            key = serialization.load_der_public_key(der)
    except (ValueError, TypeError, binascii.Error, UnicodeError):
        raise ConfigError(
            "adapter credential `webhook_public_key` is not a public key (give the base64 "
            "verification key SendGrid shows for the Signed Event Webhook, or a PEM block)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError(
            "adapter credential `webhook_public_key` is not an ECDSA P-256 public key"
        )
    return key


def message_id_key(value: str) -> str:
    """The part of a SendGrid message id that correlates a send with its events: up to the
    first `.`. `X-Message-Id` names the request and each event's `sg_message_id` begins
    with it (providers.md §2), followed by `.`-separated parts of SendGrid's own; cutting
    both at the first `.` makes them equal whichever id format the account gets."""
    return value.strip().split(".", 1)[0]


class SendgridChannel(HttpProvider):
    """Sends each message with one `POST /v3/mail/send` (providers.md §2)."""

    provider = "sendgrid"
    default_base_url = REGIONS["global"]

    def __init__(
        self, adapter: Adapter, context: ChannelContext | None = None, *, clock: Clock | None = None
    ) -> None:
        config = adapter.config
        self._extra = _settings(config)
        self._sender = _mailbox(str(config["from"]), "adapter config `from`")
        region = config.get("region") or "global"
        api_key = credential_str(adapter.credentials, "api_key", required=True)
        super().__init__(
            adapter,
            context,
            base_url=config.get("base_url") or REGIONS[region],
            headers={"Authorization": f"Bearer {api_key}"},
        )
        self.clock: Clock = clock or SystemClock()

    def body(self, message: Message) -> dict[str, Any]:
        """The Mail Send JSON for `message` (tsg_mail_v3.yaml field names). PermanentError
        when the step's `from` or `reply_to` is not a mailbox, or the message has no
        content."""
        sender = self._sender
        if message.sender:
            sender = self._step_mailbox(message.sender, "from")
        to: dict[str, str] = {"email": message.to}
        if message.to_name:
            to["name"] = message.to_name
        custom_args = {EXECUTION_ARG: str(message.execution_id)}
        for key, value in message.metadata.items():
            if isinstance(value, str) and value:
                custom_args[f"dripd_{key}"] = value
        body: dict[str, Any] = {
            "personalizations": [{"to": [to], "custom_args": custom_args}],
            "from": sender,
        }
        if message.reply_to:
            body["reply_to"] = self._step_mailbox(message.reply_to, "reply_to")
        if message.subject:
            body["subject"] = message.subject
        text = message.text if message.text is not None else message.body
        # text/plain first, then text/html; each once, never empty (a 400 otherwise).
        content = [
            {"type": kind, "value": value}
            for kind, value in (("text/plain", text), ("text/html", message.html))
            if value
        ]
        if not content:
            raise PermanentError("sendgrid: the message has neither text nor html to send")
        body["content"] = content
        headers = {
            name: value
            for name, value in message.headers.items()
            if name.lower() not in RESERVED_HEADERS
        }
        headers["Message-ID"] = message.message_id
        headers[mime.IDEMPOTENCY_HEADER] = message.idempotency_key
        body["headers"] = headers
        body.update(self._extra)
        return body

    def _step_mailbox(self, text: str, key: str) -> dict[str, str]:
        try:
            return _mailbox(text, f"step `{key}`")
        except ConfigError as exc:
            raise PermanentError(f"sendgrid: {exc.message}") from exc

    async def send(self, message: Message) -> Receipt:
        """Deliver `message`; the receipt holds `X-Message-Id` cut at its first `.`
        (`message_id_key`). Raises TransientError (429 with the wait from
        `X-RateLimit-Reset` or `Retry-After`, 408, 5xx, no answer), AdapterError (401;
        403 but for a step's own `from` refused; 404/405: not the Mail Send endpoint),
        PermanentError (400 with SendGrid's `errors[].message`, 413, 200 sandbox mode)."""
        payload = msgspec.json.encode(self.body(message))
        response = await self.request(
            "POST", SEND_PATH, content=payload, headers={"Content-Type": "application/json"}
        )
        if response.status_code == 202:
            message_id = response.headers.get("x-message-id")
            return Receipt(provider_message_id=message_id_key(message_id) if message_id else None)
        raise self.error(response, message)

    def error(self, response: httpx.Response, message: Message) -> ChannelError:
        """The error for a SendGrid answer other than 202 (providers.md §2)."""
        status = response.status_code
        errors = _errors(response)
        text = "; ".join(m for m, _ in errors) if errors else None
        what = f"sendgrid: {detail(response, text)}"
        if status == 200:
            return PermanentError(
                f"{what}: sandbox mode is on (mail_settings.sandbox_mode): nothing was queued"
            )
        if status == 429:
            return TransientError(
                what, provider_wide=True, retry_after=self.rate_limit_wait(response)
            )
        if status == 403 and self._own_sender(message) and any(f == "from" for _, f in errors):
            # The step's own sender is not a verified identity: only its messages fail.
            return PermanentError(what)
        return error_for_status(
            "sendgrid", response, text, adapter_statuses=frozenset({401, 403, 404, 405})
        )

    def _own_sender(self, message: Message) -> bool:
        """Whether `message` goes out from a step's `from` other than the adapter's."""
        if not message.sender:
            return False
        email = _mailbox(message.sender, "from")["email"]
        return email.lower() != self._sender["email"].lower()

    def rate_limit_wait(self, response: httpx.Response) -> float | None:
        """Seconds until `X-RateLimit-Reset` (epoch seconds, SendGrid's rate-limit page),
        else `Retry-After`; None when neither is readable. At most a day."""
        reset = response.headers.get("x-ratelimit-reset", "").strip()
        if reset.isascii() and reset.isdigit():
            value = float(reset)
            if value >= _EPOCH_FLOOR:
                value -= self.clock.now().timestamp()
            return min(max(value, 0.0), MAX_RETRY_AFTER)
        return retry_after(response, now=self.clock.now())


def _errors(response: httpx.Response) -> list[tuple[str, str | None]]:
    """SendGrid's `errors[]` as (message, field) pairs."""
    data = json_body(response)
    items = data.get("errors") if isinstance(data, dict) else None
    if not isinstance(items, list):
        return []
    found: list[tuple[str, str | None]] = []
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("message"), str):
            field = item.get("field")
            found.append((item["message"], field if isinstance(field, str) else None))
    return found


def from_adapter(adapter: Adapter, context: ChannelContext) -> SendgridChannel:
    """Registry factory."""
    return SendgridChannel(adapter, context)


class SendgridReceiver:
    """Verifies a Signed Event Webhook request and maps every event of its array.

    Without a `webhook_public_key` among the adapter's credentials every request is refused
    (Unverified): dripd never records unsigned feedback."""

    def __init__(
        self, public_key: ec.EllipticCurvePublicKey | None, context: ReceiverContext
    ) -> None:
        self._key = public_key
        self._window = context.replay_window

    @classmethod
    def from_adapter(cls, adapter: Adapter, context: ReceiverContext) -> SendgridReceiver:
        """Registry receiver factory; ConfigError when the public key cannot be read."""
        text = _public_key_text(adapter.credentials)
        return cls(load_public_key(text) if text is not None else None, context)

    async def receive(self, request: InboundRequest) -> Sequence[FeedbackEvent]:
        """Unverified unless the signature holds for timestamp + body and the timestamp is
        within the replay window; BadPayload when the body is not a JSON array of objects.
        One event per mapped element, in order; `processed` and unknown events are left
        out."""
        self.verify(request)
        data = decode_json(request.body, "sendgrid: the body")
        if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
            raise BadPayload("sendgrid: the body is not a JSON array of event objects")
        return [event for item in data if (event := map_event(item)) is not None]

    def verify(self, request: InboundRequest) -> None:
        """Unverified unless the request is SendGrid's and fresh."""
        if self._key is None:
            raise Unverified(
                "sendgrid: the adapter has no `webhook_public_key` credential: enable the "
                "Signed Event Webhook and add its verification key to the adapter"
            )
        signature = request.headers.get(SIGNATURE_HEADER)
        stamp = request.headers.get(TIMESTAMP_HEADER)
        if not signature or not stamp:
            raise Unverified("sendgrid: the signature or timestamp header is missing")
        stamp = stamp.strip()
        signed_at = epoch_text(stamp)
        if signed_at is None:
            raise Unverified("sendgrid: the timestamp header is not epoch seconds")
        try:
            der = base64.b64decode(signature.strip(), validate=True)
        except (ValueError, binascii.Error):
            raise Unverified("sendgrid: the signature is not base64") from None
        try:
            self._key.verify(der, stamp.encode() + request.body, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            raise Unverified("sendgrid: the signature does not verify") from None
        check_window(signed_at, request.received_at, self._window, "sendgrid")

    async def aclose(self) -> None:
        return None


def map_event(event: Mapping[str, Any]) -> FeedbackEvent | None:
    """One Event Webhook object as a FeedbackEvent, or None when dripd does not track it
    (`processed`, `group_resubscribe`, unknown kinds). Field names from SendGrid's Event
    Webhook reference: `event`, `email`, `timestamp`, `sg_event_id`, `sg_message_id`,
    `reason`, `type` (bounce: `bounce` | `blocked`), `status`, `response`, `url`; custom
    arguments come back as top-level keys (`dripd_execution`)."""
    kind = event.get("event")
    if not isinstance(kind, str):
        return None
    permanent = False
    reason = scalar_text(event.get("reason"))
    data: dict[str, Any] = {}
    if kind in _SIMPLE:
        type_ = _SIMPLE[kind]
        if kind == "deferred":
            reason = reason or scalar_text(event.get("response"))
            if (attempt := scalar_text(event.get("attempt"))) is not None:
                data["attempt"] = attempt
        elif kind == "click" and (url := scalar_text(event.get("url"))) is not None:
            data["url"] = url
        elif kind == "open" and event.get("sg_machine_open") is True:
            data["machine_open"] = True
    elif kind == "bounce":
        type_ = "bounced"
        # `blocked`: the receiving server refused this message (often content or
        # reputation), not the address; a missing type is an older bounce.
        permanent = event.get("type") != "blocked"
        for name in ("status", "type", "bounce_classification"):
            if (value := scalar_text(event.get(name))) is not None:
                data[name] = value
    elif kind == "dropped":
        type_, permanent = _DROPPED.get((reason or "").strip().lower(), ("failed", False))
    else:
        return None
    message_id = scalar_text(event.get("sg_message_id"))
    stamp = event.get("timestamp")
    recipient = scalar_text(event.get("email"))
    event_id = scalar_text(event.get("sg_event_id")) or digest_id(
        "sendgrid", kind, recipient, stamp, message_id, reason
    )
    return FeedbackEvent(
        type=type_,
        event_id=event_id,
        provider_message_id=message_id_key(message_id) if message_id else None,
        execution_id=parse_uuid(event.get(EXECUTION_ARG)),
        recipient=recipient,
        permanent=permanent,
        reason=reason[:_MAX_REASON] if reason else None,
        occurred_at=epoch_time(stamp),
        data=data,
    )


SPEC = ProviderSpec(
    name="sendgrid",
    channels=frozenset({"email"}),
    config_keys=CONFIG_KEYS,
    required_config=frozenset({"from"}),
    credential_keys=frozenset({"api_key", "webhook_public_key"}),
    required_credentials=frozenset({"api_key"}),
    factory=from_adapter,
    check=check,
    receiver=SendgridReceiver.from_adapter,
)
