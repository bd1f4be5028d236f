"""The twilio provider: the Messages create request as Twilio documents it (providers.md
§10, twilio/twilio-oai twilio_api_v2010.json), its error codes mapped onto dripd's errors,
and status callbacks and inbound messages verified by X-Twilio-Signature and mapped."""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlencode

import httpx
import pytest
from httpmock import EXECUTION, Answer, Mock, body_message, build, form_of, make_adapter

from dripd.channels import registry
from dripd.channels.base import AdapterError, PermanentError, TransientError
from dripd.channels.feedback import BadPayload, InboundRequest, ReceiverContext, Unverified
from dripd.channels.twilio import signature
from dripd.errors import ConfigError

SID = "AC" + "0123456789abcdef" * 2
TOKEN = "t0ps3cretAuthT0ken0123456789abcd"
SERVICE = "MG" + "fedcba9876543210" * 2
CREDENTIALS = {"account_sid": SID, "auth_token": TOKEN}
CONFIG = {"from": "+15005550006"}
MESSAGES_URL = f"https://api.twilio.com/2010-04-01/Accounts/{SID}/Messages.json"
CREATED = Answer(201, json={"sid": "SM0123456789abcdef0123456789abcdef", "status": "queued"})
HOOK_URL = "https://dripd.acme.example/webhooks/twilio/sms1"
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def channel(
    mock: Mock, config: dict[str, Any] | None = None, kind: str = "sms", **context: Any
) -> Any:
    return build("twilio", kind, CONFIG if config is None else config, CREDENTIALS, mock, **context)


def sms(**fields: Any) -> Any:
    return body_message("sms", "+15558675310", "Hi Ana", **fields)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# -- outbound ---------------------------------------------------------------------------


async def test_a_plain_message_is_the_documented_request() -> None:
    mock = Mock(CREATED)
    ch = channel(mock)
    receipt = await ch.send(sms())
    await ch.aclose()

    request = mock.last
    assert request.method == "POST"
    assert str(request.url) == MESSAGES_URL
    assert request.headers["authorization"] == basic(SID, TOKEN)
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert request.headers["i-twilio-idempotency-token"] == f"{EXECUTION}:0"
    # `+` goes as %2B (a bare + would read as a space).
    assert b"To=%2B15558675310" in request.content
    assert form_of(request) == {
        "To": ["+15558675310"],
        "From": ["+15005550006"],
        "Body": ["Hi Ana"],
    }
    assert receipt.provider_message_id == "SM0123456789abcdef0123456789abcdef"


async def test_every_optional_field_goes_where_twilio_reads_it() -> None:
    mock = Mock(CREATED)
    config = {
        "from": "+15005550006",
        "messaging_service_sid": SERVICE,
        "status_callback": "https://hooks.acme.example/twilio?tenant=acme",
        "base_url": "https://api.stub.example:8443",
        "error_codes": {"21211": "suppress"},
    }
    ch = channel(mock, config, webhook_url=HOOK_URL)
    await ch.send(sms(body="Your code is 1234"))
    await ch.aclose()

    assert (
        str(mock.last.url)
        == f"https://api.stub.example:8443/2010-04-01/Accounts/{SID}/Messages.json"
    )
    assert form_of(mock.last) == {
        "To": ["+15558675310"],
        "From": ["+15005550006"],
        "MessagingServiceSid": [SERVICE],
        "Body": ["Your code is 1234"],
        # The configured callback wins over the daemon's webhook URL.
        "StatusCallback": ["https://hooks.acme.example/twilio?tenant=acme"],
    }


async def test_the_status_callback_defaults_to_the_adapters_webhook_url() -> None:
    mock = Mock(CREATED)
    ch = channel(mock, {"messaging_service_sid": SERVICE}, webhook_url=HOOK_URL)
    await ch.send(sms())
    await ch.aclose()
    assert form_of(mock.last) == {
        "To": ["+15558675310"],
        "MessagingServiceSid": [SERVICE],
        "Body": ["Hi Ana"],
        "StatusCallback": [HOOK_URL],
    }


