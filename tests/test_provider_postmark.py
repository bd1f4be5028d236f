"""The postmark provider: `POST /email` and `POST /email/batch` as Postmark documents them
(providers.md §1: PascalCase fields, `X-Postmark-Server-Token`, a bare JSON array for a
batch, one ErrorCode per element), the batch path the registry builds (a Batcher gathering
concurrent sends into one request), and the webhooks verified by HTTP basic auth."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from httpmock import EXECUTION, Answer, Mock, build, json_of, make_adapter, message

from dripd.channels import registry
from dripd.channels.base import (
    AdapterError,
    Message,
    PermanentError,
    Receipt,
    TransientError,
)
from dripd.channels.feedback import BadPayload, InboundRequest, ReceiverContext, Unverified
from dripd.channels.postmark import MAX_BATCH_BYTES, PostmarkChannel
from dripd.errors import ConfigError

TOKEN = "pm-server-7f3c9a1e-4b2d-4e8f-9c6a-0d1e2f3a4b5c"
CONFIG = {"from": "Acme <news@acme.example>"}
CREDENTIALS = {"server_token": TOKEN}
OK = Answer(
    200,
    json={
        "To": "ana@example.org",
        "SubmittedAt": "2026-11-29T10:00:00.0000000Z",
        "MessageID": "0a129aee-e1cd-480d-b08d-4f48548ff48d",
        "ErrorCode": 0,
        "Message": "OK",
    },
)


def direct(mock: Mock, config: dict[str, Any] | None = None) -> PostmarkChannel:
    """The provider's own channel (single sends, `POST /email`), as the registry built it."""
    built = build("postmark", "email", config or CONFIG, CREDENTIALS, mock)
    batcher = built.wrapped
    inner = batcher.wrapped  # type: ignore[attr-defined]
    assert isinstance(inner, PostmarkChannel)
    return inner


def numbered(n: int, **fields: Any) -> Message:
    execution = uuid.UUID(f"0193c1d2-0000-7000-8000-00000000010{n}")
    return message(
        execution_id=execution,
        idempotency_key=f"{execution}:0",
        message_id=f"<{execution}.0@dripd.example>",
        to=f"user{n}@example.org",
        **fields,
    )


def plain_body(execution: uuid.UUID, to: str) -> dict[str, Any]:
    return {
        "From": "Acme <news@acme.example>",
        "To": to,
        "Subject": "Welcome",
        "TextBody": "Hi Ana",
        "Headers": [
            {"Name": "X-Dripd-Message-Id", "Value": f"<{execution}.0@dripd.example>"},
            {"Name": "X-Dripd-Idempotency-Key", "Value": f"{execution}:0"},
        ],
        "Metadata": {"dripd_execution": str(execution)},
        "MessageStream": "outbound",
    }


# -- outbound: one message ----------------------------------------------------------------


async def test_a_plain_message_is_the_documented_request() -> None:
    mock = Mock(OK)
    channel = direct(mock)
    receipt = await channel.send(message())
    await channel.aclose()

    request = mock.last
    assert request.method == "POST"
    assert str(request.url) == "https://api.postmarkapp.com/email"
    assert request.headers["x-postmark-server-token"] == TOKEN
    assert request.headers["content-type"] == "application/json"
    assert request.headers["accept"] == "application/json"
    assert "authorization" not in request.headers
    assert json_of(request) == plain_body(EXECUTION, "ana@example.org")
    assert receipt == Receipt(provider_message_id="0a129aee-e1cd-480d-b08d-4f48548ff48d")


