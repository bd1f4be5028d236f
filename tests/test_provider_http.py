"""What every HTTP provider shares (dripd.channels.http, guarded, oauth): credentials that
go into headers, URLs and basic auth are printable ASCII, checked when the adapter is added;
an email adapter's `from` reads as a mailbox; the adapter's `timeout` bounds the whole
request, a trickling answer included; and answers are read capped, never whole.

Each test runs over every built-in HTTP provider (the table below must name them all)."""

from __future__ import annotations

import asyncio
import base64
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import ip_network
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from httpmock import Answer, Endless, Mock, Trickle, body_message, build, message

from dripd.channels import registry
from dripd.channels.base import ChannelError, Message, TransientError
from dripd.channels.guarded import check_url_value
from dripd.channels.http import MAX_ANSWER_BYTES, MAX_ERROR_BYTES, credential_str
from dripd.errors import ConfigError
from dripd.netguard import NetPolicy

#: Outer deadline of a test waiting for a send that must end by itself (seconds): far above
#: the adapter's timeout, so a loaded machine does not fail the test.
DEADLINE = 60.0
#: The adapter timeout of the trickle tests (seconds).
SHORT = 0.2

LOOPBACK = NetPolicy(allow_http=True, allowed_networks=(ip_network("127.0.0.0/8"),))
GRANT = {
    "client_id": "1234-client.apps.googleusercontent.example",
    "client_secret": "GOCSPX-client-secret-9f8e7d",
    "refresh_token": "1//0refresh-token-a1b2c3d4",
}
AWS = {
    "access_key_id": "AKIAIOSFODNN7EXAMPLE",
    "secret_access_key": "je7MtGbClwBF/2Zp9Utk/h3yCo8nvbEXAMPLEKEY",
    "session_token": "IQoJb3JpZ2luX2VjEXAMPLESESSIONTOKEN",
}


def _public_key() -> str:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


@dataclass(frozen=True)
class Setup:
    """A valid adapter of one provider, with every credential key it takes, and a message
    it can send."""

    channel: str
    config: dict[str, Any]
    credentials: dict[str, Any]
    message: Callable[[], Message]


def _email() -> Message:
    return message()


HTTP: dict[str, Setup] = {
    "postmark": Setup(
        "email",
        {"from": "Acme <news@acme.example>"},
        {
            "server_token": "pm-server-7f3c9a1e-4b2d",
            "webhook_username": "dripd-hooks",
            "webhook_password": "Wq7-correct-horse",
        },
        _email,
    ),
    "mailersend": Setup(
        "email",
        {"from": "news@acme.example"},
        {"api_key": "mlsn.8f2c1d9e7a6b5c4d", "webhook_secret": "Xf9kQ2mN7pR4tV8w"},
        _email,
    ),
    "sendgrid": Setup(
        "email",
        {"from": "news@acme.example"},
        {"api_key": "SG.k3yIdent1f1er.S3cretPart", "webhook_public_key": _public_key()},
        _email,
    ),
    "mailgun": Setup(
        "email",
        {"from": "news@mg.acme.example", "domain": "mg.acme.example"},
        {"api_key": "key-3ax6xnjp29jd6fds4gc373sg", "webhook_signing_key": "whk-0a1b2c3d4e5f"},
        _email,
    ),
    "ses": Setup("email", {"from": "news@acme.example", "region": "eu-west-1"}, AWS, _email),
    "gmail": Setup("email", {"from": "news@acme.example"}, GRANT, _email),
    "ms365": Setup(
        "email", {"from": "mailer@contoso.example", "user": "mailer@contoso.example"}, GRANT, _email
    ),
    "sns": Setup(
        "sms", {"region": "eu-west-1"}, AWS, lambda: body_message("sms", "+15555550100", "Hi")
    ),
    "twilio": Setup(
        "sms",
        {"from": "+15005550006"},
        {"account_sid": "AC" + "0123456789abcdef" * 2, "auth_token": "t0ps3cretAuthT0ken0123"},
        lambda: body_message("sms", "+15558675310", "Hi"),
    ),
    "whatsapp_cloud": Setup(
        "whatsapp",
        {"phone_number_id": "106540352242922"},
        {
            "access_token": "EAAGm0PX4ZCpsBAAccessT0ken",
            "app_secret": "a1b2c3d4e5f6appsecret",
            "verify_token": "dripd-verify-0123",
        },
        lambda: body_message("whatsapp", "+15551234567", "Hi"),
    ),
    "telegram": Setup(
        "chat",
        {},
        {"bot_token": "7012345678:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw"},
        lambda: body_message("chat", "123456789", "Hi"),
    ),
    "slack": Setup(
        "chat",
        {},
        {"url": "https://127.0.0.1/services/T0001ABCD/B0002EFGH/xQz9ZmV0aGluZ1Nl"},
        lambda: body_message("chat", "sub-42", "Hi"),
    ),
    "webhook": Setup(
        "webhook",
        {"url": "http://127.0.0.1:8080/hooks/dripd"},
        {"secret": "whsec_" + base64.b64encode(b"dripd-test-signing-key-0123456789").decode()},
        lambda: body_message("webhook", "sub-42", "Hi"),
    ),
}

