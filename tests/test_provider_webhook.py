"""The webhook provider: a Standard Webhooks request (standardwebhooks.com spec v1: the
webhook-id, webhook-timestamp and webhook-signature headers, `v1,` + base64 HMAC-SHA256 of
"id.timestamp.body" under the base64 key after `whsec_`), verified by a receiver with the
`standardwebhooks` library and by hand; its answers mapped onto dripd's errors; and the
network guard of HTTP hooks in front of the configured URL."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from datetime import datetime
from ipaddress import IPv4Address, IPv6Address, ip_network
from typing import Any

import httpx
import pytest
from httpmock import EXECUTION, Answer, Mock, body_message, build, json_of, make_adapter
from standardwebhooks import Webhook

from dripd.channels import registry
from dripd.channels.base import (
    AdapterError,
    ChannelContext,
    PermanentError,
    RedactedChannel,
    TransientError,
)
from dripd.channels.webhook import WebhookChannel
from dripd.errors import ConfigError
from dripd.netguard import NetPolicy

KEY = b"dripd-test-signing-key-0123456789ab"
SECRET = "whsec_" + base64.b64encode(KEY).decode()
URL = "http://127.0.0.1:8080/hooks/dripd?source=dripd"
LOOPBACK = NetPolicy(allow_http=True, allowed_networks=(ip_network("127.0.0.0/8"),))
META = {"enrollment_id": "e-1", "sequence_key": "welcome", "step_key": "ping"}


def channel(mock: Mock, config: dict[str, Any] | None = None, **context: Any) -> Any:
    context.setdefault("net_policy", LOOPBACK)
    return build("webhook", "webhook", config or {"url": URL}, {"secret": SECRET}, mock, **context)


def webhook_message(**fields: Any) -> Any:
    return body_message("webhook", "sub-42", "Ana signed up", **{"metadata": META, **fields})


def by_hand(request: httpx.Request) -> str:
    """The signature computed from the spec, without the library."""
    signed = b".".join(
        [
            request.headers["webhook-id"].encode(),
            request.headers["webhook-timestamp"].encode(),
            request.content,
        ]
    )
    return "v1," + base64.b64encode(hmac.new(KEY, signed, hashlib.sha256).digest()).decode()


def verifying(answer: Answer) -> tuple[Mock, list[Any]]:
    """A Mock whose receiver verifies each request as a Standard Webhooks consumer does."""
    verified: list[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        verified.append(Webhook(SECRET).verify(request.content, dict(request.headers)))
        return answer.response(request)

    return Mock(handler=handler), verified


# -- outbound ---------------------------------------------------------------------------


async def test_a_plain_message_is_a_signed_standard_webhook() -> None:
    mock, verified = verifying(Answer(200, text="thanks"))
    ch = channel(mock)
    before = int(time.time())
    receipt = await ch.send(webhook_message())
    after = int(time.time())
    await ch.aclose()

    request = mock.last
    assert request.method == "POST"
    # Connected to the checked address, the name in the Host header.
    assert str(request.url) == "http://127.0.0.1:8080/hooks/dripd?source=dripd"
    assert request.headers["host"] == "127.0.0.1:8080"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["webhook-id"] == f"{EXECUTION}:0"
    assert before <= int(request.headers["webhook-timestamp"]) <= after
    assert request.headers["webhook-signature"] == by_hand(request)
    body = json_of(request)
    assert verified == [body]
    stamp = datetime.fromisoformat(body.pop("timestamp"))
    assert stamp.tzinfo is not None
    assert before <= stamp.timestamp() < after + 1
    assert body == {
        "type": "dripd.message",
        "data": {
            "execution_id": str(EXECUTION),
            "to": "sub-42",
            "text": "Ana signed up",
            "metadata": META,
        },
    }
    assert receipt.provider_message_id == f"{EXECUTION}:0"


async def test_every_optional_field() -> None:
    mock, verified = verifying(Answer(204))
    ch = channel(mock, {"url": URL, "type": "crm.lead.nudged", "timeout": 5, "max_connections": 2})
    meta = {**META, "tenant_key": "acme"}
    await ch.send(webhook_message(subject="Hello", metadata=meta))
    await ch.aclose()

    body = json_of(mock.last)
    assert verified == [body]
    assert body["type"] == "crm.lead.nudged"
    assert body["data"] == {
        "execution_id": str(EXECUTION),
        "to": "sub-42",
        "text": "Ana signed up",
        "subject": "Hello",
        "metadata": {**META, "tenant_key": "acme"},
    }
    assert mock.last.extensions["timeout"] == {
        "connect": 5.0,
        "read": 5.0,
        "write": 5.0,
        "pool": 5.0,
    }


async def test_a_json_object_body_is_the_payload_byte_for_byte() -> None:
    mock, verified = verifying(Answer(200))
    ch = channel(mock)
    rendered = '{"type": "lead.created",  "data": {"name": "Ana", "score": 7}}'
    await ch.send(webhook_message(body=rendered))
    await ch.aclose()
    assert mock.last.content == rendered.encode()
    assert verified == [{"type": "lead.created", "data": {"name": "Ana", "score": 7}}]
    # A JSON array or scalar is text for the envelope.
    ch = channel(mock)
    await ch.send(webhook_message(body="[1, 2]"))
    await ch.aclose()
    assert json_of(mock.last)["data"]["text"] == "[1, 2]"


async def test_a_resend_keeps_the_webhook_id_so_receivers_dedupe() -> None:
    mock, _ = verifying(Answer(200))
    ch = channel(mock)
    await ch.send(webhook_message())
    await ch.send(webhook_message())
    await ch.send(webhook_message(idempotency_key=f"{EXECUTION}:1"))
    await ch.aclose()
    ids = [request.headers["webhook-id"] for request in mock.requests]
    assert ids == [f"{EXECUTION}:0", f"{EXECUTION}:0", f"{EXECUTION}:1"]


async def test_a_wrong_key_does_not_verify() -> None:
    mock = Mock(Answer(200))
    ch = channel(mock)
    await ch.send(webhook_message())
    await ch.aclose()
    other = "whsec_" + base64.b64encode(b"another-key-entirely-0123456789").decode()
    with pytest.raises(Exception, match="No matching signature"):
        Webhook(other).verify(mock.last.content, dict(mock.last.headers))


@pytest.mark.parametrize(
    ("answer", "kind", "text"),
    [
        (Answer(410, text="gone"), AdapterError, "webhook: HTTP 410: gone (the endpoint asks"),
        (Answer(401, text="bad signature"), AdapterError, "webhook: HTTP 401: bad signature"),
        (Answer(301, headers={"location": "https://x.example/"}), AdapterError, "redirects"),
        (Answer(400, text="no such lead"), PermanentError, "webhook: HTTP 400: no such lead"),
        (Answer(404), PermanentError, "webhook: HTTP 404"),
        (Answer(422, json={"error": "bad"}), PermanentError, 'HTTP 422: {"error":"bad"}'),
        (Answer(429, headers={"retry-after": "30"}), TransientError, "webhook: HTTP 429"),
        (Answer(503, text="down"), TransientError, "webhook: HTTP 503: down"),
        (Answer(408), TransientError, "webhook: HTTP 408"),
    ],
)
async def test_answers_map_onto_the_taxonomy(answer: Answer, kind: type, text: str) -> None:
    ch = channel(Mock(answer))
    with pytest.raises(kind) as caught:
        await ch.send(webhook_message())
    await ch.aclose()
    assert type(caught.value) is kind
    assert text in str(caught.value)
    if isinstance(caught.value, TransientError):
        assert caught.value.provider_wide
        assert caught.value.retry_after == (30.0 if answer.status == 429 else None)
    if isinstance(caught.value, PermanentError):
        assert not caught.value.bounce


async def test_a_huge_answer_is_cut() -> None:
    ch = channel(Mock(Answer(400, content=b"x" * 5_000_000)))
    with pytest.raises(PermanentError) as caught:
        await ch.send(webhook_message())
    await ch.aclose()
    assert len(str(caught.value)) < 400


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ConnectError("[Errno 111] Connection refused"),
        httpx.ReadTimeout("timed out"),
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
    ],
)
async def test_no_answer_is_transient_for_the_adapter(exc: Exception) -> None:
    ch = channel(Mock(exc))
    with pytest.raises(TransientError) as caught:
        await ch.send(webhook_message())
    await ch.aclose()
    assert caught.value.provider_wide
    assert "webhook:" in str(caught.value)
    assert "source=dripd" not in str(caught.value)


# -- the network guard --------------------------------------------------------------------


async def test_loopback_is_refused_by_the_default_policy() -> None:
    mock = Mock(Answer(200))
    for url, reason in [
        ("https://127.0.0.1/hook", "127.0.0.1 is not a public address (loopback)"),
        ("https://[::1]:8443/hook", "::1 is not a public address (loopback)"),
        ("https://10.1.2.3/hook", "10.1.2.3 is not a public address (private)"),
        ("http://127.0.0.1:8080/hook", "URL scheme 'http' is not allowed; use https"),
    ]:
        ch = channel(mock, {"url": url}, net_policy=None)
        with pytest.raises(AdapterError) as caught:
            await ch.send(webhook_message())
        await ch.aclose()
        assert str(caught.value).startswith("webhook: config `url` refused: ")
        assert reason in str(caught.value)
    assert mock.requests == []


async def test_http_to_loopback_is_allowed_by_the_configured_networks() -> None:
    mock = Mock(Answer(200))
    ch = channel(mock, {"url": "http://127.0.0.1:9/x"}, net_policy=LOOPBACK)
    await ch.send(webhook_message())
    await ch.aclose()
    assert str(mock.last.url) == "http://127.0.0.1:9/x"
    # Allowed networks alone do not allow plain http.
    https_only = NetPolicy(allowed_networks=(ip_network("127.0.0.0/8"),))
    ch = channel(mock, {"url": "http://127.0.0.1:9/x"}, net_policy=https_only)
    with pytest.raises(AdapterError, match="scheme 'http' is not allowed"):
        await ch.send(webhook_message())
    await ch.aclose()


def direct(mock: Mock, url: str, resolve: Any, policy: NetPolicy | None = None) -> RedactedChannel:
    adapter = make_adapter("webhook", "webhook", {"url": url}, {"secret": SECRET})
    context = ChannelContext(transport=mock, net_policy=policy)
    return RedactedChannel(
        WebhookChannel(adapter, context, resolve=resolve),
        registry.redactor("webhook", adapter.credentials),
    )


async def test_a_name_is_resolved_once_and_the_checked_address_is_used() -> None:
    lookups: list[tuple[str, int]] = []

    async def resolve(host: str, port: int) -> list[IPv4Address | IPv6Address]:
        lookups.append((host, port))
        return [IPv4Address("93.184.215.14")]

    mock = Mock(Answer(200))
    ch = direct(mock, "https://receiver.example:8443/in?k=1", resolve)
    await ch.send(webhook_message())
    await ch.aclose()
    assert lookups == [("receiver.example", 8443)]
    request = mock.last
    assert str(request.url) == "https://93.184.215.14:8443/in?k=1"
    assert request.headers["host"] == "receiver.example:8443"
    # The TLS handshake names the host: its certificate is checked against the name.
    assert request.extensions["sni_hostname"] == "receiver.example"


async def test_a_name_that_resolves_inside_is_refused() -> None:
    async def resolve(host: str, port: int) -> list[IPv4Address | IPv6Address]:
        return [IPv4Address("93.184.215.14"), IPv4Address("169.254.169.254")]

    mock = Mock(Answer(200))
    ch = direct(mock, "https://receiver.example/in", resolve)
    with pytest.raises(AdapterError) as caught:
        await ch.send(webhook_message())
    await ch.aclose()
    assert str(caught.value) == (
        "webhook: config `url` refused: refused host 'receiver.example': "
        "169.254.169.254 is not a public address (link-local)"
    )
    assert mock.requests == []


async def test_the_next_address_is_tried_when_one_refuses_the_connection() -> None:
    async def resolve(host: str, port: int) -> list[IPv4Address | IPv6Address]:
        return [IPv6Address("2606:2800:21f:cb07:6820:80da:af6b:8b2c"), IPv4Address("93.184.215.14")]

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host != "93.184.215.14":
            raise httpx.ConnectError("[Errno 101] Network is unreachable")
        return httpx.Response(200)

    mock = Mock(handler=handler)
    ch = direct(mock, "https://receiver.example/in", resolve)
    await ch.send(webhook_message())
    await ch.aclose()
    assert [r.url.host for r in mock.requests] == [
        "2606:2800:21f:cb07:6820:80da:af6b:8b2c",
        "93.184.215.14",
    ]


async def test_a_name_that_does_not_resolve_is_transient() -> None:
    async def resolve(host: str, port: int) -> list[IPv4Address | IPv6Address]:
        raise OSError(-2, "Name or service not known")

    ch = direct(Mock(Answer(200)), "https://nowhere.example/in", resolve)
    with pytest.raises(TransientError) as caught:
        await ch.send(webhook_message())
    await ch.aclose()
    assert caught.value.provider_wide
    assert str(caught.value) == (
        "webhook: cannot resolve 'nowhere.example': Name or service not known"
    )


# -- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "credentials", "text"),
    [
        ({}, {"secret": SECRET}, "adapter config key 'url' is required"),
        ({"url": "ftp://x.example/"}, {"secret": SECRET}, "config `url` must be an http(s) URL"),
        ({"url": "hooks.example/x"}, {"secret": SECRET}, "config `url` must be an http(s) URL"),
        ({"url": "https://u:p@x.example/"}, {"secret": SECRET}, "must not contain a user"),
        ({"url": "https://x.example/ a"}, {"secret": SECRET}, "must not contain spaces"),
        ({"url": URL, "type": ""}, {"secret": SECRET}, "config `type` must be a non-empty"),
        ({"url": URL, "timeout": 0}, {"secret": SECRET}, "config `timeout`"),
        ({"url": URL, "base_url": "https://x/"}, {"secret": SECRET}, "'base_url' is not known"),
        ({"url": URL}, {}, "credentials key 'secret' is required"),
        ({"url": URL}, {"secret": "whsec_"}, "credential `secret` is not a Standard Webhooks"),
        ({"url": URL}, {"secret": "whsec_Zm9v*"}, "credential `secret` is not a Standard"),
    ],
)
def test_config_errors_name_the_key(
    config: dict[str, Any], credentials: dict[str, Any], text: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        registry.validate("webhook", "webhook", config, credentials)
    assert text in str(caught.value)
    for value in credentials.values():
        assert value not in str(caught.value) or value == "whsec_"


def test_the_webhook_provider_serves_the_webhook_channel_only() -> None:
    with pytest.raises(ConfigError, match="does not serve channel 'chat'"):
        registry.validate("chat", "webhook", {"url": URL}, {"secret": SECRET})
    registry.validate("webhook", "webhook", {"url": URL}, {"secret": SECRET})
    # The library takes the key without its prefix too.
    registry.validate("webhook", "webhook", {"url": URL}, {"secret": SECRET[6:]})


async def test_the_secret_never_shows_in_errors() -> None:
    mock = Mock(Answer(400, text=f"your key {SECRET} and {KEY.decode()} are wrong"))
    ch = channel(mock)
    with pytest.raises(PermanentError) as caught:
        await ch.send(webhook_message())
    await ch.aclose()
    assert SECRET not in str(caught.value)
    assert SECRET[6:] not in str(caught.value)
