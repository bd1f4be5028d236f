"""AWS Signature Version 4 as dripd signs SES and SNS requests (dripd.channels.aws.SigV4):
the reference vectors of providers.md §4 and §5 (botocore's signer at a fixed clock), a
signature computed here independently from AWS's documented algorithm, and a fresh
signature for every request sent."""

from __future__ import annotations

import hashlib
import hmac
import re
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import botocore.auth
import httpx
import pytest
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from httpmock import Answer, Mock

from dripd.channels.aws import AwsCredentials, SigV4
from dripd.clock import ManualClock

KEY_ID = "AKIDEXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
AT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
SES_URL = "https://email.eu-west-1.amazonaws.com/v2/email/outbound-emails"
SES_BODY = (
    b'{"FromEmailAddress":"a@example.com","Destination":{"ToAddresses":["b@example.org"]},'
    b'"Content":{"Raw":{"Data":"RnJvbTogYUBleGFtcGxlLmNvbQ0KVG86IGJAZXhhbXBsZS5vcmcNClN1Ymp'
    b'lY3Q6IGhpDQoNCmJvZHk="}}}'
)
SNS_URL = "https://sns.eu-west-1.amazonaws.com/"
SNS_BODY = b"Action=Publish&Version=2010-03-31&PhoneNumber=%2B15555550100&Message=Hi+there"
FORM = "application/x-www-form-urlencoded; charset=utf-8"


def independent_signature(
    request: httpx.Request, *, secret: str, region: str, service: str, signed: list[str]
) -> str:
    """The SigV4 signature of `request` over the headers `signed`, computed from AWS's
    documented steps (canonical request, string to sign, derived key) with hashlib/hmac."""
    amz_date = request.headers["x-amz-date"]
    parts = urlsplit(str(request.url))
    canonical = "\n".join(
        [
            request.method,
            parts.path or "/",
            parts.query,
            "".join(f"{name}:{' '.join(request.headers[name].split())}\n" for name in signed),
            ";".join(signed),
            hashlib.sha256(request.content).hexdigest(),
        ]
    )
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = f"AWS4{secret}".encode()
    for part in (amz_date[:8], region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def check_signed(
    request: httpx.Request,
    *,
    key_id: str,
    secret: str,
    region: str,
    service: str,
    token: str | None = None,
) -> None:
    """Assert that `request` carries a valid SigV4 Authorization for these credentials,
    signing exactly content-type, host, x-amz-date (and x-amz-security-token)."""
    match = re.fullmatch(
        r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, "
        r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})",
        request.headers["authorization"],
    )
    assert match is not None, request.headers["authorization"]
    assert match[1] == key_id
    assert match[2] == request.headers["x-amz-date"][:8]
    assert re.fullmatch(r"\d{8}T\d{6}Z", request.headers["x-amz-date"])
    assert (match[3], match[4]) == (region, service)
    signed = ["content-type", "host", "x-amz-date"] + (["x-amz-security-token"] if token else [])
    assert match[5] == ";".join(signed)
    if token:
        assert request.headers["x-amz-security-token"] == token
    else:
        assert "x-amz-security-token" not in request.headers
    expected = independent_signature(
        request, secret=secret, region=region, service=service, signed=signed
    )
    assert match[6] == expected


async def signed(
    url: str,
    body: bytes,
    content_type: str,
    *,
    service: str,
    region: str = "eu-west-1",
    token: str | None = None,
    clock: ManualClock | None = None,
) -> httpx.Request:
    """The request as it reaches the transport through an httpx client with SigV4."""
    mock = Mock(Answer(200))
    auth = SigV4(
        AwsCredentials(access_key_id=KEY_ID, secret_access_key=SECRET, session_token=token),
        service=service,
        region=region,
        clock=clock or ManualClock(AT),
    )
    async with httpx.AsyncClient(transport=mock, auth=auth) as client:
        await client.post(url, content=body, headers={"Content-Type": content_type})
    return mock.last


