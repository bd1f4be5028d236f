"""The mailgun provider: the messages request as Mailgun documents it (providers.md §3,
Mailgun's "Send an email" reference), its answers mapped onto dripd's errors, and the JSON
webhooks (hex HMAC-SHA256 of timestamp + token) verified and mapped."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
from httpmock import EXECUTION, Answer, Mock, build, make_adapter, message

from dripd.channels import registry
from dripd.channels.base import AdapterError, PermanentError, TransientError
from dripd.channels.feedback import (
    BadPayload,
    FeedbackEvent,
    InboundRequest,
    ReceiverContext,
    Unverified,
)
from dripd.errors import ConfigError

API_KEY = "key-3ax6xnjp29jd6fds4gc373sgvjxteol0"
SIGNING_KEY = "whk-0a1b2c3d4e5f60718293a4b5c6d7e8f9"
CONFIG = {"from": "Acme <news@mg.acme.example>", "domain": "mg.acme.example"}
CREDENTIALS = {"api_key": API_KEY, "webhook_signing_key": SIGNING_KEY}
QUEUED = Answer(
    200, json={"id": "<20260301120000.1.ABCDEF@mg.acme.example>", "message": "Queued. Thank you."}
)


def channel(mock: Mock, config: dict[str, Any] | None = None) -> Any:
    return build("mailgun", "email", config or CONFIG, CREDENTIALS, mock)


def form(mock: Mock) -> list[tuple[str, str]]:
    return parse_qsl(mock.last.content.decode(), keep_blank_values=True, strict_parsing=True)


# -- outbound ---------------------------------------------------------------------------


async def test_a_plain_message_is_the_documented_request() -> None:
    mock = Mock(QUEUED)
    ch = channel(mock)
    receipt = await ch.send(message())
    await ch.aclose()

    request = mock.last
    assert request.method == "POST"
    assert str(request.url) == "https://api.mailgun.net/v3/mg.acme.example/messages"
    basic = base64.b64encode(f"api:{API_KEY}".encode()).decode()
    assert request.headers["authorization"] == f"Basic {basic}"
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert API_KEY not in str(request.url)
    assert API_KEY.encode() not in request.content
    assert form(mock) == [
        ("from", '"Acme" <news@mg.acme.example>'),
        ("to", "ana@example.org"),
        ("subject", "Welcome"),
        ("text", "Hi Ana"),
        ("h:Message-Id", f"<{EXECUTION}.0@dripd.example>"),
        ("h:X-Dripd-Idempotency-Key", f"{EXECUTION}:0"),
        ("v:dripd_execution", str(EXECUTION)),
    ]
    # Stored without the angle brackets, as events give it.
    assert receipt.provider_message_id == "20260301120000.1.ABCDEF@mg.acme.example"


async def test_every_optional_field_goes_where_mailgun_reads_it() -> None:
    mock = Mock(QUEUED)
    config = {
        "from": "news@mg.acme.example",
        "domain": "mg.acme.example",
        "region": "eu",
        "tags": ["lifecycle", "welcome"],
        "tracking": False,
    }
    ch = channel(mock, config)
    await ch.send(
        message(
            to_name="Souza, Ana",
            sender="Acme Support <help@mg.acme.example>",
            reply_to="replies@acme.example",
            html="<p>Hi Ana</p>",
            headers={
                "List-Unsubscribe": "<https://acme.example/u/abc>",
                "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
                "X-Campaign": "spring",
                "Subject": "not here",
                "Message-ID": "<nor@here.example>",
            },
            metadata={"enrollment_id": "e-1", "sequence_key": "onboarding"},
        )
    )
    await ch.aclose()

    assert str(mock.last.url) == "https://api.eu.mailgun.net/v3/mg.acme.example/messages"
    assert form(mock) == [
        ("from", '"Acme Support" <help@mg.acme.example>'),
        ("to", '"Souza, Ana" <ana@example.org>'),
        ("subject", "Welcome"),
        ("text", "Hi Ana"),
        ("html", "<p>Hi Ana</p>"),
        ("h:Reply-To", "replies@acme.example"),
        ("h:List-Unsubscribe", "<https://acme.example/u/abc>"),
        ("h:List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
        ("h:X-Campaign", "spring"),
        ("h:Message-Id", f"<{EXECUTION}.0@dripd.example>"),
        ("h:X-Dripd-Idempotency-Key", f"{EXECUTION}:0"),
        ("o:tag", "lifecycle"),
        ("o:tag", "welcome"),
        ("o:tracking", "no"),
        ("v:dripd_execution", str(EXECUTION)),
    ]
    # Recipients can read v: values (X-Mailgun-Variables): only the execution id goes there.
    assert [k for k, _ in form(mock) if k.startswith("v:")] == ["v:dripd_execution"]


async def test_html_only_and_base_url() -> None:
    mock = Mock(QUEUED)
    ch = channel(mock, {**CONFIG, "base_url": "http://127.0.0.1:9/mg", "tracking": True})
    await ch.send(message(text=None, html="<b>hi</b>"))
    await ch.aclose()
    assert str(mock.last.url) == "http://127.0.0.1:9/mg/v3/mg.acme.example/messages"
    fields = dict(form(mock))
    assert "text" not in fields
    assert fields["html"] == "<b>hi</b>"
    assert fields["o:tracking"] == "yes"


async def test_a_step_from_that_is_not_a_mailbox_is_permanent() -> None:
    mock = Mock(QUEUED)
    ch = channel(mock)
    with pytest.raises(PermanentError, match="from"):
        await ch.send(message(sender="a@b.example, c@d.example"))
    await ch.aclose()
    assert mock.requests == []


@pytest.mark.parametrize(
    ("answer", "kind"),
    [
        (Answer(400, json={"message": "to parameter is not a valid address"}), PermanentError),
        (Answer(401, text="Forbidden"), AdapterError),
        (Answer(403, json={"message": "Domain mg.acme.example is not allowed"}), AdapterError),
        (Answer(404, json={"message": "Domain not found: mg.acme.example"}), AdapterError),
        (Answer(413, text="Request Entity Too Large"), PermanentError),
        (Answer(429, json={"message": "Too many requests"}), TransientError),
        (Answer(500, text="Internal Server Error"), TransientError),
        (Answer(503, text="unavailable"), TransientError),
    ],
)
async def test_answers_map_onto_the_taxonomy(answer: Answer, kind: type[Exception]) -> None:
    mock = Mock(answer)
    ch = channel(mock)
    with pytest.raises(kind) as caught:
        await ch.send(message())
    await ch.aclose()
    assert type(caught.value) is kind
    assert f"HTTP {answer.status}" in str(caught.value)
    assert API_KEY not in str(caught.value)
    if isinstance(caught.value, TransientError):
        assert caught.value.provider_wide


async def test_a_400_carries_mailguns_message() -> None:
    mock = Mock(
        Answer(
            400, json={"message": "to parameter is not a valid address. please check documentation"}
        )
    )
    ch = channel(mock)
    with pytest.raises(PermanentError) as caught:
        await ch.send(message())
    await ch.aclose()
    assert str(caught.value) == (
        "mailgun: HTTP 400: to parameter is not a valid address. please check documentation"
    )
    assert not caught.value.bounce


async def test_a_404_names_the_domain() -> None:
    mock = Mock(Answer(404, json={"message": "Domain not found"}))
    ch = channel(mock)
    with pytest.raises(AdapterError, match=r"mg\.acme\.example"):
        await ch.send(message())
    await ch.aclose()


async def test_a_429_honours_retry_after() -> None:
    mock = Mock(Answer(429, headers={"Retry-After": "30"}))
    ch = channel(mock)
    with pytest.raises(TransientError) as caught:
        await ch.send(message())
    await ch.aclose()
    assert caught.value.retry_after == 30.0


async def test_no_answer_is_transient_and_provider_wide() -> None:
    mock = Mock(httpx.ReadTimeout("timed out"))
    ch = channel(mock)
    with pytest.raises(TransientError) as caught:
        await ch.send(message())
    await ch.aclose()
    assert caught.value.provider_wide


@pytest.mark.parametrize(
    ("config", "credentials", "key"),
    [
        ({"from": "a@mg.acme.example"}, CREDENTIALS, "domain"),
        ({"domain": "mg.acme.example"}, CREDENTIALS, "from"),
        (CONFIG, {"webhook_signing_key": SIGNING_KEY}, "api_key"),
        (CONFIG, {"api_key": "key-clé"}, "api_key"),
        ({**CONFIG, "domain": "mg.acme.example/../v4"}, CREDENTIALS, "domain"),
        ({**CONFIG, "domain": "mg.acme.example?x=1"}, CREDENTIALS, "domain"),
        ({**CONFIG, "region": "global"}, CREDENTIALS, "region"),
        ({**CONFIG, "tags": ["a", "b", "c", "d"]}, CREDENTIALS, "tags"),
        ({**CONFIG, "tags": ["né"]}, CREDENTIALS, "tags"),
        ({**CONFIG, "tags": "welcome"}, CREDENTIALS, "tags"),
        ({**CONFIG, "tracking": "yes"}, CREDENTIALS, "tracking"),
        ({**CONFIG, "webhook_signing_key": SIGNING_KEY}, CREDENTIALS, "webhook_signing_key"),
    ],
)
def test_config_is_checked_naming_the_key(
    config: dict[str, Any], credentials: dict[str, Any], key: str
) -> None:
    with pytest.raises(ConfigError, match=key) as caught:
        registry.validate("email", "mailgun", config, credentials)
    assert API_KEY not in str(caught.value)
    assert SIGNING_KEY not in str(caught.value)


# -- inbound ----------------------------------------------------------------------------

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
STAMP = str(int(NOW.timestamp()))
TOKEN = "e0b5477167110d68991efc6b9f89f0a11066af27834600e123"


def signature(stamp: str = STAMP, token: str = TOKEN, key: str = SIGNING_KEY) -> str:
    """Mailgun's signature: hex HMAC-SHA256 of timestamp followed by token."""
    return hmac.new(key.encode(), f"{stamp}{token}".encode(), hashlib.sha256).hexdigest()


