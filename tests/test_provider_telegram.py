"""The telegram provider: `sendMessage` as the Bot API documents it (providers.md §13,
core.telegram.org/bots/api), its answers mapped onto dripd's errors, and the bot token
(which sits in the URL path) kept out of every error."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from httpmock import Answer, Mock, body_message, build, json_of

from dripd.channels import registry
from dripd.channels.base import AdapterError, PermanentError, TransientError
from dripd.errors import ConfigError

TOKEN = "7012345678:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw"
CREDENTIALS = {"bot_token": TOKEN}
OK = Answer(
    200,
    json={
        "ok": True,
        "result": {
            "message_id": 42,
            "from": {"id": 7012345678, "is_bot": True, "first_name": "Acme"},
            "chat": {"id": 123456789, "first_name": "Ana", "type": "private"},
            "date": 1764504000,
            "text": "Hi Ana",
        },
    },
)


def channel(mock: Mock, config: dict[str, Any] | None = None) -> Any:
    return build("telegram", "chat", config or {}, CREDENTIALS, mock)


def chat(**fields: Any) -> Any:
    return body_message("chat", "123456789", "Hi Ana", **fields)


def telegram_error(code: int, description: str, **parameters: Any) -> Answer:
    body: dict[str, Any] = {"ok": False, "error_code": code, "description": description}
    if parameters:
        body["parameters"] = parameters
    return Answer(code, json=body)


async def test_a_plain_message_is_the_documented_request() -> None:
    mock = Mock(OK)
    ch = channel(mock)
    receipt = await ch.send(chat())
    await ch.aclose()

    request = mock.last
    assert request.method == "POST"
    assert str(request.url) == f"https://api.telegram.org/bot{TOKEN}/sendMessage"
    assert request.headers["content-type"] == "application/json"
    assert "authorization" not in request.headers
    assert json_of(mock.last) == {"chat_id": 123456789, "text": "Hi Ana"}
    assert receipt.provider_message_id == "123456789:42"


async def test_every_optional_field_goes_where_telegram_reads_it() -> None:
    mock = Mock(OK)
    config = {
        "parse_mode": "HTML",
        "disable_notification": True,
        "base_url": "http://bot.stub.example:8081",
    }
    ch = channel(mock, config)
    await ch.send(chat(to="@acme_news", body="Hi <b>Ana</b>"))
    await ch.aclose()
    assert str(mock.last.url) == f"http://bot.stub.example:8081/bot{TOKEN}/sendMessage"
    assert json_of(mock.last) == {
        "chat_id": "@acme_news",
        "text": "Hi <b>Ana</b>",
        "parse_mode": "HTML",
        "disable_notification": True,
    }


async def test_a_group_chat_id_is_a_negative_integer() -> None:
    mock = Mock(OK)
    ch = channel(mock)
    receipt = await ch.send(chat(to="-1001234567890"))
    await ch.aclose()
    assert json_of(mock.last)["chat_id"] == -1001234567890
    assert receipt.provider_message_id == "-1001234567890:42"


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        ({"body": "x" * 4097}, "4097 characters"),
        ({"body": "  "}, "no text"),
        ({"to": "ana@example.org"}, "not a chat id"),
        ({"to": "@ab"}, "not a chat id"),
    ],
)
async def test_a_message_telegram_would_refuse_is_permanent_before_sending(
    fields: dict[str, Any], complaint: str
) -> None:
    mock = Mock(OK)
    ch = channel(mock)
    with pytest.raises(PermanentError, match=complaint):
        await ch.send(chat(**fields))
    await ch.aclose()
    assert mock.requests == []


async def test_with_a_parse_mode_telegram_judges_the_length() -> None:
    mock = Mock(OK)
    ch = channel(mock, {"parse_mode": "HTML"})
    await ch.send(chat(body="<b>" + "x" * 4096 + "</b>"))
    await ch.aclose()
    assert len(mock.requests) == 1


@pytest.mark.parametrize(
    ("answer", "kind", "bounce"),
    [
        (telegram_error(403, "Forbidden: bot was blocked by the user"), PermanentError, True),
        (telegram_error(403, "Forbidden: user is deactivated"), PermanentError, True),
        (
            telegram_error(403, "Forbidden: bot was kicked from the group chat"),
            PermanentError,
            True,
        ),
        (
            telegram_error(403, "Forbidden: bot can't initiate conversation with a user"),
            PermanentError,
            True,
        ),
        (telegram_error(400, "Bad Request: chat not found"), PermanentError, True),
        (telegram_error(400, "Bad Request: message text is empty"), PermanentError, False),
        (telegram_error(403, "Forbidden: bot can't send messages to bots"), PermanentError, False),
        (telegram_error(401, "Unauthorized"), AdapterError, None),
        (telegram_error(404, "Not Found"), AdapterError, None),
        (telegram_error(500, "Internal Server Error"), TransientError, None),
        (Answer(502, text="<html>Bad Gateway</html>"), TransientError, None),
        (Answer(200, json={"ok": False}), TransientError, None),
    ],
)
async def test_errors_map_by_status_and_description(
    answer: Answer, kind: type[Exception], bounce: bool | None
) -> None:
    mock = Mock(answer)
    ch = channel(mock)
    with pytest.raises(kind) as caught:
        await ch.send(chat())
    await ch.aclose()
    error: Any = caught.value
    if bounce is not None:
        assert error.bounce is bounce
    assert TOKEN not in str(error)
    assert TOKEN.split(":")[1] not in str(error)


async def test_a_429_waits_the_retry_after_of_the_body() -> None:
    mock = Mock(telegram_error(429, "Too Many Requests: retry after 35", retry_after=35))
    ch = channel(mock)
    with pytest.raises(TransientError) as caught:
        await ch.send(chat())
    await ch.aclose()
    assert caught.value.retry_after == 35.0
    assert caught.value.provider_wide


async def test_a_migrated_group_names_its_new_chat_id() -> None:
    mock = Mock(
        telegram_error(
            400,
            "Bad Request: group chat was upgraded to a supergroup chat",
            migrate_to_chat_id=-1009876543210,
        )
    )
    ch = channel(mock)
    with pytest.raises(PermanentError, match="-1009876543210") as caught:
        await ch.send(chat(to="-123456"))
    await ch.aclose()
    assert caught.value.bounce is False


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ConnectError(f"cannot connect to https://api.telegram.org/bot{TOKEN}/sendMessage"),
        httpx.ReadTimeout("timed out"),
    ],
)
async def test_transport_failures_are_transient_and_never_show_the_token(
    failure: Exception,
) -> None:
    mock = Mock(failure)
    ch = channel(mock)
    with pytest.raises(TransientError) as caught:
        await ch.send(chat())
    await ch.aclose()
    assert caught.value.provider_wide
    assert TOKEN.split(":")[1] not in str(caught.value)
    assert TOKEN.split(":")[1] not in repr(ch)


@pytest.mark.parametrize(
    ("config", "credentials", "complaint"),
    [
        ({}, {}, "bot_token"),
        ({}, {"bot_token": "not a token/../x"}, "bot_token"),
        ({"parse_mode": "html"}, CREDENTIALS, "parse_mode"),
        ({"disable_notification": "yes"}, CREDENTIALS, "disable_notification"),
        ({"bot_token": TOKEN}, CREDENTIALS, "credential"),
    ],
)
def test_config_and_credentials_are_checked(
    config: dict[str, Any], credentials: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(ConfigError, match=complaint) as caught:
        registry.validate("chat", "telegram", config, credentials)
    assert TOKEN.split(":")[1] not in str(caught.value)


def test_telegram_serves_the_chat_channel() -> None:
    with pytest.raises(ConfigError, match="does not serve"):
        registry.validate("sms", "telegram", {}, CREDENTIALS)