#: The built-in providers that do not speak HTTP.
NOT_HTTP = {"smtp", "outbox", "postgres"}


def test_the_table_names_every_builtin_http_provider() -> None:
    builtin = {importlib.import_module(f"dripd.channels.{m}").SPEC.name for m in registry.BUILTIN}
    assert set(HTTP) == builtin - NOT_HTTP
    for name, setup in HTTP.items():
        spec = registry.get(name)
        assert set(setup.credentials) == spec.credential_keys, name
        registry.validate(setup.channel, name, setup.config, setup.credentials)


# -- credentials are printable ASCII ---------------------------------------------------------

#: Characters a pasted credential picks up: an accented letter, a line separator (U+2028),
#: a non-breaking space, a typographic quote, a zero-width space, a DEL.
STRAY = ["é", "\u2028", "\u00a0", "\u2019", "\u200b", "\x7f"]

CASES = [
    (provider, key, stray)
    for provider, setup in HTTP.items()
    for key in sorted(setup.credentials)
    for stray in STRAY
]


def _spoiled(value: str, stray: str) -> str:
    middle = len(value) // 2
    return value[:middle] + stray + value[middle:]


@pytest.mark.parametrize(("provider", "key", "stray"), CASES)
def test_a_credential_that_is_not_printable_ascii_is_refused_at_add(
    provider: str, key: str, stray: str
) -> None:
    setup = HTTP[provider]
    bad = _spoiled(setup.credentials[key], stray)
    with pytest.raises(ConfigError) as caught:
        registry.validate(setup.channel, provider, setup.config, {**setup.credentials, key: bad})
    text = caught.value.message
    assert f"`{key}`" in text
    assert "printable ASCII" in text or "control characters" in text
    assert bad not in text
    assert setup.credentials[key] not in text


@pytest.mark.parametrize("provider", sorted(HTTP))
async def test_an_adapter_stored_with_such_a_credential_does_not_build(provider: str) -> None:
    # An adapter stored before the check: refused at build, naming the key, never a crash
    # at the first send.
    setup = HTTP[provider]
    key = sorted(setup.credentials)[0]
    credentials = {**setup.credentials, key: _spoiled(setup.credentials[key], "é")}
    with pytest.raises(ConfigError, match=f"`{key}`"):
        build(provider, setup.channel, setup.config, credentials, Mock())


def test_credential_str_keeps_line_breaks_only_when_multiline() -> None:
    pem = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0D\n-----END PUBLIC KEY-----\n"
    assert credential_str({"k": pem}, "k", multiline=True) == pem
    with pytest.raises(ConfigError, match="`k`"):
        credential_str({"k": pem}, "k")
    with pytest.raises(ConfigError, match="`k` must be printable ASCII"):
        credential_str({"k": pem.replace("MFkw", "MFkw\u2028")}, "k", multiline=True)
    with pytest.raises(ConfigError, match="`k` must be printable ASCII"):
        credential_str({"k": "tokén-abc"}, "k")
    assert credential_str({"k": "mot de passe éclair"}, "k", ascii_only=False)


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.slack.example/services/tokén",
        "https://bücher.example/hook",
        "https://a.example/a\u2028b",
    ],
)
def test_a_url_that_is_not_printable_ascii_is_refused(url: str) -> None:
    with pytest.raises(ConfigError, match="config `url` must be printable ASCII") as caught:
        check_url_value(url, "config `url`")
    assert url not in caught.value.message


# -- an email adapter's `from` ---------------------------------------------------------------

EMAIL = sorted(name for name, setup in HTTP.items() if setup.channel == "email")


@pytest.mark.parametrize(
    ("provider", "config"),
    [(name, HTTP[name].config) for name in EMAIL]
    + [("smtp", {"host": "smtp.acme.example"}), ("outbox", {"path": "/tmp/outbox.jsonl"})],
)
@pytest.mark.parametrize("sender", ["not an address", "nobody", "a@b.example, c@d.example"])
def test_an_email_adapters_from_must_be_a_mailbox(
    provider: str, config: dict[str, Any], sender: str
) -> None:
    credentials = HTTP[provider].credentials if provider in HTTP else {}
    with pytest.raises(ConfigError, match=r"^adapter config `from`: .* is not an email address"):
        registry.validate("email", provider, {**config, "from": sender}, credentials)


