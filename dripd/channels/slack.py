"""The `slack` provider: chat messages through a Slack incoming webhook
(https://api.slack.com/messaging/webhooks), through the network guard of HTTP hooks
(dripd.channels.guarded).

Credentials: `url`, the incoming-webhook URL (`https://hooks.slack.com/services/T…/B…/…`).
The URL is the credential: it never appears in an error, a log line or a stored answer
(errors name Slack's host only). The webhook posts to the channel chosen when it was
created, so the message's recipient is not sent. Adapter config: `timeout`,
`max_connections` (see dripd.channels.http).

The body, `Content-Type: application/json`: `{"text": "<the step's body>"}`; or, when the
rendered body is a JSON object, that object (Block Kit `blocks`, `attachments`, …), which
must then hold a non-empty `text`: Slack shows it in notifications, where blocks are not.

Answers (Slack's "Changes to errors for incoming webhooks", 2016-05-17): 200 with the body
`ok` is delivered (Slack gives no message id); 429 (about one message a second per webhook)
and 5xx (`rollup_error`) are transient, `Retry-After` honoured; 401, 403
(`action_prohibited`, `invalid_token`), 404 (`channel_not_found`, `no_service`), 410
(`channel_is_archived`) and those codes under any status mean the URL is dead: the adapter is
paused; any other answer (400 `invalid_payload`, `user_not_found`, `no_text`) is permanent.
"""

from __future__ import annotations

from collections.abc import Mapping
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
)
from dripd.channels.guarded import GuardedProvider, check_url_value
from dripd.channels.http import (
    HTTP_CONFIG_KEYS,
    check_http_config,
    detail,
    error_for_status,
    json_object,
    transient_status,
)
from dripd.channels.spec import ProviderSpec
from dripd.model import Adapter

__all__ = ["SPEC", "SlackChannel", "check", "from_adapter", "payload"]

#: Statuses that mean the webhook URL no longer posts anywhere.
DEAD_STATUSES: Final = frozenset({401, 403, 404, 410})
#: Slack's error codes that mean the same, whatever the status.
DEAD_CODES: Final = frozenset(
    {
        "action_prohibited",
        "channel_is_archived",
        "channel_not_found",
        "invalid_token",
        "no_service",
        "no_team",
        "posting_to_general_channel_denied",
        "team_disabled",
    }
)

_CONFIG_KEYS = frozenset({"timeout", "max_connections"})


def check(config: Mapping[str, Any], credentials: Mapping[str, Any]) -> None:
    """Registry hook: ConfigError naming the key (never quoting the URL) when the `url`
    credential is not an http(s) URL, or `timeout` or `max_connections` is wrong."""
    check_url_value(credentials.get("url"), "credential `url`")
    check_http_config({key: config[key] for key in HTTP_CONFIG_KEYS & set(config)})


def from_adapter(adapter: Adapter, context: ChannelContext | None = None) -> SlackChannel:
    """Registry factory: the channel of a validated adapter (connections open on send)."""
    return SlackChannel(adapter, context)


def payload(message: Message) -> bytes:
    """The JSON body for `message` (see the module docstring); PermanentError when there is
    no text to send."""
    body = message.body if message.body is not None else message.text
    if body is None or not body.strip():
        raise PermanentError("slack: the message has no text")
    document = json_object(body)
    if document is None:
        return msgspec.json.encode({"text": body})
    text = document.get("text")
    if not isinstance(text, str) or not text.strip():
        raise PermanentError(
            "slack: a JSON message needs a non-empty `text` (shown in notifications)"
        )
    return msgspec.json.encode(document)


class SlackChannel(GuardedProvider):
    """POSTs each message to the adapter's incoming-webhook URL (see the module docstring)."""

    provider = "slack"

    def __init__(
        self, adapter: Adapter, context: ChannelContext | None = None, **guard: Any
    ) -> None:
        super().__init__(
            adapter, context, url=adapter.credentials["url"], where="credential `url`", **guard
        )

    async def send(self, message: Message) -> Receipt:
        """POST `message`; a Receipt without id (Slack returns none) on 200 `ok`."""
        content = payload(message)
        response = await self.post(content, {"content-type": "application/json"})
        if response.status_code == 200 and response.text.strip() == "ok":
            return Receipt()
        raise _error(response)


def _error(response: httpx.Response) -> ChannelError:
    status = response.status_code
    if not transient_status(status):
        if status in DEAD_STATUSES or response.text.strip() in DEAD_CODES:
            return AdapterError(
                f"slack: {detail(response)} (the webhook URL no longer posts: replace it)"
            )
        if status == 200:
            return PermanentError(f"slack: {detail(response)} (not `ok`)")
    return error_for_status("slack", response)


SPEC = ProviderSpec(
    name="slack",
    channels=frozenset({"chat"}),
    config_keys=_CONFIG_KEYS,
    required_config=frozenset(),
    credential_keys=frozenset({"url"}),
    required_credentials=frozenset({"url"}),
    factory=from_adapter,
    check=check,
)