async def test_every_optional_field_goes_where_postmark_reads_it() -> None:
    mock = Mock(OK)
    config = {
        "from": "news@acme.example",
        "base_url": "http://127.0.0.1:9/pm",
        "message_stream": "broadcast",
        "tag": "welcome",
        "track_opens": True,
        "track_links": "HtmlAndText",
    }
    channel = direct(mock, config)
    await channel.send(
        message(
            to_name='Ana "the, first" Souza',
            sender="Acme News <hello@acme.example>",
            reply_to="help@acme.example",
            html="<p>Hi Ana</p>",
            headers={
                "List-Unsubscribe": "<https://acme.example/u/abc>",
                "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            },
            metadata={
                "enrollment_id": "0193c1d2-0000-7000-8000-00000000e001",
                "sequence_key": "onboarding",
                "step_key": "welcome",
                "tenant_key": "t1",
            },
        )
    )
    await channel.aclose()

    assert str(mock.last.url) == "http://127.0.0.1:9/pm/email"
    assert json_of(mock.last) == {
        "From": "Acme News <hello@acme.example>",
        "To": '"Ana \\"the, first\\" Souza" <ana@example.org>',
        "Subject": "Welcome",
        "TextBody": "Hi Ana",
        "HtmlBody": "<p>Hi Ana</p>",
        "ReplyTo": "help@acme.example",
        "Headers": [
            {"Name": "List-Unsubscribe", "Value": "<https://acme.example/u/abc>"},
            {"Name": "List-Unsubscribe-Post", "Value": "List-Unsubscribe=One-Click"},
            {"Name": "X-Dripd-Message-Id", "Value": f"<{EXECUTION}.0@dripd.example>"},
            {"Name": "X-Dripd-Idempotency-Key", "Value": f"{EXECUTION}:0"},
        ],
        "Tag": "welcome",
        "TrackOpens": True,
        "TrackLinks": "HtmlAndText",
        "Metadata": {
            "dripd_execution": str(EXECUTION),
            "enrollment_id": "0193c1d2-0000-7000-8000-00000000e001",
            "sequence_key": "onboarding",
            "step_key": "welcome",
            "tenant_key": "t1",
        },
        "MessageStream": "broadcast",
    }


async def test_a_step_header_cannot_replace_dripds_identifying_headers() -> None:
    mock = Mock(OK)
    channel = direct(mock)
    await channel.send(message(headers={"x-dripd-idempotency-key": "forged"}))
    await channel.aclose()

    headers = json_of(mock.last)["Headers"]
    assert {"Name": "X-Dripd-Idempotency-Key", "Value": f"{EXECUTION}:0"} in headers
    assert all(header["Value"] != "forged" for header in headers)


async def test_a_message_without_any_body_is_refused_before_sending() -> None:
    mock = Mock(OK)
    channel = direct(mock)
    with pytest.raises(PermanentError, match="neither a text nor an HTML body"):
        await channel.send(message(text=None))
    await channel.aclose()
    assert mock.requests == []


def unprocessable(code: int, text: str) -> Answer:
    return Answer(422, json={"ErrorCode": code, "Message": text})


@pytest.mark.parametrize(
    ("answer", "kind", "bounce"),
    [
        (unprocessable(406, "Found inactive addresses: ana@example.org."), PermanentError, True),
        (unprocessable(300, "Invalid 'To' address: 'ana@'."), PermanentError, False),
        (unprocessable(402, "Invalid JSON"), PermanentError, False),
        (unprocessable(10, "Bad or missing API token"), AdapterError, None),
        (unprocessable(400, "Sender signature not found"), AdapterError, None),
        (unprocessable(401, "Sender signature not confirmed"), AdapterError, None),
        (unprocessable(405, "Not allowed to send"), AdapterError, None),
        (unprocessable(412, "Account pending"), AdapterError, None),
        (unprocessable(413, "Account may not send"), AdapterError, None),
        (Answer(401, json={"ErrorCode": 10, "Message": "Bad token"}), AdapterError, None),
        (Answer(413, text="Request Entity Too Large"), PermanentError, False),
    ],
)
async def test_errors_map_by_error_code_and_status(
    answer: Answer, kind: type[Exception], bounce: bool | None
) -> None:
    channel = direct(Mock(answer))
    with pytest.raises(kind) as caught:
        await channel.send(message())
    await channel.aclose()
    assert type(caught.value) is kind
    if bounce is not None:
        assert isinstance(caught.value, PermanentError)
        assert caught.value.bounce is bounce
    assert str(answer.json["ErrorCode"] if answer.json else 413) in str(caught.value)


@pytest.mark.parametrize("code", [400, 401])
async def test_a_steps_own_unverified_sender_fails_that_message_only(code: int) -> None:
    channel = direct(Mock(unprocessable(code, "Sender signature not found")))
    with pytest.raises(PermanentError) as caught:
        await channel.send(message(sender="Other <other@elsewhere.example>"))
    assert type(caught.value) is PermanentError
    assert caught.value.bounce is False
    # The adapter's own `from` refused: no message can go, the adapter is paused.
    with pytest.raises(AdapterError):
        await channel.send(message(sender=CONFIG["from"]))
    await channel.aclose()


async def test_a_steps_own_unverified_sender_in_a_batch_fails_its_element_only() -> None:
    answer = Answer(
        200,
        json=[
            {"ErrorCode": 400, "Message": "Sender signature not found"},
            {"ErrorCode": 400, "Message": "Sender signature not found"},
        ],
    )
    channel = direct(Mock(answer))
    results = await channel.send_batch([numbered(1, sender="other@elsewhere.example"), numbered(2)])
    await channel.aclose()
    assert [type(result) for result in results] == [PermanentError, AdapterError]


@pytest.mark.parametrize(
    "answer",
    [
        Answer(429, json={"ErrorCode": 429, "Message": "Rate limit"}, headers={"Retry-After": "7"}),
        Answer(500, text="Internal Server Error", headers={"Retry-After": "7"}),
        Answer(503, text="Maintenance", headers={"Retry-After": "7"}),
    ],
)
async def test_rate_limits_and_server_errors_are_transient_and_honour_retry_after(
    answer: Answer,
) -> None:
    channel = direct(Mock(answer))
    with pytest.raises(TransientError) as caught:
        await channel.send(message())
    await channel.aclose()
    assert caught.value.provider_wide is True
    assert caught.value.retry_after == 7.0


async def test_no_answer_is_transient_and_provider_wide() -> None:
    channel = direct(Mock(httpx.ConnectTimeout("timed out")))
    with pytest.raises(TransientError) as caught:
        await channel.send(message())
    await channel.aclose()
    assert caught.value.provider_wide is True


async def test_an_error_text_echoing_the_token_is_redacted() -> None:
    mock = Mock(unprocessable(300, f"token {TOKEN} may not send this"))
    channel = build("postmark", "email", CONFIG, CREDENTIALS, mock)
    with pytest.raises(PermanentError) as caught:
        await channel.send(message())
    await channel.aclose()
    assert TOKEN not in str(caught.value)
    assert TOKEN[:12] not in str(caught.value)


# -- outbound: the batch ------------------------------------------------------------------


async def test_concurrent_sends_go_out_as_one_batch_each_with_its_own_result() -> None:
    mock = Mock(
        Answer(
            200,
            json=[
                {"ErrorCode": 0, "Message": "OK", "MessageID": "id-1", "To": "user1@example.org"},
                {
                    "ErrorCode": 406,
                    "Message": "You tried to send to a recipient that has been marked as "
                    "inactive. Found inactive addresses: user2@example.org.",
                },
                {"ErrorCode": 0, "Message": "OK", "MessageID": "id-3", "To": "user3@example.org"},
            ],
        )
    )
    channel = build("postmark", "email", CONFIG, CREDENTIALS, mock)
    messages = [numbered(1), numbered(2), numbered(3)]
    results = await asyncio.gather(*(channel.send(m) for m in messages), return_exceptions=True)
    await channel.aclose()

    assert len(mock.requests) == 1
    request = mock.last
    assert request.method == "POST"
    assert str(request.url) == "https://api.postmarkapp.com/email/batch"
    assert request.headers["x-postmark-server-token"] == TOKEN
    assert request.headers["content-type"] == "application/json"
    assert json_of(request) == [
        plain_body(m.execution_id, f"user{n}@example.org") for n, m in enumerate(messages, 1)
    ]
    assert results[0] == Receipt(provider_message_id="id-1")
    assert isinstance(results[1], PermanentError)
    assert results[1].bounce is True
    assert "406" in str(results[1])
    assert results[2] == Receipt(provider_message_id="id-3")


async def test_batch_elements_map_their_own_error_codes() -> None:
    channel = direct(
        Mock(
            Answer(
                200,
                json=[
                    {"ErrorCode": 300, "Message": "Invalid 'To' address"},
                    {"ErrorCode": 405, "Message": "Not allowed to send"},
                    {"ErrorCode": 0, "Message": "OK", "MessageID": "id-3"},
                ],
            )
        )
    )
    results = await channel.send_batch([numbered(1), numbered(2), numbered(3)])
    await channel.aclose()
    assert isinstance(results[0], PermanentError)
    assert results[0].bounce is False
    assert isinstance(results[1], AdapterError)
    assert results[2] == Receipt(provider_message_id="id-3")


async def test_a_message_that_cannot_be_built_fails_alone_and_is_not_sent() -> None:
    mock = Mock(Answer(200, json=[{"ErrorCode": 0, "Message": "OK", "MessageID": "id-2"}]))
    channel = direct(mock)
    results = await channel.send_batch([numbered(1, text=None), numbered(2)])
    await channel.aclose()
    assert isinstance(results[0], PermanentError)
    assert results[1] == Receipt(provider_message_id="id-2")
    assert [element["To"] for element in json_of(mock.last)] == ["user2@example.org"]


@pytest.mark.parametrize(
    ("answer", "kind"),
    [
        (Answer(429, text="Too Many Requests", headers={"Retry-After": "3"}), TransientError),
        (Answer(500, text="Internal Server Error"), TransientError),
        (httpx.ReadTimeout("timed out"), TransientError),
        (Answer(401, json={"ErrorCode": 10, "Message": "Bad token"}), AdapterError),
        (Answer(422, json={"ErrorCode": 10, "Message": "Bad or missing token"}), AdapterError),
        # An answer that does not account for every message: nobody's result is known.
        (Answer(200, json=[{"ErrorCode": 0, "MessageID": "id-1"}]), TransientError),
    ],
)
async def test_a_failed_batch_request_fails_every_message_alike(
    answer: Answer | Exception, kind: type[Exception]
) -> None:
    mock = Mock(answer)
    channel = build("postmark", "email", CONFIG, CREDENTIALS, mock)
    results = await asyncio.gather(
        *(channel.send(numbered(n)) for n in (1, 2)), return_exceptions=True
    )
    await channel.aclose()
    assert len(mock.requests) == 1
    assert [type(result) for result in results] == [kind, kind]


async def test_a_whole_batch_refused_as_bad_json_is_permanent_for_each() -> None:
    channel = direct(Mock(Answer(422, json={"ErrorCode": 402, "Message": "Invalid JSON"})))
    results = await channel.send_batch([numbered(1), numbered(2)])
    await channel.aclose()
    assert [type(result) for result in results] == [PermanentError, PermanentError]


# -- sizes: 10 MB per message, 50 MB per batch request (providers.md §1) ----------------------

MiB = 1024 * 1024


def sized(n: int, mib: float) -> Message:
    """Message `n` whose text is `mib` MiB."""
    return numbered(n, text="x" * int(mib * MiB))


def accepting(request: httpx.Request) -> httpx.Response:
    """Postmark accepting every message of a request: MessageID `id-<To>`."""
    sent = json_of(request)
    elements = sent if isinstance(sent, list) else [sent]
    answers = [{"ErrorCode": 0, "Message": "OK", "MessageID": f"id-{e['To']}"} for e in elements]
    return httpx.Response(200, json=answers if isinstance(sent, list) else answers[0])


async def test_a_message_over_10_mb_is_refused_alone_and_not_sent() -> None:
    mock = Mock(handler=accepting)
    channel = build("postmark", "email", CONFIG, CREDENTIALS, mock)
    messages = [numbered(1), sized(2, 10.5), numbered(3)]
    results = await asyncio.gather(*(channel.send(m) for m in messages), return_exceptions=True)
    await channel.aclose()

    assert results[0] == Receipt(provider_message_id="id-user1@example.org")
    assert type(results[1]) is PermanentError
    assert "10 MB" in str(results[1])
    assert results[2] == Receipt(provider_message_id="id-user3@example.org")
    [request] = mock.requests
    assert [element["To"] for element in json_of(request)] == [
        "user1@example.org",
        "user3@example.org",
    ]


async def test_a_single_send_over_10_mb_is_refused_before_sending() -> None:
    mock = Mock(OK)
    channel = direct(mock)
    with pytest.raises(PermanentError, match="10 MB"):
        await channel.send(sized(1, 10.5))
    await channel.aclose()
    assert mock.requests == []


async def test_a_batch_over_the_request_limit_goes_out_in_several_requests() -> None:
    mock = Mock(handler=accepting)
    channel = build("postmark", "email", CONFIG, CREDENTIALS, mock)
    messages = [sized(n, 9) for n in range(1, 8)]  # 63 MiB in all
    results = await asyncio.gather(*(channel.send(m) for m in messages), return_exceptions=True)
    await channel.aclose()

    assert results == [Receipt(provider_message_id=f"id-user{n}@example.org") for n in range(1, 8)]
    assert len(mock.requests) >= 2
    assert all(str(request.url).endswith("/email/batch") for request in mock.requests)
    assert all(len(request.content) <= MAX_BATCH_BYTES for request in mock.requests)
    assert all(len(request.content) < 50 * 1000 * 1000 for request in mock.requests)
    sent = [element["To"] for request in mock.requests for element in json_of(request)]
    assert sent == [f"user{n}@example.org" for n in range(1, 8)]  # each once, in order


async def test_a_failed_request_of_a_split_batch_fails_its_own_and_the_later_messages() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        first = len(mock.requests) == 1
        return accepting(request) if first else httpx.Response(503, text="busy")

    mock = Mock(handler=handler)
    channel = direct(mock)
    results = await channel.send_batch([sized(n, 9) for n in range(1, 8)])
    await channel.aclose()

    first = len(json_of(mock.requests[0]))
    assert len(mock.requests) == 2  # nothing more is sent after a provider-wide failure
    assert results[:first] == [
        Receipt(provider_message_id=f"id-user{n}@example.org") for n in range(1, first + 1)
    ]
    assert all(type(result) is TransientError for result in results[first:])
    assert len(results) == 7


async def test_a_batch_refused_whole_as_too_large_is_sent_one_message_at_a_time() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/email/batch":
            return httpx.Response(413, text="Request Entity Too Large")
        if json_of(request)["To"] == "user2@example.org":
            return httpx.Response(
                422, json={"ErrorCode": 406, "Message": "Found inactive addresses."}
            )
        return accepting(request)

    mock = Mock(handler=handler)
    channel = build("postmark", "email", CONFIG, CREDENTIALS, mock)
    messages = [numbered(1), numbered(2), numbered(3)]
    results = await asyncio.gather(*(channel.send(m) for m in messages), return_exceptions=True)
    await channel.aclose()

    assert [request.url.path for request in mock.requests] == [
        "/email/batch",
        "/email",
        "/email",
        "/email",
    ]
    assert results[0] == Receipt(provider_message_id="id-user1@example.org")
    assert isinstance(results[1], PermanentError)
    assert results[1].bounce is True
    assert results[2] == Receipt(provider_message_id="id-user3@example.org")
    # Each single send is the batch element as it was encoded.
    assert json_of(mock.requests[1]) == json_of(mock.requests[0])[0]


async def test_one_by_one_stops_at_an_error_that_would_fail_every_send() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/email/batch":
            return httpx.Response(413, text="Request Entity Too Large")
        return httpx.Response(401, json={"ErrorCode": 10, "Message": "Bad token"})

    mock = Mock(handler=handler)
    channel = direct(mock)
    results = await channel.send_batch([numbered(1), numbered(2), numbered(3)])
    await channel.aclose()
    assert [type(result) for result in results] == [AdapterError] * 3
    assert len(mock.requests) == 2


def test_the_batch_size_is_postmarks_limit() -> None:
    channel = direct(Mock(OK))
    assert channel.max_batch == 500
    built = build("postmark", "email", CONFIG, CREDENTIALS, Mock(OK))
    assert built.wrapped.max_batch == 500  # type: ignore[attr-defined]


# -- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "credentials", "key"),
    [
        (CONFIG, {}, "server_token"),
        ({}, CREDENTIALS, "from"),
        ({**CONFIG, "track_links": "Always"}, CREDENTIALS, "track_links"),
        ({**CONFIG, "track_opens": "yes"}, CREDENTIALS, "track_opens"),
        ({**CONFIG, "message_stream": ""}, CREDENTIALS, "message_stream"),
        ({**CONFIG, "base_url": "ftp://x"}, CREDENTIALS, "base_url"),
        (CONFIG, {**CREDENTIALS, "webhook_username": "dripd-hooks"}, "webhook_username"),
        (CONFIG, {**CREDENTIALS, "webhook_username": "a:b", "webhook_password": "pw"}, "':'"),
        ({**CONFIG, "server_token": TOKEN}, CREDENTIALS, "server_token"),
    ],
)
def test_a_bad_adapter_is_a_config_error_naming_the_key(
    config: dict[str, Any], credentials: dict[str, Any], key: str
) -> None:
    with pytest.raises(ConfigError, match=key) as caught:
        registry.validate("email", "postmark", config, credentials)
    assert TOKEN not in str(caught.value)


