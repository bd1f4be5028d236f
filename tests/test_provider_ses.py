"""The ses provider: SES v2 SendEmail with the raw MIME as AWS documents it (providers.md §4,
the botocore model sesv2/2019-09-27: rest-json, SigV4 for `ses`), its error codes mapped
onto dripd's errors, and SES events through SNS: the SNS message signature (versions 1 and
2), its signing certificate (URL, chain, name, validity), topic and replay window checked,
subscriptions confirmed, and bounces, complaints and the rest mapped to feedback events."""

from __future__ import annotations

import base64
import email
import email.policy
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID
from httpmock import (
    EXECUTION,
    Answer,
    Endless,
    Mock,
    build,
    json_of,
    make_adapter,
    message,
    mime_message,
)
from test_aws_sigv4 import check_signed

from dripd.channels import registry
from dripd.channels.aws import MAX_CERT_BYTES
from dripd.channels.base import AdapterError, PermanentError, TransientError
from dripd.channels.feedback import BadPayload, InboundRequest, ReceiverContext, Unverified
from dripd.channels.ses import SesReceiver
from dripd.errors import ConfigError

KEY_ID = "AKIAIOSFODNN7EXAMPLE"
SECRET = "je7MtGbClwBF/2Zp9Utk/h3yCo8nvbEXAMPLEKEY"
TOKEN = "IQoJb3JpZ2luX2VjEXAMPLESESSIONTOKEN"
CREDENTIALS = {"access_key_id": KEY_ID, "secret_access_key": SECRET}
CONFIG = {"from": "Acme <news@acme.example>", "region": "eu-west-1"}
URL = "https://email.eu-west-1.amazonaws.com/v2/email/outbound-emails"
SENT = Answer(200, json={"MessageId": "010201abcdef-1234-5678-9abc-def012345678-000000"})


def channel(mock: Mock, config: dict[str, Any] | None = None, **credentials: str) -> Any:
    return build(
        "ses", "email", CONFIG if config is None else config, {**CREDENTIALS, **credentials}, mock
    )


def ses_error(status: int, code: str, text: str) -> Answer:
    """An SES v2 error answer: the code in `x-amzn-ErrorType`, the text in `message`."""
    return Answer(status, json={"message": text}, headers={"x-amzn-ErrorType": code})


def sent_mail(request: httpx.Request) -> email.message.EmailMessage:
    body = json_of(request)
    raw = base64.b64decode(body["Content"]["Raw"]["Data"], validate=True)
    assert b"\r\n" in raw  # the wire form, CRLF line ends
    return mime_message(raw)


# -- outbound ---------------------------------------------------------------------------


async def test_a_plain_message_is_the_documented_request() -> None:
    mock = Mock(SENT)
    ch = channel(mock)
    receipt = await ch.send(message())
    await ch.aclose()

    request = mock.last
    assert request.method == "POST"
    assert str(request.url) == URL
    assert request.headers["content-type"] == "application/json"
    check_signed(request, key_id=KEY_ID, secret=SECRET, region="eu-west-1", service="ses")
    body = json_of(request)
    assert set(body) == {"FromEmailAddress", "Destination", "Content", "EmailTags"}
    assert body["FromEmailAddress"] == "news@acme.example"
    assert body["Destination"] == {"ToAddresses": ["ana@example.org"]}
    assert set(body["Content"]) == {"Raw"}
    assert set(body["Content"]["Raw"]) == {"Data"}
    assert body["EmailTags"] == [{"Name": "dripd_execution", "Value": str(EXECUTION)}]

    mail = sent_mail(request)
    assert mail["From"] == "Acme <news@acme.example>"
    assert mail["To"] == "ana@example.org"
    assert mail["Subject"] == "Welcome"
    assert mail["Message-ID"] == f"<{EXECUTION}.0@dripd.example>"
    assert mail["X-Dripd-Idempotency-Key"] == f"{EXECUTION}:0"
    assert mail.get_content().strip() == "Hi Ana"
    assert receipt.provider_message_id == "010201abcdef-1234-5678-9abc-def012345678-000000"


