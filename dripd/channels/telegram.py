"""The `telegram` provider: chat messages through the Telegram Bot API's `sendMessage`
(providers.md §13).

`POST /bot<token>/sendMessage` on api.telegram.org with a JSON body. The bot token sits in
the URL path: no error text here holds the URL, HttpProvider's transport errors name no
URL, and dripd's log filter cuts httpx's request lines to scheme and host
(dripd.logs.http_client_records). The recipient (`to` of a `chat` step) is a chat id
(an integer, negative for groups) or a public channel's `@username`.
"""

from __future__ import annotations

import re
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
    TransientError,
)
from dripd.channels.http import (
    HTTP_CONFIG_KEYS,
    MAX_RETRY_AFTER,
    HttpProvider,
    check_http_config,
    config_bool,
    config_str,
    credential_str,
    detail,
    error_for_status,
    json_body,
    retry_after,
)
from dripd.channels.spec import ProviderSpec
from dripd.errors import ConfigError
from dripd.model import Adapter

__all__ = ["CONFIG_KEYS", "MAX_TEXT", "PARSE_MODES", "TelegramChannel", "check"]

CONFIG_KEYS: Final = HTTP_CONFIG_KEYS | {"parse_mode", "disable_notification"}
#: `parse_mode` values the Bot API knows.
PARSE_MODES: Final = frozenset({"HTML", "MarkdownV2", "Markdown"})
#: The longest message text (characters after entities are parsed).
MAX_TEXT: Final = 4096

# A bot token is `<bot id>:<secret>` (BotFather); anything else could bend the URL path.
_TOKEN = re.compile(r"[0-9]{1,20}:[A-Za-z0-9_-]{1,200}")
_CHAT_ID = re.compile(r"-?[0-9]{1,20}")
_USERNAME = re.compile(r"@[A-Za-z][A-Za-z0-9_]{3,31}")
# 403 descriptions that mean this chat will never take the bot's messages (providers.md
# §13, from client code): suppress the recipient.
_GONE = (
    "bot was blocked by the user",
    "user is deactivated",
    "bot was kicked",
    "bot can't initiate conversation",
)
_CHAT_NOT_FOUND = "chat not found"


def check(config: Mapping[str, Any], credentials: Mapping[str, Any]) -> None:
    """Registry hook: ConfigError naming the key unless these maps are a `telegram`
    adapter: `bot_token` like `123456:ABC…`, `parse_mode` one of PARSE_MODES,
    `disable_notification` a boolean."""
    check_http_config(config)
    token = credential_str(credentials, "bot_token", required=True) or ""
    if not _TOKEN.fullmatch(token):
        raise ConfigError(
            "adapter credential `bot_token` must be a Telegram bot token "
            "(<bot id>:<secret>, as BotFather gives it)"
        )
    mode = config_str(config, "parse_mode", max_length=20)
    if mode is not None and mode not in PARSE_MODES:
        raise ConfigError(
            f"adapter config `parse_mode` must be one of {', '.join(sorted(PARSE_MODES))}"
        )
    config_bool(config, "disable_notification")


def from_adapter(adapter: Adapter, context: ChannelContext) -> TelegramChannel:
    """Registry factory."""
    return TelegramChannel(adapter, context)


