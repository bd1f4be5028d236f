"""The `ms365` provider: Microsoft Graph's `sendMail` in the MIME form as documented
(providers.md §8: `Content-Type: text/plain`, standard base64 of the whole MIME, 202 with no
body), the Microsoft refresh grant it uses (§9), and the error mapping, through
`httpx.MockTransport`."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from email.message import EmailMessage
from typing import Any

import httpx
import pytest
from httpmock import Answer, Mock, build, form_of, message, mime_message

from dripd.channels.base import AdapterError, PermanentError, Receipt, TransientError
from dripd.errors import ConfigError

GRANT = {
    "client_id": "6731de76-14a6-49ae-97bc-6eba6914391e",
    "client_secret": "qW8Q~ms365-client-secret",
    "refresh_token": "0.AAAA-ms365-refresh-token",
}
CONFIG = {"from": "Mailer <mailer@contoso.example>", "user": "mailer@contoso.example"}
TOKEN = Answer(
    200,
    json={
        "access_token": "eyJ0eXAi.first",
        "token_type": "Bearer",
        "expires_in": 3599,
        "scope": "https://graph.microsoft.com/Mail.Send",
        "refresh_token": "0.AAAA-ms365-refresh-token-2",
    },
)
ACCEPTED = Answer(202)
TOKEN_URL = "https://login.microsoftonline.com/common/oauth2/v2.0/token"
SEND_URL = "https://graph.microsoft.com/v1.0/users/mailer@contoso.example/sendMail"


def ms365(
    mock: httpx.AsyncBaseTransport, config: Mapping[str, Any] | None = None, **context: Any
) -> Any:
    return build("ms365", "email", {**CONFIG, **(config or {})}, GRANT, mock, **context)


def mime_of(request: httpx.Request) -> EmailMessage:
    """The MIME message in the request body, decoded as Graph decodes it (standard base64)."""
    body = request.content
    assert b"+" in body or b"/" in body  # standard alphabet (the test's text makes sure)
    try:
        data = base64.b64decode(body, validate=True)  # refuses `-` and `_`
    except binascii.Error as exc:  # pragma: no cover - the failure being tested for
        raise AssertionError(f"not standard base64: {exc}") from exc
    return mime_message(data)


async def test_plain_message_is_the_documented_mime_request() -> None:
    mock = Mock(TOKEN, ACCEPTED)
    channel = ms365(mock)
    receipt = await channel.send(message(text="Hi Ana ~~~??? >>> ÿÿÿ"))
    await channel.aclose()

    # Graph answers no id: the stored id is dripd's own Message-ID, inside the MIME.
    assert receipt == Receipt(provider_message_id=message().message_id)
    token_request, send = mock.requests
    assert str(token_request.url) == TOKEN_URL
    assert form_of(token_request)["scope"] == [
        "https://graph.microsoft.com/Mail.Send offline_access"
    ]

    assert send.method == "POST"
    assert str(send.url) == SEND_URL
    assert send.headers["authorization"] == "Bearer eyJ0eXAi.first"
    assert send.headers["content-type"] == "text/plain"
    mail = mime_of(send)
    assert mail["From"] == "Mailer <mailer@contoso.example>"
    assert mail["To"] == "ana@example.org"
    assert mail["Subject"] == "Welcome"
    assert mail["Message-ID"] == message().message_id
    assert mail.get_content().rstrip("\r\n") == "Hi Ana ~~~??? >>> ÿÿÿ"


async def test_message_with_every_optional_field() -> None:
    mock = Mock(TOKEN, ACCEPTED)
    tenant = "contoso.onmicrosoft.example"
    channel = ms365(
        mock,
        {
            "user": "7f3c2b1a-0000-4000-8000-00000000abcd",
            "tenant": tenant,
            "base_url": "https://graph.microsoft.us",
            "token_url": "https://login.microsoftonline.us/contoso/oauth2/v2.0/token",
            "scope": "https://graph.microsoft.us/Mail.Send offline_access",
            "max_connections": 2,
        },
    )
    unsubscribe = "<https://u.example/u/abc>, <mailto:u@x.example?subject=stop>"
    await channel.send(
        message(
            to_name="Ana Lima",
            sender="News <news@contoso.example>",
            reply_to="help@contoso.example",
            html="<p>Hi <b>Ana</b> ~~~??? >>></p>",
            headers={
                "List-Unsubscribe": unsubscribe,
                "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            },
        )
    )
    await channel.aclose()

    token_request, send = mock.requests
    assert str(token_request.url) == "https://login.microsoftonline.us/contoso/oauth2/v2.0/token"
    assert form_of(token_request)["scope"] == [
        "https://graph.microsoft.us/Mail.Send offline_access"
    ]
    assert str(send.url) == (
        "https://graph.microsoft.us/v1.0/users/7f3c2b1a-0000-4000-8000-00000000abcd/sendMail"
    )
    mail = mime_of(send)
    assert mail["From"] == "News <news@contoso.example>"
    assert mail["To"] == "Ana Lima <ana@example.org>"
    assert mail["Reply-To"] == "help@contoso.example"
    assert mail["List-Unsubscribe"] == unsubscribe
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert [p.get_content_type() for p in mail.iter_parts()] == ["text/plain", "text/html"]


async def test_two_sends_one_token_and_the_rotated_refresh_token_is_saved() -> None:
    saved: list[dict[str, Any]] = []

    async def save(credentials: Mapping[str, Any]) -> None:
        saved.append(dict(credentials))

    mock = Mock(TOKEN, ACCEPTED, ACCEPTED)
    channel = ms365(mock, save_credentials=save)
    await channel.send(message(text="one ~~~??? >>>"))
    await channel.send(message(text="two ~~~??? >>>"))
    await channel.aclose()
    assert [str(r.url) for r in mock.requests] == [TOKEN_URL, SEND_URL, SEND_URL]
    assert saved == [{**GRANT, "refresh_token": "0.AAAA-ms365-refresh-token-2"}]


async def test_401_refreshes_once_and_retries_once() -> None:
    expired = Answer(
        401,
        json={
            "error": {"code": "InvalidAuthenticationToken", "message": "Access token has expired."}
        },
    )
    fresh = Answer(200, json={"access_token": "eyJ0eXAi.fresh", "expires_in": 3599})
    mock = Mock(TOKEN, expired, fresh, ACCEPTED)
    channel = ms365(mock)
    assert await channel.send(message(text="~~~??? >>>")) == Receipt(
        provider_message_id=message().message_id
    )
    await channel.aclose()
    assert [str(r.url) for r in mock.requests] == [TOKEN_URL, SEND_URL, TOKEN_URL, SEND_URL]
    # The second refresh uses the refresh token the first one rotated in.
    assert form_of(mock.requests[2])["refresh_token"] == ["0.AAAA-ms365-refresh-token-2"]
    assert mock.last.headers["authorization"] == "Bearer eyJ0eXAi.fresh"


async def test_401_after_the_refresh_pauses_the_adapter() -> None:
    expired = Answer(
        401, json={"error": {"code": "InvalidAuthenticationToken", "message": "Token is invalid."}}
    )
    mock = Mock(TOKEN, expired, TOKEN, expired)
    channel = ms365(mock)
    with pytest.raises(
        AdapterError, match="ms365: HTTP 401: InvalidAuthenticationToken: Token is invalid"
    ):
        await channel.send(message())
    await channel.aclose()
    assert len(mock.requests) == 4


async def test_consent_required_pauses_the_adapter_before_any_send() -> None:
    refused = Answer(
        400,
        json={
            "error": "consent_required",
            "error_description": "AADSTS65001: The user or administrator has not consented.",
            "error_codes": [65001],
        },
    )
    mock = Mock(refused)
    channel = ms365(mock)
    with pytest.raises(AdapterError) as caught:
        await channel.send(message())
    await channel.aclose()
    assert caught.value.message == (
        "ms365: oauth refresh refused: consent_required: AADSTS65001: The user or administrator "
        "has not consented."
    )
    assert [str(r.url) for r in mock.requests] == [TOKEN_URL]


def graph_error(
    status: int, code: str, text: str, headers: Mapping[str, str] | None = None
) -> Answer:
    return Answer(status, json={"error": {"code": code, "message": text}}, headers=headers or {})


@pytest.mark.parametrize(
    ("answer", "kind", "retry_after", "text"),
    [
        (
            graph_error(
                400,
                "ErrorMimeContentInvalidBase64String",
                "Invalid base64 string for MIME content.",
            ),
            PermanentError,
            None,
            "HTTP 400: ErrorMimeContentInvalidBase64String: Invalid base64",
        ),
        (
            graph_error(403, "ErrorAccessDenied", "Access is denied."),
            AdapterError,
            None,
            "HTTP 403: ErrorAccessDenied",
        ),
        (
            graph_error(404, "ErrorInvalidUser", "The requested user is invalid."),
            AdapterError,
            None,
            "ErrorInvalidUser",
        ),
        (
            graph_error(429, "ApplicationThrottled", "Too many requests", {"Retry-After": "7"}),
            TransientError,
            7.0,
            "HTTP 429: ApplicationThrottled",
        ),
        (
            graph_error(503, "ServiceUnavailable", "busy", {"Retry-After": "30"}),
            TransientError,
            30.0,
            "HTTP 503",
        ),
        (Answer(504, text="gateway timeout"), TransientError, None, "HTTP 504"),
        (Answer(200, json={}), PermanentError, None, "sendMail answers 202"),
        (graph_error(413, "ErrorMessageSizeExceeded", "too big"), PermanentError, None, "HTTP 413"),
    ],
)
async def test_error_mapping(
    answer: Answer, kind: type[Exception], retry_after: float | None, text: str
) -> None:
    mock = Mock(TOKEN, answer)
    channel = ms365(mock)
    with pytest.raises(kind) as caught:
        await channel.send(message())
    await channel.aclose()
    error = caught.value
    assert text in str(error)
    if isinstance(error, TransientError):
        assert error.provider_wide
        assert error.retry_after == retry_after
    if isinstance(error, PermanentError):
        assert error.bounce is False  # Graph's answer never says the recipient is gone
    assert "eyJ0eXAi.first" not in str(error)
    assert len(mock.requests) == 2  # no retry outside a 401


async def test_network_failure_is_transient_provider_wide() -> None:
    mock = Mock(TOKEN, httpx.ReadTimeout("timed out"))
    channel = ms365(mock)
    with pytest.raises(TransientError) as caught:
        await channel.send(message())
    assert caught.value.provider_wide
    await channel.aclose()


async def provide(adapter_name: str, provider: str) -> Any:
    return {"access_token": f"host-{provider}-{adapter_name}", "expires_in": 600}


async def test_token_provider_mode_sends_the_providers_token() -> None:
    mock = Mock(ACCEPTED)
    config = {**CONFIG, "token_provider": "test_provider_ms365:provide"}
    channel = build("ms365", "email", config, {}, mock)
    await channel.send(message(text="~~~??? >>>"))
    await channel.send(message(text="~~~??? >>>"))
    await channel.aclose()
    assert [str(r.url) for r in mock.requests] == [SEND_URL, SEND_URL]
    assert mock.last.headers["authorization"] == "Bearer host-ms365-a1"


def test_user_is_required() -> None:
    with pytest.raises(ConfigError, match="config key 'user' is required"):
        build("ms365", "email", {"from": "a@contoso.example"}, GRANT, Mock())