# -- inbound --------------------------------------------------------------------------------

USERNAME = "dripd-hooks"
PASSWORD = "Wq7-correct-horse-battery"
NOW = datetime(2026, 11, 29, 10, 0, tzinfo=UTC)
MESSAGE_ID = "883953f4-6105-42a2-a16a-77a8eac79483"


def hook_receiver(credentials: dict[str, Any] | None = None) -> Any:
    adapter = make_adapter(
        "postmark",
        "email",
        CONFIG,
        credentials
        if credentials is not None
        else {**CREDENTIALS, "webhook_username": USERNAME, "webhook_password": PASSWORD},
    )
    built = registry.receiver(adapter, ReceiverContext())
    assert built is not None
    return built


def basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def post(
    record: Any, authorization: str | None = None, *, received_at: datetime = NOW
) -> InboundRequest:
    headers = {"content-type": "application/json"}
    headers["authorization"] = (
        authorization if authorization is not None else basic(USERNAME, PASSWORD)
    )
    return InboundRequest(
        url="https://dripd.example/webhooks/postmark/a1",
        headers=headers,
        body=json.dumps(record).encode(),
        received_at=received_at,
    )


def bounce(**fields: Any) -> dict[str, Any]:
    record = {
        "RecordType": "Bounce",
        "MessageStream": "outbound",
        "ID": 4323372036854775807,
        "Type": "HardBounce",
        "TypeCode": 1,
        "Name": "Hard bounce",
        "Tag": "welcome",
        "MessageID": MESSAGE_ID,
        "Metadata": {"dripd_execution": str(EXECUTION), "step_key": "welcome"},
        "ServerID": 23,
        "Description": "The server was unable to deliver your message (ex: unknown user).",
        "Details": "smtp;550 5.1.1 The email account that you tried to reach does not exist.",
        "Email": "ana@example.org",
        "From": "news@acme.example",
        "BouncedAt": "2026-11-29T04:58:52.6543678-05:00",
        "DumpAvailable": True,
        "Inactive": True,
        "CanActivate": True,
        "Subject": "Welcome",
    }
    record.update(fields)
    return record