async def test_every_optional_field_goes_where_ses_reads_it() -> None:
    mock = Mock(SENT)
    config = {
        **CONFIG,
        "region": "us-west-2",
        "configuration_set": "dripd-events_1",
        "sns_topic_arn": "arn:aws:sns:us-west-2:123456789012:ses-feedback",
        "base_url": "http://127.0.0.1:9/ses",
        "timeout": 5,
        "max_connections": 3,
    }
    ch = channel(mock, config, session_token=TOKEN)
    unsubscribe = "<https://dripd.acme.example/u/abc>, <mailto:u@acme.example?subject=u>"
    await ch.send(
        message(
            to_name="Ana Lima",
            sender='"Acme Support" <help@acme.example>',
            reply_to="replies@acme.example",
            html="<p>Hi Ana</p>",
            headers={
                "List-Unsubscribe": unsubscribe,
                "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            },
        )
    )
    await ch.aclose()

    request = mock.last
    assert str(request.url) == "http://127.0.0.1:9/ses/v2/email/outbound-emails"
    check_signed(
        request, key_id=KEY_ID, secret=SECRET, region="us-west-2", service="ses", token=TOKEN
    )
    body = json_of(request)
    assert body["FromEmailAddress"] == "help@acme.example"
    assert body["Destination"] == {"ToAddresses": ["ana@example.org"]}
    assert body["ConfigurationSetName"] == "dripd-events_1"
    assert body["EmailTags"] == [{"Name": "dripd_execution", "Value": str(EXECUTION)}]
    assert "Simple" not in body["Content"]
    assert "Template" not in body["Content"]

    mail = sent_mail(request)
    assert mail["From"] == "Acme Support <help@acme.example>"
    assert mail["To"] == "Ana Lima <ana@example.org>"
    assert mail["Reply-To"] == "replies@acme.example"
    # (The header is folded on the wire: compare the unfolded value.)
    assert mail["List-Unsubscribe"].strip() == unsubscribe
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert mail["Message-ID"] == f"<{EXECUTION}.0@dripd.example>"
    assert mail.get_content_type() == "multipart/alternative"
    assert [part.get_content_type() for part in mail.iter_parts()] == ["text/plain", "text/html"]


@pytest.mark.parametrize(
    ("answer", "kind"),
    [
        (
            ses_error(
                429,
                "TooManyRequestsException:http://internal.amazon.com/coral/com.amazonaws.sesv2/",
                "Maximum sending rate exceeded.",
            ),
            TransientError,
        ),
        (ses_error(400, "LimitExceededException", "Daily quota"), TransientError),
        (ses_error(500, "InternalServiceErrorException", "oops"), TransientError),
        (Answer(503, text="unavailable"), TransientError),
        (
            ses_error(400, "SendingPausedException", "Sending paused for this account."),
            AdapterError,
        ),
        (ses_error(400, "AccountSuspendedException", "suspended"), AdapterError),
        (ses_error(400, "MailFromDomainNotVerifiedException", "MAIL FROM"), AdapterError),
        (
            ses_error(404, "NotFoundException", "Configuration set <x> does not exist."),
            AdapterError,
        ),
        (
            ses_error(
                403, "SignatureDoesNotMatch", "The request signature we calculated does not match"
            ),
            AdapterError,
        ),
        (
            ses_error(
                403,
                "UnrecognizedClientException",
                "The security token included in the request is invalid.",
            ),
            AdapterError,
        ),
        (
            Answer(
                403,
                json={"__type": "com.amazon.coral.service#AccessDeniedException", "message": "no"},
            ),
            AdapterError,
        ),
        (ses_error(400, "MessageRejected", "Email address is not verified."), PermanentError),
        (ses_error(400, "BadRequestException", "Missing final '@domain'"), PermanentError),
        (Answer(413, text="too large"), PermanentError),
    ],
)
async def test_errors_map_by_ses_code_then_status(answer: Answer, kind: type[Exception]) -> None:
    ch = channel(Mock(answer))
    with pytest.raises(kind) as caught:
        await ch.send(message())
    await ch.aclose()
    assert type(caught.value) is kind
    if isinstance(caught.value, TransientError):
        assert caught.value.provider_wide is True
    if isinstance(caught.value, PermanentError):
        assert caught.value.bounce is False


async def test_the_error_names_the_code_and_message() -> None:
    answer = ses_error(
        400,
        "MessageRejected:http://internal.amazon.com/coral/",
        "Email address is not verified. The following identities failed",
    )
    ch = channel(Mock(answer))
    with pytest.raises(PermanentError) as caught:
        await ch.send(message())
    await ch.aclose()
    assert str(caught.value) == (
        "ses: MessageRejected: HTTP 400: Email address is not verified. The following "
        "identities failed"
    )


async def test_throttling_honours_retry_after() -> None:
    answer = Answer(
        429,
        json={"message": "slow"},
        headers={"x-amzn-ErrorType": "TooManyRequestsException", "Retry-After": "3"},
    )
    ch = channel(Mock(answer))
    with pytest.raises(TransientError) as caught:
        await ch.send(message())
    await ch.aclose()
    assert caught.value.retry_after == 3.0


async def test_a_timeout_is_provider_wide() -> None:
    ch = channel(Mock(httpx.ReadTimeout("slow")))
    with pytest.raises(TransientError) as caught:
        await ch.send(message())
    await ch.aclose()
    assert caught.value.provider_wide is True


async def test_an_error_echoing_the_secret_is_redacted() -> None:
    answer = Answer(
        403,
        json={"message": f"Signature expected for {SECRET} with token {TOKEN}"},
        headers={"x-amzn-ErrorType": "SignatureDoesNotMatch"},
    )
    ch = channel(Mock(answer), session_token=TOKEN)
    with pytest.raises(AdapterError) as caught:
        await ch.send(message())
    await ch.aclose()
    assert SECRET not in str(caught.value)
    assert TOKEN not in str(caught.value)


@pytest.mark.parametrize(
    ("config", "credentials", "key"),
    [
        ({"region": "eu-west-1"}, CREDENTIALS, "from"),
        ({"from": "a@acme.example"}, CREDENTIALS, "region"),
        ({**CONFIG, "region": "eu_west_1"}, CREDENTIALS, "region"),
        ({**CONFIG, "configuration_set": "has space"}, CREDENTIALS, "configuration_set"),
        (
            {**CONFIG, "sns_topic_arn": "arn:aws:sqs:eu-west-1:123456789012:q"},
            CREDENTIALS,
            "sns_topic_arn",
        ),
        ({**CONFIG, "timeout": 0}, CREDENTIALS, "timeout"),
        ({**CONFIG, "access_key_id": KEY_ID}, CREDENTIALS, "access_key_id"),
        (CONFIG, {"secret_access_key": SECRET}, "access_key_id"),
        (CONFIG, {**CREDENTIALS, "api_key": "x"}, "api_key"),
    ],
)
def test_config_and_credentials_are_checked(
    config: dict[str, Any], credentials: dict[str, Any], key: str
) -> None:
    with pytest.raises(ConfigError, match=key) as caught:
        registry.validate("email", "ses", config, credentials)
    assert SECRET not in str(caught.value)


def test_ses_serves_email_and_has_a_receiver() -> None:
    spec = registry.get("ses")
    assert spec.channels == frozenset({"email"})
    assert spec.identifier_keys == frozenset({"access_key_id"})
    adapter = make_adapter("ses", "email", CONFIG, CREDENTIALS)
    assert isinstance(registry.receiver(adapter, ReceiverContext()), SesReceiver)


# -- inbound: SNS messages ---------------------------------------------------------------

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
TOPIC = "arn:aws:sns:us-east-1:123456789012:ses-feedback"
CERT_URL = (
    "https://sns.us-east-1.amazonaws.com/"
    "SimpleNotificationService-6aad65c2f9911b05cd53efda11f913f9.pem"
)
ISSUER_URL = "http://crt.r2m01.amazontrust.com/r2m01.cer"
SES_MESSAGE_ID = "0100019311aa-bbbb-cccc-dddd-eeeeffff0000-000000"


class Pki:
    """A root, an intermediate and SNS signing certificates, made here."""

    def __init__(self) -> None:
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = self._ca("Test Root CA", self.root_key, None, None)
        self.inter_key = ec.generate_private_key(ec.SECP256R1())
        self.inter = self._ca("Test Issuing CA", self.inter_key, self.root, self.root_key)
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        # As SNS serves it: the leaf alone, issued by an intermediate named in its AIA.
        self.leaf = self.issue("sns.amazonaws.com")
        # Issued by the root directly (found without the AIA).
        self.direct = self.issue("sns.amazonaws.com", issuer=self.root, issuer_key=self.root_key)

    def _ca(
        self,
        name: str,
        key: ec.EllipticCurvePrivateKey,
        issuer: x509.Certificate | None,
        issuer_key: ec.EllipticCurvePrivateKey | None,
    ) -> x509.Certificate:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer.subject if issuer else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - timedelta(days=365))
            .not_valid_after(NOW + timedelta(days=3650))
            .add_extension(
                x509.BasicConstraints(ca=True, path_length=None if issuer is None else 0),
                critical=True,
            )
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
        )
        if issuer is not None and issuer_key is not None:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                critical=False,
            )
        return builder.sign(issuer_key or key, hashes.SHA256())

    def issue(
        self,
        name: str,
        *,
        issuer: x509.Certificate | None = None,
        issuer_key: ec.EllipticCurvePrivateKey | None = None,
        key: rsa.RSAPrivateKey | None = None,
        not_after: datetime | None = None,
    ) -> x509.Certificate:
        issuer = issuer or self.inter
        issuer_key = issuer_key or self.inter_key
        key = key or self.key
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(issuer.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - timedelta(days=30))
            .not_valid_after(not_after or NOW + timedelta(days=300))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                critical=False,
            )
            .add_extension(
                x509.AuthorityInformationAccess(
                    [
                        x509.AccessDescription(
                            AuthorityInformationAccessOID.CA_ISSUERS,
                            x509.UniformResourceIdentifier(ISSUER_URL),
                        )
                    ]
                ),
                critical=False,
            )
            .sign(issuer_key, hashes.SHA256())
        )


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class Aws:
    """The transport standing in for AWS: the signing certificate, the intermediate, and
    the subscription confirmation endpoint; records what was fetched."""

    def __init__(self, pki: Pki, leaf: x509.Certificate | None = None) -> None:
        self.files = {
            CERT_URL: pem(leaf or pki.leaf),
            ISSUER_URL: pki.inter.public_bytes(serialization.Encoding.DER),
        }
        self.mock = Mock(handler=self.answer)

    def answer(self, request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        if url in self.files:
            return httpx.Response(200, content=self.files[url])
        if url.startswith("https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription"):
            return httpx.Response(200, text="<ConfirmSubscriptionResponse/>")
        return httpx.Response(404)

    @property
    def fetched(self) -> list[str]:
        return [str(request.url) for request in self.mock.requests]


def receiver(
    aws: Aws, pki: Pki, *, topic: str | None = TOPIC, window: timedelta = timedelta(minutes=5)
) -> SesReceiver:
    config = {**CONFIG, **({"sns_topic_arn": topic} if topic else {})}
    adapter = make_adapter("ses", "email", config, CREDENTIALS)
    registry.validate("email", "ses", config, CREDENTIALS)
    context = ReceiverContext(replay_window=window, transport=aws.mock)
    return SesReceiver(adapter, context, trust=[pki.root])


# The fields SNS signs per message type, in order ("Verifying the signatures of Amazon SNS
# messages", AWS SNS developer guide).
NOTIFICATION_FIELDS = ["Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"]
CONFIRMATION_FIELDS = [
    "Message",
    "MessageId",
    "SubscribeURL",
    "Timestamp",
    "Token",
    "TopicArn",
    "Type",
]


def sign(doc: dict[str, Any], key: rsa.RSAPrivateKey) -> dict[str, Any]:
    fields = NOTIFICATION_FIELDS if doc["Type"] == "Notification" else CONFIRMATION_FIELDS
    text = "".join(f"{name}\n{doc[name]}\n" for name in fields if name in doc)
    # SignatureVersion 1 is SHA1withRSA: SNS's own choice, reproduced here.
    algorithm = hashes.SHA1() if doc["SignatureVersion"] == "1" else hashes.SHA256()  # noqa: S303
    signature = key.sign(text.encode(), padding.PKCS1v15(), algorithm)
    return {**doc, "Signature": base64.b64encode(signature).decode()}


def notification(
    pki: Pki,
    event: dict[str, Any],
    *,
    version: str = "1",
    key: rsa.RSAPrivateKey | None = None,
    **fields: Any,
) -> dict[str, Any]:
    doc = {
        "Type": "Notification",
        "MessageId": "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
        "TopicArn": TOPIC,
        "Message": json.dumps(event),
        "Timestamp": (NOW - timedelta(seconds=20)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
        "SignatureVersion": version,
        "SigningCertURL": CERT_URL,
        "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe&x=y",
        **fields,
    }
    return sign(doc, key or pki.key)


def confirmation(pki: Pki, kind: str = "SubscriptionConfirmation", **fields: Any) -> dict[str, Any]:
    token = "2336412f37fb687f5d51e6e241d09c805a5a57b30d712f794cc5f6a988666d92768dd60a747ba6f3"
    doc = {
        "Type": kind,
        "MessageId": "165545c9-2a5c-472c-8df2-7ff2be2b3b1b",
        "Token": token,
        "TopicArn": TOPIC,
        "Message": f"You have chosen to subscribe to the topic {TOPIC}.",
        "SubscribeURL": (
            "https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription"
            f"&TopicArn={TOPIC}&Token={token}"
        ),
        "Timestamp": "2026-11-30T11:59:30.000Z",
        "SignatureVersion": "2",
        "SigningCertURL": CERT_URL,
        **fields,
    }
    return sign(doc, pki.key)


def inbound(doc: dict[str, Any] | bytes, at: datetime = NOW) -> InboundRequest:
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return InboundRequest(
        url="https://dripd.acme.example/webhooks/ses/a1",
        headers={
            "content-type": "text/plain; charset=UTF-8",
            "x-amz-sns-message-type": "Notification",
        },
        body=body,
        received_at=at,
    )


def mail(**extra: Any) -> dict[str, Any]:
    return {
        "timestamp": "2026-11-30T11:58:00.000Z",
        "source": "news@acme.example",
        "sendingAccountId": "123456789012",
        "messageId": SES_MESSAGE_ID,
        "destination": ["ana@example.org"],
        "headersTruncated": False,
        "tags": {
            "ses:configuration-set": ["dripd-events"],
            "dripd_execution": [str(EXECUTION)],
        },
        **extra,
    }


def bounce(kind: str, *recipients: str, sub: str = "General") -> dict[str, Any]:
    return {
        "eventType": "Bounce",
        "bounce": {
            "bounceType": kind,
            "bounceSubType": sub,
            "bouncedRecipients": [
                {
                    "emailAddress": r,
                    "action": "failed",
                    "status": "5.1.1",
                    "diagnosticCode": "smtp; 550 5.1.1 user unknown",
                }
                for r in recipients
            ],
            "timestamp": "2026-11-30T11:59:00.000Z",
            "feedbackId": "0100019311aa-feedback",
            "reportingMTA": "dsn; a8-70.smtp-out.amazonses.com",
        },
        "mail": mail(),
    }


async def test_a_signed_permanent_bounce_is_accepted_and_mapped(pki: Pki) -> None:
    aws = Aws(pki)
    rx = receiver(aws, pki)
    events = await rx.receive(inbound(notification(pki, bounce("Permanent", "ana@example.org"))))
    await rx.aclose()

    [event] = events
    assert event.type == "bounced"
    assert event.permanent is True
    assert event.recipient == "ana@example.org"
    assert event.event_id == "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324"
    assert event.provider_message_id == SES_MESSAGE_ID
    assert event.execution_id == EXECUTION
    assert event.reason == "General"
    assert event.occurred_at == datetime(2026, 11, 30, 11, 59, tzinfo=UTC)
    assert event.data["status"] == "5.1.1"
    # The signing certificate, then its issuer from the AIA (SNS serves the leaf alone).
    assert aws.fetched == [CERT_URL, ISSUER_URL]


async def test_one_event_per_bounced_recipient(pki: Pki) -> None:
    aws = Aws(pki)
    rx = receiver(aws, pki)
    event = bounce("Transient", "ana@example.org", "bo@example.org", sub="MailboxFull")
    events = await rx.receive(inbound(notification(pki, event, version="2")))
    await rx.aclose()
    assert [(e.recipient, e.event_id, e.permanent) for e in events] == [
        ("ana@example.org", "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324:0", False),
        ("bo@example.org", "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324:1", False),
    ]
    assert {e.reason for e in events} == {"MailboxFull"}


async def test_an_undetermined_bounce_is_temporary(pki: Pki) -> None:
    rx = receiver(Aws(pki), pki)
    [event] = await rx.receive(
        inbound(notification(pki, bounce("Undetermined", "ana@example.org")))
    )
    await rx.aclose()
    assert (event.type, event.permanent) == ("bounced", False)


async def test_a_complaint_identity_notification(pki: Pki) -> None:
    # An identity's feedback notification says `notificationType`, not `eventType`.
    event = {
        "notificationType": "Complaint",
        "complaint": {
            "complainedRecipients": [{"emailAddress": "ana@example.org"}],
            "timestamp": "2026-11-30T11:59:10.000Z",
            "feedbackId": "0100019311aa-complaint",
            "complaintFeedbackType": "abuse",
        },
        "mail": mail(),
    }
    rx = receiver(Aws(pki), pki)
    [found] = await rx.receive(inbound(notification(pki, event, version="2")))
    await rx.aclose()
    assert (found.type, found.recipient, found.reason) == ("complained", "ana@example.org", "abuse")
    assert found.execution_id == EXECUTION


@pytest.mark.parametrize(
    ("event", "kind", "check"),
    [
        (
            {
                "eventType": "Delivery",
                "delivery": {
                    "timestamp": "2026-11-30T11:58:30.000Z",
                    "recipients": ["ana@example.org"],
                    "smtpResponse": "250 2.6.0 Message received",
                },
                "mail": mail(),
            },
            "delivered",
            lambda e: (
                e.recipient == "ana@example.org" and e.data["smtp_response"].startswith("250")
            ),
        ),
        (
            {
                "eventType": "Open",
                "open": {
                    "timestamp": "2026-11-30T11:59:40.000Z",
                    "ipAddress": "192.0.2.1",
                    "userAgent": "Mozilla/5.0",
                },
                "mail": mail(),
            },
            "opened",
            lambda e: (
                e.recipient == "ana@example.org"
                and e.occurred_at == datetime(2026, 11, 30, 11, 59, 40, tzinfo=UTC)
            ),
        ),
        (
            {
                "eventType": "Click",
                "click": {
                    "timestamp": "2026-11-30T11:59:41.000Z",
                    "link": "https://acme.example/pricing",
                    "ipAddress": "192.0.2.1",
                },
                "mail": mail(),
            },
            "clicked",
            lambda e: e.data == {"url": "https://acme.example/pricing"},
        ),
        (
            {
                "eventType": "DeliveryDelay",
                "deliveryDelay": {
                    "delayType": "MailboxFull",
                    "delayedRecipients": [{"emailAddress": "ana@example.org", "status": "4.2.2"}],
                    "timestamp": "2026-11-30T11:59:00.000Z",
                },
                "mail": mail(),
            },
            "deferred",
            lambda e: e.reason == "MailboxFull" and e.recipient == "ana@example.org",
        ),
        (
            {"eventType": "Reject", "reject": {"reason": "Bad content"}, "mail": mail()},
            "failed",
            lambda e: e.reason == "Bad content",
        ),
    ],
)
async def test_other_ses_events_map(
    pki: Pki, event: dict[str, Any], kind: str, check: Callable[[Any], bool]
) -> None:
    rx = receiver(Aws(pki), pki)
    [found] = await rx.receive(inbound(notification(pki, event)))
    await rx.aclose()
    assert found.type == kind
    assert found.provider_message_id == SES_MESSAGE_ID
    assert found.execution_id == EXECUTION
    assert check(found)


async def test_a_send_event_records_nothing(pki: Pki) -> None:
    rx = receiver(Aws(pki), pki)
    found = await rx.receive(
        inbound(notification(pki, {"eventType": "Send", "send": {}, "mail": mail()}))
    )
    await rx.aclose()
    assert found == []


async def test_an_event_without_our_tag_correlates_by_message_id(pki: Pki) -> None:
    event = bounce("Permanent", "ana@example.org")
    event["mail"]["tags"] = {"dripd_execution": ["not-a-uuid"]}
    rx = receiver(Aws(pki), pki)
    [found] = await rx.receive(inbound(notification(pki, event)))
    await rx.aclose()
    assert found.execution_id is None
    assert found.provider_message_id == SES_MESSAGE_ID


async def test_the_subject_is_signed_when_present(pki: Pki) -> None:
    rx = receiver(Aws(pki), pki)
    doc = notification(
        pki, bounce("Permanent", "ana@example.org"), Subject="Amazon SES Email Event Notification"
    )
    assert len(await rx.receive(inbound(doc))) == 1
    with pytest.raises(Unverified, match="signature"):
        await rx.receive(inbound({**doc, "Subject": "Something else"}))
    await rx.aclose()


async def test_the_signing_certificate_is_fetched_once(pki: Pki) -> None:
    aws = Aws(pki)
    rx = receiver(aws, pki)
    for _ in range(3):
        await rx.receive(inbound(notification(pki, bounce("Permanent", "ana@example.org"))))
    await rx.aclose()
    assert aws.fetched == [CERT_URL, ISSUER_URL]


async def test_a_certificate_issued_by_a_trusted_root_needs_no_intermediate(pki: Pki) -> None:
    aws = Aws(pki, leaf=pki.direct)
    rx = receiver(aws, pki)
    assert (
        len(await rx.receive(inbound(notification(pki, bounce("Permanent", "a@example.org"))))) == 1
    )
    await rx.aclose()
    assert aws.fetched == [CERT_URL]


async def test_a_regional_certificate_name_is_accepted(pki: Pki) -> None:
    aws = Aws(pki, leaf=pki.issue("sns.us-east-1.amazonaws.com"))
    rx = receiver(aws, pki)
    assert (
        len(await rx.receive(inbound(notification(pki, bounce("Permanent", "a@example.org"))))) == 1
    )
    await rx.aclose()


async def test_a_subscription_to_the_topic_is_confirmed(pki: Pki) -> None:
    aws = Aws(pki)
    rx = receiver(aws, pki)
    doc = confirmation(pki)
    assert await rx.receive(inbound(doc)) == []
    await rx.aclose()
    confirm = aws.mock.last
    assert confirm.method == "GET"
    assert str(confirm.url) == doc["SubscribeURL"]


async def test_an_unsubscribe_confirmation_records_and_fetches_nothing_more(pki: Pki) -> None:
    aws = Aws(pki)
    rx = receiver(aws, pki)
    assert await rx.receive(inbound(confirmation(pki, "UnsubscribeConfirmation"))) == []
    await rx.aclose()
    assert "ConfirmSubscription" not in " ".join(aws.fetched)


async def test_a_subscribe_url_off_the_topics_sns_host_is_not_followed(pki: Pki) -> None:
    aws = Aws(pki)
    rx = receiver(aws, pki)
    doc = confirmation(pki, SubscribeURL="https://evil.example/?Action=ConfirmSubscription")
    assert await rx.receive(inbound(doc)) == []
    doc = confirmation(
        pki, SubscribeURL="http://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription"
    )
    assert await rx.receive(inbound(doc)) == []
    await rx.aclose()
    assert all(urlsplit(url).path.endswith((".pem", ".cer")) for url in aws.fetched)


async def test_a_subscription_to_another_topic_is_refused(pki: Pki) -> None:
    aws = Aws(pki)
    rx = receiver(aws, pki)
    other = "arn:aws:sns:us-east-1:123456789012:someone-else"
    with pytest.raises(Unverified, match="sns_topic_arn"):
        await rx.receive(inbound(confirmation(pki, TopicArn=other)))
    await rx.aclose()
    assert aws.fetched == []


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"Message": json.dumps(bounce("Permanent", "bo@example.org"))}, "signature"),
        ({"MessageId": "another"}, "signature"),
        ({"Signature": base64.b64encode(b"\x00" * 256).decode()}, "signature"),
        ({"Signature": "not base64!"}, "base64"),
        ({"SignatureVersion": "3"}, "SignatureVersion"),
        ({"TopicArn": "arn:aws:sns:us-east-1:123456789012:other"}, "sns_topic_arn"),
        ({"Timestamp": "2026-11-30T11:50:00.000Z"}, "replay window"),
        ({"Timestamp": "2026-11-30T12:10:00.000Z"}, "replay window"),
        ({"Timestamp": "yesterday"}, "Timestamp"),
        ({"Timestamp": None}, "Timestamp"),
        ({"SigningCertURL": CERT_URL.replace("https:", "http:")}, "SigningCertURL"),
        (
            {"SigningCertURL": "https://evil.example/SimpleNotificationService-1.pem"},
            "SigningCertURL",
        ),
        (
            {"SigningCertURL": "https://sns.us-east-1.amazonaws.com.evil.example/x.pem"},
            "SigningCertURL",
        ),
        ({"SigningCertURL": "https://sns.us-east-1.amazonaws.com/cert.txt"}, "SigningCertURL"),
        ({"SigningCertURL": "https://sns.us-east-1.amazonaws.com:8443/x.pem"}, "SigningCertURL"),
        ({"Type": "Announcement"}, "type"),
    ],
)
async def test_a_forged_or_stale_message_is_unverified(
    pki: Pki, change: dict[str, Any], reason: str
) -> None:
    aws = Aws(pki)
    rx = receiver(aws, pki)
    doc = {**notification(pki, bounce("Permanent", "ana@example.org")), **change}
    with pytest.raises(Unverified, match=reason):
        await rx.receive(inbound(doc))
    await rx.aclose()


