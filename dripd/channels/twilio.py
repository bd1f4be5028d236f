"""The `twilio` provider: SMS and WhatsApp through Twilio Programmable Messaging, and its
status callbacks and inbound messages in (providers.md §10).

Out: `POST /2010-04-01/Accounts/{AccountSid}/Messages.json`, form-encoded, HTTP Basic with
the account SID and auth token. In: `POST /webhooks/twilio/{adapter}` takes the
`StatusCallback` requests dripd asks for on every send and the number's inbound messages
(configure the number's or Messaging Service's "A message comes in" URL to the same
address), verified by `X-Twilio-Signature`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Iterator, Mapping, Sequence
from enum import StrEnum
from typing import Any, Final, assert_never
from urllib.parse import urlsplit, urlunsplit

import httpx

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
    OPT_OUT_KEYWORDS,
    BadPayload,
    FeedbackEvent,
    InboundRequest,
    ReceiverContext,
    Unverified,
    equal,
    inbound_message,
    keyword,
)
from dripd.channels.http import (
    HTTP_CONFIG_KEYS,
    HttpProvider,
    check_http_config,
    config_str,
    credential_str,
    detail,
    error_for_status,
    json_body,
    json_str,
    retry_after,
)
from dripd.channels.spec import ProviderSpec
from dripd.channels.whatsapp_cloud import TEMPLATE_NAME
from dripd.errors import ConfigError
from dripd.model import Adapter

__all__ = [
    "CONFIG_KEYS",
    "DEFAULT_ERROR_CODES",
    "IDEMPOTENCY_HEADER",
    "OPT_IN_KEYWORDS",
    "OPT_OUT_KEYWORDS",
    "Action",
    "TwilioChannel",
    "TwilioReceiver",
    "check",
    "error_codes",
    "keyword",
    "signature",
]

CONFIG_KEYS: Final = HTTP_CONFIG_KEYS | {"messaging_service_sid", "status_callback", "error_codes"}

#: Sent with every create (the execution's idempotency key). Best effort: Twilio's API
#: reference does not document it for Messages create; dripd's own ledger is what keeps a
#: message from going twice. Twilio sends the same header on its webhook requests, where a
#: retried delivery repeats it (the event id of a callback, below).
IDEMPOTENCY_HEADER: Final = "I-Twilio-Idempotency-Token"

#: The longest `Body` Twilio accepts (characters; error 21617 beyond).
MAX_BODY: Final = 1600

# OPT_OUT_KEYWORDS (Twilio's default opt-out keywords) and `keyword` are
# dripd.channels.feedback's, shared with whatsapp_cloud; they stay importable from here.

#: Twilio's opt-in keywords. dripd does not lift a suppression on them (an operator does,
#: knowing why the number was suppressed); they are recorded as `replied`.
OPT_IN_KEYWORDS: Final = frozenset({"START", "UNSTOP", "YES"})

_ACCOUNT_SID = re.compile(r"AC[0-9a-fA-F]{32}")
_SERVICE_SID = re.compile(r"MG[0-9a-fA-F]{32}")
_SIGNATURE_HEADER = "x-twilio-signature"
_WHATSAPP = "whatsapp:"
_DEFAULT_PORTS = {"https": 443, "http": 80}


class Action(StrEnum):
    """What an error code of Twilio's means for dripd (config `error_codes` values)."""

    SUPPRESS = "suppress"  # the recipient will never accept: permanent, and suppressed
    PERMANENT = "permanent"  # this message cannot go: stop, no suppression
    ADAPTER = "adapter"  # the account or sender is wrong: pause the adapter
    TRANSIENT = "transient"  # retry later (provider-wide)


#: Twilio error codes dripd knows (twilio.com/docs/api/errors); config `error_codes`
#: overrides them, since Twilio splits and renames codes (changelog 2024-07-10). Unknown
#: codes follow the HTTP status: 429 and 5xx transient, 401 pause, other 4xx permanent.
#: In status callbacks (`undelivered`, `failed`) only `suppress` makes a bounce permanent.
DEFAULT_ERROR_CODES: Final[Mapping[int, Action]] = {
    20003: Action.ADAPTER,  # authentication failed
    20404: Action.ADAPTER,  # the account in the URL does not exist
    20429: Action.TRANSIENT,  # too many requests
    21211: Action.PERMANENT,  # invalid `To` number
    21408: Action.ADAPTER,  # the destination region is not enabled for the account
    21606: Action.ADAPTER,  # the `From` number cannot send SMS
    21610: Action.SUPPRESS,  # the recipient replied STOP
    21611: Action.TRANSIENT,  # the `From` number's queue is full
    21614: Action.SUPPRESS,  # `To` is not a mobile number (SMS only; permanent for WhatsApp)
    30003: Action.TRANSIENT,  # handset unreachable (switched off, out of coverage)
    30005: Action.SUPPRESS,  # unknown handset: the number does not exist
    30006: Action.SUPPRESS,  # landline or unreachable carrier
}


