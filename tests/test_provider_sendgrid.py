"""The sendgrid provider: the Mail Send request as SendGrid documents it (providers.md §2,
twilio/sendgrid-oai tsg_mail_v3.yaml), its answers mapped onto dripd's errors, and the
Signed Event Webhook (ECDSA P-256 over timestamp + body) verified and mapped."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from httpmock import EXECUTION, Answer, Mock, build, json_of, make_adapter, message

from dripd.channels import registry
from dripd.channels.base import AdapterError, PermanentError, TransientError
from dripd.channels.feedback import (
    BadPayload,
    FeedbackEvent,
    InboundRequest,
    ReceiverContext,
    Unverified,
)
from dripd.clock import ManualClock
from dripd.errors import ConfigError

API_KEY = "SG.k3yIdent1f1er.S3cretPartOfTheKey-0123456789abcdef"
CONFIG = {"from": "Acme <news@acme.example>"}
CREDENTIALS = {"api_key": API_KEY}
ACCEPTED = Answer(202, headers={"X-Message-Id": "Xm5gIdAbCdEfGhIjKlMnOp"})


def channel(mock: Mock, config: dict[str, Any] | None = None) -> Any:
    return build("sendgrid", "email", config or CONFIG, CREDENTIALS, mock)


# -- outbound ---------------------------------------------------------------------------


async def test_a_plain_message_is_the_documented_request() -> None:
    mock = Mock(ACCEPTED)
    ch = channel(mock)
    receipt = await ch.send(message())
    await ch.aclose()

    request = mock.last
    assert request.method == "POST"
    assert str(request.url) == "https://api.sendgrid.com/v3/mail/send"
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert request.headers["content-type"] == "application/json"
    assert json_of(mock.last) == {
        "personalizations": [
            {
                "to": [{"email": "ana@example.org"}],
                "custom_args": {"dripd_execution": str(EXECUTION)},
            }
        ],
        "from": {"email": "news@acme.example", "name": "Acme"},
        "subject": "Welcome",
        "content": [{"type": "text/plain", "value": "Hi Ana"}],
        "headers": {
            "Message-ID": f"<{EXECUTION}.0@dripd.example>",
            "X-Dripd-Idempotency-Key": f"{EXECUTION}:0",
        },
    }
    assert receipt.provider_message_id == "Xm5gIdAbCdEfGhIjKlMnOp"


async def test_every_optional_field_goes_where_sendgrid_reads_it() -> None:
    mock = Mock(ACCEPTED)
    config = {
        "from": "news@acme.example",
        "region": "eu",
        "categories": ["lifecycle", "welcome"],
        "asm_group_id": 4242,
        "ip_pool_name": "marketing",
    }
    ch = channel(mock, config)
    await ch.send(
        message(
            to_name="Ana Souza",
            sender='"Acme, Support" <help@acme.example>',
            reply_to="Replies <replies@acme.example>",
            html="<p>Hi Ana</p>",
            headers={
                "List-Unsubscribe": "<https://acme.example/u/abc>",
                "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
                "X-Campaign": "spring",
                "Subject": "not here",
                "reply-to": "nor@here.example",
            },
            metadata={"enrollment_id": "e-1", "sequence_key": "onboarding", "step_key": "s1"},
        )
    )
    await ch.aclose()

    assert str(mock.last.url) == "https://api.eu.sendgrid.com/v3/mail/send"
    assert json_of(mock.last) == {
        "personalizations": [
            {
                "to": [{"email": "ana@example.org", "name": "Ana Souza"}],
                "custom_args": {
                    "dripd_execution": str(EXECUTION),
                    "dripd_enrollment_id": "e-1",
                    "dripd_sequence_key": "onboarding",
                    "dripd_step_key": "s1",
                },
            }
        ],
        "from": {"email": "help@acme.example", "name": "Acme, Support"},
        "reply_to": {"email": "replies@acme.example", "name": "Replies"},
        "subject": "Welcome",
        "content": [
            {"type": "text/plain", "value": "Hi Ana"},
            {"type": "text/html", "value": "<p>Hi Ana</p>"},
        ],
        "headers": {
            "List-Unsubscribe": "<https://acme.example/u/abc>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            "X-Campaign": "spring",
            "Message-ID": f"<{EXECUTION}.0@dripd.example>",
            "X-Dripd-Idempotency-Key": f"{EXECUTION}:0",
        },
        "categories": ["lifecycle", "welcome"],
        "asm": {"group_id": 4242},
        "ip_pool_name": "marketing",
    }
    assert "reply_to_list" not in json_of(mock.last)


async def test_html_only_and_base_url() -> None:
    mock = Mock(ACCEPTED)
    ch = channel(mock, {**CONFIG, "base_url": "http://127.0.0.1:9/sg"})
    await ch.send(message(text=None, html="<b>hi</b>"))
    await ch.aclose()
    assert str(mock.last.url) == "http://127.0.0.1:9/sg/v3/mail/send"
    assert json_of(mock.last)["content"] == [{"type": "text/html", "value": "<b>hi</b>"}]


async def test_a_message_without_content_is_permanent_before_any_request() -> None:
    mock = Mock(ACCEPTED)
    ch = channel(mock)
    with pytest.raises(PermanentError, match="neither text nor html"):
        await ch.send(message(text=None))
    await ch.aclose()
    assert mock.requests == []


async def test_a_step_from_that_is_not_a_mailbox_is_permanent() -> None:
    mock = Mock(ACCEPTED)
    ch = channel(mock)
    with pytest.raises(PermanentError, match="from"):
        await ch.send(message(sender="not an address"))
    await ch.aclose()
    assert mock.requests == []


def errors_body(*messages: str, field: str | None = None) -> dict[str, Any]:
    return {"errors": [{"message": m, "field": field, "help": None} for m in messages]}


@pytest.mark.parametrize(
    ("answer", "kind"),
    [
        (Answer(400, json=errors_body("Does not contain a valid address.")), PermanentError),
        (Answer(401, json=errors_body("authorization required")), AdapterError),
        (Answer(403, json=errors_body("access forbidden")), AdapterError),
        (Answer(404, json=errors_body("not found")), AdapterError),
        (Answer(413, json=errors_body("content too large")), PermanentError),
        (Answer(500, json=errors_body("internal server error")), TransientError),
        (Answer(503, text="upstream"), TransientError),
        (Answer(200), PermanentError),  # sandbox mode: validated, not queued
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


async def test_a_400_carries_sendgrids_messages() -> None:
    body = errors_body(
        "The from email does not contain a valid address.", "Invalid type.", field="from.email"
    )
    mock = Mock(Answer(400, json=body))
    ch = channel(mock)
    with pytest.raises(PermanentError) as caught:
        await ch.send(message())
    await ch.aclose()
    assert str(caught.value) == (
        "sendgrid: HTTP 400: The from email does not contain a valid address.; Invalid type."
    )
    assert not caught.value.bounce


async def test_a_403_for_a_steps_own_sender_fails_only_that_message() -> None:
    refused = Answer(
        403,
        json=errors_body(
            "The from address does not match a verified Sender Identity.", field="from"
        ),
    )
    mock = Mock(refused)
    ch = channel(mock)
    with pytest.raises(PermanentError):
        await ch.send(message(sender="other@elsewhere.example"))
    # The adapter's own sender refused: no message can go out.
    with pytest.raises(AdapterError):
        await ch.send(message())
    await ch.aclose()


async def test_a_429_waits_until_x_ratelimit_reset() -> None:
    clock = ManualClock(datetime(2026, 3, 1, 12, 0, tzinfo=UTC))
    reset = int(clock.now().timestamp()) + 42
    mock = Mock(Answer(429, json=errors_body("too many requests"),
                       headers={"X-RateLimit-Limit": "600", "X-RateLimit-Remaining": "0",
                                "X-RateLimit-Reset": str(reset)}))  # fmt: skip
    ch = channel(mock)
    ch.wrapped.clock = clock
    with pytest.raises(TransientError) as caught:
        await ch.send(message())
    await ch.aclose()
    assert caught.value.provider_wide
    assert caught.value.retry_after == 42.0


async def test_a_429_without_reset_honours_retry_after() -> None:
    mock = Mock(Answer(429, headers={"Retry-After": "17"}))
    ch = channel(mock)
    with pytest.raises(TransientError) as caught:
        await ch.send(message())
    await ch.aclose()
    assert caught.value.retry_after == 17.0


async def test_no_answer_is_transient_and_provider_wide() -> None:
    mock = Mock(httpx.ConnectError("connection refused"))
    ch = channel(mock)
    with pytest.raises(TransientError) as caught:
        await ch.send(message())
    await ch.aclose()
    assert caught.value.provider_wide


@pytest.mark.parametrize(
    ("config", "credentials", "key"),
    [
        ({}, CREDENTIALS, "from"),
        (CONFIG, {}, "api_key"),
        (CONFIG, {"api_key": "SG.clé-secrète"}, "api_key"),
        ({**CONFIG, "region": "us"}, CREDENTIALS, "region"),
        ({**CONFIG, "categories": [f"c{i}" for i in range(11)]}, CREDENTIALS, "categories"),
        ({**CONFIG, "categories": "one"}, CREDENTIALS, "categories"),
        ({**CONFIG, "asm_group_id": True}, CREDENTIALS, "asm_group_id"),
        ({**CONFIG, "asm_group_id": "12"}, CREDENTIALS, "asm_group_id"),
        ({**CONFIG, "ip_pool_name": "x"}, CREDENTIALS, "ip_pool_name"),
        ({"from": "nobody"}, CREDENTIALS, "from"),
        ({**CONFIG, "api_key": API_KEY}, CREDENTIALS, "api_key"),
        (CONFIG, {**CREDENTIALS, "webhook_public_key": "bm90IGEga2V5"}, "webhook_public_key"),
    ],
)
def test_config_is_checked_naming_the_key(
    config: dict[str, Any], credentials: dict[str, Any], key: str
) -> None:
    with pytest.raises(ConfigError, match=key) as caught:
        registry.validate("email", "sendgrid", config, credentials)
    assert API_KEY not in str(caught.value)


def test_an_rsa_key_is_not_a_webhook_key() -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    der = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ConfigError, match="P-256"):
        registry.validate(
            "email",
            "sendgrid",
            CONFIG,
            {**CREDENTIALS, "webhook_public_key": base64.b64encode(der).decode()},
        )


# -- inbound ----------------------------------------------------------------------------

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
STAMP = str(int(NOW.timestamp()))
OTHER = uuid.UUID("0193c1d2-0000-7000-8000-000000000002")


def keypair() -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A P-256 key and its public half as SendGrid shows it: base64 DER SPKI."""
    private = ec.generate_private_key(ec.SECP256R1())
    der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, base64.b64encode(der).decode()