async def test_a_signature_by_another_key_is_unverified(pki: Pki) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rx = receiver(Aws(pki), pki)
    with pytest.raises(Unverified, match="signature"):
        await rx.receive(
            inbound(notification(pki, bounce("Permanent", "a@example.org"), key=other))
        )
    await rx.aclose()


async def test_a_replayed_message_is_unverified_after_the_window(pki: Pki) -> None:
    rx = receiver(Aws(pki), pki)
    doc = notification(pki, bounce("Permanent", "ana@example.org"))
    assert len(await rx.receive(inbound(doc))) == 1
    with pytest.raises(Unverified, match="replay window"):
        await rx.receive(inbound(doc, at=NOW + timedelta(minutes=6)))
    await rx.aclose()


@pytest.mark.parametrize(
    "which",
    ["self-signed", "wrong name", "expired", "untrusted issuer"],
)
async def test_an_untrusted_signing_certificate_is_unverified(pki: Pki, which: str) -> None:
    if which == "self-signed":
        leaf = pki.issue(
            "sns.amazonaws.com", issuer=pki.root, issuer_key=ec.generate_private_key(ec.SECP256R1())
        )
    elif which == "wrong name":
        leaf = pki.issue("evil.example")
    elif which == "expired":
        leaf = pki.issue("sns.amazonaws.com", not_after=NOW - timedelta(days=1))
    else:
        stranger = Pki()
        leaf = stranger.issue(
            "sns.amazonaws.com", issuer=stranger.root, issuer_key=stranger.root_key, key=pki.key
        )
    rx = receiver(Aws(pki, leaf=leaf), pki)
    with pytest.raises(Unverified, match="not trusted"):
        await rx.receive(inbound(notification(pki, bounce("Permanent", "a@example.org"))))
    await rx.aclose()


