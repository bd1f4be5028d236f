"""The `gmail` provider: email through the Gmail API's `users.messages.send` with dripd's own
MIME message, authorised by an OAuth 2.0 access token (dripd.channels.oauth).

    POST {base_url}/gmail/v1/users/{user}/messages/send
    Authorization: Bearer <access token>
    {"raw": "<base64url of the RFC 5322 message>"}

Config: `from` (required: the From mailbox, the account's address or one of its send-as
aliases), `user` (default "me": the account the token belongs to), the HTTP keys
(`base_url` default https://gmail.googleapis.com), and the token source's keys
(`token_url`, or `token_provider`). Credentials: `client_id`, `client_secret`,
`refresh_token` (scope https://www.googleapis.com/auth/gmail.send), unless a token provider
is named.

Answers (providers.md §7, Google's "Handle errors" guide): 200 gives the Message resource,
whose `id` is the provider message id; 401 refreshes the token once and retries once, then
pauses the adapter; 403 with reason `rateLimitExceeded` or `userRateLimitExceeded` is a
provider-wide TransientError, any other 403 (insufficient scope, delegation denied) pauses
the adapter; 404 (no such `user`) pauses it too; 408, 429 and 5xx are transient with
`Retry-After`; 400 and other 4xx are permanent with Google's message. Gmail says nothing of
bounces here: they come back into the sending mailbox.
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
    Receipt,
    TransientError,
)
from dripd.channels.http import (
    HTTP_CONFIG_KEYS,
    check_http_config,
    config_str,
    detail,
    json_body,
    json_dict,
    json_str,
    retry_after,
)
from dripd.channels.spec import ProviderSpec
from dripd.clock import Clock
from dripd.errors import ConfigError
from dripd.model import Adapter

__all__ = ["CONFIG_KEYS", "SPEC", "GmailChannel", "check", "from_adapter"]

CONFIG_KEYS = HTTP_CONFIG_KEYS | {"user", "token_url", "token_provider"}

#: The `errors[].reason` (and `ErrorInfo` reason) values of a 403 that mean "slow down".
_RATE_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded", "RATE_LIMIT_EXCEEDED"})
#: A mailbox for the URL path: "me", an address, or an id; nothing that ends the path segment.
_USER = re.compile(r"[^\s/?#\\%]{1,320}")


def check(config: Mapping[str, Any], credentials: Mapping[str, Any]) -> None:
    """Registry hook: ConfigError naming the key if these maps are not a `gmail` adapter."""
    check_http_config(config)
    config_str(config, "from", required=True)
    user = config_str(config, "user")
    if user is not None and not _USER.fullmatch(user):
        raise ConfigError("adapter config `user` must be `me` or the mailbox's address")
    oauth.check("gmail", config, credentials)


def from_adapter(adapter: Adapter, context: ChannelContext) -> GmailChannel:
    """Registry factory: the channel, with its token source (a token provider is imported
    now: ConfigError naming `token_provider`)."""
    return GmailChannel(adapter, context)


class GmailChannel(oauth.BearerProvider):
    """Sends each message as raw MIME through `users.messages.send`."""

    provider = "gmail"
    default_base_url = "https://gmail.googleapis.com"

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
        user = str(adapter.config.get("user") or "me")
        self.path = f"/gmail/v1/users/{quote(user, safe='@')}/messages/send"

    async def send(self, message: Message) -> Receipt:
        """Deliver `message`: Receipt(provider_message_id = the Gmail message `id`), or the
        error its answer maps to (see the module's docstring)."""
        mail = mime.compose(
            message,
            sender=self.sender,
            now=self.clock.now(),
            where=f"gmail adapter {self.adapter.name!r}",
        )
        # Google's own samples send base64url with its `=` padding; the API accepts it.
        raw = base64.urlsafe_b64encode(mime.to_bytes(mail)).decode("ascii")
        response = await self.authorized("POST", self.path, json={"raw": raw})
        if response.is_success:
            return Receipt(provider_message_id=json_str(json_body(response), "id"))
        raise _error(response)


def _error(response: httpx.Response) -> ChannelError:
    """The error for a Gmail answer that is not a success: a 403 for a rate limit is
    transient (provider-wide), any other answer as `oauth.bearer_error` maps it."""
    message, reasons = _google_error(json_body(response))
    shown = f"{message} ({', '.join(sorted(reasons))})" if message and reasons else message
    if response.status_code == 403 and reasons & _RATE_REASONS:
        return TransientError(
            f"gmail: {detail(response, shown)}",
            provider_wide=True,
            retry_after=retry_after(response),
        )
    return oauth.bearer_error("gmail", response, shown)


def _google_error(body: Any) -> tuple[str | None, set[str]]:
    """The message and reasons of Google's error body: {"error": {"code", "message",
    "errors": [{"domain", "reason", "message"}], "details": [{"@type": …ErrorInfo,
    "reason"}]}}."""
    error = json_dict(body, "error")
    reasons: set[str] = set()
    for key in ("errors", "details"):
        items = error.get(key)
        if isinstance(items, list):
            for item in items:
                reason = item.get("reason") if isinstance(item, dict) else None
                if isinstance(reason, str) and reason:
                    reasons.add(reason[:64])
    return json_str(error, "message"), reasons


SPEC = ProviderSpec(
    name="gmail",
    channels=frozenset({"email"}),
    config_keys=CONFIG_KEYS,
    required_config=frozenset({"from"}),
    credential_keys=oauth.CREDENTIAL_KEYS,
    required_credentials=frozenset(),
    factory=from_adapter,
    check=check,
    identifier_keys=frozenset({"client_id"}),
)