PRIVATE, PUBLIC = keypair()


def signed(
    body: bytes,
    *,
    stamp: str = STAMP,
    key: ec.EllipticCurvePrivateKey = PRIVATE,
    received_at: datetime = NOW,
) -> InboundRequest:
    """A request as SendGrid sends it: ECDSA/SHA-256 over timestamp then raw body, base64
    DER signature."""
    signature = key.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    return InboundRequest(
        url="https://dripd.example/webhooks/sendgrid/a1",
        headers={
            "content-type": "application/json",
            "x-twilio-email-event-webhook-signature": base64.b64encode(signature).decode(),
            "x-twilio-email-event-webhook-timestamp": stamp,
        },
        body=body,
        received_at=received_at,
    )


def receiver(public_key: str | None = PUBLIC, window: float = 300) -> Any:
    credentials = dict(CREDENTIALS)
    if public_key is not None:
        credentials["webhook_public_key"] = public_key
    adapter = make_adapter("sendgrid", "email", CONFIG, credentials)
    return registry.receiver(adapter, ReceiverContext(replay_window=timedelta(seconds=window)))


def event(kind: str, n: int, **fields: Any) -> dict[str, Any]:
    return {
        "email": "ana@example.org",
        "timestamp": 1772366000 + n,
        "smtp-id": "<14c5d75ce93.dfd.64b469@ismtpd-555>",
        "event": kind,
        "category": ["lifecycle"],
        "sg_event_id": f"ev-{n}",
        "sg_message_id": "Xm5gIdAbCdEfGhIjKlMnOp.recvd-5f54b5d587-pczjm-1-67BADEEA-6.0",
        "dripd_execution": str(EXECUTION),
        **fields,
    }