def request(
    event_data: dict[str, Any],
    *,
    block: dict[str, Any] | None = None,
    received_at: datetime = NOW,
) -> InboundRequest:
    block = block or {"timestamp": STAMP, "token": TOKEN, "signature": signature()}
    body = json.dumps({"signature": block, "event-data": event_data}).encode()
    return InboundRequest(
        url="https://dripd.example/webhooks/mailgun/a1",
        headers={"content-type": "application/json"},
        body=body,
        received_at=received_at,
    )


def receiver(credentials: dict[str, Any] | None = None, window: float = 300) -> Any:
    adapter = make_adapter("mailgun", "email", CONFIG, credentials or CREDENTIALS)
    return registry.receiver(adapter, ReceiverContext(replay_window=timedelta(seconds=window)))


def event_data(kind: str, n: int = 1, **fields: Any) -> dict[str, Any]:
    return {
        "id": f"evt-{n}",
        "event": kind,
        "timestamp": 1772366400.123,
        "recipient": "ana@example.org",
        "log-level": "info",
        "message": {
            "headers": {
                "message-id": "20260301120000.1.ABCDEF@mg.acme.example",
                "from": "news@mg.acme.example",
                "to": "ana@example.org",
                "subject": "Welcome",
            }
        },
        "user-variables": {"dripd_execution": str(EXECUTION)},
        "tags": ["lifecycle"],
        **fields,
    }


