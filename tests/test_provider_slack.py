"""The slack provider: an incoming-webhook POST as Slack documents it (providers.md §12:
api.slack.com/messaging/webhooks, the 2016-05-17 errors changelog, slack_sdk's webhook
client), its answers mapped onto dripd's errors, the network guard in front of the URL, and
the URL, which is the credential, kept out of every error."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv6Address, ip_network
from typing import Any

import httpx
import pytest
from httpmock import Answer, Mock, body_message, build, json_of, make_adapter

from dripd.channels import registry
from dripd.channels.base import (
    AdapterError,
    ChannelContext,
    ChannelError,
    PermanentError,
    RedactedChannel,
    TransientError,
)
from dripd.channels.slack import SlackChannel
from dripd.errors import ConfigError
from dripd.netguard import NetPolicy

TOKEN = "xQz9ZmV0aGluZ1NlY3JldDEyMzQ1Njc4"
PATH = f"/services/T0001ABCD/B0002EFGH/{TOKEN}"
# Tests reach a loopback stand-in for hooks.slack.com through `allowed_networks`.
URL = f"https://127.0.0.1{PATH}"
LOOPBACK = NetPolicy(allowed_networks=(ip_network("127.0.0.0/8"),))
OK = Answer(200, text="ok")


def channel(
    mock: Mock, url: str = URL, config: dict[str, Any] | None = None, **context: Any
) -> Any:
    context.setdefault("net_policy", LOOPBACK)
    return build("slack", "chat", config or {}, {"url": url}, mock, **context)


def chat(**fields: Any) -> Any:
    return body_message("chat", "sub-42", "Ana just signed up :tada:", **fields)


def assert_no_url(error: BaseException) -> None:
    text = str(error)
    assert TOKEN not in text
    assert "T0001ABCD" not in text
    assert "/services/" not in text


# -- outbound ---------------------------------------------------------------------------


async def test_a_plain_message_is_the_documented_request() -> None:
    mock = Mock(OK)
    ch = channel(mock)
    receipt = await ch.send(chat())
    await ch.aclose()

    request = mock.last
    assert request.method == "POST"
    assert str(request.url) == URL
    assert request.headers["content-type"] == "application/json"
    assert "authorization" not in request.headers  # the URL is the credential
    assert json_of(request) == {"text": "Ana just signed up :tada:"}
    assert receipt.provider_message_id is None


async def test_a_json_body_with_blocks_is_sent_as_the_payload() -> None:
    mock = Mock(OK)
    ch = channel(mock, config={"timeout": 5, "max_connections": 1})
    document = {
        "text": "Ana just signed up",
        "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": "*Ana* just signed up"}}],
        "attachments": [{"color": "#36a64f", "text": "plan: pro"}],
    }
    await ch.send(chat(body=json.dumps(document)))
    await ch.aclose()
    assert json_of(mock.last) == document
    assert mock.last.extensions["timeout"]["read"] == 5.0


async def test_a_message_needs_text() -> None:
    mock = Mock(OK)
    ch = channel(mock)
    with pytest.raises(PermanentError, match="needs a non-empty `text`"):
        await ch.send(chat(body=json.dumps({"blocks": [{"type": "divider"}]})))
    with pytest.raises(PermanentError, match="has no text"):
        await ch.send(chat(body="  "))
    # Text that only looks like JSON is text.
    await ch.send(chat(body="{not json}"))
    await ch.aclose()
    assert [json_of(r) for r in mock.requests] == [{"text": "{not json}"}]


@pytest.mark.parametrize(
    ("answer", "kind", "text"),
    [
        (Answer(400, text="invalid_payload"), PermanentError, "slack: HTTP 400: invalid_payload"),
        (Answer(400, text="user_not_found"), PermanentError, "slack: HTTP 400: user_not_found"),
        (Answer(400, text="no_text"), PermanentError, "slack: HTTP 400: no_text"),
        (Answer(403, text="action_prohibited"), AdapterError, "HTTP 403: action_prohibited"),
        (Answer(403, text="invalid_token"), AdapterError, "HTTP 403: invalid_token"),
        (Answer(404, text="channel_not_found"), AdapterError, "HTTP 404: channel_not_found"),
        (Answer(404, text="no_service"), AdapterError, "HTTP 404: no_service"),
        (Answer(410, text="channel_is_archived"), AdapterError, "HTTP 410: channel_is_archived"),
        (Answer(400, text="no_service"), AdapterError, "HTTP 400: no_service"),
        (Answer(401), AdapterError, "slack: HTTP 401"),
        (Answer(200, text="ok_but_not"), PermanentError, "HTTP 200: ok_but_not (not `ok`)"),
        (Answer(201, text="ok"), PermanentError, "slack: HTTP 201: ok"),
        (Answer(429, text="rate_limited", headers={"Retry-After": "2"}), TransientError, "429"),
        (Answer(500, text="rollup_error"), TransientError, "slack: HTTP 500: rollup_error"),
        (Answer(503), TransientError, "slack: HTTP 503"),
    ],
)
async def test_answers_map_onto_the_taxonomy(answer: Answer, kind: type, text: str) -> None:
    ch = channel(Mock(answer))
    with pytest.raises(ChannelError) as caught:
        await ch.send(chat())
    await ch.aclose()
    assert type(caught.value) is kind
    assert text in str(caught.value)
    assert_no_url(caught.value)
    if isinstance(caught.value, TransientError):
        assert caught.value.provider_wide
        assert caught.value.retry_after == (2.0 if answer.status == 429 else None)
    if isinstance(caught.value, PermanentError):
        assert not caught.value.bounce


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ConnectError(f"cannot connect to {URL}"),
        httpx.ReadTimeout(f"timed out reading {URL}"),
        httpx.RemoteProtocolError(f"bad answer from {URL}"),
    ],
)
async def test_no_answer_is_transient_and_hides_the_url(exc: Exception) -> None:
    ch = channel(Mock(exc))
    with pytest.raises(TransientError) as caught:
        await ch.send(chat())
    await ch.aclose()
    assert caught.value.provider_wide
    assert_no_url(caught.value)
    assert caught.value.__cause__ is None  # the library's error, unredacted, is not chained
    # The provider's own text holds no URL either: it does not rely on the redactor.
    raw = channel(Mock(exc))
    with pytest.raises(TransientError) as caught:
        await raw.wrapped.send(chat())
    await raw.aclose()
    assert_no_url(caught.value)


async def test_an_error_echoing_the_url_is_redacted() -> None:
    ch = channel(Mock(Answer(400, text=f"invalid_payload for {URL}")))
    with pytest.raises(PermanentError) as caught:
        await ch.send(chat())
    await ch.aclose()
    assert_no_url(caught.value)


# -- the network guard --------------------------------------------------------------------


async def test_loopback_is_refused_by_the_default_policy_without_the_url() -> None:
    mock = Mock(OK)
    ch = channel(mock, net_policy=None)
    with pytest.raises(AdapterError) as caught:
        await ch.send(chat())
    await ch.aclose()
    # (The address is a fragment of the credential here, so the redactor hides it too.)
    assert str(caught.value).startswith("slack: credential `url` refused: refused host ")
    assert str(caught.value).endswith(" is not a public address (loopback)")
    assert_no_url(caught.value)
    assert mock.requests == []
    ch = channel(mock, f"http://127.0.0.1{PATH}")
    with pytest.raises(AdapterError, match="scheme 'http' is not allowed") as caught:
        await ch.send(chat())
    await ch.aclose()
    assert_no_url(caught.value)


async def test_hooks_slack_com_is_reached_by_its_checked_address() -> None:
    lookups: list[tuple[str, int]] = []

    async def resolve(host: str, port: int) -> list[IPv4Address | IPv6Address]:
        lookups.append((host, port))
        return [IPv4Address("52.22.137.10")]

    url = f"https://hooks.slack.com{PATH}"
    adapter = make_adapter("slack", "chat", {}, {"url": url})
    mock = Mock(OK)
    ch = RedactedChannel(
        SlackChannel(adapter, ChannelContext(transport=mock), resolve=resolve),
        registry.redactor("slack", adapter.credentials),
    )
    await ch.send(chat())
    await ch.aclose()
    assert lookups == [("hooks.slack.com", 443)]
    assert str(mock.last.url) == f"https://52.22.137.10{PATH}"
    assert mock.last.headers["host"] == "hooks.slack.com"
    assert mock.last.extensions["sni_hostname"] == "hooks.slack.com"
    assert TOKEN not in repr(ch)


# -- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "credentials", "text"),
    [
        ({}, {}, "credentials key 'url' is required"),
        ({"url": URL}, {"url": URL}, "config key 'url' is a credential"),
        ({}, {"url": f"hooks.slack.com{PATH}"}, "credential `url` must be an http(s) URL"),
        ({}, {"url": f"ftp://hooks.slack.com{PATH}"}, "credential `url` must be an http(s) URL"),
        ({}, {"url": f"https://hooks.slack.com{PATH} "}, "must not contain spaces"),
        ({}, {"url": f"https://a:b@hooks.slack.com{PATH}"}, "must not contain a user"),
        ({}, {"url": f"https://hooks.slack.com{PATH}#x"}, "must not contain a fragment"),
        ({"base_url": "https://x.example"}, {"url": URL}, "'base_url' is not known"),
        ({"timeout": -1}, {"url": URL}, "config `timeout`"),
        ({"max_connections": 0}, {"url": URL}, "config `max_connections`"),
    ],
)
def test_config_errors_name_the_key_not_the_url(
    config: dict[str, Any], credentials: dict[str, Any], text: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        registry.validate("chat", "slack", config, credentials)
    assert text in str(caught.value)
    assert TOKEN not in str(caught.value)


def test_slack_serves_the_chat_channel() -> None:
    registry.validate("chat", "slack", {}, {"url": f"https://hooks.slack.com{PATH}"})
    with pytest.raises(ConfigError, match="does not serve channel 'webhook'"):
        registry.validate("webhook", "slack", {}, {"url": URL})