BATCH = [
    event("processed", 0),
    event("delivered", 1, response="250 OK"),
    event("open", 2, useragent="Mozilla/5.0", ip="192.0.2.1", sg_machine_open=False),
    event("click", 3, url="https://acme.example/start"),
    event("bounce", 4, type="bounce", status="5.1.1", reason="550 5.1.1 no such user"),
    event("bounce", 5, type="blocked", status="5.7.1", reason="550 5.7.1 blocked"),
    event("dropped", 6, reason="Bounced Address"),
    event("dropped", 7, reason="Unsubscribed Address"),
    event("dropped", 8, reason="Spam Reporting Address"),
    event("dropped", 9, reason="Invalid"),
    event("dropped", 10, reason="Spam Content (if spam checker app enabled)"),
    event("deferred", 11, response="400 try again later", attempt="5"),
    event("spamreport", 12),
    event("unsubscribe", 13),
    event("group_unsubscribe", 14, asm_group_id=4242, dripd_execution=str(OTHER)),
    event("group_resubscribe", 15),
]


async def test_a_signed_batch_maps_every_event() -> None:
    events = await receiver().receive(signed(json.dumps(BATCH).encode()))
    summary = [(e.type, e.event_id, e.permanent, e.reason) for e in events]
    assert summary == [
        ("delivered", "ev-1", False, None),
        ("opened", "ev-2", False, None),
        ("clicked", "ev-3", False, None),
        ("bounced", "ev-4", True, "550 5.1.1 no such user"),
        ("bounced", "ev-5", False, "550 5.7.1 blocked"),
        ("bounced", "ev-6", True, "Bounced Address"),
        ("unsubscribed", "ev-7", False, "Unsubscribed Address"),
        ("complained", "ev-8", False, "Spam Reporting Address"),
        ("bounced", "ev-9", True, "Invalid"),
        ("failed", "ev-10", False, "Spam Content (if spam checker app enabled)"),
        ("deferred", "ev-11", False, "400 try again later"),
        ("complained", "ev-12", False, None),
        ("unsubscribed", "ev-13", False, None),
        ("unsubscribed", "ev-14", False, None),
    ]
    first = events[0]
    assert first == FeedbackEvent(
        type="delivered",
        event_id="ev-1",
        provider_message_id="Xm5gIdAbCdEfGhIjKlMnOp",
        execution_id=EXECUTION,
        recipient="ana@example.org",
        occurred_at=datetime.fromtimestamp(1772366001, UTC),
    )
    assert events[2].data == {"url": "https://acme.example/start"}
    assert events[3].data == {"status": "5.1.1", "type": "bounce"}
    assert events[-1].execution_id == OTHER
    # No client IP or user agent is kept.
    assert "ip" not in events[1].data
    assert "useragent" not in events[1].data


