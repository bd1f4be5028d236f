"""The whatsapp_cloud provider: the Cloud API messages request as Meta documents it
(providers.md §11, WhatsApp-Nodejs-SDK), its `error.code`s mapped onto dripd's errors, and
the messages webhook verified by X-Hub-Signature-256 and mapped."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from httpmock import EXECUTION, Answer, Mock, body_message, build, json_of, make_adapter

from dripd.channels import registry
from dripd.channels.base import AdapterError, PermanentError, TransientError
from dripd.channels.feedback import BadPayload, InboundRequest, ReceiverContext, Unverified
from dripd.errors import ConfigError

TOKEN = "EAAGm0PX4ZCpsBAAccessT0kenS3cret0123456789"
APP_SECRET = "a1b2c3d4e5f6appsecret0123456789ab"
CREDENTIALS = {"access_token": TOKEN, "app_secret": APP_SECRET}
CONFIG = {"phone_number_id": "106540352242922"}
SENT = Answer(
    200,
    json={
        "messaging_product": "whatsapp",
        "contacts": [{"input": "15551234567", "wa_id": "15551234567"}],
        "messages": [{"id": "wamid.HBgLMTU1NTEyMzQ1NjcVAgARGBI"}],
    },
)
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def channel(mock: Mock, config: dict[str, Any] | None = None) -> Any:
    return build("whatsapp_cloud", "whatsapp", config or CONFIG, CREDENTIALS, mock)


def wa(**fields: Any) -> Any:
    return body_message("whatsapp", "+15551234567", "Hi Ana", **fields)


# -- outbound ---------------------------------------------------------------------------


async def test_a_text_message_is_the_documented_request() -> None:
    mock = Mock(SENT)
    ch = channel(mock)
    receipt = await ch.send(wa())
    await ch.aclose()

    request = mock.last
    assert request.method == "POST"
    assert str(request.url) == "https://graph.facebook.com/v23.0/106540352242922/messages"
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert request.headers["content-type"] == "application/json"
    assert json_of(mock.last) == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": "15551234567",
        "type": "text",
        "text": {"body": "Hi Ana", "preview_url": False},
        "biz_opaque_callback_data": str(EXECUTION),
    }
    assert receipt.provider_message_id == "wamid.HBgLMTU1NTEyMzQ1NjcVAgARGBI"


async def test_every_optional_field_goes_where_meta_reads_it() -> None:
    mock = Mock(SENT)
    config = {
        "phone_number_id": "106540352242922",
        "api_version": "v21.0",
        "preview_url": True,
        "base_url": "http://graph.stub.example:8080",
    }
    ch = channel(mock, config)
    await ch.send(wa(body="See https://acme.example"))
    await ch.aclose()
    assert str(mock.last.url) == "http://graph.stub.example:8080/v21.0/106540352242922/messages"
    assert json_of(mock.last)["text"] == {"body": "See https://acme.example", "preview_url": True}


async def test_a_template_message_carries_name_language_and_body_parameters() -> None:
    mock = Mock(SENT)
    ch = channel(mock)
    await ch.send(
        wa(
            metadata={
                "step_key": "s1",
                "template_name": "order_update",
                "template_language": "en_US",
                "template_params": json.dumps(["Ana", "#1042"]),
            }
        )
    )
    await ch.aclose()
    assert json_of(mock.last) == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": "15551234567",
        "type": "template",
        "template": {
            "name": "order_update",
            "language": {"code": "en_US"},
            "components": [
                {
                    "type": "body",
                    "parameters": [
                        {"type": "text", "text": "Ana"},
                        {"type": "text", "text": "#1042"},
                    ],
                }
            ],
        },
        "biz_opaque_callback_data": str(EXECUTION),
    }


async def test_a_template_without_parameters_has_no_components() -> None:
    mock = Mock(SENT)
    ch = channel(mock)
    await ch.send(wa(metadata={"template_name": "hello_world", "template_language": "en_US"}))
    await ch.aclose()
    assert json_of(mock.last)["template"] == {"name": "hello_world", "language": {"code": "en_US"}}


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        ({"metadata": {"template_name": "order_update"}}, "language"),
        ({"metadata": {"template_name": "Order Update!", "template_language": "en"}}, "name"),
        (
            {
                "metadata": {
                    "template_name": "order_update",
                    "template_language": "en",
                    "template_params": '{"a": 1}',
                }
            },
            "template_params",
        ),
        ({"body": "x" * 4097}, "4097 characters"),
        ({"body": ""}, "no body"),
        ({"to": "acme"}, "E.164"),
    ],
)
async def test_a_message_that_cannot_be_built_is_permanent_before_sending(
    fields: dict[str, Any], complaint: str
) -> None:
    mock = Mock(SENT)
    ch = channel(mock)
    with pytest.raises(PermanentError, match=complaint):
        await ch.send(wa(**fields))
    await ch.aclose()
    assert mock.requests == []


def meta_error(status: int, code: int, text: str = "error", **headers: str) -> Answer:
    return Answer(
        status,
        json={
            "error": {
                "message": text,
                "type": "OAuthException",
                "code": code,
                "error_data": {"messaging_product": "whatsapp", "details": f"details of {code}"},
                "fbtrace_id": "AbCdEf",
            }
        },
        headers=headers,
    )


@pytest.mark.parametrize(
    ("answer", "kind", "provider_wide"),
    [
        (meta_error(400, 100, "Invalid parameter"), PermanentError, None),
        (meta_error(400, 131008, "Required parameter is missing"), PermanentError, None),
        (meta_error(404, 132001, "Template name does not exist"), PermanentError, None),
        (meta_error(401, 190, "Error validating access token"), AdapterError, None),
        (meta_error(403, 10, "Permission denied"), AdapterError, None),
        (
            meta_error(403, 200, "Requires whatsapp_business_messaging permission"),
            AdapterError,
            None,
        ),
        (meta_error(400, 368, "Temporarily blocked for policies violations"), AdapterError, None),
        (meta_error(400, 130429, "Rate limit hit"), TransientError, True),
        (meta_error(400, 80007, "Rate limit issues"), TransientError, True),
        (meta_error(400, 131048, "Spam rate limit hit"), TransientError, True),
        (
            meta_error(400, 131056, "(Business Account, Consumer Account) pair rate limit hit"),
            TransientError,
            False,
        ),
        (Answer(502, text="Bad Gateway"), TransientError, True),
        (meta_error(400, 135000, "Generic user error"), PermanentError, None),
        (Answer(401, text=""), AdapterError, None),
    ],
)
async def test_errors_map_by_meta_code_then_status(
    answer: Answer, kind: type[Exception], provider_wide: bool | None
) -> None:
    mock = Mock(answer)
    ch = channel(mock)
    with pytest.raises(kind) as caught:
        await ch.send(wa())
    await ch.aclose()
    error: Any = caught.value
    if provider_wide is not None:
        assert error.provider_wide is provider_wide
    if isinstance(error, PermanentError):
        assert error.bounce is False
    assert error.message.startswith(f"whatsapp_cloud: HTTP {answer.status}")


async def test_an_error_echoing_the_token_is_redacted() -> None:
    mock = Mock(meta_error(400, 100, f"Invalid parameter {TOKEN}"))
    ch = channel(mock)
    with pytest.raises(PermanentError) as caught:
        await ch.send(wa())
    await ch.aclose()
    assert TOKEN not in str(caught.value)
    assert "100 Invalid parameter" in str(caught.value)


@pytest.mark.parametrize(
    ("config", "credentials", "complaint"),
    [
        ({}, CREDENTIALS, "phone_number_id"),
        ({"phone_number_id": "+1555"}, CREDENTIALS, "phone_number_id"),
        ({**CONFIG, "api_version": "23"}, CREDENTIALS, "api_version"),
        ({**CONFIG, "preview_url": "yes"}, CREDENTIALS, "preview_url"),
        (CONFIG, {"app_secret": APP_SECRET}, "access_token"),
        ({**CONFIG, "access_token": TOKEN}, CREDENTIALS, "credential"),
    ],
)
def test_config_and_credentials_are_checked(
    config: dict[str, Any], credentials: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(ConfigError, match=complaint) as caught:
        registry.validate("whatsapp", "whatsapp_cloud", config, credentials)
    assert TOKEN not in str(caught.value)


# -- inbound ----------------------------------------------------------------------------


def receiver(credentials: dict[str, Any] | None = None) -> Any:
    adapter = make_adapter("whatsapp_cloud", "whatsapp", CONFIG, credentials or CREDENTIALS)
    found = registry.receiver(adapter, ReceiverContext())
    assert found is not None
    return found


def signed(
    payload: Any, *, secret: str = APP_SECRET, tamper: bytes | None = None
) -> InboundRequest:
    body = json.dumps(payload).encode()
    mac = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return InboundRequest(
        url="https://dripd.acme.example/webhooks/whatsapp_cloud/a1",
        headers={"content-type": "application/json", "x-hub-signature-256": f"sha256={mac}"},
        body=tamper if tamper is not None else body,
        received_at=NOW,
    )


def notification(value: dict[str, Any]) -> dict[str, Any]:
    return {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "102290129340398",
                "changes": [
                    {
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {
                                "display_phone_number": "15550783881",
                                "phone_number_id": "106540352242922",
                            },
                            **value,
                        },
                        "field": "messages",
                    }
                ],
            }
        ],
    }


def a_status(state: str, errors: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {
        "id": "wamid.HBgLMTU1NTEyMzQ1NjcVAgARGBI",
        "status": state,
        "timestamp": "1764504000",
        "recipient_id": "15551234567",
        "biz_opaque_callback_data": str(EXECUTION),
    }
    if errors is not None:
        status["errors"] = errors
    return status


def a_message(body: str, kind: str = "text") -> dict[str, Any]:
    content: dict[str, Any] = (
        {"text": {"body": body}} if kind == "text" else {"button": {"payload": "p", "text": body}}
    )
    return {
        "contacts": [{"profile": {"name": "Ana"}, "wa_id": "15551234567"}],
        "messages": [
            {
                "from": "15551234567",
                "id": "wamid.InboundHBgLMTU1NTEyMzQ1Njc",
                "timestamp": "1764504000",
                "type": kind,
                **content,
            }
        ],
    }


@pytest.mark.parametrize(("state", "kind"), [("delivered", "delivered"), ("read", "opened")])
async def test_delivered_and_read_statuses_are_events(state: str, kind: str) -> None:
    rx = receiver()
    [event] = await rx.receive(signed(notification({"statuses": [a_status(state)]})))
    await rx.aclose()
    assert event.type == kind
    assert event.event_id == f"wamid.HBgLMTU1NTEyMzQ1NjcVAgARGBI:{state}"
    assert event.provider_message_id == "wamid.HBgLMTU1NTEyMzQ1NjcVAgARGBI"
    assert event.execution_id == EXECUTION
    assert event.recipient == "+15551234567"
    assert event.channel == "whatsapp"
    assert event.occurred_at == datetime.fromtimestamp(1764504000, UTC)


async def test_a_sent_status_records_nothing() -> None:
    assert await receiver().receive(signed(notification({"statuses": [a_status("sent")]}))) == []


async def test_a_marketing_opt_out_failure_unsubscribes() -> None:
    errors = [{"code": 131050, "title": "User has stopped marketing messages"}]
    payload = notification({"statuses": [a_status("failed", errors)]})
    [event] = await receiver().receive(signed(payload))
    assert event.type == "unsubscribed"
    assert event.recipient == "+15551234567"
    assert event.data == {"error_code": 131050}


async def test_an_undeliverable_failure_is_a_temporary_bounce() -> None:
    payload = notification(
        {"statuses": [a_status("failed", [{"code": 131026, "title": "Message undeliverable"}])]}
    )
    [event] = await receiver().receive(signed(payload))
    assert (event.type, event.permanent) == ("bounced", False)


async def test_other_failures_are_failed_events() -> None:
    payload = notification(
        {"statuses": [a_status("failed", [{"code": 131047, "title": "Re-engagement message"}])]}
    )
    [event] = await receiver().receive(signed(payload))
    assert event.type == "failed"
    assert event.reason == "whatsapp error 131047: Re-engagement message"


@pytest.mark.parametrize("body", ["STOP", " stop ", "Unsubscribe"])
async def test_an_inbound_stop_unsubscribes(body: str) -> None:
    [event] = await receiver().receive(signed(notification(a_message(body))))
    assert event.type == "unsubscribed"
    assert event.recipient == "+15551234567"
    assert event.event_id == "wamid.InboundHBgLMTU1NTEyMzQ1Njc"


async def test_a_stop_button_of_a_template_unsubscribes() -> None:
    [event] = await receiver().receive(signed(notification(a_message("Stop", kind="button"))))
    assert event.type == "unsubscribed"


async def test_other_inbound_messages_are_replies() -> None:
    [event] = await receiver().receive(signed(notification(a_message("When is my order due?"))))
    assert event.type == "replied"
    assert event.data == {"body": "When is my order due?"}


async def test_a_replayed_notification_is_the_same_events() -> None:
    rx = receiver()
    request = signed(notification({"statuses": [a_status("delivered")]}))
    assert await rx.receive(request) == await rx.receive(request)


@pytest.mark.parametrize(
    "request_",
    [
        signed(notification({"statuses": [a_status("read")]}), secret="another-apps-secret"),
        signed(
            notification({"statuses": [a_status("read")]}),
            tamper=json.dumps(notification({"statuses": [a_status("failed")]})).encode(),
        ),
    ],
)
async def test_forged_notifications_are_unverified(request_: InboundRequest) -> None:
    with pytest.raises(Unverified):
        await receiver().receive(request_)


@pytest.mark.parametrize("header", ["", "sha1=abcdef", "sha256=" + "0" * 64])
async def test_a_missing_or_wrong_signature_header_is_unverified(header: str) -> None:
    request = signed(notification({"statuses": [a_status("read")]}))
    forged = InboundRequest(
        url=request.url,
        headers={**request.headers, "x-hub-signature-256": header},
        body=request.body,
        received_at=NOW,
    )
    with pytest.raises(Unverified):
        await receiver().receive(forged)


async def test_a_signed_body_that_is_not_a_notification_is_a_bad_payload() -> None:
    with pytest.raises(BadPayload):
        await receiver().receive(signed({"hello": "world"}))


def test_receiving_needs_the_app_secret() -> None:
    adapter = make_adapter("whatsapp_cloud", "whatsapp", CONFIG, {"access_token": TOKEN})
    with pytest.raises(ConfigError, match="app_secret"):
        registry.receiver(adapter, ReceiverContext())


def test_the_subscription_handshake_answers_the_challenge() -> None:
    rx = receiver({**CREDENTIALS, "verify_token": "my-verify-token"})
    params = {"hub.mode": "subscribe", "hub.verify_token": "my-verify-token", "hub.challenge": "42"}
    assert rx.challenge(params) == "42"
    with pytest.raises(Unverified):
        rx.challenge({**params, "hub.verify_token": "guess"})
    with pytest.raises(Unverified):
        receiver().challenge(params)