async def test_a_hard_bounce_is_a_permanent_bounce_with_postmarks_bounce_id() -> None:
    receiver = hook_receiver()
    [event] = await receiver.receive(post(bounce()))
    assert event.type == "bounced"
    assert event.permanent is True
    assert event.event_id == "postmark-bounce:4323372036854775807"
    assert event.execution_id == EXECUTION
    assert event.provider_message_id == MESSAGE_ID
    assert event.recipient == "ana@example.org"
    assert event.occurred_at == datetime(2026, 11, 29, 9, 58, 52, 654367, tzinfo=UTC)
    assert "550 5.1.1" in (event.reason or "")
    assert event.data["type"] == "HardBounce"


@pytest.mark.parametrize(
    ("bounce_type", "inactive", "permanent"),
    [
        ("HardBounce", True, True),
        ("BadEmailAddress", True, True),
        ("ManuallyDeactivated", True, True),
        ("SoftBounce", False, False),
        ("Transient", False, False),
        ("DnsError", False, False),
        ("Blocked", False, False),
        ("Unknown", True, True),  # whatever the type, Postmark deactivated the address
    ],
)
async def test_bounce_types_map_to_permanent_or_temporary(
    bounce_type: str, inactive: bool, permanent: bool
) -> None:
    [event] = await hook_receiver().receive(post(bounce(Type=bounce_type, Inactive=inactive)))
    assert event.type == "bounced"
    assert event.permanent is permanent