async def test_an_unreachable_certificate_is_unverified(pki: Pki) -> None:
    aws = Aws(pki)
    del aws.files[CERT_URL]
    rx = receiver(aws, pki)
    with pytest.raises(Unverified, match="HTTP 404"):
        await rx.receive(inbound(notification(pki, bounce("Permanent", "a@example.org"))))
    await rx.aclose()


async def test_a_huge_certificate_answer_is_not_read(pki: Pki) -> None:
    huge = Endless(256 * 1024 * 1024)
    aws = Aws(pki)
    aws.mock = Mock(handler=lambda request: httpx.Response(200, stream=huge))
    rx = receiver(aws, pki)
    with pytest.raises(Unverified, match="larger than"):
        await rx.receive(inbound(notification(pki, bounce("Permanent", "a@example.org"))))
    await rx.aclose()
    assert huge.sent <= MAX_CERT_BYTES + huge.chunk


async def test_without_a_topic_nothing_is_accepted(pki: Pki) -> None:
    aws = Aws(pki)
    rx = receiver(aws, pki, topic=None)
    with pytest.raises(Unverified, match="sns_topic_arn"):
        await rx.receive(inbound(notification(pki, bounce("Permanent", "a@example.org"))))
    await rx.aclose()
    assert aws.fetched == []


@pytest.mark.parametrize("body", [b"", b"not json", b"[]", b'{"Type": 5}'])
async def test_a_body_that_is_not_an_sns_message_is_unverified(pki: Pki, body: bytes) -> None:
    rx = receiver(Aws(pki), pki)
    with pytest.raises(Unverified):
        await rx.receive(inbound(body))
    await rx.aclose()


async def test_a_verified_message_that_is_not_an_ses_event_is_a_bad_payload(pki: Pki) -> None:
    rx = receiver(Aws(pki), pki)
    doc = notification(pki, {})
    doc = sign({**doc, "Message": "plain text, not JSON"}, pki.key)
    with pytest.raises(BadPayload):
        await rx.receive(inbound(doc))
    await rx.aclose()