async def test_whatsapp_addresses_carry_the_whatsapp_prefix() -> None:
    mock = Mock(CREATED)
    ch = channel(mock, {"from": "+14155238886"}, kind="whatsapp")
    await ch.send(sms(channel="whatsapp"))
    await ch.aclose()
    assert form_of(mock.last) == {
        "To": ["whatsapp:+15558675310"],
        "From": ["whatsapp:+14155238886"],
        "Body": ["Hi Ana"],
    }


async def test_a_whatsapp_template_step_is_refused_with_the_reason_before_sending() -> None:
    # A `whatsapp_template` step: Twilio sends templates by Content SID, not by name.
    mock = Mock(CREATED)
    ch = channel(mock, {"from": "+14155238886"}, kind="whatsapp")
    template = {
        "template_name": "order_update",
        "template_language": "en_US",
        "template_params": '["Ana"]',
    }
    with pytest.raises(PermanentError) as caught:
        await ch.send(sms(channel="whatsapp", body=None, metadata=template))
    await ch.aclose()
    assert type(caught.value) is PermanentError
    assert "Content SID" in caught.value.message
    assert "whatsapp_cloud" in caught.value.message
    assert mock.requests == []


async def test_a_body_twilio_would_refuse_is_permanent_before_sending() -> None:
    mock = Mock(CREATED)
    ch = channel(mock)
    with pytest.raises(PermanentError, match="1601 characters"):
        await ch.send(sms(body="x" * 1601))
    with pytest.raises(PermanentError, match="no body"):
        await ch.send(sms(body=""))
    await ch.aclose()
    assert mock.requests == []


def twilio_error(status: int, code: int, text: str = "refused", **headers: str) -> Answer:
    return Answer(
        status,
        json={
            "code": code,
            "message": text,
            "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status,
        },
        headers=headers,
    )


@pytest.mark.parametrize(
    ("answer", "kind", "bounce"),
    [
        (
            twilio_error(400, 21610, "Attempt to send to unsubscribed recipient"),
            PermanentError,
            True,
        ),
        (
            twilio_error(400, 21614, "'To' number is not a valid mobile number"),
            PermanentError,
            True,
        ),
        (twilio_error(400, 21211, "Invalid 'To' Phone Number"), PermanentError, False),
        (
            twilio_error(400, 21408, "Permission to send an SMS has not been enabled"),
            AdapterError,
            None,
        ),
        (
            twilio_error(400, 21606, "The 'From' phone number provided is not valid"),
            AdapterError,
            None,
        ),
        (twilio_error(401, 20003, "Authenticate"), AdapterError, None),
        (Answer(401, text="Unauthorized"), AdapterError, None),
        (twilio_error(429, 20429, "Too Many Requests"), TransientError, None),
        (Answer(503, text="Service Unavailable"), TransientError, None),
        (
            Answer(500, json={"code": 20500, "message": "Internal Server Error"}),
            TransientError,
            None,
        ),
        (twilio_error(400, 21999, "some new code"), PermanentError, False),
        (Answer(404, text="Not Found"), PermanentError, False),
    ],
)
async def test_errors_map_by_twilio_code_then_status(
    answer: Answer, kind: type[Exception], bounce: bool | None
) -> None:
    mock = Mock(answer)
    ch = channel(mock)
    with pytest.raises(kind) as caught:
        await ch.send(sms())
    await ch.aclose()
    error: Any = caught.value
    if bounce is not None:
        assert error.bounce is bounce
    if isinstance(error, TransientError):
        assert error.provider_wide
    assert error.message.startswith(f"twilio: HTTP {answer.status}")


async def test_a_429_honours_retry_after() -> None:
    mock = Mock(twilio_error(429, 20429, "Too Many Requests", **{"Retry-After": "7"}))
    ch = channel(mock)
    with pytest.raises(TransientError) as caught:
        await ch.send(sms())
    await ch.aclose()
    assert caught.value.retry_after == 7.0