def test_a_from_with_a_display_name_is_a_mailbox() -> None:
    setup = HTTP["postmark"]
    registry.validate(
        "email", "postmark", {"from": '"Acme, Inc." <news@acme.example>'}, setup.credentials
    )


def test_from_on_other_channels_is_not_read_as_an_email_address() -> None:
    setup = HTTP["twilio"]
    registry.validate("sms", "twilio", {"from": "+15005550006"}, setup.credentials)


# -- the whole request within the adapter's timeout ------------------------------------------


def _context(provider: str) -> dict[str, Any]:
    return {"net_policy": LOOPBACK} if provider in ("slack", "webhook") else {}


def _serving(answer: Callable[[httpx.Request], httpx.Response]) -> Mock:
    """A Mock answering OAuth token requests with a token, every other request `answer`."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/token"):
            return httpx.Response(
                200, json={"access_token": "ya29.t", "expires_in": 3600}, request=request
            )
        return answer(request)

    return Mock(handler=handler)


async def _send(provider: str, mock: Mock, **config: Any) -> BaseException | None:
    setup = HTTP[provider]
    channel = build(
        provider,
        setup.channel,
        {**setup.config, **config},
        setup.credentials,
        mock,
        **_context(provider),
    )
    try:
        await asyncio.wait_for(channel.send(setup.message()), DEADLINE)
    except ChannelError as exc:
        return exc
    finally:
        await channel.aclose()
    return None


@pytest.mark.parametrize("provider", sorted(HTTP))
async def test_a_trickling_answer_ends_at_the_adapters_timeout(provider: str) -> None:
    streams: list[Trickle] = []

    def trickle(request: httpx.Request) -> httpx.Response:
        stream = Trickle(b"{", pause=0.02)
        streams.append(stream)
        return httpx.Response(200, stream=stream, request=request)

    error = await _send(provider, _serving(trickle), timeout=SHORT)
    assert isinstance(error, TransientError), error
    assert error.provider_wide
    assert f"{SHORT:g} s" in error.message
    assert "timeout" in error.message
    [stream] = streams
    assert stream.sent < stream.count  # it did not run to its end


@pytest.mark.parametrize("provider", sorted(set(HTTP) - {"slack", "webhook"}))
async def test_a_success_answer_over_the_cap_is_refused_unread(provider: str) -> None:
    streams: list[Endless] = []

    def huge(request: httpx.Request) -> httpx.Response:
        stream = Endless(MAX_ANSWER_BYTES + 4 * 1024 * 1024)
        streams.append(stream)
        return httpx.Response(200, stream=stream, request=request)

    error = await _send(provider, _serving(huge))
    assert isinstance(error, TransientError), error
    assert error.provider_wide
    assert "larger than 16 MiB" in error.message
    [stream] = streams
    assert stream.sent <= MAX_ANSWER_BYTES + stream.chunk


@pytest.mark.parametrize("provider", sorted(HTTP))
async def test_an_error_answer_is_read_only_as_far_as_its_message(provider: str) -> None:
    streams: list[Endless] = []

    def huge(request: httpx.Request) -> httpx.Response:
        stream = Endless(256 * 1024 * 1024, fill=b"Internal error. ")
        streams.append(stream)
        return httpx.Response(500, stream=stream, request=request)

    error = await _send(provider, _serving(huge))
    assert isinstance(error, TransientError), error
    [stream] = streams
    assert stream.sent <= MAX_ERROR_BYTES + stream.chunk
    assert len(error.message) < 1000


@pytest.mark.parametrize("provider", sorted(HTTP))
async def test_a_capped_answer_is_still_an_ordinary_answer(provider: str) -> None:
    # The providers keep reading status, headers and JSON from what `request` returns.
    def busy(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            429,
            json={"message": "slow down"},
            headers={"Retry-After": "7"},
            request=request,
        )

    error = await _send(provider, _serving(busy))
    assert isinstance(error, TransientError), error
    assert error.retry_after == 7.0


async def test_an_answer_that_fits_is_read_whole() -> None:
    setup = HTTP["postmark"]
    element = {"ErrorCode": 0, "Message": "OK", "MessageID": "id-1", "Padding": "p" * 300_000}
    mock = Mock(Answer(200, json=[element]))
    channel = build("postmark", "email", setup.config, setup.credentials, mock)
    receipt = await channel.send(setup.message())
    await channel.aclose()
    assert receipt.provider_message_id == "id-1"
