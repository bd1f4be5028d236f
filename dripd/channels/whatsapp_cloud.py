"""The `whatsapp_cloud` provider: WhatsApp text and approved-template messages through
Meta's WhatsApp Cloud API, and its messages webhook in (providers.md §11).

Out: `POST /{api_version}/{phone_number_id}/messages` on graph.facebook.com, a JSON body,
`Authorization: Bearer <access_token>`. In: `POST /webhooks/whatsapp_cloud/{adapter}` takes
the app's `messages` webhook (statuses and inbound messages), verified by
`X-Hub-Signature-256` with the app secret.

A step sends a template when its message's metadata holds `template_name`; then
`template_language` (a code like `en_US`) is required, and `template_params`, a JSON array
of strings, fills the template body's `{{1}}`, `{{2}}`, … in order. The rendered body is
not sent with a template. Without `template_name` the body goes as a text message (which
WhatsApp delivers only inside the 24-hour customer-service window).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
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
)
from dripd.channels.feedback import (
    BadPayload,
    FeedbackEvent,
    InboundRequest,
    ReceiverContext,
    Unverified,
    decode_json,
    epoch_text,
    equal,
    hmac_sha256_hex,
    inbound_message,
    parse_uuid,
)
from dripd.channels.http import (
    HTTP_CONFIG_KEYS,
    HttpProvider,
    check_http_config,
    config_bool,
    config_str,
    credential_str,
    detail,
    error_for_status,
    json_body,
    json_dict,
    json_str,
    retry_after,
)
from dripd.channels.spec import ProviderSpec
from dripd.errors import ConfigError
from dripd.model import Adapter

__all__ = [
    "CONFIG_KEYS",
    "DEFAULT_API_VERSION",
    "TEMPLATE_LANGUAGE",
    "TEMPLATE_NAME",
    "TEMPLATE_PARAMS",
    "WhatsAppChannel",
    "WhatsAppReceiver",
    "check",
]

CONFIG_KEYS: Final = HTTP_CONFIG_KEYS | {"phone_number_id", "api_version", "preview_url"}
DEFAULT_API_VERSION: Final = "v23.0"

#: Message metadata keys a step sets to send an approved template instead of text.
TEMPLATE_NAME: Final = "template_name"
TEMPLATE_LANGUAGE: Final = "template_language"
TEMPLATE_PARAMS: Final = "template_params"  # a JSON array of strings

#: The longest text body WhatsApp takes (characters).
MAX_TEXT: Final = 4096
#: Meta's limit on `biz_opaque_callback_data` (bytes); an execution id is 36.
_MAX_CALLBACK_DATA = 512

_PHONE_NUMBER_ID = re.compile(r"[0-9]{1,30}")
_API_VERSION = re.compile(r"v[0-9]{1,3}\.[0-9]{1,3}")
_TEMPLATE_NAME = re.compile(r"[a-z0-9_]{1,512}")
_LANGUAGE = re.compile(r"[A-Za-z]{2,3}(_[A-Za-z0-9]{2,4})?")
_SIGNATURE_HEADER = "x-hub-signature-256"

# Error codes of the Graph API and the Cloud API (providers.md §11, from mirrors of Meta's
# error-code page): decided on `error.code`, as Meta advises, not on the HTTP status.
_ADAPTER_CODES = frozenset(
    {
        190,  # access token expired or revoked
        10,  # permission denied
        368,  # temporarily blocked for policy violations
        131031,  # business account locked
        131042,  # business eligibility (payment) issue
        133010,  # the phone number is not registered on the Cloud API
        *range(200, 300),  # API permission errors
    }
)
_THROTTLE_CODES = frozenset(
    {
        1,  # API unknown (Meta: retry)
        2,  # API service temporarily unavailable
        4,  # application request limit reached
        80007,  # WhatsApp Business Account rate limit
        130429,  # Cloud API throughput limit
        131000,  # something went wrong (Meta: retry)
        131016,  # service unavailable
        131048,  # spam rate limit: back off
    }
)
#: Too many messages to this one recipient: retry this message later; others can go.
_PAIR_RATE_LIMIT = 131056
_PERMANENT_CODES = frozenset({100, 131008, 131009, 131026, 131030, 131047, 131051, 132000, 132001})

# Webhook `statuses[].errors[].code`: the recipient stopped marketing messages (suppress),
# and "message undeliverable" (no WhatsApp account, old app: a temporary bounce).
_MARKETING_OPT_OUT = 131050
_UNDELIVERABLE = 131026


def check(config: Mapping[str, Any], credentials: Mapping[str, Any]) -> None:
    """Registry hook: ConfigError naming the key unless these maps are a `whatsapp_cloud`
    adapter: `phone_number_id` digits, `api_version` like v23.0, `preview_url` a boolean,
    `access_token`, optional `app_secret` (webhooks) and `verify_token` (the GET handshake)."""
    check_http_config(config)
    number = config.get("phone_number_id")
    if isinstance(number, int) and not isinstance(number, bool):
        number = str(number)
    if not isinstance(number, str) or not _PHONE_NUMBER_ID.fullmatch(number):
        raise ConfigError(
            "adapter config `phone_number_id` must be the WhatsApp phone number id "
            "(digits, from the app's WhatsApp > API Setup page)"
        )
    version = config_str(config, "api_version", max_length=10)
    if version is not None and not _API_VERSION.fullmatch(version):
        raise ConfigError(f"adapter config `api_version` {version!r} is not like v23.0")
    config_bool(config, "preview_url")
    credential_str(credentials, "access_token", required=True)
    credential_str(credentials, "app_secret")
    credential_str(credentials, "verify_token")


def from_adapter(adapter: Adapter, context: ChannelContext) -> WhatsAppChannel:
    """Registry factory."""
    return WhatsAppChannel(adapter, context)


def receiver(adapter: Adapter, context: ReceiverContext) -> WhatsAppReceiver:
    """Registry receiver factory; ConfigError without the `app_secret` credential."""
    return WhatsAppReceiver(adapter, context)


class WhatsAppChannel(HttpProvider):
    """Sends WhatsApp messages from one business phone number.

    Body (WhatsApp-Nodejs-SDK `src/types/messages.ts`): `messaging_product: "whatsapp"`,
    `recipient_type: "individual"`, `to` (the E.164 number's digits), `type` (`text` or
    `template`) and the object of that name, and `biz_opaque_callback_data` = the
    execution id, which the status webhooks carry back.
    """

    provider = "whatsapp_cloud"
    default_base_url = "https://graph.facebook.com"

    def __init__(self, adapter: Adapter, context: ChannelContext | None = None) -> None:
        config = adapter.config
        token = credential_str(adapter.credentials, "access_token", required=True) or ""
        super().__init__(adapter, context, headers={"Authorization": f"Bearer {token}"})
        version = config_str(config, "api_version", max_length=10) or DEFAULT_API_VERSION
        self._path = f"/{version}/{config['phone_number_id']}/messages"
        self._preview_url = bool(config.get("preview_url", False))

    async def send(self, message: Message) -> Receipt:
        """Send `message`; Receipt holds `messages[0].id` (the `wamid.…` the status
        webhooks name). Raises PermanentError before sending when the message cannot be
        built (no body, a body over 4096 characters, a bad template spec), else
        TransientError, PermanentError or AdapterError by Meta's `error.code`."""
        digits = message.to.removeprefix("+")
        if not digits.isascii() or not digits.isdigit():
            raise PermanentError(f"whatsapp_cloud: {message.to!r} is not an E.164 number")
        payload: dict[str, Any] = {
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": digits,
        }
        payload.update(self._content(message))
        payload["biz_opaque_callback_data"] = str(message.execution_id)[:_MAX_CALLBACK_DATA]
        response = await self.request(
            "POST",
            self._path,
            content=msgspec.json.encode(payload),
            headers={"Content-Type": "application/json"},
        )
        if response.status_code == 200:
            return Receipt(provider_message_id=_message_id(json_body(response)))
        raise _error(self.provider, response)

    def _content(self, message: Message) -> dict[str, Any]:
        meta = message.metadata
        name = meta.get(TEMPLATE_NAME)
        if name:
            return {"type": "template", "template": _template(name, meta)}
        body = message.body if message.body is not None else message.text
        if not body:
            raise PermanentError("whatsapp_cloud: the message has no body")
        if len(body) > MAX_TEXT:
            raise PermanentError(
                f"whatsapp_cloud: the body has {len(body)} characters; WhatsApp takes at "
                f"most {MAX_TEXT}"
            )
        return {"type": "text", "text": {"body": body, "preview_url": self._preview_url}}