def error_codes(config: Mapping[str, Any], channel: str = "sms") -> dict[int, Action]:
    """The code table of an adapter: DEFAULT_ERROR_CODES with config `error_codes` (an
    object of code, as a string of digits or an integer, to one of `Action`'s values)
    merged over it. On WhatsApp, 21614 (not a mobile number) stops the message without a
    suppression unless the config says otherwise. ConfigError names the bad entry."""
    table = dict(DEFAULT_ERROR_CODES)
    if channel != "sms":
        table[21614] = Action.PERMANENT
    given = config.get("error_codes")
    if given is None:
        return table
    if not isinstance(given, Mapping):
        raise ConfigError(
            "adapter config `error_codes` must be an object of Twilio error code to "
            'action, like {"21610": "suppress"}'
        )
    if len(given) > 1000:
        raise ConfigError("adapter config `error_codes` has more than 1000 entries")
    actions = " | ".join(action.value for action in Action)
    for key, value in given.items():
        code = _code(key)
        if code is None:
            raise ConfigError(
                f"adapter config `error_codes` key {str(key)[:20]!r} is not a Twilio error "
                "code (a number like 21610)"
            )
        try:
            table[code] = Action(value)
        except ValueError:
            raise ConfigError(
                f"adapter config `error_codes` value for {code} must be one of {actions}, "
                f"not {str(value)[:40]!r}"
            ) from None
    return table


def check(config: Mapping[str, Any], credentials: Mapping[str, Any]) -> None:
    """Registry hook: ConfigError naming the key unless these maps are a `twilio` adapter:
    `account_sid` AC + 32 hex digits, `auth_token`, `from` or `messaging_service_sid`
    (MG + 32 hex digits), `status_callback` an http(s) URL, `error_codes` a code table."""
    check_http_config(config)
    sid = credential_str(credentials, "account_sid", required=True) or ""
    if not _ACCOUNT_SID.fullmatch(sid):
        raise ConfigError(
            "adapter credential `account_sid` must be a Twilio account SID "
            "(AC followed by 32 hexadecimal digits)"
        )
    credential_str(credentials, "auth_token", required=True)
    sender = config_str(config, "from", max_length=100)
    service = config_str(config, "messaging_service_sid", max_length=34)
    if sender is None and service is None:
        raise ConfigError(
            "adapter config `from` (a Twilio number, short code or alphanumeric sender id) "
            "or `messaging_service_sid` is required by provider 'twilio'"
        )
    if service is not None and not _SERVICE_SID.fullmatch(service):
        raise ConfigError(
            "adapter config `messaging_service_sid` must be a Messaging Service SID "
            "(MG followed by 32 hexadecimal digits)"
        )
    callback = config_str(config, "status_callback", max_length=2000)
    if callback is not None:
        parts = urlsplit(callback)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"adapter config `status_callback` {callback[:100]!r} is not an http(s) URL"
            )
        if "_" in parts.hostname:
            # Twilio refuses a callback whose host name holds an underscore.
            raise ConfigError("adapter config `status_callback` host must not contain '_'")
    error_codes(config)


def from_adapter(adapter: Adapter, context: ChannelContext) -> TwilioChannel:
    """Registry factory."""
    return TwilioChannel(adapter, context)


def receiver(adapter: Adapter, context: ReceiverContext) -> TwilioReceiver:
    """Registry receiver factory."""
    return TwilioReceiver(adapter, context)


