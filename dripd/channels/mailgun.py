"""The `mailgun` provider: email through Mailgun's `POST /v3/{domain}/messages`, and its
signed webhooks in.

Outbound (providers.md §3; Mailgun's "Send an email" API reference): one form-encoded
request per message, HTTP Basic auth with user `api` and the API key. dripd's Message-ID
goes out as `h:Message-Id` (Mailgun keeps a Message-Id given this way), the extra headers
(List-Unsubscribe among them) as `h:<name>`, and the execution id as `v:dripd_execution`:
Mailgun returns it in every event as a user variable. Mailgun also copies `v:` values into
the delivered mail's `X-Mailgun-Variables` header, where the recipient can read them, so
nothing else goes there. 200 answers `{"id": "<…>"}`; the id is stored without its angle
brackets, the form events give it in (`message.headers.message-id`).

No batching: many `to` with `recipient-variables` are one request with one `id`, and a 400
for one malformed address fails all of them (providers.md §14): no message would get its
own result.

Inbound (Mailgun "Securing Webhooks"): the JSON webhooks, `{"signature": {"timestamp",
"token", "signature"}, "event-data": {…}}`, where `signature` is the hex HMAC-SHA256 of
timestamp followed by token, keyed with the domain's HTTP webhook signing key
(credential `webhook_signing_key`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any, Final
from urllib.parse import urlencode

import httpx
import msgspec

from dripd import addresses
from dripd.channels import mime
from dripd.channels.base import (
    AdapterError,
    ChannelContext,
    ChannelError,
    Message,
    PermanentError,
    Receipt,
    mailbox_header,
)
from dripd.channels.feedback import (
    BadPayload,
    FeedbackEvent,
    InboundRequest,
    ReceiverContext,
    Unverified,
    check_window,
    digest_id,
    epoch_text,
    epoch_time,
    equal,
    hmac_sha256_hex,
    parse_uuid,
    scalar_text,
)
from dripd.channels.http import (
    HTTP_CONFIG_KEYS,
    HttpProvider,
    check_http_config,
    config_bool,
    config_choice,
    config_str,
    credential_str,
    detail,
    error_for_status,
    json_body,
    string_list,
)
from dripd.channels.spec import ProviderSpec
from dripd.errors import ConfigError
from dripd.model import Adapter

__all__ = [
    "CONFIG_KEYS",
    "SPEC",
    "MailgunChannel",
    "MailgunReceiver",
    "bare_message_id",
    "check",
    "map_event",
]

CONFIG_KEYS: Final = HTTP_CONFIG_KEYS | {"domain", "region", "tags", "tracking"}

#: The API host per `region` (Mailgun's OpenAPI servers).
REGIONS: Final = {"us": "https://api.mailgun.net", "eu": "https://api.eu.mailgun.net"}

#: The user variable that carries the execution id (`v:dripd_execution`).
EXECUTION_VAR: Final = "dripd_execution"

#: Headers that have their own field (or that Mailgun writes): never sent as `h:`.
RESERVED_HEADERS: Final = frozenset(
    {
        "bcc",
        "cc",
        "content-transfer-encoding",
        "content-type",
        "date",
        "from",
        "message-id",
        "mime-version",
        "reply-to",
        "subject",
        "to",
    }
)

#: Mailgun's tag rules ("Tags" in the user manual): at most 3 per message, ASCII, 128 long.
MAX_TAGS: Final = 3
MAX_TAG_LENGTH: Final = 128

# A sending domain as it goes into the path: an ASCII host name.
_DOMAIN: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}\.)*[A-Za-z0-9-]{1,63}")
_MAX_REASON: Final = 300
# `failed` reasons of a message Mailgun did not even try: the address is on its suppression
# lists (event type, permanent).
_SUPPRESSED: Final = {
    "suppress-bounce": ("bounced", True),
    "suppress-unsubscribe": ("unsubscribed", False),
    "suppress-complaint": ("complained", False),
}
_SIMPLE: Final = {
    "delivered": "delivered",
    "opened": "opened",
    "clicked": "clicked",
    "complained": "complained",
    "unsubscribed": "unsubscribed",
    "rejected": "failed",
}


def check(config: Mapping[str, Any], credentials: Mapping[str, Any]) -> None:
    """Registry hook: ConfigError naming the key when these maps are not a `mailgun`
    adapter (`domain`, `region`, `tags`, `tracking`, `from`, `api_key`,
    `webhook_signing_key`)."""
    check_http_config(config)
    _settings(config)
    credential_str(credentials, "api_key", required=True)
    credential_str(credentials, "webhook_signing_key")


def _settings(config: Mapping[str, Any]) -> tuple[str, list[tuple[str, str]]]:
    """The sending domain and the form fields the config adds to every send, checked."""
    domain = config_str(config, "domain", required=True, max_length=253) or ""
    if not _DOMAIN.fullmatch(domain):
        raise ConfigError(
            f"adapter config `domain` {domain[:80]!r} is not a sending domain like "
            "mg.example.com (the domain as Mailgun lists it, in ASCII)"
        )
    config_choice(config, "region", REGIONS, "us")
    fields: list[tuple[str, str]] = []
    tags = config.get("tags")
    if tags is not None:
        if not string_list(tags, most=MAX_TAGS, longest=MAX_TAG_LENGTH, ascii_only=True):
            raise ConfigError(
                f"adapter config `tags` must be a list of 1 to {MAX_TAGS} printable ASCII "
                f"strings of at most {MAX_TAG_LENGTH} characters (Mailgun's limits)"
            )
        fields += [("o:tag", tag) for tag in tags]
    tracking = config_bool(config, "tracking")
    if tracking is not None:
        fields.append(("o:tracking", "yes" if tracking else "no"))
    return domain, fields


def _sender(text: str, where: str) -> str:
    """`text` (`addr` or `Name <addr>`) as one mailbox, its name quoted again; ConfigError
    naming `where` when it is not one address."""
    read = addresses.recipient("email", text, field=where)
    return mailbox_header(read.display_name, read.address)


def bare_message_id(value: str) -> str:
    """A Message-Id without white space and angle brackets: the send answers `<id>`, events
    carry `id`; both are stored and matched in this form."""
    return value.strip().removeprefix("<").removesuffix(">").strip()


class MailgunChannel(HttpProvider):
    """Sends each message with one `POST /v3/{domain}/messages` (providers.md §3)."""

    provider = "mailgun"
    default_base_url = REGIONS["us"]

    def __init__(self, adapter: Adapter, context: ChannelContext | None = None) -> None:
        config = adapter.config
        self.domain, self._fields = _settings(config)
        self._from = _sender(str(config["from"]), "adapter config `from`")
        region = config.get("region") or "us"
        api_key = credential_str(adapter.credentials, "api_key", required=True) or ""
        super().__init__(
            adapter,
            context,
            base_url=config.get("base_url") or REGIONS[region],
            auth=httpx.BasicAuth("api", api_key),
        )
        self.path = f"/v3/{self.domain}/messages"

    def form(self, message: Message) -> list[tuple[str, str]]:
        """The form fields for `message`, in order (Mailgun's field names). PermanentError
        when the step's `from` is not one mailbox."""
        sender = self._from
        if message.sender:
            try:
                sender = _sender(message.sender, "step `from`")
            except ConfigError as exc:
                raise PermanentError(f"mailgun: {exc.message}") from exc
        fields = [("from", sender), ("to", mailbox_header(message.to_name, message.to))]
        if message.subject is not None:
            fields.append(("subject", message.subject))
        text = message.text if message.text is not None else message.body
        if text is not None or message.html is None:
            fields.append(("text", text or ""))
        if message.html is not None:
            fields.append(("html", message.html))
        if message.reply_to:
            fields.append(("h:Reply-To", message.reply_to))
        fields += [
            (f"h:{name}", value)
            for name, value in message.headers.items()
            if name.lower() not in RESERVED_HEADERS
        ]
        fields.append(("h:Message-Id", message.message_id))
        fields.append((f"h:{mime.IDEMPOTENCY_HEADER}", message.idempotency_key))
        fields += self._fields
        fields.append((f"v:{EXECUTION_VAR}", str(message.execution_id)))
        return fields

    async def send(self, message: Message) -> Receipt:
        """Deliver `message`; the receipt holds the answer's `id` without angle brackets.
        Raises TransientError (429, 408, 5xx, no answer), AdapterError (401 and 403: the
        key or account; 404: the domain is not in this account or region), PermanentError
        (400 and other 4xx, with Mailgun's `message`)."""
        response = await self.request(
            "POST",
            self.path,
            content=urlencode(self.form(message)).encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        if response.status_code == 200:
            data = json_body(response)
            found = data.get("id") if isinstance(data, dict) else None
            return Receipt(
                provider_message_id=bare_message_id(found) if isinstance(found, str) else None
            )
        raise self.error(response)

    def error(self, response: httpx.Response) -> ChannelError:
        """The error for a Mailgun answer other than 200 (providers.md §3)."""
        data = json_body(response)
        said = data.get("message") if isinstance(data, dict) else None
        said = said if isinstance(said, str) else None
        if response.status_code == 404:
            return AdapterError(
                f"mailgun: {detail(response, said)} (is the domain {self.domain!r} in this "
                "account and region?)"
            )
        return error_for_status("mailgun", response, said, adapter_statuses=frozenset({401, 403}))


def from_adapter(adapter: Adapter, context: ChannelContext) -> MailgunChannel:
    """Registry factory."""
    return MailgunChannel(adapter, context)


class MailgunReceiver:
    """Verifies a Mailgun webhook (JSON form) and maps its one event.

    Without a `webhook_signing_key` among the adapter's credentials every request is
    refused (Unverified): dripd never records unsigned feedback."""

    def __init__(self, signing_key: str | None, context: ReceiverContext) -> None:
        self._key = signing_key.encode() if signing_key is not None else None
        self._window = context.replay_window

    @classmethod
    def from_adapter(cls, adapter: Adapter, context: ReceiverContext) -> MailgunReceiver:
        """Registry receiver factory."""
        return cls(credential_str(adapter.credentials, "webhook_signing_key"), context)

    async def receive(self, request: InboundRequest) -> Sequence[FeedbackEvent]:
        """Unverified unless `signature.signature` (or, for a subaccount's domain,
        `signature.parent-signature`) is the HMAC of timestamp + token under the signing key
        and the timestamp is within the replay window; BadPayload when `event-data` cannot
        be read. [] for events dripd does not track (`accepted`, `stored`, …). The event
        carries the token as its `nonce`: a second request with that token records
        nothing."""
        if self._key is None:
            raise Unverified(
                "mailgun: the adapter has no `webhook_signing_key` credential: add the "
                "domain's HTTP webhook signing key to the adapter"
            )
        try:
            data = msgspec.json.decode(request.body)
        except (msgspec.DecodeError, RecursionError):
            raise Unverified("mailgun: the body is not JSON, so it carries no signature") from None
        block = data.get("signature") if isinstance(data, dict) else None
        if not isinstance(block, dict):
            raise Unverified("mailgun: the body has no `signature` object")
        self.verify(block, request.received_at)
        event = data.get("event-data")
        if not isinstance(event, dict):
            raise BadPayload("mailgun: the body has no `event-data` object")
        mapped = map_event(event)
        if mapped is None:
            return []
        # Mailgun signs the timestamp and token, not the event: the token is recorded as a
        # nonce, so a captured signature cannot carry other event data (Mailgun's advice:
        # cache the tokens).
        return [replace(mapped, nonce=f"mailgun-token:{block['token']}")]

    def verify(self, block: Mapping[str, Any], received_at: datetime) -> None:
        """Unverified unless the signature block is Mailgun's and fresh."""
        assert self._key is not None
        stamp, token = block.get("timestamp"), block.get("token")
        if isinstance(stamp, int) and not isinstance(stamp, bool):
            stamp = str(stamp)
        if not isinstance(stamp, str) or not isinstance(token, str):
            raise Unverified("mailgun: the signature has no timestamp or token")
        signed_at = epoch_text(stamp)
        if signed_at is None:
            raise Unverified("mailgun: the signature timestamp is not epoch seconds")
        expected = hmac_sha256_hex(self._key, (stamp + token).encode())
        given = [
            value.strip().lower()
            for value in (block.get("signature"), block.get("parent-signature"))
            if isinstance(value, str)
        ]
        # Both compared, so the time taken does not say which one matched.
        matches = [equal(expected, value) for value in given]
        if not any(matches):
            raise Unverified("mailgun: the signature does not verify")
        check_window(signed_at, received_at, self._window, "mailgun")

    async def aclose(self) -> None:
        return None


def map_event(event: Mapping[str, Any]) -> FeedbackEvent | None:
    """One `event-data` object as a FeedbackEvent, or None when dripd does not track it.
    Field names from Mailgun's event reference: `id`, `event`, `timestamp`, `recipient`,
    `severity`, `reason`, `delivery-status` (`code`, `message`, `description`), `url`,
    `user-variables`, `message.headers.message-id`.

    `failed`: a `suppress-*` reason maps to the suppression it names; else `permanent`
    severity is a hard bounce and `temporary` is deferred (Mailgun retries it and reports
    the outcome later)."""
    kind = event.get("event")
    if not isinstance(kind, str):
        return None
    status = event.get("delivery-status")
    status = status if isinstance(status, dict) else {}
    reason = scalar_text(event.get("reason"))
    permanent = False
    data: dict[str, Any] = {}
    if kind in _SIMPLE:
        type_ = _SIMPLE[kind]
        if kind == "clicked" and (url := scalar_text(event.get("url"))) is not None:
            data["url"] = url
    elif kind == "failed":
        severity = scalar_text(event.get("severity"))
        if reason in _SUPPRESSED:
            type_, permanent = _SUPPRESSED[reason]
        elif severity == "temporary":
            type_ = "deferred"
        else:
            type_, permanent = "bounced", True
        if severity is not None:
            data["severity"] = severity
        if (code := scalar_text(status.get("code"))) is not None:
            data["code"] = code
        said = scalar_text(status.get("description")) or scalar_text(status.get("message"))
        if said is not None:
            reason = f"{reason}: {said}" if reason else said
    else:
        return None
    message = event.get("message")
    headers = message.get("headers") if isinstance(message, dict) else None
    message_id = scalar_text(headers.get("message-id")) if isinstance(headers, dict) else None
    stamp = event.get("timestamp")
    recipient = scalar_text(event.get("recipient"))
    variables = event.get("user-variables")
    execution = variables.get(EXECUTION_VAR) if isinstance(variables, dict) else None
    event_id = scalar_text(event.get("id")) or digest_id(
        "mailgun", kind, recipient, stamp, message_id, reason
    )
    return FeedbackEvent(
        type=type_,
        event_id=event_id,
        provider_message_id=bare_message_id(message_id) if message_id else None,
        execution_id=parse_uuid(execution),
        recipient=recipient,
        permanent=permanent,
        reason=reason[:_MAX_REASON] if reason else None,
        occurred_at=epoch_time(stamp),
        data=data,
    )


SPEC = ProviderSpec(
    name="mailgun",
    channels=frozenset({"email"}),
    config_keys=CONFIG_KEYS,
    required_config=frozenset({"domain", "from"}),
    credential_keys=frozenset({"api_key", "webhook_signing_key"}),
    required_credentials=frozenset({"api_key"}),
    factory=from_adapter,
    check=check,
    receiver=MailgunReceiver.from_adapter,
)
