"""The mailersend provider: `POST /v1/email` as MailerSend documents it (providers.md §6:
Bearer auth, `from`/`to`/`reply_to` objects, `headers` as `[{name, value}]`, 202 with
`X-Message-Id`, a 202's `warnings` naming suppressed recipients), and the activity webhooks
signed with `Signature: hex HMAC-SHA256(signing secret, raw body)`."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from httpmock import Answer, Mock, build, json_of, make_adapter, message

from dripd.channels import registry
from dripd.channels.base import AdapterError, PermanentError, Receipt, TransientError
from dripd.channels.feedback import BadPayload, InboundRequest, ReceiverContext, Unverified
from dripd.errors import ConfigError

API_KEY = "mlsn.8f2c1d9e7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d"
CONFIG = {"from": "Acme <news@acme.example>"}
CREDENTIALS = {"api_key": API_KEY}
ACCEPTED = Answer(202, headers={"X-Message-Id": "5e42957d51f1d94a1070a733"})


def channel(mock: Mock, config: dict[str, Any] | None = None) -> Any:
    return build("mailersend", "email", config or CONFIG, CREDENTIALS, mock)


# -- outbound ---------------------------------------------------------------------------------


async def test_a_plain_message_is_the_documented_request() -> None:
    mock = Mock(ACCEPTED)
    ch = channel(mock)
    receipt = await ch.send(message())
    await ch.aclose()

    request = mock.last
    assert request.method == "POST"
    assert str(request.url) == "https://api.mailersend.com/v1/email"
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert request.headers["content-type"] == "application/json"
    assert json_of(mock.last) == {
        "from": {"email": "news@acme.example", "name": "Acme"},
        "to": [{"email": "ana@example.org"}],
        "subject": "Welcome",
        "text": "Hi Ana",
    }
    assert receipt == Receipt(provider_message_id="5e42957d51f1d94a1070a733")


async def test_every_optional_field_goes_where_mailersend_reads_it() -> None:
    mock = Mock(ACCEPTED)
    config = {
        "from": "news@acme.example",
        "base_url": "http://127.0.0.1:9/ms",
        "tags": ["welcome", "onboarding"],
        "track_opens": True,
        "track_clicks": False,
    }
    ch = channel(mock, config)
    await ch.send(
        message(
            to_name="Souza, Ana; PhD",
            sender="Acme News <hello@acme.example>",
            reply_to="Help Desk <help@acme.example>",
            html="<p>Hi Ana</p>",
            headers={"List-Unsubscribe": "<https://acme.example/u/abc>"},
        )
    )
    await ch.aclose()

    assert str(mock.last.url) == "http://127.0.0.1:9/ms/v1/email"
    assert json_of(mock.last) == {
        "from": {"email": "hello@acme.example", "name": "Acme News"},
        "to": [{"email": "ana@example.org", "name": "Souza Ana PhD"}],
        "reply_to": {"email": "help@acme.example", "name": "Help Desk"},
        "subject": "Welcome",
        "text": "Hi Ana",
        "html": "<p>Hi Ana</p>",
        "headers": [{"name": "List-Unsubscribe", "value": "<https://acme.example/u/abc>"}],
        "tags": ["welcome", "onboarding"],
        "settings": {"track_opens": True, "track_clicks": False},
    }


async def test_a_header_name_mailersend_refuses_is_refused_before_sending() -> None:
    mock = Mock(ACCEPTED)
    ch = channel(mock)
    with pytest.raises(PermanentError, match="header name"):
        await ch.send(message(headers={"X_Custom": "1"}))
    await ch.aclose()
    assert mock.requests == []


def suppressed(kind: str, email: str, reasons: list[str]) -> Answer:
    return Answer(
        202,
        json={
            "message": "There are some warnings for your request.",
            "warnings": [
                {
                    "type": kind,
                    "warning": "Some of the recipients have been suppressed.",
                    "recipients": [{"email": email, "name": "", "reasons": reasons}],
                }
            ],
        },
        headers={"X-Message-Id": "5e42957d51f1d94a1070a733"},
    )


@pytest.mark.parametrize(
    "answer",
    [
        suppressed("ALL_SUPPRESSED", "ana@example.org", ["hard_bounced"]),
        suppressed("SOME_SUPPRESSED", "Ana@Example.org", ["unsubscribed"]),
    ],
)
async def test_a_suppressed_recipient_is_a_bounce_not_a_send(answer: Answer) -> None:
    ch = channel(Mock(answer))
    with pytest.raises(PermanentError) as caught:
        await ch.send(message())
    await ch.aclose()
    assert caught.value.bounce is True
    assert "SUPPRESSED" in str(caught.value)


async def test_another_recipients_suppression_leaves_this_send_alone() -> None:
    ch = channel(Mock(suppressed("SOME_SUPPRESSED", "bob@example.org", ["hard_bounced"])))
    receipt = await ch.send(message())
    await ch.aclose()
    assert receipt.provider_message_id == "5e42957d51f1d94a1070a733"


@pytest.mark.parametrize(
    ("answer", "kind"),
    [
        (Answer(401, json={"message": "Unauthenticated."}), AdapterError),
        (Answer(403, json={"message": "This action is unauthorized."}), AdapterError),
        (
            Answer(
                422,
                json={
                    "message": "The given data was invalid.",
                    "errors": {"to.0.email": ["The to.0.email must be a valid email address."]},
                },
            ),
            PermanentError,
        ),
        (Answer(400, json={"message": "Bad request"}), PermanentError),
    ],
)
async def test_client_errors_map_to_permanent_or_paused(
    answer: Answer, kind: type[Exception]
) -> None:
    ch = channel(Mock(answer))
    with pytest.raises(kind) as caught:
        await ch.send(message())
    await ch.aclose()
    assert type(caught.value) is kind
    assert str(answer.status) in str(caught.value)
    if isinstance(caught.value, PermanentError):
        assert caught.value.bounce is False
    if answer.status == 422:
        assert "to.0.email" in str(caught.value)


@pytest.mark.parametrize(
    "answer",
    [
        Answer(429, json={"message": "Too Many Attempts."}, headers={"Retry-After": "11"}),
        Answer(500, text="Server Error", headers={"Retry-After": "11"}),
        Answer(408, text="Request Timeout", headers={"Retry-After": "11"}),
    ],
)
async def test_rate_limits_and_server_errors_are_transient(answer: Answer) -> None:
    ch = channel(Mock(answer))
    with pytest.raises(TransientError) as caught:
        await ch.send(message())
    await ch.aclose()
    assert caught.value.provider_wide is True
    assert caught.value.retry_after == 11.0


async def test_no_answer_is_transient() -> None:
    ch = channel(Mock(httpx.ConnectError("refused")))
    with pytest.raises(TransientError):
        await ch.send(message())
    await ch.aclose()


async def test_an_error_text_echoing_the_key_is_redacted() -> None:
    ch = channel(Mock(Answer(422, json={"message": f"key {API_KEY} cannot send"})))
    with pytest.raises(PermanentError) as caught:
        await ch.send(message())
    await ch.aclose()
    assert API_KEY not in str(caught.value)
    assert API_KEY[5:20] not in str(caught.value)


@pytest.mark.parametrize(
    ("config", "credentials", "key"),
    [
        (CONFIG, {}, "api_key"),
        ({}, CREDENTIALS, "from"),
        ({"from": "not a mailbox"}, CREDENTIALS, "from"),
        ({**CONFIG, "tags": ["a", "b", "c", "d", "e", "f"]}, CREDENTIALS, "tags"),
        ({**CONFIG, "tags": "welcome"}, CREDENTIALS, "tags"),
        ({**CONFIG, "track_opens": 1}, CREDENTIALS, "track_opens"),
        ({**CONFIG, "api_key": API_KEY}, CREDENTIALS, "api_key"),
    ],
)
def test_a_bad_adapter_is_a_config_error_naming_the_key(
    config: dict[str, Any], credentials: dict[str, Any], key: str
) -> None:
    with pytest.raises(ConfigError, match=key) as caught:
        registry.validate("email", "mailersend", config, credentials)
    assert API_KEY not in str(caught.value)


# -- inbound ----------------------------------------------------------------------------------

SECRET = "Xf9kQ2mN7pR4tV8wZ1bC5dG3hJ6"
PUBLIC_TEST_SECRET = "test_Am3L1GuOIc4blLUuHqAPxxwkZaJyEk8G"  # published by MailerSend
NOW = datetime(2026, 11, 29, 10, 0, 30, tzinfo=UTC)
MESSAGE_ID = "6892766ae78995a317577aa1"


def hook_receiver(credentials: dict[str, Any] | None = None) -> Any:
    adapter = make_adapter(
        "mailersend",
        "email",
        CONFIG,
        credentials if credentials is not None else {**CREDENTIALS, "webhook_secret": SECRET},
    )
    built = registry.receiver(adapter, ReceiverContext(replay_window=timedelta(minutes=5)))
    assert built is not None
    return built


def post(
    payload: Any,
    *,
    secret: str = SECRET,
    signature: str | None = None,
    received_at: datetime = NOW,
) -> InboundRequest:
    # MailerSend escapes every "/" in its JSON; the signature is over those exact bytes.
    body = json.dumps(payload).replace("/", "\\/").encode()
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return InboundRequest(
        url="https://dripd.example/webhooks/mailersend/a1",
        headers={
            "content-type": "application/json",
            "signature": signature if signature is not None else digest,
        },
        body=body,
        received_at=received_at,
    )


def activity(kind: str, **data: Any) -> dict[str, Any]:
    fields = {
        "id": "6892766a5b66e2daf3dc9158",
        "domain_id": "yv69oxl5kl785kw2",
        "message_id": MESSAGE_ID,
        "email_id": "6892766a8d52ba62543d5e71",
        "type": kind,
        "subject": "Welcome",
        "recipient": "ana@example.org",
        "tags": ["welcome"],
        "meta": [],
    }
    fields.update(data)
    return {"type": f"activity.{kind}", "created_at": "2026-11-29T10:00:02.000000Z", "data": fields}


async def test_a_hard_bounce_is_a_permanent_bounce_keyed_by_the_activity_id() -> None:
    payload = activity(
        "hard_bounced",
        meta={
            "bounce_reason": "Host or domain name not found",
            "bounce_code": 550,
            "bounce_type": "hard",
        },
    )
    [event] = await hook_receiver().receive(post(payload))
    assert event.type == "bounced"
    assert event.permanent is True
    assert event.event_id == "6892766a5b66e2daf3dc9158"
    assert event.provider_message_id == MESSAGE_ID
    assert event.recipient == "ana@example.org"
    assert event.reason == "Host or domain name not found"
    assert event.data["bounce_code"] == "550"
    assert event.occurred_at == datetime(2026, 11, 29, 10, 0, 2, tzinfo=UTC)
    assert event.execution_id is None  # MailerSend echoes no metadata: correlated by id


@pytest.mark.parametrize(
    ("kind", "expected", "permanent"),
    [
        ("delivered", "delivered", False),
        ("soft_bounced", "bounced", False),
        ("opened", "opened", False),
        ("opened_unique", "opened", False),
        ("clicked", "clicked", False),
        ("clicked_unique", "clicked", False),
        ("spam_complaint", "complained", False),
        ("unsubscribed", "unsubscribed", False),
        ("deferred", "deferred", False),
    ],
)
async def test_activity_types_map_to_feedback(kind: str, expected: str, permanent: bool) -> None:
    [event] = await hook_receiver().receive(post(activity(kind)))
    assert (event.type, event.permanent) == (expected, permanent)
    assert event.provider_message_id == MESSAGE_ID


async def test_a_click_keeps_its_url() -> None:
    payload = activity("clicked", meta={"url": "https://acme.example/start", "ip": "192.0.2.1"})
    [event] = await hook_receiver().receive(post(payload))
    assert event.data == {"url": "https://acme.example/start"}


async def test_the_legacy_payload_shape_is_read_too() -> None:
    payload = {
        "type": "activity.hard_bounced",
        "domain_id": "yv69oxl5kl785kw2",
        "created_at": "2026-11-29T10:00:01.520507Z",
        "webhook_id": "2351ndgwr4zqx8ko",
        "url": "https://dripd.example/webhooks/mailersend/a1",
        "data": {
            "object": "activity",
            "id": "63fd251d5c00f8e52001fce6",
            "type": "hard_bounced",
            "created_at": "2026-11-29T10:00:01.506000Z",
            "email": {
                "object": "email",
                "status": "rejected",
                "message": {"object": "message", "id": "63fd25194d5edba3da09e044"},
                "recipient": {"object": "recipient", "email": "invalid@example.com"},
            },
            "morph": {"object": "recipient_bounce", "reason": "Host or domain name not found"},
        },
    }
    [event] = await hook_receiver().receive(post(payload))
    assert event.event_id == "63fd251d5c00f8e52001fce6"
    assert event.provider_message_id == "63fd25194d5edba3da09e044"
    assert event.recipient == "invalid@example.com"
    assert event.reason == "Host or domain name not found"
    assert event.permanent is True


async def test_sent_and_other_events_record_nothing() -> None:
    receiver = hook_receiver()
    assert await receiver.receive(post(activity("sent"))) == []
    assert await receiver.receive(post(activity("survey_opened"))) == []


async def test_the_save_ping_signed_with_the_public_test_secret_is_answered() -> None:
    ping = {
        "type": "webhook.test",
        "message": "This is a ping test message",
        "created_at": "2026-11-29T10:00:20.577080Z",
    }
    assert await hook_receiver().receive(post(ping, secret=PUBLIC_TEST_SECRET)) == []


async def test_the_public_test_secret_verifies_nothing_but_the_ping() -> None:
    with pytest.raises(Unverified):
        await hook_receiver().receive(post(activity("hard_bounced"), secret=PUBLIC_TEST_SECRET))


@pytest.mark.parametrize(
    "request_for",
    [
        lambda payload: post(payload, secret="another-secret"),
        lambda payload: post(payload, signature=""),
        lambda payload: post(payload, signature="0" * 64),
        lambda payload: post(payload, signature="sha256=whatever"),
    ],
)
async def test_forged_or_unsigned_requests_are_unverified(request_for: Any) -> None:
    with pytest.raises(Unverified) as caught:
        await hook_receiver().receive(request_for(activity("hard_bounced")))
    assert SECRET not in str(caught.value)


async def test_a_tampered_body_is_unverified() -> None:
    good = post(activity("delivered"))
    tampered = InboundRequest(
        url=good.url,
        headers=good.headers,
        body=good.body.replace(b"delivered", b"hard_bounced"),
        received_at=NOW,
    )
    with pytest.raises(Unverified):
        await hook_receiver().receive(tampered)


@pytest.mark.parametrize("shift", [timedelta(minutes=6), timedelta(minutes=-6)])
async def test_an_event_outside_the_replay_window_is_unverified(shift: timedelta) -> None:
    with pytest.raises(Unverified, match="replay window"):
        await hook_receiver().receive(post(activity("delivered"), received_at=NOW + shift))


async def test_an_event_within_the_window_is_taken() -> None:
    late = NOW + timedelta(minutes=4)
    assert len(await hook_receiver().receive(post(activity("delivered"), received_at=late))) == 1


@pytest.mark.parametrize("created_at", [None, 1764410402, "", "yesterday", ["2026-11-29"]])
async def test_an_event_without_a_readable_signed_time_is_unverified(created_at: Any) -> None:
    # Signed, but without a time the replay window cannot hold: it could be replayed forever.
    payload = activity("delivered")
    if created_at is None:
        del payload["created_at"]
    else:
        payload["created_at"] = created_at
    with pytest.raises(Unverified, match="created_at"):
        await hook_receiver().receive(post(payload))


async def test_the_data_objects_created_at_serves_when_the_top_level_has_none() -> None:
    payload = activity("delivered", created_at="2026-11-29T10:00:02.000000Z")
    del payload["created_at"]
    [event] = await hook_receiver().receive(post(payload))
    assert event.occurred_at == datetime(2026, 11, 29, 10, 0, 2, tzinfo=UTC)
    with pytest.raises(Unverified, match="replay window"):
        await hook_receiver().receive(post(payload, received_at=NOW + timedelta(hours=1)))


async def test_an_adapter_without_a_signing_secret_refuses_everything() -> None:
    with pytest.raises(Unverified, match="webhook_secret"):
        await hook_receiver(CREDENTIALS).receive(post(activity("delivered")))


async def test_a_verified_body_that_is_not_a_json_object_is_a_bad_payload() -> None:
    body = b"[1, 2]"
    request = InboundRequest(
        url="https://dripd.example/webhooks/mailersend/a1",
        headers={"signature": hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()},
        body=body,
        received_at=NOW,
    )
    with pytest.raises(BadPayload):
        await hook_receiver().receive(request)
