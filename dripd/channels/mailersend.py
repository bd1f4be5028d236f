"""The `mailersend` provider: email through MailerSend's `POST /v1/email`, and MailerSend's
signed activity webhooks in.

Followed: developers.mailersend.com/api/v1/email (fields, 202 + `X-Message-Id`),
/general (Bearer auth, status codes), mailersend.com/help/rest-api-response-codes (a 202
with `warnings` of `ALL_SUPPRESSED` / `SOME_SUPPRESSED`), /api/v1/webhooks (events,
payloads, the `Signature` header, retries). See providers.md §6.

What goes out (JSON, header `Authorization: Bearer <api_key>`):

    from       {email, name} of the step's `from`, else the adapter's `from`
    to         [{email, name}] (`;` and `,` are left out of the name: MailerSend refuses them)
    reply_to   {email, name} of the step's `reply_to`
    subject, text, html
    headers    the step's extra headers (List-Unsubscribe…) as [{name, value}]; dripd adds
               none of its own: MailerSend offers custom headers on some plans only
    tags       config `tags` (at most 5)
    settings   {track_opens, track_clicks} from the config, when set

MailerSend has no idempotency key and no custom metadata: a send retried after a lost
answer may go out twice, and webhooks correlate by the message id (`X-Message-Id`, which
the webhooks carry as `data.message_id`).

Answers:

    202 (X-Message-Id)                          Receipt(X-Message-Id)
    202 with ALL_SUPPRESSED, or SOME_SUPPRESSED naming the recipient
                                                PermanentError(bounce): not sent, suppress
    401, 403                                    AdapterError (token refused or not allowed)
    408, 429, 5xx, no answer                    TransientError(provider_wide), Retry-After
    other 4xx (422 validation…)                 PermanentError with MailerSend's message
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Final

import httpx
import msgspec

from dripd.channels.base import (
    ChannelContext,
    Message,
    PermanentError,
    Receipt,
)
from dripd.channels.feedback import (
    FeedbackEvent,
    InboundRequest,
    ReceiverContext,
    Unverified,
    check_window,
    decode_object,
    digest_id,
    equal,
    hmac_sha256_hex,
    iso_time,
)
from dripd.channels.http import (
    HTTP_CONFIG_KEYS,
    HttpProvider,
    check_http_config,
    clip,
    config_bool,
    credential_str,
    error_for_status,
    json_body,
    json_dict,
    json_str,
    string_list,
)
from dripd.channels.spec import ProviderSpec
from dripd.errors import ConfigError
from dripd.model import Adapter

__all__ = [
    "CONFIG_KEYS",
    "TEST_SIGNING_SECRET",
    "MailerSendChannel",
    "MailerSendReceiver",
    "check",
    "from_adapter",
    "receiver",
]

CONFIG_KEYS: Final = HTTP_CONFIG_KEYS | {"tags", "track_opens", "track_clicks"}
CREDENTIAL_KEYS: Final = frozenset({"api_key", "webhook_secret"})
MAX_TAGS: Final = 5

#: MailerSend signs the `webhook.test` ping it sends when a webhook is saved with this
#: published secret, not the webhook's own: the ping must get a 2xx for the webhook to be
#: saved. A ping verified by it is answered and records nothing.
TEST_SIGNING_SECRET: Final = "test_Am3L1GuOIc4blLUuHqAPxxwkZaJyEk8G"  # noqa: S105 - public, see above

_SUPPRESSED: Final = ("ALL_SUPPRESSED", "SOME_SUPPRESSED")
# "The name is alphanumeric with `-`" (MailerSend's custom header rule).
_HEADER_NAME: Final = re.compile(r"[A-Za-z0-9-]+")

# activity.<type> -> (dripd event type, permanent)
_EVENTS: Final[Mapping[str, tuple[str, bool]]] = {
    "activity.delivered": ("delivered", False),
    "activity.soft_bounced": ("bounced", False),
    "activity.hard_bounced": ("bounced", True),
    "activity.deferred": ("deferred", False),
    "activity.opened": ("opened", False),
    "activity.opened_unique": ("opened", False),
    "activity.clicked": ("clicked", False),
    "activity.clicked_unique": ("clicked", False),
    "activity.spam_complaint": ("complained", False),
    "activity.unsubscribed": ("unsubscribed", False),
}


def check(config: Mapping[str, Any], credentials: Mapping[str, Any]) -> None:
    """Registry hook: ConfigError naming the key if these maps are not a `mailersend`
    adapter."""
    check_http_config(config)
    tags = config.get("tags")
    if tags is not None and not string_list(tags, least=0, most=MAX_TAGS):
        raise ConfigError(
            f"mailersend adapter config `tags` must be a list of at most {MAX_TAGS} "
            "non-empty strings"
        )
    for key in ("track_opens", "track_clicks"):
        config_bool(config, key, provider="mailersend")
    credential_str(credentials, "api_key", required=True)
    credential_str(credentials, "webhook_secret")


def from_adapter(adapter: Adapter, context: ChannelContext | None = None) -> MailerSendChannel:
    """Registry factory: the channel with its pooled client (nothing is sent yet)."""
    return MailerSendChannel(adapter, context)


class MailerSendChannel(HttpProvider):
    """Sends one message per `POST /v1/email`."""

    provider = "mailersend"
    default_base_url = "https://api.mailersend.com"

    def __init__(self, adapter: Adapter, context: ChannelContext | None = None) -> None:
        config = adapter.config
        key = credential_str(adapter.credentials, "api_key", required=True) or ""
        super().__init__(
            adapter,
            context,
            headers={"Authorization": f"Bearer {key}", "Accept": "application/json"},
        )
        self.sender = str(config["from"])
        tags = config.get("tags")
        self.tags: list[str] | None = list(tags) if tags else None
        self.settings = {
            name: config[key]
            for name, key in (("track_opens", "track_opens"), ("track_clicks", "track_clicks"))
            if config.get(key) is not None
        }

    async def send(self, message: Message) -> Receipt:
        """Deliver `message`: Receipt(X-Message-Id), or the error the answer maps to (see
        the module docstring)."""
        response = await self.request(
            "POST",
            "/v1/email",
            content=msgspec.json.encode(self.payload(message)),
            headers={"Content-Type": "application/json"},
        )
        status = response.status_code
        data = json_body(response)
        if status == httpx.codes.ACCEPTED:
            _check_suppressed(data, message.to)
            return Receipt(provider_message_id=response.headers.get("x-message-id") or None)
        raise error_for_status(
            "mailersend",
            response,
            _error_text(data),
            adapter_statuses=frozenset({httpx.codes.UNAUTHORIZED, httpx.codes.FORBIDDEN}),
        )

    def payload(self, message: Message) -> dict[str, Any]:
        """The JSON object `POST /v1/email` takes for `message`. PermanentError when the
        sender or reply-to is not a mailbox, or a header name is one MailerSend refuses."""
        body: dict[str, Any] = {
            "from": _contact(message.sender or self.sender, "from"),
            "to": [_recipient(message)],
        }
        if message.reply_to:
            body["reply_to"] = _contact(message.reply_to, "reply_to")
        if message.subject is not None:
            body["subject"] = message.subject
        text = message.text if message.text is not None else message.body
        if text is not None:
            body["text"] = text
        if message.html is not None:
            body["html"] = message.html
        if message.headers:
            body["headers"] = _headers(message.headers)
        if self.tags:
            body["tags"] = self.tags
        if self.settings:
            body["settings"] = dict(self.settings)
        return body


def _contact(mailbox: str, what: str) -> dict[str, str]:
    name, address = email.utils.parseaddr(mailbox)
    if "@" not in address:
        raise PermanentError(f"mailersend: `{what}` {mailbox[:100]!r} is not a mailbox")
    contact = {"email": address}
    if name:
        contact["name"] = name
    return contact


def _recipient(message: Message) -> dict[str, str]:
    contact = {"email": message.to}
    name = " ".join((message.to_name or "").replace(";", " ").replace(",", " ").split())
    if name:
        contact["name"] = name
    return contact


def _headers(headers: Mapping[str, str]) -> list[dict[str, str]]:
    for name in headers:
        if not _HEADER_NAME.fullmatch(name):
            raise PermanentError(
                f"mailersend: header name {name[:100]!r} is refused by MailerSend "
                "(letters, digits and '-' only)"
            )
    return [{"name": name, "value": value} for name, value in headers.items()]


def _check_suppressed(data: Any, recipient: str) -> None:
    """PermanentError(bounce) when a 202's `warnings` say the recipient was suppressed:
    MailerSend accepted the request but sends nothing to a suppressed address."""
    if not isinstance(data, dict) or not isinstance(data.get("warnings"), list):
        return
    wanted = recipient.lower()
    for warning in data["warnings"]:
        if not isinstance(warning, dict) or warning.get("type") not in _SUPPRESSED:
            continue
        listed = [
            entry
            for entry in warning.get("recipients") or []
            if isinstance(entry, dict) and str(entry.get("email", "")).lower() == wanted
        ]
        if warning["type"] == "SOME_SUPPRESSED" and not listed:
            continue
        reasons = sorted(
            {
                str(reason)
                for entry in listed
                for reason in (entry.get("reasons") or [])
                if isinstance(reason, str)
            }
        )
        text = warning.get("message") if isinstance(warning.get("message"), str) else ""
        because = f" ({', '.join(reasons)})" if reasons else ""
        raise PermanentError(
            f"mailersend: {warning['type']}: the recipient is suppressed{because}: "
            f"{clip(str(text))}".rstrip(": "),
            bounce=True,
        )


def _error_text(data: Any) -> str | None:
    """MailerSend's `message`, and the first field error of a 422's `errors`."""
    if not isinstance(data, dict):
        return None
    text = json_str(data, "message") or ""
    errors = data.get("errors")
    if isinstance(errors, dict):
        for field, problems in errors.items():
            if isinstance(problems, list) and problems:
                text = f"{text} {field}: {problems[0]}".strip()
                break
    return text or None


# Feedback in -------------------------------------------------------------------------------


def receiver(adapter: Adapter, context: ReceiverContext) -> MailerSendReceiver:
    """Registry hook: the adapter's webhook receiver."""
    return MailerSendReceiver(adapter, context)


