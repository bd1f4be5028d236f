"""The `ms365` provider: email through Microsoft Graph's `sendMail` in its MIME form, with
dripd's own MIME message, authorised by an OAuth 2.0 access token (dripd.channels.oauth).

    POST {base_url}/v1.0/users/{user}/sendMail
    Authorization: Bearer <access token>
    Content-Type: text/plain
    <standard base64 of the RFC 5322 message>

The MIME form is the one that keeps dripd's Message-ID and List-Unsubscribe headers (the
JSON form takes only `x-` custom headers). It has no `saveToSentItems` parameter: Exchange
saves the message in the mailbox's Sent Items, as the JSON form does by default.

Config: `from` (required: the From mailbox, the `user` mailbox or one it may send as),
`user` (required: the sending mailbox's user principal name or object id), the HTTP keys
(`base_url` default https://graph.microsoft.com; a national cloud's Graph host), and the
token source's keys (`tenant` default "common", `scope` default
"https://graph.microsoft.com/Mail.Send offline_access", `token_url`, or `token_provider`).
Credentials: `client_id`, `client_secret`, `refresh_token`, unless a token provider is named.

Answers (providers.md §8, Graph's sendMail and throttling pages): exactly 202 is success;
Graph returns no id, so the provider message id is dripd's own Message-ID; 401 refreshes the
token once and retries once, then pauses the adapter; 403 (no `Mail.Send` consent, mailbox
access denied) and 404 (no such `user`) pause it; 408, 429 and 5xx are transient with
`Retry-After`; 400 and other 4xx are permanent with Graph's error code and message.
Non-delivery reports come back into the mailbox, not here.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import httpx

from dripd.channels import mime, oauth
from dripd.channels.base import (
    ChannelContext,
    ChannelError,
    Message,
    PermanentError,
    Receipt,
)
from dripd.channels.http import (
    HTTP_CONFIG_KEYS,
    check_http_config,
    config_str,
    detail,
    json_body,
    json_dict,
)
from dripd.channels.spec import ProviderSpec
from dripd.clock import Clock
from dripd.errors import ConfigError
from dripd.model import Adapter

__all__ = ["CONFIG_KEYS", "SPEC", "Ms365Channel", "check", "from_adapter"]

CONFIG_KEYS = HTTP_CONFIG_KEYS | oauth.CONFIG_KEYS | {"user"}

#: A mailbox for the URL path: a user principal name or an id; nothing that ends the segment.
_USER = re.compile(r"[^\s/?#\\%]{1,320}")


def check(config: Mapping[str, Any], credentials: Mapping[str, Any]) -> None:
    """Registry hook: ConfigError naming the key if these maps are not an `ms365` adapter."""
    check_http_config(config)
    config_str(config, "from", required=True)
    user = config_str(config, "user", required=True)
    if user is not None and not _USER.fullmatch(user):
        raise ConfigError(
            "adapter config `user` must be the mailbox's user principal name or object id"
        )
    oauth.check("ms365", config, credentials)


def from_adapter(adapter: Adapter, context: ChannelContext) -> Ms365Channel:
    """Registry factory: the channel, with its token source (a token provider is imported
    now: ConfigError naming `token_provider`)."""
    return Ms365Channel(adapter, context)


class Ms365Channel(oauth.BearerProvider):
    """Sends each message as base64 MIME through Graph's `sendMail`."""

    provider = "ms365"
    default_base_url = "https://graph.microsoft.com"

    def __init__(
        self,
        adapter: Adapter,
        context: ChannelContext | None = None,
        *,
        clock: Clock | None = None,
        tokens: oauth.TokenSource | None = None,
    ) -> None:
        super().__init__(adapter, context, clock=clock, tokens=tokens)
        self.sender = str(adapter.config["from"])
        user = str(adapter.config["user"])
        self.path = f"/v1.0/users/{quote(user, safe='@')}/sendMail"

    async def send(self, message: Message) -> Receipt:
        """Deliver `message`: Receipt(provider_message_id = `message.message_id`, the
        Message-ID inside the MIME) on 202, or the error its answer maps to (see the
        module's docstring)."""
        mail = mime.compose(
            message,
            sender=self.sender,
            now=self.clock.now(),
            where=f"ms365 adapter {self.adapter.name!r}",
        )
        body = base64.b64encode(mime.to_bytes(mail))
        response = await self.authorized(
            "POST", self.path, content=body, headers={"Content-Type": "text/plain"}
        )
        if response.status_code == 202:
            return Receipt(provider_message_id=message.message_id)
        raise _error(response)


def _error(response: httpx.Response) -> ChannelError:
    """The error for a Graph answer other than 202: another success is permanent, any
    other answer as `oauth.bearer_error` maps it."""
    shown = _graph_error(json_body(response))
    if response.is_success:
        # sendMail answers 202 only; whether this went out is unknown, so it is not resent.
        return PermanentError(
            f"ms365: {detail(response, shown)} (sendMail answers 202; not resent)"
        )
    return oauth.bearer_error("ms365", response, shown)


def _graph_error(body: Any) -> str | None:
    """`<code>: <message>` from Graph's error body {"error": {"code", "message",
    "innerError"}}."""
    error = json_dict(body, "error")
    code, message = error.get("code"), error.get("message")
    parts = [p for p in (code, message) if isinstance(p, str) and p]
    return ": ".join(parts) or None


SPEC = ProviderSpec(
    name="ms365",
    channels=frozenset({"email"}),
    config_keys=CONFIG_KEYS,
    required_config=frozenset({"from", "user"}),
    credential_keys=oauth.CREDENTIAL_KEYS,
    required_credentials=frozenset(),
    factory=from_adapter,
    check=check,
    identifier_keys=frozenset({"client_id"}),
)