class TwilioChannel(HttpProvider):
    """Sends SMS (or WhatsApp, `whatsapp:` addresses) through Twilio's Messages resource.

    Form fields (PascalCase, Twilio's OpenAPI): `To` (E.164), `From` (config `from`) and/or
    `MessagingServiceSid`, `Body`, `StatusCallback` (config `status_callback`, else the
    adapter's own webhook URL when the daemon knows its public address).
    """

    provider = "twilio"
    default_base_url = "https://api.twilio.com"

    def __init__(self, adapter: Adapter, context: ChannelContext | None = None) -> None:
        context = context or ChannelContext()
        config, credentials = adapter.config, adapter.credentials
        sid = credential_str(credentials, "account_sid", required=True) or ""
        token = credential_str(credentials, "auth_token", required=True) or ""
        super().__init__(adapter, context, auth=(sid, token))
        self._path = f"/2010-04-01/Accounts/{sid}/Messages.json"
        self._sender = config_str(config, "from", max_length=100)
        self._service = config_str(config, "messaging_service_sid", max_length=34)
        self._callback = config_str(config, "status_callback", max_length=2000) or (
            context.webhook_url
        )
        self._codes = error_codes(config, adapter.channel)

    async def send(self, message: Message) -> Receipt:
        """Create the message; Receipt holds its `sid` (SM…/MM…), which status callbacks
        carry as `MessageSid`. Raises TransientError, PermanentError (bounce for codes
        mapped to `suppress`, 21610 among them) or AdapterError, per the code table."""
        if message.metadata.get(TEMPLATE_NAME):
            # A `whatsapp_template` step: its rendered body is not what the template says.
            raise PermanentError(
                "twilio: this is a WhatsApp template step; Twilio sends WhatsApp templates "
                "by Content SID (ContentSid, ContentVariables), which dripd does not support: "
                "send template steps through a `whatsapp_cloud` adapter"
            )
        body = message.body if message.body is not None else message.text
        if not body:
            raise PermanentError("twilio: the message has no body")
        if len(body) > MAX_BODY:
            raise PermanentError(
                f"twilio: the body has {len(body)} characters; Twilio takes at most {MAX_BODY}"
            )
        form = {"To": _address(message.to, message.channel)}
        if self._sender is not None:
            form["From"] = _address(self._sender, message.channel)
        if self._service is not None:
            form["MessagingServiceSid"] = self._service
        form["Body"] = body
        if self._callback:
            form["StatusCallback"] = self._callback
        response = await self.request(
            "POST",
            self._path,
            data=form,
            headers={IDEMPOTENCY_HEADER: message.idempotency_key, "Accept": "application/json"},
        )
        if response.status_code in (200, 201):
            return Receipt(provider_message_id=json_str(json_body(response), "sid"))
        raise self._error(response)

    def _error(self, response: httpx.Response) -> ChannelError:
        payload = json_body(response)
        code: int | None = None
        text: str | None = None
        if isinstance(payload, dict):
            code = _code(payload.get("code"))
            said = payload.get("message")
            if isinstance(said, str):
                text = f"{code} {said}" if code is not None else said
        action = self._codes.get(code) if code is not None else None
        if action is None:
            return error_for_status(self.provider, response, text)
        what = f"{self.provider}: {detail(response, text)}"
        match action:
            case Action.SUPPRESS:
                return PermanentError(what, bounce=True)
            case Action.PERMANENT:
                return PermanentError(what)
            case Action.ADAPTER:
                return AdapterError(what)
            case Action.TRANSIENT:
                return TransientError(what, provider_wide=True, retry_after=retry_after(response))
            case _:
                assert_never(action)