class MailerSendReceiver:
    """Verifies MailerSend's webhooks and maps their activity events.

    MailerSend sends `Signature: <hex HMAC-SHA256 of the raw body>` keyed with the
    webhook's signing secret (credential `webhook_secret`); it is compared in constant
    time. The body's `created_at` (when MailerSend created the event, inside what is
    signed; the `data` object's when the top level has none) is required and must be within
    the replay window: MailerSend retries a failed call only twice, 10 and 100 seconds
    later. An adapter without `webhook_secret` refuses every request. The `webhook.test`
    ping MailerSend sends when a webhook is saved is signed with MailerSend's published
    test secret; it is accepted and records nothing.
    """

    def __init__(self, adapter: Adapter, context: ReceiverContext | None = None) -> None:
        self._secret = credential_str(adapter.credentials, "webhook_secret")
        self._adapter = adapter.name
        self._window = (context or ReceiverContext()).replay_window

    async def receive(self, request: InboundRequest) -> Sequence[FeedbackEvent]:
        """Verify the signature and window (Unverified), then map the event (BadPayload
        when the body is not a JSON object); [] for events dripd keeps nothing of."""
        if self._secret is None:
            raise Unverified(
                f"mailersend adapter {self._adapter!r} has no `webhook_secret` credential, "
                "so no webhook can be verified: set it to the webhook's signing secret"
            )
        signature = request.headers.get("signature", "").strip().lower()
        if not signature:
            raise Unverified("mailersend webhook without a Signature header")
        if not equal(signature, hmac_sha256_hex(self._secret, request.body)):
            if (
                equal(signature, hmac_sha256_hex(TEST_SIGNING_SECRET, request.body))
                and _decode(request.body).get("type") == "webhook.test"
            ):
                return []
            raise Unverified("mailersend webhook signature does not match")
        payload = _decode(request.body)
        kind = payload.get("type")
        if kind == "webhook.test":
            return []
        created = _when(payload.get("created_at"))
        data = json_dict(payload, "data")
        if created is None:
            created = _when(data.get("created_at"))
        if created is None:
            # Without its signed time a captured request could be replayed at any time.
            raise Unverified("mailersend webhook without a readable `created_at` time")
        check_window(created, request.received_at, self._window, "mailersend created_at")
        if not isinstance(kind, str) or kind not in _EVENTS:
            return []
        return [_event(_EVENTS[kind], kind, data, created)]

    async def aclose(self) -> None:
        return None