async def test_bounce_records_that_are_no_failure_record_nothing() -> None:
    assert await hook_receiver().receive(post(bounce(Type="AutoResponder", Inactive=False))) == []


async def test_a_spam_complaint_is_a_complaint() -> None:
    record = bounce(RecordType="SpamComplaint", Type="SpamComplaint", TypeCode=512, ID=42)
    [event] = await hook_receiver().receive(post(record))
    assert event.type == "complained"
    assert event.event_id == "postmark-bounce:42"
    assert event.recipient == "ana@example.org"
    assert event.execution_id == EXECUTION


async def test_a_delivery_is_delivered_with_a_stable_event_id() -> None:
    record = {
        "RecordType": "Delivery",
        "ServerID": 23,
        "MessageStream": "outbound",
        "MessageID": MESSAGE_ID,
        "Recipient": "ana@example.org",
        "Tag": "welcome",
        "DeliveredAt": "2026-11-29T09:59:58Z",
        "Details": "Test delivery webhook details",
        "Metadata": {"dripd_execution": str(EXECUTION)},
    }
    receiver = hook_receiver()
    [event] = await receiver.receive(post(record))
    [again] = await receiver.receive(post(record))
    assert event.type == "delivered"
    assert event.provider_message_id == MESSAGE_ID
    assert event.execution_id == EXECUTION
    assert event.occurred_at == datetime(2026, 11, 29, 9, 59, 58, tzinfo=UTC)
    assert event.event_id == again.event_id
    other = await receiver.receive(post({**record, "DeliveredAt": "2026-11-29T09:59:59Z"}))
    assert other[0].event_id != event.event_id