async def test_21614_on_whatsapp_stops_the_message_without_a_suppression() -> None:
    mock = Mock(twilio_error(400, 21614, "not a mobile number"))
    ch = channel(mock, {"from": "+14155238886"}, kind="whatsapp")
    with pytest.raises(PermanentError) as caught:
        await ch.send(sms(channel="whatsapp"))
    await ch.aclose()
    assert caught.value.bounce is False


async def test_the_error_codes_table_overrides_the_defaults() -> None:
    config = {"from": "+15005550006", "error_codes": {"21211": "suppress", "21610": "transient"}}
    mock = Mock(twilio_error(400, 21211), twilio_error(400, 21610))
    ch = channel(mock, config)
    with pytest.raises(PermanentError) as first:
        await ch.send(sms())
    with pytest.raises(TransientError):
        await ch.send(sms())
    await ch.aclose()
    assert first.value.bounce is True


async def test_a_connection_failure_is_provider_wide_and_names_no_secret() -> None:
    mock = Mock(httpx.ConnectError(f"refused while sending {TOKEN}"))
    ch = channel(mock)
    with pytest.raises(TransientError) as caught:
        await ch.send(sms())
    await ch.aclose()
    assert caught.value.provider_wide
    assert TOKEN not in str(caught.value)


async def test_an_error_echoing_the_token_is_redacted() -> None:
    mock = Mock(twilio_error(400, 21211, f"bad request {TOKEN}"))
    ch = channel(mock)
    with pytest.raises(PermanentError) as caught:
        await ch.send(sms())
    await ch.aclose()
    assert TOKEN not in str(caught.value)
    assert "21211" in str(caught.value)