class TwilioReceiver:
    """Verifies and maps Twilio's webhook requests for one adapter.

    Verification (twilio.com/docs/usage/security, "Validating requests"): `X-Twilio-Signature`
    is base64(HMAC-SHA1(auth token, URL + every POST parameter's name and value, sorted by
    name)), the URL exactly as Twilio called it (`InboundRequest.url`); as Twilio's own
    libraries do, the URL with the scheme's default port added or removed is accepted too.
    Twilio signs no timestamp: a replayed request repeats its event id and changes nothing.

    Mapping: a status callback (`MessageStatus`) `delivered` -> delivered, `read` (WhatsApp)
    -> opened, `undelivered`/`failed` -> bounced (permanent when `ErrorCode` maps to
    `suppress`), others ignored; correlated by `MessageSid`. An inbound message: an opt-out
    keyword (or `OptOutType=STOP`) -> unsubscribed, anything else -> replied with its body.
    Event id: the `I-Twilio-Idempotency-Token` header, else `MessageSid:MessageStatus`
    (callbacks) or `MessageSid` (inbound).
    """

    #: What the webhook route answers: TwiML that sends no reply (Twilio reads the answer to
    #: an inbound message as TwiML and logs a warning for anything else).
    reply = ("text/xml", b'<?xml version="1.0" encoding="UTF-8"?><Response/>')

    def __init__(self, adapter: Adapter, context: ReceiverContext | None = None) -> None:
        token = credential_str(adapter.credentials, "auth_token", required=True) or ""
        self._key = token.encode()
        self._codes = error_codes(adapter.config, adapter.channel)

    async def receive(self, request: InboundRequest) -> Sequence[FeedbackEvent]:
        """Unverified unless signed with the adapter's auth token; BadPayload without a
        `MessageSid`; the events of the request (one at most)."""
        self.verify(request)
        form = request.form
        sid = _one(form, "MessageSid") or _one(form, "SmsSid")
        if not sid:
            raise BadPayload("twilio: the request has no MessageSid")
        token = request.headers.get(IDEMPOTENCY_HEADER.lower(), "").strip()
        status = (_one(form, "MessageStatus") or "").lower()
        if status and status != "received":
            return self._status(form, sid, status, token)
        if _one(form, "Body") is not None or (_one(form, "SmsStatus") or "").lower() == "received":
            return [self._inbound(form, sid, token)]
        return []

    async def aclose(self) -> None:
        return None

    def verify(self, request: InboundRequest) -> None:
        """Unverified unless `X-Twilio-Signature` holds for the request's URL and form."""
        given = request.headers.get(_SIGNATURE_HEADER, "").strip()
        if not given:
            raise Unverified("twilio: no X-Twilio-Signature header")
        for url in _url_forms(request.url):
            if equal(signature(self._key, url, request.form), given):
                return
        raise Unverified("twilio: the X-Twilio-Signature does not match the request")

    def _status(
        self, form: Mapping[str, Sequence[str]], sid: str, status: str, token: str
    ) -> list[FeedbackEvent]:
        event_id = token or f"{sid}:{status}"
        channel, recipient = _party(_one(form, "To"))
        common: dict[str, Any] = {
            "event_id": event_id,
            "provider_message_id": sid,
            "recipient": recipient,
            "channel": channel,
        }
        if status == "delivered":
            return [FeedbackEvent(type="delivered", **common)]
        if status == "read":
            return [FeedbackEvent(type="opened", **common)]
        if status in ("undelivered", "failed"):
            code = _code(_one(form, "ErrorCode"))
            permanent = code is not None and self._codes.get(code) is Action.SUPPRESS
            data: dict[str, Any] = {"status": status}
            if code is not None:
                data["error_code"] = code
            return [
                FeedbackEvent(
                    type="bounced",
                    permanent=permanent,
                    reason=f"twilio error {code}" if code is not None else status,
                    data=data,
                    **common,
                )
            ]
        return []

    def _inbound(self, form: Mapping[str, Sequence[str]], sid: str, token: str) -> FeedbackEvent:
        channel, sender = _party(_one(form, "From"))
        if sender is None:
            raise BadPayload("twilio: the inbound message has no From")
        body = _one(form, "Body") or ""
        word = keyword(body)
        opt_out = (_one(form, "OptOutType") or "").strip().upper()
        data: dict[str, Any] = {}
        if word in OPT_IN_KEYWORDS or opt_out == "START":
            # Not an unsuppression: an operator lifts it, knowing why it was added (README).
            data["keyword"] = word if word in OPT_IN_KEYWORDS else "START"
        return inbound_message(
            body,
            opted_out=opt_out == "STOP",
            data=data,
            event_id=token or sid,
            recipient=sender,
            channel=channel,
        )


def signature(key: bytes, url: str, params: Mapping[str, Sequence[str]]) -> str:
    """Twilio's request signature: base64(HMAC-SHA1(key, url + name + value for each POST
    parameter, names sorted, a repeated name's values sorted))."""
    text = url + "".join(name + value for name in sorted(params) for value in sorted(params[name]))
    return base64.b64encode(hmac.new(key, text.encode(), hashlib.sha1).digest()).decode()


def _url_forms(url: str) -> Iterator[str]:
    yield url
    parts = urlsplit(url)
    default = _DEFAULT_PORTS.get(parts.scheme)
    host = parts.hostname
    if default is None or host is None:
        return
    try:
        port = parts.port
    except ValueError:
        return
    auth = parts.netloc.rpartition("@")[0]
    hostport = f"[{host}]" if ":" in host else host
    prefix = f"{auth}@" if auth else ""
    if port is None:
        netloc = f"{prefix}{hostport}:{default}"
    elif port == default:
        netloc = f"{prefix}{hostport}"
    else:
        return
    yield urlunsplit(parts._replace(netloc=netloc))


def _address(value: str, channel: str) -> str:
    if channel == "whatsapp" and not value.startswith(_WHATSAPP):
        return _WHATSAPP + value
    return value


def _party(value: str | None) -> tuple[str, str | None]:
    """The channel and bare address of a `To`/`From` (`whatsapp:+1…` is WhatsApp)."""
    if value is None or not value.strip():
        return "sms", None
    value = value.strip()
    if value.startswith(_WHATSAPP):
        return "whatsapp", value[len(_WHATSAPP) :]
    return "sms", value


def _one(form: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = form.get(name)
    return values[0] if values else None


def _code(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 < value < 10**7 else None
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 7:
        return int(value) or None
    return None


SPEC = ProviderSpec(
    name="twilio",
    channels=frozenset({"sms", "whatsapp"}),
    config_keys=CONFIG_KEYS,
    required_config=frozenset(),
    credential_keys=frozenset({"account_sid", "auth_token"}),
    required_credentials=frozenset({"account_sid", "auth_token"}),
    factory=from_adapter,
    check=check,
    identifier_keys=frozenset({"account_sid"}),
    receiver=receiver,
)
