"""The `gmail` provider: the request Gmail's `users.messages.send` documents (providers.md §7:
URL, Bearer token, JSON `raw` as URL-safe base64 of the whole MIME), and its error mapping,
through `httpx.MockTransport`."""

from __future__ import annotations

import base64
from email.message import EmailMessage
from typing import Any

import httpx
import pytest
from httpmock import Answer, Mock, build, form_of, json_of, make_adapter, message, mime_message

from dripd.channels.base import (
    AdapterError,
    ChannelContext,
    PermanentError,
    Receipt,
    TransientError,
)
from dripd.channels.gmail import GmailChannel
from dripd.clock import ManualClock

GRANT = {
    "client_id": "1234-abc.apps.googleusercontent.example",
    "client_secret": "GOCSPX-gmail-secret-77",
    "refresh_token": "1//0gmail-refresh-42",
}
TOKEN = Answer(
    200, json={"access_token": "ya29.a0-first", "expires_in": 3599, "token_type": "Bearer"}
)
SENT = Answer(
    200, json={"id": "18c2f0a1b2c3d4e5", "threadId": "18c2f0a1b2c3d4e5", "labelIds": ["SENT"]}
)
SEND_URL = "https://gmail.googleapis.com/gmail/v1/users/me/messages/send"
URLSAFE = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=")


def gmail(mock: httpx.AsyncBaseTransport, config: dict[str, Any] | None = None) -> Any:
    return build("gmail", "email", {"from": "news@x.example", **(config or {})}, GRANT, mock)


def raw_mime(request: httpx.Request) -> EmailMessage:
    """The MIME message inside the request's `raw`, read as Gmail reads it."""
    body = json_of(request)
    assert list(body) == ["raw"]
    raw = body["raw"]
    assert set(raw) <= URLSAFE  # base64url: `-` and `_`, never `+` or `/`
    data = base64.urlsafe_b64decode(raw)
    # The test's message makes standard base64 differ, so a `+`/`/` encoder would be caught.
    assert base64.b64encode(data).decode() != raw
    return mime_message(data)


async def test_plain_message_is_the_documented_request() -> None:
    mock = Mock(TOKEN, SENT)
    channel = gmail(mock)
    # `~~~?` and `>>>` encode to `+` and `/` in standard base64: the body must not hold them.
    receipt = await channel.send(message(text="Hi Ana ~~~??? >>> ÿÿÿ"))
    await channel.aclose()

    assert receipt == Receipt(provider_message_id="18c2f0a1b2c3d4e5")
    token_request, send = mock.requests
    assert str(token_request.url) == "https://oauth2.googleapis.com/token"
    assert form_of(token_request)["grant_type"] == ["refresh_token"]

    assert send.method == "POST"
    assert str(send.url) == SEND_URL
    assert send.headers["authorization"] == "Bearer ya29.a0-first"
    assert send.headers["content-type"] == "application/json"
    assert "key" not in send.url.params  # no API key: the token is the only credential
    mail = raw_mime(send)
    assert mail["From"] == "news@x.example"
    assert mail["To"] == "ana@example.org"
    assert mail["Subject"] == "Welcome"
    assert mail["Message-ID"] == message().message_id
    assert mail.get_content().rstrip("\r\n") == "Hi Ana ~~~??? >>> ÿÿÿ"


async def test_message_with_every_optional_field() -> None:
    mock = Mock(TOKEN, SENT)
    channel = gmail(
        mock,
        {"user": "news@x.example", "base_url": "https://gmail.test.example", "timeout": 5},
    )
    unsubscribe = "<https://u.example/u/abc>, <mailto:u@x.example?subject=stop>"
    await channel.send(
        message(
            to_name="Ana Lima",
            sender='"News" <news@x.example>',
            reply_to="help@x.example",
            html="<p>Hi <b>Ana</b></p>",
            headers={
                "List-Unsubscribe": unsubscribe,
                "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            },
        )
    )
    await channel.aclose()

    send = mock.last
    assert str(send.url) == "https://gmail.test.example/gmail/v1/users/news@x.example/messages/send"
    mail = raw_mime(send)
    assert mail["From"] == "News <news@x.example>"
    assert mail["To"] == "Ana Lima <ana@example.org>"
    assert mail["Reply-To"] == "help@x.example"
    assert mail["List-Unsubscribe"] == unsubscribe
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert mail.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in mail.iter_parts()] == ["text/plain", "text/html"]


async def test_two_sends_use_one_token_until_it_expires() -> None:
    clock = ManualClock()
    mock = Mock(
        TOKEN,
        SENT,
        SENT,
        Answer(200, json={"access_token": "ya29.second", "expires_in": 3599}),
        SENT,
    )
    adapter = make_adapter("gmail", "email", {"from": "news@x.example"}, GRANT)
    channel = GmailChannel(adapter, ChannelContext(transport=mock), clock=clock)
    await channel.send(message())
    await channel.send(message())
    hosts = [r.url.host for r in mock.requests]
    assert hosts == ["oauth2.googleapis.com", "gmail.googleapis.com", "gmail.googleapis.com"]

    clock.advance(3599 - 60)
    await channel.send(message())
    assert mock.requests[-2].url.host == "oauth2.googleapis.com"
    assert mock.last.headers["authorization"] == "Bearer ya29.second"
    await channel.aclose()


