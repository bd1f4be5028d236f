"""The `webhook` provider: a step's message POSTed as JSON to an operator's endpoint, signed
the Standard Webhooks way (https://www.standardwebhooks.com, spec v1) with the
`standardwebhooks` library, through the network guard of HTTP hooks (dripd.channels.guarded).

Adapter config:

    url              the endpoint (required): an http(s) URL; http only with
                     `[hooks] allow_http`, private addresses only inside `allowed_networks`
    type             the event type in the payload (default "dripd.message")
    timeout          seconds for the whole request (default 30)
    max_connections  requests at once, kept alive between sends (default 10)

Credentials: `secret`, the signing key `whsec_<base64>` (Standard Webhooks' form).

The body: the step's rendered `body` itself when it is a JSON object (sent byte for byte),
else the spec's recommended envelope:

    {"type": "dripd.message", "timestamp": "2026-01-02T03:04:05.678901Z",
     "data": {"execution_id": "…", "to": "…", "text": "<the body>",
              "metadata": {"enrollment_id": "…", "sequence_key": "…", "step_key": "…",
                           "tenant_key": "…"}}}

(`subject` joins `data` when the message has one, `tenant_key` only for a tenant's
enrollment.) Headers: `webhook-id` is the execution's idempotency key (the same on a resend
after a crash, so the receiver can drop the duplicate), `webhook-timestamp` the send time
in Unix seconds, `webhook-signature` `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`.

Answers: 2xx delivered (the receipt's id is the webhook-id); 401 (the receiver refuses our
signature) and 410 (the spec's "disable this endpoint") pause the adapter, as does a
redirect (never followed: the endpoint moved); 408, 429 and 5xx are transient
(Retry-After honoured); any other 4xx is permanent.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

import httpx
import msgspec
from standardwebhooks import Webhook
from standardwebhooks.webhooks import EmptyWebhookSecretError

from dripd.channels.base import AdapterError, ChannelContext, Message, Receipt
from dripd.channels.guarded import GuardedProvider, check_url_value
from dripd.channels.http import (
    HTTP_CONFIG_KEYS,
    check_http_config,
    config_str,
    credential_str,
    detail,
    error_for_status,
    json_object,
)
from dripd.channels.spec import ProviderSpec
from dripd.errors import ConfigError
from dripd.model import Adapter

__all__ = ["DEFAULT_TYPE", "SPEC", "WebhookChannel", "check", "from_adapter", "payload"]

#: The event type of the envelope when the adapter sets none.
DEFAULT_TYPE: Final = "dripd.message"

_CONFIG_KEYS = frozenset({"url", "type", "timeout", "max_connections"})


def _signer(credentials: Mapping[str, Any]) -> Webhook:
    secret = credential_str(credentials, "secret", required=True)
    assert secret is not None
    key = secret.removeprefix("whsec_")
    try:
        # Strictly: the library skips characters that are not base64, so a mistyped key
        # would sign with other bytes than a receiver decoding it strictly.
        base64.b64decode(key + "=" * (-len(key) % 4), validate=True)
        return Webhook(secret)
    except (ValueError, EmptyWebhookSecretError, RuntimeError):  # binascii.Error: a ValueError
        raise ConfigError(
            "adapter credential `secret` is not a Standard Webhooks signing key "
            "(whsec_ followed by base64)"
        ) from None


def check(config: Mapping[str, Any], credentials: Mapping[str, Any]) -> None:
    """Registry hook: ConfigError naming the key when `url`, `type`, `timeout`,
    `max_connections` or the `secret` credential is wrong."""
    check_url_value(config.get("url"), "config `url`")
    config_str(config, "type", max_length=200)
    check_http_config({key: config[key] for key in HTTP_CONFIG_KEYS & set(config)})
    _signer(credentials)


def from_adapter(adapter: Adapter, context: ChannelContext | None = None) -> WebhookChannel:
    """Registry factory: the channel of a validated adapter (connections open on send)."""
    return WebhookChannel(adapter, context)


def _wall_now() -> datetime:
    return datetime.now(UTC)


def payload(message: Message, event_type: str, at: datetime) -> bytes:
    """The JSON body for `message` (see the module docstring): its rendered `body` as is when
    that is a JSON object, else the envelope of type `event_type` stamped `at`."""
    body = message.body
    if body is not None and json_object(body) is not None:
        return body.encode()
    data: dict[str, Any] = {
        "execution_id": str(message.execution_id),
        "to": message.to,
        "text": body if body is not None else message.text,
    }
    if message.subject is not None:
        data["subject"] = message.subject
    data["metadata"] = dict(message.metadata)
    stamp = at.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    return msgspec.json.encode({"type": event_type, "timestamp": stamp, "data": data})


class WebhookChannel(GuardedProvider):
    """POSTs each message, signed, to the adapter's `url` (see the module docstring).
    `now` is the wall clock the signatures are stamped with: receivers compare it with
    their own clock, so it is never the daemon's domain clock."""

    provider = "webhook"

    def __init__(
        self,
        adapter: Adapter,
        context: ChannelContext | None = None,
        *,
        now: Callable[[], datetime] = _wall_now,
        **guard: Any,
    ) -> None:
        super().__init__(adapter, context, url=adapter.config["url"], where="config `url`", **guard)
        self._signer = _signer(adapter.credentials)
        self._type = str(adapter.config.get("type", DEFAULT_TYPE))
        self._now = now

    async def send(self, message: Message) -> Receipt:
        """POST `message` (see the module docstring for the body, headers and answers);
        the Receipt's id is the webhook-id."""
        at = self._now().astimezone(UTC)
        content = payload(message, self._type, at)
        msg_id = message.idempotency_key
        headers = {
            "content-type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(math.floor(at.timestamp())),
            "webhook-signature": self._signer.sign(msg_id, at, content.decode()),
        }
        response = await self.post(content, headers)
        status = response.status_code
        if 200 <= status < 300:
            return Receipt(provider_message_id=msg_id)
        raise _error(response)


def _error(response: httpx.Response) -> Exception:
    status = response.status_code
    if 300 <= status < 400:
        return AdapterError(
            f"webhook: HTTP {status}: the endpoint redirects (redirects are not followed); "
            "set the adapter's `url` to the final location"
        )
    if status == 410:
        return AdapterError(f"webhook: {detail(response)} (the endpoint asks to be disabled)")
    return error_for_status("webhook", response, adapter_statuses=frozenset({401}))


SPEC = ProviderSpec(
    name="webhook",
    channels=frozenset({"webhook"}),
    config_keys=_CONFIG_KEYS,
    required_config=frozenset({"url"}),
    credential_keys=frozenset({"secret"}),
    required_credentials=frozenset({"secret"}),
    factory=from_adapter,
    check=check,
)