class TelegramChannel(HttpProvider):
    """Sends text messages as one bot.

    Body (core.telegram.org/bots/api#sendmessage): `chat_id` (an integer, or `@channel`),
    `text`, and from the config `parse_mode` and `disable_notification`.
    """

    provider = "telegram"
    default_base_url = "https://api.telegram.org"

    def __init__(self, adapter: Adapter, context: ChannelContext | None = None) -> None:
        config = adapter.config
        token = credential_str(adapter.credentials, "bot_token", required=True) or ""
        super().__init__(adapter, context)
        self._path = f"/bot{token}/sendMessage"
        self._parse_mode = config_str(config, "parse_mode", max_length=20)
        self._silent = config.get("disable_notification")

    async def send(self, message: Message) -> Receipt:
        """Send `message.body` (else `text`) to the chat `message.to`; Receipt holds
        `<chat_id>:<message_id>` (a message id is unique only within its chat).

        PermanentError before sending: not a chat id, no text, or more than 4096
        characters (without `parse_mode`; with one, Telegram counts after parsing and
        refuses with a 400). Then: 429 TransientError after `parameters.retry_after`;
        403 blocked/deactivated/kicked/can't initiate and 400 "chat not found"
        PermanentError(bounce); 400 with `migrate_to_chat_id` PermanentError naming the
        supergroup's new id (the subscriber's chat id must change); 401 and 404 (a wrong
        token) AdapterError; 5xx TransientError; other 4xx PermanentError."""
        chat = message.to.strip()
        chat_id: int | str
        if _CHAT_ID.fullmatch(chat):
            chat_id = int(chat)
        elif _USERNAME.fullmatch(chat):
            chat_id = chat
        else:
            raise PermanentError(
                f"telegram: {chat[:64]!r} is not a chat id (an integer or @channelusername)"
            )
        text = message.body if message.body is not None else message.text
        if not text or not text.strip():
            raise PermanentError("telegram: the message has no text")
        if self._parse_mode is None and len(text) > MAX_TEXT:
            raise PermanentError(
                f"telegram: the text has {len(text)} characters; Telegram takes at most {MAX_TEXT}"
            )
        payload: dict[str, Any] = {"chat_id": chat_id, "text": text}
        if self._parse_mode is not None:
            payload["parse_mode"] = self._parse_mode
        if self._silent is not None:
            payload["disable_notification"] = self._silent
        response = await self.request(
            "POST",
            self._path,
            content=msgspec.json.encode(payload),
            headers={"Content-Type": "application/json"},
        )
        answer = json_body(response)
        if response.status_code == 200 and isinstance(answer, dict) and answer.get("ok") is True:
            result = answer.get("result")
            ident = result.get("message_id") if isinstance(result, dict) else None
            if isinstance(ident, int) and not isinstance(ident, bool):
                return Receipt(provider_message_id=f"{chat}:{ident}")
            return Receipt()
        raise _error(self.provider, response, answer)


def _error(provider: str, response: httpx.Response, answer: Any) -> ChannelError:
    """The error for an answer whose `ok` is not true (the Bot API's error object:
    `error_code`, `description`, `parameters`), decided on the status and description."""
    answer = answer if isinstance(answer, dict) else {}
    description = answer.get("description")
    said = description if isinstance(description, str) else None
    code = answer.get("error_code")
    status = code if isinstance(code, int) and not isinstance(code, bool) else None
    status = status or response.status_code
    if status == 200:  # `ok` false or missing with a success status: not sent
        status = 500
    params = answer.get("parameters")
    params = params if isinstance(params, dict) else {}
    what = f"{provider}: {detail(response, said)}"
    lowered = (said or "").lower()
    if status == 429:
        wait = params.get("retry_after")
        seconds = (
            min(float(wait), MAX_RETRY_AFTER)
            if isinstance(wait, int | float) and not isinstance(wait, bool) and wait >= 0
            else retry_after(response)
        )
        return TransientError(what, provider_wide=True, retry_after=seconds)
    migrated = params.get("migrate_to_chat_id")
    if isinstance(migrated, int) and not isinstance(migrated, bool):
        return PermanentError(
            f"{what}; the group is now the supergroup {migrated}: change the subscriber's "
            "chat id to it"
        )
    if status == 403 and any(phrase in lowered for phrase in _GONE):
        return PermanentError(what, bounce=True)
    if status == 400 and _CHAT_NOT_FOUND in lowered:
        return PermanentError(what, bounce=True)
    if status in (401, 404):
        return AdapterError(what)
    if status >= 500:
        return TransientError(what, provider_wide=True, retry_after=retry_after(response))
    return error_for_status(provider, response, said)


SPEC = ProviderSpec(
    name="telegram",
    channels=frozenset({"chat"}),
    config_keys=CONFIG_KEYS,
    required_config=frozenset(),
    credential_keys=frozenset({"bot_token"}),
    required_credentials=frozenset({"bot_token"}),
    factory=from_adapter,
    check=check,
)