class WhatsAppReceiver:
    """Verifies and maps the app's `messages` webhook for one adapter.

    Verification: `X-Hub-Signature-256` is `sha256=` + the hex HMAC-SHA256 of the raw body
    with the app secret (credential `app_secret`). Meta signs no timestamp and retries an
    unanswered delivery for days, so the window is not applied: a replay repeats its event
    ids and changes nothing.

    Mapping of `entry[].changes[].value`: `statuses[]` `delivered` -> delivered, `read` ->
    opened, `failed` -> unsubscribed for error 131050 (marketing opt-out), bounced
    (temporary) for 131026, failed otherwise; event id `<wamid>:<status>`, correlated by
    `biz_opaque_callback_data` (the execution id) or the wamid. `messages[]` (inbound): an
    opt-out keyword -> unsubscribed, anything else -> replied; event id the inbound wamid.
    """

    def __init__(self, adapter: Adapter, context: ReceiverContext | None = None) -> None:
        secret = credential_str(adapter.credentials, "app_secret")
        if secret is None:
            raise ConfigError(
                "adapter credential `app_secret` (the Meta app's secret) is required to "
                "receive WhatsApp webhooks"
            )
        self._key = secret.encode()
        self._verify_token = credential_str(adapter.credentials, "verify_token")

    async def receive(self, request: InboundRequest) -> Sequence[FeedbackEvent]:
        """Unverified unless signed with the app secret; BadPayload when the body is not
        a webhook notification; its events (statuses dripd does not track are left out)."""
        self.verify(request)
        payload = decode_json(request.body, "whatsapp_cloud: the body")
        if not isinstance(payload, dict) or not isinstance(payload.get("entry"), list):
            raise BadPayload("whatsapp_cloud: the body has no `entry` list")
        events: list[FeedbackEvent] = []
        for entry in payload["entry"]:
            for change in _dicts(entry.get("changes") if isinstance(entry, dict) else None):
                value = change.get("value")
                if change.get("field") != "messages" or not isinstance(value, dict):
                    continue
                events.extend(filter(None, map(_status_event, _dicts(value.get("statuses")))))
                events.extend(filter(None, map(_inbound_event, _dicts(value.get("messages")))))
        return events

    async def aclose(self) -> None:
        return None

    def verify(self, request: InboundRequest) -> None:
        """Unverified unless `X-Hub-Signature-256` is the body's HMAC under the app secret."""
        given = request.headers.get(_SIGNATURE_HEADER, "").strip()
        if not given:
            raise Unverified("whatsapp_cloud: no X-Hub-Signature-256 header")
        scheme, _, digest = given.partition("=")
        expected = hmac_sha256_hex(self._key, request.body)
        if scheme.lower() != "sha256" or not equal(digest.lower(), expected):
            raise Unverified("whatsapp_cloud: the X-Hub-Signature-256 does not match the body")

    def challenge(self, params: Mapping[str, str]) -> str:
        """Meta's subscription handshake (`GET` with `hub.mode=subscribe`,
        `hub.verify_token`, `hub.challenge`): the challenge to answer with 200 when the
        token is the adapter's `verify_token` credential; Unverified otherwise. Called by
        `GET /webhooks/whatsapp_cloud/{adapter}`."""
        token = params.get("hub.verify_token", "")
        if (
            self._verify_token is None
            or params.get("hub.mode") != "subscribe"
            or not equal(token, self._verify_token)
        ):
            raise Unverified("whatsapp_cloud: the subscription verify token does not match")
        return params.get("hub.challenge", "")