def _decode(body: bytes) -> dict[str, Any]:
    return decode_object(body, "mailersend webhook body")


def _event(
    mapped: tuple[str, bool], kind: str, data: Mapping[str, Any], created: datetime | None
) -> FeedbackEvent:
    """One event from `data`, in either payload shape: the current one (`message_id`,
    `recipient` or `email` as a string, `meta`) or the legacy one (`email.message.id`,
    `email.recipient.email`, `morph`)."""
    event_type, permanent = mapped
    legacy = json_dict(data, "email")
    message_id = json_str(data, "message_id") or json_str(json_dict(legacy, "message"), "id")
    recipient = (
        json_str(data, "recipient")
        or json_str(data, "email")
        or json_str(json_dict(legacy, "recipient"), "email")
    )
    meta = json_dict(data, "meta")
    morph = json_dict(data, "morph")
    event_id = json_str(data, "id") or digest_id(
        "mailersend", kind, message_id, recipient, created.isoformat() if created else None
    )
    reason = (
        json_str(meta, "bounce_reason")
        or json_str(meta, "unsubscribe_reason")
        or json_str(morph, "readable_reason")
        or json_str(morph, "reason")
    )
    kept: dict[str, Any] = {}
    url = json_str(meta, "url") or json_str(morph, "url")
    if url is not None:
        kept["url"] = url
    code = meta.get("bounce_code")
    if isinstance(code, int | str) and not isinstance(code, bool):
        kept["bounce_code"] = str(code)
    return FeedbackEvent(
        type=event_type,
        event_id=event_id,
        provider_message_id=message_id,
        execution_id=None,
        recipient=recipient,
        permanent=permanent,
        reason=clip(reason) if reason else None,
        occurred_at=created,
        data=kept,
    )


def _when(value: Any) -> datetime | None:
    """`2025-08-05T21:23:54.000000Z`, or `2025-08-05 22:27:14` (UTC, as MailerSend writes
    some events' times), or None."""
    return iso_time(value, naive_utc=True)


SPEC = ProviderSpec(
    name="mailersend",
    channels=frozenset({"email"}),
    config_keys=CONFIG_KEYS,
    required_config=frozenset({"from"}),
    credential_keys=CREDENTIAL_KEYS,
    required_credentials=frozenset({"api_key"}),
    factory=from_adapter,
    check=check,
    receiver=receiver,
)