@pytest.mark.parametrize(
    ("config", "credentials", "complaint"),
    [
        ({}, CREDENTIALS, "`from`"),
        (CONFIG, {"account_sid": "AC123", "auth_token": TOKEN}, "account_sid"),
        (CONFIG, {"account_sid": SID}, "auth_token"),
        ({"messaging_service_sid": "MG12"}, CREDENTIALS, "messaging_service_sid"),
        ({**CONFIG, "status_callback": "ftp://x.example/"}, CREDENTIALS, "status_callback"),
        ({**CONFIG, "status_callback": "https://my_host.example/"}, CREDENTIALS, "status_callback"),
        ({**CONFIG, "error_codes": {"21610": "ignore"}}, CREDENTIALS, "error_codes"),
        ({**CONFIG, "error_codes": {"STOP": "suppress"}}, CREDENTIALS, "error_codes"),
        ({**CONFIG, "error_codes": ["21610"]}, CREDENTIALS, "error_codes"),
        ({**CONFIG, "auth_token": TOKEN}, CREDENTIALS, "credential"),
    ],
)
def test_config_and_credentials_are_checked(
    config: dict[str, Any], credentials: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(ConfigError, match=complaint) as caught:
        registry.validate("sms", "twilio", config, credentials)
    assert TOKEN not in str(caught.value)


def test_twilio_serves_sms_and_whatsapp_only() -> None:
    registry.validate("whatsapp", "twilio", CONFIG, CREDENTIALS)
    with pytest.raises(ConfigError, match="does not serve"):
        registry.validate("email", "twilio", CONFIG, CREDENTIALS)


# -- inbound ----------------------------------------------------------------------------


def twilio_signature(token: str, url: str, params: dict[str, str]) -> str:
    """Twilio's documented construction, written out independently of dripd's."""
    data = url
    for name in sorted(params):
        data += name + params[name]
    digest = hmac.new(token.encode("utf-8"), data.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def inbound(
    params: dict[str, str],
    *,
    url: str = HOOK_URL,
    signed_url: str | None = None,
    token: str = TOKEN,
    headers: dict[str, str] | None = None,
    tamper: dict[str, str] | None = None,
) -> InboundRequest:
    sig = twilio_signature(token, signed_url or url, params)
    body = urlencode({**params, **(tamper or {})}).encode()
    return InboundRequest(
        url=url,
        headers={
            "content-type": "application/x-www-form-urlencoded",
            "x-twilio-signature": sig,
            **(headers or {}),
        },
        body=body,
        received_at=NOW,
        form=parse_qs(body.decode(), keep_blank_values=True),
    )


def receiver(config: dict[str, Any] | None = None, kind: str = "sms") -> Any:
    adapter = make_adapter("twilio", kind, config or CONFIG, CREDENTIALS, name="sms1")
    found = registry.receiver(adapter, ReceiverContext())
    assert found is not None
    return found


def status(state: str, **extra: str) -> dict[str, str]:
    return {
        "AccountSid": SID,
        "ApiVersion": "2010-04-01",
        "From": "+15005550006",
        "MessageSid": "SM0123456789abcdef0123456789abcdef",
        "MessageStatus": state,
        "SmsSid": "SM0123456789abcdef0123456789abcdef",
        "SmsStatus": state,
        "To": "+15558675310",
        **extra,
    }


def incoming(body: str, sender: str = "+15558675310", **extra: str) -> dict[str, str]:
    return {
        "AccountSid": SID,
        "ApiVersion": "2010-04-01",
        "Body": body,
        "From": sender,
        "MessageSid": "SMfeedbeef0123456789abcdef01234567",
        "NumMedia": "0",
        "NumSegments": "1",
        "SmsMessageSid": "SMfeedbeef0123456789abcdef01234567",
        "SmsSid": "SMfeedbeef0123456789abcdef01234567",
        "SmsStatus": "received",
        "To": "+15005550006",
        **extra,
    }


def test_the_signature_matches_twilios_documented_example() -> None:
    # twilio.com/docs/usage/security, "Validating requests": this URL, these parameters
    # and the auth token 12345 sign to this value.
    params = {
        "CallSid": ["CA1234567890ABCDE"],
        "Caller": ["+12349013030"],
        "Digits": ["1234"],
        "From": ["+12349013030"],
        "To": ["+18005551212"],
    }
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    assert signature(b"12345", url, params) == "0/KCTR6DLpKmkAf8muzZqo1nDgQ="


async def test_a_delivered_callback_becomes_a_delivered_event() -> None:
    rx = receiver()
    events = await rx.receive(inbound(status("delivered")))
    await rx.aclose()
    assert len(events) == 1
    event = events[0]
    assert event.type == "delivered"
    assert event.provider_message_id == "SM0123456789abcdef0123456789abcdef"
    assert event.event_id == "SM0123456789abcdef0123456789abcdef:delivered"
    assert event.recipient == "+15558675310"
    assert event.channel == "sms"


@pytest.mark.parametrize(
    ("state", "code", "permanent"),
    [
        ("undelivered", "30005", True),  # unknown handset
        ("undelivered", "30006", True),  # landline
        ("failed", "21610", True),  # replied STOP
        ("undelivered", "30003", False),  # handset switched off
        ("failed", "30008", False),  # unknown error
        ("failed", "", False),
    ],
)
async def test_failed_callbacks_are_bounces_permanent_by_code(
    state: str, code: str, permanent: bool
) -> None:
    rx = receiver()
    [event] = await rx.receive(inbound(status(state, ErrorCode=code)))
    assert event.type == "bounced"
    assert event.permanent is permanent
    assert event.event_id == f"SM0123456789abcdef0123456789abcdef:{state}"


async def test_the_error_codes_table_decides_callback_bounces_too() -> None:
    rx = receiver({**CONFIG, "error_codes": {"30003": "suppress", "30005": "permanent"}})
    [off] = await rx.receive(inbound(status("undelivered", ErrorCode="30003")))
    [unknown] = await rx.receive(inbound(status("undelivered", ErrorCode="30005")))
    assert off.permanent is True
    assert unknown.permanent is False


@pytest.mark.parametrize("state", ["queued", "sending", "sent", "accepted", "canceled"])
async def test_intermediate_statuses_record_nothing(state: str) -> None:
    assert await receiver().receive(inbound(status(state))) == []


async def test_a_whatsapp_read_receipt_is_an_open() -> None:
    params = status("read", To="whatsapp:+15558675310", From="whatsapp:+14155238886")
    [event] = await receiver(kind="whatsapp").receive(inbound(params))
    assert (event.type, event.channel, event.recipient) == ("opened", "whatsapp", "+15558675310")


async def test_twilios_idempotency_token_is_the_event_id() -> None:
    request = inbound(status("delivered"), headers={"i-twilio-idempotency-token": "tok-1-2-3"})
    [event] = await receiver().receive(request)
    assert event.event_id == "tok-1-2-3"


@pytest.mark.parametrize(
    "body",
    [
        "STOP",
        "stop",
        "  Stop \n",
        "STOPALL",
        "unsubscribe",
        "Cancel",
        "END",
        "quit",
        "REVOKE",
        "optout",
    ],
)
async def test_an_opt_out_keyword_unsubscribes_the_sender(body: str) -> None:
    [event] = await receiver().receive(inbound(incoming(body)))
    assert event.type == "unsubscribed"
    assert event.recipient == "+15558675310"
    assert event.channel == "sms"
    assert event.event_id == "SMfeedbeef0123456789abcdef01234567"
    assert event.provider_message_id is None


async def test_advanced_opt_out_type_stop_unsubscribes() -> None:
    [event] = await receiver().receive(inbound(incoming("ARRET", OptOutType="STOP")))
    assert event.type == "unsubscribed"


async def test_a_whatsapp_stop_unsubscribes_the_bare_number() -> None:
    params = incoming("STOP", sender="whatsapp:+15558675310", To="whatsapp:+14155238886")
    [event] = await receiver(kind="whatsapp").receive(inbound(params))
    assert (event.type, event.channel, event.recipient) == (
        "unsubscribed",
        "whatsapp",
        "+15558675310",
    )


@pytest.mark.parametrize("body", ["STOP PLEASE", "please stop", "Thanks!", ""])
async def test_anything_else_is_a_reply(body: str) -> None:
    [event] = await receiver().receive(inbound(incoming(body)))
    assert event.type == "replied"
    assert event.data == {"body": body}
    assert event.recipient == "+15558675310"


async def test_start_is_a_reply_and_lifts_no_suppression() -> None:
    [event] = await receiver().receive(inbound(incoming(" start ")))
    assert event.type == "replied"
    assert event.data["keyword"] == "START"


async def test_a_long_reply_keeps_its_first_thousand_characters() -> None:
    [event] = await receiver().receive(inbound(incoming("y" * 1500)))
    assert event.data["body"] == "y" * 1000


async def test_a_replayed_request_is_the_same_event() -> None:
    rx = receiver()
    request = inbound(status("undelivered", ErrorCode="30005"))
    assert await rx.receive(request) == await rx.receive(request)


async def test_a_url_signed_with_the_default_port_is_accepted() -> None:
    signed = "https://dripd.acme.example:443/webhooks/twilio/sms1"
    [event] = await receiver().receive(inbound(status("delivered"), signed_url=signed))
    assert event.type == "delivered"


@pytest.mark.parametrize(
    "forgery",
    [
        {"tamper": {"MessageStatus": "failed"}},
        {"tamper": {"Extra": "1"}},
        {"token": "another-accounts-token"},
        {"signed_url": "http://dripd.acme.example/webhooks/twilio/sms1"},
        {"signed_url": HOOK_URL + "?tenant=acme"},
        {"signed_url": "https://dripd.acme.example:8443/webhooks/twilio/sms1"},
        {"headers": {"x-twilio-signature": ""}},
        {"headers": {"x-twilio-signature": "AAAAAAAAAAAAAAAAAAAAAAAAAAA="}},
    ],
)
async def test_forged_requests_are_unverified(forgery: dict[str, Any]) -> None:
    with pytest.raises(Unverified):
        await receiver().receive(inbound(status("undelivered", ErrorCode="30005"), **forgery))


async def test_a_signed_request_without_a_message_sid_is_a_bad_payload() -> None:
    with pytest.raises(BadPayload):
        await receiver().receive(inbound({"AccountSid": SID, "MessageStatus": "delivered"}))