def _template(name: str, meta: Mapping[str, str]) -> dict[str, Any]:
    if not _TEMPLATE_NAME.fullmatch(name):
        raise PermanentError(
            f"whatsapp_cloud: template name {name[:60]!r} is not a WhatsApp template name "
            "(lowercase letters, digits and _)"
        )
    language = meta.get(TEMPLATE_LANGUAGE)
    if not language or not _LANGUAGE.fullmatch(language):
        raise PermanentError(
            f"whatsapp_cloud: template {name!r} needs a language code like en_US "
            f"(metadata `{TEMPLATE_LANGUAGE}`)"
        )
    template: dict[str, Any] = {"name": name, "language": {"code": language}}
    raw = meta.get(TEMPLATE_PARAMS)
    if raw:
        try:
            params = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            params = None
        if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
            raise PermanentError(
                f"whatsapp_cloud: template {name!r}: metadata `{TEMPLATE_PARAMS}` must be a "
                "JSON array of strings"
            )
        if params:
            template["components"] = [
                {"type": "body", "parameters": [{"type": "text", "text": p} for p in params]}
            ]
    return template


def _message_id(payload: Any) -> str | None:
    messages = payload.get("messages") if isinstance(payload, dict) else None
    return json_str(messages[0], "id") if isinstance(messages, list) and messages else None