async def test_401_refreshes_once_and_retries_once() -> None:
    mock = Mock(
        TOKEN,
        Answer(401, json={"error": {"code": 401, "message": "Invalid Credentials"}}),
        Answer(200, json={"access_token": "ya29.fresh", "expires_in": 3599}),
        SENT,
    )
    channel = gmail(mock)
    assert await channel.send(message()) == Receipt(provider_message_id="18c2f0a1b2c3d4e5")
    await channel.aclose()
    assert [str(r.url) for r in mock.requests] == [
        "https://oauth2.googleapis.com/token",
        SEND_URL,
        "https://oauth2.googleapis.com/token",
        SEND_URL,
    ]
    assert mock.last.headers["authorization"] == "Bearer ya29.fresh"
    assert mock.last.content == mock.requests[1].content  # the same message, sent again


async def test_401_after_the_refresh_pauses_the_adapter() -> None:
    denied = Answer(401, json={"error": {"code": 401, "message": "Invalid Credentials"}})
    mock = Mock(
        TOKEN, denied, Answer(200, json={"access_token": "ya29.b", "expires_in": 3599}), denied
    )
    channel = gmail(mock)
    with pytest.raises(AdapterError, match=r"gmail: HTTP 401: Invalid Credentials"):
        await channel.send(message())
    await channel.aclose()
    assert len(mock.requests) == 4  # token, send, token, send: no third try


async def test_revoked_grant_during_a_send_pauses_the_adapter_and_sends_nothing() -> None:
    mock = Mock(
        Answer(
            400,
            json={
                "error": "invalid_grant",
                "error_description": "Token has been expired or revoked.",
            },
        )
    )
    channel = gmail(mock)
    with pytest.raises(AdapterError) as caught:
        await channel.send(message())
    assert caught.value.message == (
        "gmail: oauth refresh refused: invalid_grant: Token has been expired or revoked."
    )
    assert [r.url.host for r in mock.requests] == ["oauth2.googleapis.com"]
    await channel.aclose()


def google_error(status: int, reason: str, text: str) -> Answer:
    return Answer(
        status,
        json={
            "error": {
                "code": status,
                "message": text,
                "errors": [{"domain": "usageLimits", "reason": reason, "message": text}],
            }
        },
    )


@pytest.mark.parametrize(
    ("answer", "kind", "provider_wide", "retry_after", "text"),
    [
        (
            google_error(400, "invalidArgument", "Invalid To header"),
            PermanentError,
            None,
            None,
            "HTTP 400: Invalid To header",
        ),
        (
            google_error(403, "rateLimitExceeded", "Rate Limit Exceeded"),
            TransientError,
            True,
            None,
            "rateLimitExceeded",
        ),
        (
            google_error(403, "userRateLimitExceeded", "User-rate limit exceeded"),
            TransientError,
            True,
            None,
            "HTTP 403",
        ),
        (
            google_error(403, "insufficientPermissions", "Insufficient Permission"),
            AdapterError,
            None,
            None,
            "Insufficient Permission",
        ),
        (
            google_error(404, "notFound", "Requested entity was not found."),
            AdapterError,
            None,
            None,
            "HTTP 404",
        ),
        (
            Answer(
                429,
                json={"error": {"code": 429, "message": "Too many"}},
                headers={"Retry-After": "12"},
            ),
            TransientError,
            True,
            12.0,
            "HTTP 429",
        ),
        (
            google_error(500, "backendError", "Backend Error"),
            TransientError,
            True,
            None,
            "HTTP 500",
        ),
        (Answer(503, text="unavailable"), TransientError, True, None, "HTTP 503"),
        (google_error(413, "uploadTooLarge", "Too large"), PermanentError, None, None, "HTTP 413"),
    ],
)
async def test_error_mapping(
    answer: Answer,
    kind: type[Exception],
    provider_wide: bool | None,
    retry_after: float | None,
    text: str,
) -> None:
    mock = Mock(TOKEN, answer)
    channel = gmail(mock)
    with pytest.raises(kind) as caught:
        await channel.send(message())
    await channel.aclose()
    error = caught.value
    assert text in str(error)
    if isinstance(error, TransientError):
        assert error.provider_wide is provider_wide
        assert error.retry_after == retry_after
    if isinstance(error, PermanentError):
        assert error.bounce is False  # Gmail's answer never says the recipient is gone
    assert "ya29.a0-first" not in str(error)
    assert len(mock.requests) == 2  # no retry outside a 401


async def test_network_failure_is_transient_provider_wide() -> None:
    mock = Mock(TOKEN, httpx.ConnectError("connection reset"))
    channel = gmail(mock)
    with pytest.raises(TransientError) as caught:
        await channel.send(message())
    assert caught.value.provider_wide
    await channel.aclose()


async def provide(adapter_name: str, provider: str) -> str:
    return "host-token-1"


async def test_token_provider_mode_sends_the_providers_token() -> None:
    mock = Mock(SENT)
    channel = build(
        "gmail",
        "email",
        {"from": "news@x.example", "token_provider": "test_provider_gmail:provide"},
        {},
        mock,
    )
    await channel.send(message())
    await channel.aclose()
    [send] = mock.requests
    assert str(send.url) == SEND_URL
    assert send.headers["authorization"] == "Bearer host-token-1"