async def test_the_ses_reference_vector() -> None:
    request = await signed(SES_URL, SES_BODY, "application/json", service="ses")
    assert request.headers["x-amz-date"] == "20260102T030405Z"
    assert request.headers["authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20260102/eu-west-1/ses/aws4_request, "
        "SignedHeaders=content-type;host;x-amz-date, "
        "Signature=b2e294119642605931c6178a96865b07fac96267da1fcccc0d1e10527fc8a40b"
    )
    assert request.content == SES_BODY


@pytest.mark.parametrize(
    ("token", "headers", "signature"),
    [
        (
            None,
            "content-type;host;x-amz-date",
            "f58a7b864519636bf55b5f8347b521f14000a039e73e0fbcede782ffe5fee324",
        ),
        (
            "SESSIONTOKEN",
            "content-type;host;x-amz-date;x-amz-security-token",
            "47e7f85c36bc195a8a1a5db780bd4293f3d624322e68c47fb44aa4d163bc973b",
        ),
    ],
)
async def test_the_sns_reference_vectors(token: str | None, headers: str, signature: str) -> None:
    request = await signed(SNS_URL, SNS_BODY, FORM, service="sns", token=token)
    assert request.headers["authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20260102/eu-west-1/sns/aws4_request, "
        f"SignedHeaders={headers}, Signature={signature}"
    )
    if token:
        assert request.headers["x-amz-security-token"] == token


@pytest.mark.parametrize("token", [None, "FwoGZXIvYXdzEXAMPLETOKEN"])
async def test_an_independent_signature_agrees(token: str | None) -> None:
    # Another region, a host with a port, a path prefix (a `base_url` for tests).
    request = await signed(
        "http://127.0.0.1:8443/stub/v2/email/outbound-emails",
        SES_BODY,
        "application/json",
        service="ses",
        region="us-east-1",
        token=token,
    )
    assert request.headers["host"] == "127.0.0.1:8443"
    check_signed(
        request, key_id=KEY_ID, secret=SECRET, region="us-east-1", service="ses", token=token
    )


async def test_the_signature_is_botocores_own(monkeypatch: pytest.MonkeyPatch) -> None:
    # botocore's SigV4Auth.add_auth, reading its patched wall clock, signs the same bytes
    # to the same headers: dripd's clocked signer follows botocore's steps exactly.
    request = await signed(SNS_URL, SNS_BODY, FORM, service="sns", token="T0KEN")
    stock = AWSRequest(method="POST", url=SNS_URL, data=SNS_BODY, headers={"Content-Type": FORM})
    monkeypatch.setattr(
        botocore.auth, "get_current_datetime", lambda *a, **k: AT.replace(tzinfo=None)
    )
    botocore.auth.SigV4Auth(Credentials(KEY_ID, SECRET, "T0KEN"), "sns", "eu-west-1").add_auth(
        stock
    )
    assert request.headers["authorization"] == stock.headers["Authorization"]
    assert request.headers["x-amz-date"] == stock.headers["X-Amz-Date"]


async def test_every_request_is_signed_at_its_own_time() -> None:
    clock = ManualClock(AT)
    mock = Mock(Answer(503), Answer(200))
    auth = SigV4(
        AwsCredentials(access_key_id=KEY_ID, secret_access_key=SECRET),
        service="sns",
        region="eu-west-1",
        clock=clock,
    )
    async with httpx.AsyncClient(transport=mock, auth=auth) as client:
        await client.post(SNS_URL, content=SNS_BODY, headers={"Content-Type": FORM})
        clock.advance(timedelta(minutes=20))
        await client.post(SNS_URL, content=SNS_BODY, headers={"Content-Type": FORM})
    first, second = mock.requests
    assert first.headers["x-amz-date"] == "20260102T030405Z"
    assert second.headers["x-amz-date"] == "20260102T032405Z"
    assert first.headers["authorization"] != second.headers["authorization"]
    for request in mock.requests:
        check_signed(request, key_id=KEY_ID, secret=SECRET, region="eu-west-1", service="sns")


def test_no_secret_in_reprs() -> None:
    credentials = AwsCredentials(access_key_id=KEY_ID, secret_access_key=SECRET, session_token="S")
    auth = SigV4(credentials, service="ses", region="eu-west-1")
    assert SECRET not in repr(credentials)
    assert "session_token='S'" not in repr(credentials)
    assert SECRET not in repr(auth)