def failed(severity: str, reason: str, code: int, description: str) -> dict[str, Any]:
    return event_data(
        "failed",
        severity=severity,
        reason=reason,
        **{"delivery-status": {"code": code, "message": "", "description": description}},
    )


async def test_a_signed_delivered_event_is_mapped() -> None:
    events = await receiver().receive(request(event_data("delivered")))
    assert events == [
        FeedbackEvent(
            type="delivered",
            event_id="evt-1",
            provider_message_id="20260301120000.1.ABCDEF@mg.acme.example",
            execution_id=EXECUTION,
            recipient="ana@example.org",
            occurred_at=datetime.fromtimestamp(1772366400.123, UTC),
            # Mailgun signs the token, not the event: recorded once, a replay of the
            # signature with other event data records nothing (dripd.db.feedback.ingest).
            nonce=f"mailgun-token:{TOKEN}",
        )
    ]


async def test_the_stored_receipt_and_the_events_name_the_same_message() -> None:
    mock = Mock(QUEUED)
    ch = channel(mock)
    receipt = await ch.send(message())
    await ch.aclose()
    [delivered] = await receiver().receive(request(event_data("delivered")))
    assert delivered.provider_message_id == receipt.provider_message_id


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (event_data("opened"), ("opened", False, None)),
        (event_data("clicked", url="https://acme.example/start"), ("clicked", False, None)),
        (event_data("complained"), ("complained", False, None)),
        (event_data("unsubscribed"), ("unsubscribed", False, None)),
        (
            failed("permanent", "bounce", 550, "5.1.1 The email account does not exist"),
            ("bounced", True, "bounce: 5.1.1 The email account does not exist"),
        ),
        (
            failed("temporary", "generic", 452, "4.2.2 Mailbox full"),
            ("deferred", False, "generic: 4.2.2 Mailbox full"),
        ),
        (
            failed(
                "permanent", "suppress-bounce", 605, "Not delivering to previously bounced address"
            ),
            ("bounced", True, "suppress-bounce: Not delivering to previously bounced address"),
        ),
        (
            failed(
                "permanent", "suppress-unsubscribe", 606, "Not delivering to unsubscribed address"
            ),
            ("unsubscribed", False, "suppress-unsubscribe: Not delivering to unsubscribed address"),
        ),
        (
            failed(
                "permanent",
                "suppress-complaint",
                607,
                "Not delivering to a user who marked your messages as spam",
            ),
            (
                "complained",
                False,
                "suppress-complaint: Not delivering to a user who marked your messages as spam",
            ),
        ),
    ],
)
async def test_events_map_onto_feedback_types(
    data: dict[str, Any], expected: tuple[str, bool, str | None]
) -> None:
    [event] = await receiver().receive(request(data))
    assert (event.type, event.permanent, event.reason) == expected
    assert event.execution_id == EXECUTION
    if data["event"] == "clicked":
        assert event.data == {"url": "https://acme.example/start"}
    if data["event"] == "failed":
        assert event.data["code"] == str(data["delivery-status"]["code"])
        assert event.data["severity"] == data["severity"]