async def test_opens_and_clicks_are_mapped() -> None:
    common = {
        "MessageID": MESSAGE_ID,
        "Recipient": "ana@example.org",
        "ReceivedAt": "2026-11-29T09:59:00Z",
        "Metadata": {"dripd_execution": str(EXECUTION)},
        "MessageStream": "outbound",
        "Tag": "welcome",
    }
    receiver = hook_receiver()
    [opened] = await receiver.receive(post({"RecordType": "Open", "FirstOpen": True, **common}))
    [clicked] = await receiver.receive(
        post(
            {
                "RecordType": "Click",
                "ClickLocation": "HTML",
                "OriginalLink": "https://acme.example/start",
                **common,
            }
        )
    )
    assert (opened.type, opened.data["first_open"]) == ("opened", True)
    assert (clicked.type, clicked.data["url"]) == ("clicked", "https://acme.example/start")
    assert opened.event_id != clicked.event_id
    assert clicked.execution_id == EXECUTION


def subscription_change(**fields: Any) -> dict[str, Any]:
    record = {
        "RecordType": "SubscriptionChange",
        "MessageID": MESSAGE_ID,
        "ServerID": 23,
        "MessageStream": "broadcast",
        "ChangedAt": "2026-11-29T09:59:30Z",
        "Recipient": "ana@example.org",
        "Origin": "Recipient",
        "SuppressSending": True,
        "SuppressionReason": "ManualSuppression",
        "Tag": "welcome",
        "Metadata": {"dripd_execution": str(EXECUTION)},
    }
    record.update(fields)
    return record