def _error(provider: str, response: httpx.Response) -> ChannelError:
    """The error for a refused send, by Meta's `error.code` first, then the HTTP status."""
    error = json_dict(json_body(response), "error")
    code: int | None = None
    text: str | None = None
    if error:
        raw = error.get("code")
        code = raw if isinstance(raw, int) and not isinstance(raw, bool) else None
        parts = [str(code)] if code is not None else []
        if isinstance(error.get("message"), str):
            parts.append(error["message"])
        data = error.get("error_data")
        if isinstance(data, dict) and isinstance(data.get("details"), str):
            parts.append(f"({data['details']})")
        text = " ".join(parts) or None
    what = f"{provider}: {detail(response, text)}"
    if code in _ADAPTER_CODES:
        return AdapterError(what)
    if code in _THROTTLE_CODES:
        return TransientError(what, provider_wide=True, retry_after=retry_after(response))
    if code == _PAIR_RATE_LIMIT:
        return TransientError(what, retry_after=retry_after(response))
    if code in _PERMANENT_CODES:
        return PermanentError(what)
    return error_for_status(provider, response, text)


def _status_event(status: dict[str, Any]) -> FeedbackEvent | None:
    wamid = status.get("id")
    state = status.get("status")
    if not isinstance(wamid, str) or not wamid or not isinstance(state, str):
        return None
    common: dict[str, Any] = {
        "event_id": f"{wamid}:{state}",
        "provider_message_id": wamid,
        "execution_id": parse_uuid(status.get("biz_opaque_callback_data")),
        "recipient": _phone(status.get("recipient_id")),
        "channel": "whatsapp",
        "occurred_at": epoch_text(status.get("timestamp")),
    }
    if state == "delivered":
        return FeedbackEvent(type="delivered", **common)
    if state == "read":
        return FeedbackEvent(type="opened", **common)
    if state != "failed":
        return None
    errors = list(_dicts(status.get("errors")))
    first = errors[0] if errors else {}
    code = first.get("code") if isinstance(first.get("code"), int) else None
    title = first.get("title") or first.get("message")
    reason = f"whatsapp error {code}" + (f": {title}" if isinstance(title, str) else "")
    data = {"error_code": code} if code is not None else {}
    if code == _MARKETING_OPT_OUT:
        return FeedbackEvent(type="unsubscribed", reason=reason[:300], data=data, **common)
    if code == _UNDELIVERABLE:
        return FeedbackEvent(
            type="bounced", permanent=False, reason=reason[:300], data=data, **common
        )
    return FeedbackEvent(type="failed", reason=reason[:300], data=data, **common)


def _inbound_event(message: dict[str, Any]) -> FeedbackEvent | None:
    wamid = message.get("id")
    sender = _phone(message.get("from"))
    if not isinstance(wamid, str) or not wamid or sender is None:
        return None
    kind = message.get("type")
    return inbound_message(
        _text_of(message),
        data={"type": kind[:40]} if isinstance(kind, str) and kind != "text" else None,
        event_id=wamid,
        recipient=sender,
        channel="whatsapp",
        occurred_at=epoch_text(message.get("timestamp")),
    )


def _text_of(message: Mapping[str, Any]) -> str:
    """The words of an inbound message: a text's body, a quick-reply button's text (a
    marketing template's "Stop promotions" button comes back so), an interactive reply's
    title; "" for media."""
    for outer, inner in (("text", "body"), ("button", "text")):
        part = message.get(outer)
        if isinstance(part, dict) and isinstance(part.get(inner), str):
            return str(part[inner])
    interactive = message.get("interactive")
    if isinstance(interactive, dict):
        for reply in ("button_reply", "list_reply"):
            part = interactive.get(reply)
            if isinstance(part, dict) and isinstance(part.get("title"), str):
                return str(part["title"])
    return ""


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _phone(value: Any) -> str | None:
    """A WhatsApp id (the number's digits) as E.164."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return "+" + value
    return None


SPEC = ProviderSpec(
    name="whatsapp_cloud",
    channels=frozenset({"whatsapp"}),
    config_keys=CONFIG_KEYS,
    required_config=frozenset({"phone_number_id"}),
    credential_keys=frozenset({"access_token", "app_secret", "verify_token"}),
    required_credentials=frozenset({"access_token"}),
    factory=from_adapter,
    check=check,
    receiver=receiver,
)