async def test_the_stored_receipt_and_the_events_name_the_same_message() -> None:
    mock = Mock(ACCEPTED)
    ch = channel(mock)
    receipt = await ch.send(message())
    await ch.aclose()
    [delivered] = await receiver().receive(signed(json.dumps([event("delivered", 1)]).encode()))
    assert delivered.provider_message_id == receipt.provider_message_id


async def test_an_event_without_custom_args_or_event_id_still_maps() -> None:
    plain = {"email": "x@example.org", "timestamp": 1772366000, "event": "dropped",
             "reason": "Bounced Address", "sg_message_id": "Abc.filter0001.1.0"}  # fmt: skip
    once = await receiver().receive(signed(json.dumps([plain]).encode()))
    again = await receiver().receive(signed(json.dumps([plain]).encode()))
    assert once[0].execution_id is None
    assert once[0].provider_message_id == "Abc"
    assert once[0].event_id.startswith("sha256:")
    assert once[0].event_id == again[0].event_id  # a redelivery is the same event


async def test_a_pem_key_is_accepted() -> None:
    pem = (
        PRIVATE.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    events = await receiver(pem).receive(signed(json.dumps([event("delivered", 1)]).encode()))
    assert [e.type for e in events] == ["delivered"]


async def test_a_changed_body_is_refused() -> None:
    request = signed(json.dumps([event("delivered", 1)]).encode())
    forged = InboundRequest(
        url=request.url,
        headers=request.headers,
        body=json.dumps([event("bounce", 1, type="bounce")]).encode(),
        received_at=request.received_at,
    )
    with pytest.raises(Unverified, match="does not verify"):
        await receiver().receive(forged)


async def test_a_changed_timestamp_is_refused() -> None:
    request = signed(json.dumps([event("delivered", 1)]).encode())
    headers = dict(request.headers)
    headers["x-twilio-email-event-webhook-timestamp"] = str(int(STAMP) + 1)
    forged = InboundRequest(url=request.url, headers=headers, body=request.body, received_at=NOW)
    with pytest.raises(Unverified):
        await receiver().receive(forged)


async def test_a_signature_by_another_key_is_refused() -> None:
    other, _ = keypair()
    with pytest.raises(Unverified, match="does not verify"):
        await receiver().receive(signed(b"[]", key=other))


@pytest.mark.parametrize("skew", [301, -301, 86_400])
async def test_a_request_outside_the_replay_window_is_refused(skew: int) -> None:
    request = signed(b"[]", received_at=NOW + timedelta(seconds=skew))
    with pytest.raises(Unverified, match="replay window"):
        await receiver().receive(request)
    # Inside the window it is accepted.
    await receiver().receive(signed(b"[]", received_at=NOW + timedelta(seconds=299)))


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"x-twilio-email-event-webhook-timestamp": STAMP},
        {"x-twilio-email-event-webhook-signature": "MEUCIQ=="},
        {
            "x-twilio-email-event-webhook-signature": "not base64!",
            "x-twilio-email-event-webhook-timestamp": STAMP,
        },
        {
            "x-twilio-email-event-webhook-signature": "MEUCIQ==",
            "x-twilio-email-event-webhook-timestamp": "soon",
        },
    ],
)
async def test_missing_or_malformed_headers_are_refused(headers: dict[str, str]) -> None:
    request = InboundRequest(url="https://d.example/", headers=headers, body=b"[]", received_at=NOW)
    with pytest.raises(Unverified):
        await receiver().receive(request)


async def test_without_a_public_key_every_request_is_refused() -> None:
    with pytest.raises(Unverified, match="webhook_public_key"):
        await receiver(None).receive(signed(b"[]"))


@pytest.mark.parametrize("body", [b"{}", b"not json", b'[{"event": "delivered"}, 3]'])
async def test_a_signed_body_that_is_not_an_event_array_is_a_bad_payload(body: bytes) -> None:
    with pytest.raises(BadPayload):
        await receiver().receive(signed(body))