async def test_a_recipients_suppression_is_an_unsubscribe() -> None:
    [event] = await hook_receiver().receive(post(subscription_change()))
    assert event.type == "unsubscribed"
    assert event.recipient == "ana@example.org"
    assert event.reason == "ManualSuppression"
    assert event.execution_id == EXECUTION


async def test_reactivations_and_bounce_suppressions_record_nothing() -> None:
    receiver = hook_receiver()
    assert await receiver.receive(post(subscription_change(SuppressSending=False))) == []
    # The Bounce webhook reports the hard bounce itself, with Postmark's bounce id.
    assert await receiver.receive(post(subscription_change(SuppressionReason="HardBounce"))) == []


async def test_an_event_older_than_the_replay_window_is_still_taken() -> None:
    # Postmark retries a failed post for hours and signs no time: redelivery is
    # deduplicated by the event id instead of refused by age.
    late = NOW + timedelta(hours=6)
    [event] = await hook_receiver().receive(post(bounce(), received_at=late))
    assert event.event_id == "postmark-bounce:4323372036854775807"


@pytest.mark.parametrize(
    "authorization",
    [
        basic(USERNAME, "wrong-password"),
        basic("someone-else", PASSWORD),
        basic(USERNAME, PASSWORD + "x"),
        basic(USERNAME, ""),
        "",
        f"Bearer {PASSWORD}",
        "Basic !!!not-base64!!!",
        "Basic " + base64.b64encode(f"{USERNAME}{PASSWORD}".encode()).decode(),
    ],
)
async def test_wrong_or_missing_credentials_are_unverified(authorization: str) -> None:
    with pytest.raises(Unverified) as caught:
        await hook_receiver().receive(post(bounce(), authorization))
    assert PASSWORD not in str(caught.value)


async def test_an_adapter_without_webhook_credentials_refuses_everything() -> None:
    receiver = hook_receiver(CREDENTIALS)
    with pytest.raises(Unverified, match="webhook_username"):
        await receiver.receive(post(bounce()))
    with pytest.raises(Unverified):
        await receiver.receive(post(bounce(), basic("", "")))


async def test_a_verified_body_that_is_not_json_is_a_bad_payload() -> None:
    request = InboundRequest(
        url="https://dripd.example/webhooks/postmark/a1",
        headers={"authorization": basic(USERNAME, PASSWORD)},
        body=b"not json",
        received_at=NOW,
    )
    with pytest.raises(BadPayload):
        await hook_receiver().receive(request)


async def test_an_unverified_request_is_refused_before_its_body_is_read() -> None:
    request = InboundRequest(
        url="https://dripd.example/webhooks/postmark/a1",
        headers={"authorization": basic(USERNAME, "nope")},
        body=b"not json",
        received_at=NOW,
    )
    with pytest.raises(Unverified):
        await hook_receiver().receive(request)