@pytest.mark.parametrize("kind", ["accepted", "stored", "list_member_uploaded"])
async def test_untracked_events_record_nothing(kind: str) -> None:
    assert await receiver().receive(request(event_data(kind))) == []


async def test_an_event_without_an_id_or_variables_still_maps() -> None:
    data = event_data("delivered")
    del data["id"], data["user-variables"]
    data["message"]["headers"]["message-id"] = "<20260301120000.1.ABCDEF@mg.acme.example>"
    once = await receiver().receive(request(data))
    again = await receiver().receive(request(data))
    assert once[0].execution_id is None
    assert once[0].provider_message_id == "20260301120000.1.ABCDEF@mg.acme.example"
    assert once[0].event_id.startswith("sha256:")
    assert once[0].event_id == again[0].event_id


async def test_an_integer_timestamp_and_a_parent_signature_are_accepted() -> None:
    block = {
        "timestamp": int(STAMP),
        "token": TOKEN,
        "signature": signature(key="the-subaccount-key"),
        "parent-signature": signature(),
    }
    events = await receiver().receive(request(event_data("delivered"), block=block))
    assert [e.type for e in events] == ["delivered"]


async def test_a_changed_token_or_timestamp_is_refused() -> None:
    for block in (
        {"timestamp": STAMP, "token": TOKEN[:-1] + "x", "signature": signature()},
        {"timestamp": str(int(STAMP) + 1), "token": TOKEN, "signature": signature()},
        {"timestamp": STAMP, "token": TOKEN, "signature": "0" * 64},
    ):
        with pytest.raises(Unverified, match="does not verify"):
            await receiver().receive(request(event_data("delivered"), block=block))


async def test_a_signature_under_another_key_is_refused() -> None:
    block = {"timestamp": STAMP, "token": TOKEN, "signature": signature(key=API_KEY)}
    with pytest.raises(Unverified):
        await receiver().receive(request(event_data("delivered"), block=block))
    # Nor does the API key stand in for a missing signing key.
    with pytest.raises(Unverified, match="webhook_signing_key"):
        await receiver({"api_key": API_KEY}).receive(request(event_data("delivered"), block=block))


@pytest.mark.parametrize("skew", [301, -301, 86_400])
async def test_a_request_outside_the_replay_window_is_refused(skew: int) -> None:
    stale = request(
        event_data("failed", severity="permanent"), received_at=NOW + timedelta(seconds=skew)
    )
    with pytest.raises(Unverified, match="replay window"):
        await receiver().receive(stale)
    await receiver().receive(
        request(event_data("delivered"), received_at=NOW - timedelta(seconds=299))
    )


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"event-data": {"event": "delivered"}}',
        b'{"signature": "abc", "event-data": {}}',
        json.dumps({"signature": {"token": TOKEN, "signature": signature()}}).encode(),
        json.dumps({"signature": {"timestamp": "soon", "token": TOKEN, "signature": "x"}}).encode(),
    ],
)
async def test_unsigned_or_unreadable_signatures_are_refused(body: bytes) -> None:
    unsigned = InboundRequest(url="https://d.example/", headers={}, body=body, received_at=NOW)
    with pytest.raises(Unverified):
        await receiver().receive(unsigned)


async def test_a_signed_body_without_event_data_is_a_bad_payload() -> None:
    block = {"timestamp": STAMP, "token": TOKEN, "signature": signature()}
    body = json.dumps({"signature": block}).encode()
    signed = InboundRequest(url="https://d.example/", headers={}, body=body, received_at=NOW)
    with pytest.raises(BadPayload):
        await receiver().receive(signed)
