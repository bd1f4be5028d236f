"""The sns provider: SMS by SNS `Publish` as AWS documents it (providers.md §5, the botocore
model sns/2010-03-31: Query protocol, form body, SigV4 for `sns`), its XML answer read, and
its error codes mapped onto dripd's errors."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from httpmock import Answer, Mock, body_message, build, form_of
from test_aws_sigv4 import check_signed

from dripd.channels import registry
from dripd.channels.base import AdapterError, PermanentError, TransientError
from dripd.errors import ConfigError

KEY_ID = "AKIAIOSFODNN7EXAMPLE"
SECRET = "je7MtGbClwBF/2Zp9Utk/h3yCo8nvbEXAMPLEKEY"
TOKEN = "IQoJb3JpZ2luX2VjEXAMPLESESSIONTOKEN"
CREDENTIALS = {"access_key_id": KEY_ID, "secret_access_key": SECRET}
CONFIG = {"region": "eu-west-1"}
URL = "https://sns.eu-west-1.amazonaws.com/"
NS = "http://sns.amazonaws.com/doc/2010-03-31/"
PUBLISHED = Answer(
    200,
    text=(
        f'<PublishResponse xmlns="{NS}"><PublishResult>'
        "<MessageId>94f20ce6-13c5-43a0-9a9e-ca52d816e90b</MessageId>"
        "</PublishResult><ResponseMetadata><RequestId>f187a3c1-376f-11df-8963-01868b7c937a"
        "</RequestId></ResponseMetadata></PublishResponse>"
    ),
    headers={"Content-Type": "text/xml"},
)


def channel(mock: Mock, config: dict[str, Any] | None = None, **credentials: str) -> Any:
    return build(
        "sns", "sms", CONFIG if config is None else config, {**CREDENTIALS, **credentials}, mock
    )


def sms(**fields: Any) -> Any:
    return body_message("sms", "+15555550100", "Hi there", **fields)


def error(status: int, code: str, text: str = "went wrong", kind: str = "Sender") -> Answer:
    return Answer(
        status,
        text=(
            f'<ErrorResponse xmlns="{NS}"><Error><Type>{kind}</Type><Code>{code}</Code>'
            f"<Message>{text}</Message></Error><RequestId>r-1</RequestId></ErrorResponse>"
        ),
        headers={"Content-Type": "text/xml"},
    )


async def test_a_plain_message_is_the_documented_request() -> None:
    mock = Mock(PUBLISHED)
    ch = channel(mock)
    receipt = await ch.send(sms())
    await ch.aclose()

    request = mock.last
    assert request.method == "POST"
    assert str(request.url) == URL
    assert request.headers["content-type"] == "application/x-www-form-urlencoded; charset=utf-8"
    # The body botocore produces for this publish (providers.md §5), byte for byte.
    assert request.content == (
        b"Action=Publish&Version=2010-03-31&PhoneNumber=%2B15555550100&Message=Hi+there"
    )
    check_signed(request, key_id=KEY_ID, secret=SECRET, region="eu-west-1", service="sns")
    assert receipt.provider_message_id == "94f20ce6-13c5-43a0-9a9e-ca52d816e90b"


async def test_every_optional_field_goes_where_sns_reads_it() -> None:
    mock = Mock(PUBLISHED)
    config = {
        "region": "ap-southeast-2",
        "sms_type": "Transactional",
        "sender_id": "Acme1",
        "origination_number": "+61400000000",
        "base_url": "http://127.0.0.1:9/sns",
        "timeout": 5,
        "max_connections": 2,
    }
    ch = channel(mock, config, session_token=TOKEN)
    await ch.send(sms(to="+61412345678", body="Código: 1234 & más"))
    await ch.aclose()

    request = mock.last
    assert str(request.url) == "http://127.0.0.1:9/sns/"
    assert form_of(request) == {
        "Action": ["Publish"],
        "Version": ["2010-03-31"],
        "PhoneNumber": ["+61412345678"],
        "Message": ["Código: 1234 & más"],
        "MessageAttributes.entry.1.Name": ["AWS.SNS.SMS.SMSType"],
        "MessageAttributes.entry.1.Value.DataType": ["String"],
        "MessageAttributes.entry.1.Value.StringValue": ["Transactional"],
        "MessageAttributes.entry.2.Name": ["AWS.SNS.SMS.SenderID"],
        "MessageAttributes.entry.2.Value.DataType": ["String"],
        "MessageAttributes.entry.2.Value.StringValue": ["Acme1"],
        "MessageAttributes.entry.3.Name": ["AWS.MM.SMS.OriginationNumber"],
        "MessageAttributes.entry.3.Value.DataType": ["String"],
        "MessageAttributes.entry.3.Value.StringValue": ["+61400000000"],
    }
    assert b"PhoneNumber=%2B61412345678" in request.content
    check_signed(
        request,
        key_id=KEY_ID,
        secret=SECRET,
        region="ap-southeast-2",
        service="sns",
        token=TOKEN,
    )


async def test_the_text_is_sent_when_there_is_no_body() -> None:
    mock = Mock(PUBLISHED)
    ch = channel(mock)
    await ch.send(sms(body=None, text="Plain text"))
    await ch.aclose()
    assert form_of(mock.last)["Message"] == ["Plain text"]


async def test_an_empty_message_is_permanent_before_sending() -> None:
    mock = Mock(PUBLISHED)
    ch = channel(mock)
    with pytest.raises(PermanentError, match="empty"):
        await ch.send(sms(body=""))
    await ch.aclose()
    assert mock.requests == []


async def test_a_success_without_an_id_is_still_sent() -> None:
    ch = channel(Mock(Answer(200, text="<PublishResponse/>")))
    receipt = await ch.send(sms())
    await ch.aclose()
    assert receipt.provider_message_id is None


@pytest.mark.parametrize(
    ("answer", "kind", "provider_wide"),
    [
        (error(400, "Throttling", "Rate exceeded"), TransientError, True),
        (error(500, "InternalError", kind="Receiver"), TransientError, True),
        (Answer(503, text="Service Unavailable"), TransientError, True),
        (Answer(429), TransientError, True),
        (error(400, "InvalidParameter", "Invalid parameter: PhoneNumber"), PermanentError, None),
        (error(400, "ParameterValueInvalid"), PermanentError, None),
        (
            error(403, "AuthorizationError", "not authorized to perform SNS:Publish"),
            AdapterError,
            None,
        ),
        (error(403, "InvalidClientTokenId", "The security token is invalid"), AdapterError, None),
        (error(403, "SignatureDoesNotMatch"), AdapterError, None),
        (error(403, "InvalidSecurity"), AdapterError, None),
        (Answer(403, text="Forbidden"), AdapterError, None),
        (error(400, "OptedOut"), PermanentError, None),
        (Answer(404, text="<html>not here</html>"), PermanentError, None),
    ],
)
async def test_errors_map_by_sns_code_then_status(
    answer: Answer, kind: type[Exception], provider_wide: bool | None
) -> None:
    ch = channel(Mock(answer))
    with pytest.raises(kind) as caught:
        await ch.send(sms())
    await ch.aclose()
    if provider_wide is not None:
        assert isinstance(caught.value, TransientError)
        assert caught.value.provider_wide is provider_wide
    assert type(caught.value) is kind


async def test_the_error_names_the_code_and_message() -> None:
    ch = channel(Mock(error(400, "InvalidParameter", "Invalid parameter: PhoneNumber Reason: x")))
    with pytest.raises(PermanentError) as caught:
        await ch.send(sms())
    await ch.aclose()
    assert str(caught.value) == (
        "sns: InvalidParameter: HTTP 400: Invalid parameter: PhoneNumber Reason: x"
    )
    assert caught.value.bounce is False


async def test_throttling_honours_retry_after() -> None:
    answer = error(400, "Throttling")
    ch = channel(Mock(Answer(400, text=answer.text, headers={"Retry-After": "7"})))
    with pytest.raises(TransientError) as caught:
        await ch.send(sms())
    await ch.aclose()
    assert caught.value.retry_after == 7.0


async def test_a_connection_failure_is_provider_wide() -> None:
    ch = channel(Mock(httpx.ConnectError("connection refused")))
    with pytest.raises(TransientError) as caught:
        await ch.send(sms())
    await ch.aclose()
    assert caught.value.provider_wide is True


async def test_an_error_echoing_the_secret_is_redacted() -> None:
    ch = channel(Mock(error(403, "SignatureDoesNotMatch", f"expected key {SECRET}")))
    with pytest.raises(AdapterError) as caught:
        await ch.send(sms())
    await ch.aclose()
    assert SECRET not in str(caught.value)
    assert "SignatureDoesNotMatch" in str(caught.value)


async def test_an_entity_in_the_answer_is_not_expanded() -> None:
    body = (
        '<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x "EXPANDED">]>'
        f'<PublishResponse xmlns="{NS}"><PublishResult><MessageId>&x;</MessageId>'
        "</PublishResult></PublishResponse>"
    )
    ch = channel(Mock(Answer(200, text=body)))
    receipt = await ch.send(sms())
    await ch.aclose()
    assert receipt.provider_message_id != "EXPANDED"


@pytest.mark.parametrize(
    ("config", "credentials", "key"),
    [
        ({}, CREDENTIALS, "region"),
        ({"region": "Europe"}, CREDENTIALS, "region"),
        ({**CONFIG, "sms_type": "Urgent"}, CREDENTIALS, "sms_type"),
        ({**CONFIG, "sender_id": "TooLongSender1"}, CREDENTIALS, "sender_id"),
        ({**CONFIG, "sender_id": "12345"}, CREDENTIALS, "sender_id"),
        ({**CONFIG, "origination_number": "555-0100"}, CREDENTIALS, "origination_number"),
        ({**CONFIG, "base_url": "ftp://x"}, CREDENTIALS, "base_url"),
        ({**CONFIG, "topic": "x"}, CREDENTIALS, "topic"),
        ({**CONFIG, "secret_access_key": SECRET}, CREDENTIALS, "secret_access_key"),
        (CONFIG, {"access_key_id": KEY_ID}, "secret_access_key"),
        (CONFIG, {**CREDENTIALS, "session_token": 5}, "session_token"),
    ],
)
def test_config_and_credentials_are_checked(
    config: dict[str, Any], credentials: dict[str, Any], key: str
) -> None:
    with pytest.raises(ConfigError, match=key) as caught:
        registry.validate("sms", "sns", config, credentials)
    assert SECRET not in str(caught.value)


def test_sns_serves_sms_only_and_names_its_keys() -> None:
    spec = registry.get("sns")
    assert spec.channels == frozenset({"sms"})
    assert spec.identifier_keys == frozenset({"access_key_id"})
    assert spec.receiver is None
    with pytest.raises(ConfigError, match="channel"):
        registry.validate("email", "sns", CONFIG, CREDENTIALS)
