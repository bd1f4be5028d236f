"""What the AWS providers (`ses`, `sns`) share: their credentials, the region, the AWS error
codes that mean the account must be fixed, Signature Version 4 by botocore's signer, and
the verification of the messages an SNS topic posts to dripd's webhook.

Requests are signed with botocore's `SigV4Auth` (AWS's own implementation of "Signature
Version 4 signing process", docs.aws.amazon.com/IAM/latest/UserGuide/reference_sigv.html)
inside httpx's auth flow, so every request, a retried one too, is signed when it is sent,
with the date of that moment.

SNS messages are verified as "Verifying the signatures of Amazon SNS messages"
(docs.aws.amazon.com/sns/latest/dg/sns-verify-signature-of-message.html) says, and more:
the topic must be the configured one, the timestamp within the replay window, the signing
certificate served over https by an `sns.<region>.amazonaws.com` host, and that
certificate must chain to a trusted root for the name `sns.amazonaws.com` (or the host).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import re
import warnings
from collections import OrderedDict
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final
from urllib.parse import urlsplit

import certifi
import httpx
import structlog
from botocore.auth import SIGV4_TIMESTAMP, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import AuthorityInformationAccessOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from dripd.channels.feedback import Unverified, check_window, iso_time
from dripd.channels.http import MAX_ERROR_BYTES, clip, config_str, credential_str, read_capped
from dripd.clock import Clock, SystemClock
from dripd.errors import ConfigError

__all__ = [
    "ACCOUNT_ERROR_CODES",
    "CREDENTIAL_KEYS",
    "IDENTIFIER_KEYS",
    "REQUIRED_CREDENTIALS",
    "THROTTLING_CODES",
    "AwsCredentials",
    "SigV4",
    "SnsMessage",
    "SnsVerifier",
    "TopicArn",
    "check_region",
    "check_topic_arn",
    "default_trust",
    "parse_timestamp",
]

log = structlog.get_logger("dripd.channels")

#: The credential keys of every AWS provider: an IAM access key, and the session token of
#: temporary credentials (STS).
CREDENTIAL_KEYS: Final = frozenset({"access_key_id", "secret_access_key", "session_token"})
REQUIRED_CREDENTIALS: Final = frozenset({"access_key_id", "secret_access_key"})
#: The access key id names an account's key; it is not itself a secret.
IDENTIFIER_KEYS: Final = frozenset({"access_key_id"})

# us-east-1, eu-west-1, us-gov-west-1, cn-north-1, ap-southeast-2 …
_REGION = re.compile(r"[a-z]{2}(?:-[a-z]+)+-\d{1,2}")

#: Error codes botocore's standard retry mode counts as throttling
#: (botocore/retries/standard.py, botocore/data/_retry.json): retry later.
THROTTLING_CODES: Final = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "TransactionInProgressException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "LimitExceededException",
        "RequestThrottled",
        "SlowDown",
        "PriorRequestNotComplete",
        "EC2ThrottledException",
    }
)

#: Error codes that refuse the credentials or the signature (every AWS API): nothing goes
#: out until an operator fixes the key, its policy or the host's clock.
ACCOUNT_ERROR_CODES: Final = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "AuthorizationError",
        "ExpiredToken",
        "ExpiredTokenException",
        "IncompleteSignature",
        "InvalidAccessKeyId",
        "InvalidClientTokenId",
        "InvalidSecurity",
        "InvalidSignatureException",
        "MissingAuthenticationToken",
        "NotAuthorized",
        "OptInRequired",
        "RequestExpired",
        "SignatureDoesNotMatch",
        "UnrecognizedClientException",
    }
)


def check_region(config: Mapping[str, Any], provider: str) -> str:
    """The adapter config `region` (an AWS region name like `eu-west-1`); ConfigError
    naming the key when it is missing or not shaped like one."""
    region = config_str(config, "region", required=True, max_length=40) or ""
    if not _REGION.fullmatch(region):
        raise ConfigError(
            f"{provider} adapter config `region` {region!r} is not an AWS region name "
            "like eu-west-1"
        )
    return region


@dataclass(frozen=True, slots=True, kw_only=True)
class AwsCredentials:
    """An adapter's AWS access key: credentials `access_key_id`, `secret_access_key` and,
    for temporary credentials, `session_token`."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, credentials: Mapping[str, Any]) -> AwsCredentials:
        """Read the credentials map; ConfigError names the key, never the value."""
        return cls(
            access_key_id=credential_str(credentials, "access_key_id", required=True) or "",
            secret_access_key=(
                credential_str(credentials, "secret_access_key", required=True) or ""
            ),
            session_token=credential_str(credentials, "session_token"),
        )


class _ClockedSigV4Auth(SigV4Auth):  # type: ignore[misc]  # botocore ships no type hints
    """botocore's SigV4 signer, reading the signing time from a dripd clock.

    `SigV4Auth.add_auth` reads the wall clock itself; this is the same sequence of
    botocore's own steps with the timestamp taken from `clock`, so tests reproduce AWS's
    signatures exactly and the daemon signs with the time it runs on.
    """

    def __init__(self, credentials: Credentials, service: str, region: str, clock: Clock):
        super().__init__(credentials, service, region)
        self._clock = clock

    def add_auth(self, request: AWSRequest) -> None:
        now = self._clock.now().astimezone(UTC).replace(tzinfo=None)
        request.context["timestamp"] = now.strftime(SIGV4_TIMESTAMP)
        self._modify_request_before_signing(request)
        canonical = self.canonical_request(request)
        string_to_sign = self.string_to_sign(request, canonical)
        self._inject_signature_to_request(request, self.signature(string_to_sign, request))


class SigV4(httpx.Auth):
    """httpx authentication that signs each request with AWS Signature Version 4 for
    `service` (the signing name: `ses` for SES v2, `sns`) in `region`.

    The signed headers are `host`, `content-type` (when the request has a body type),
    `x-amz-date`, and `x-amz-security-token` with a session token: the headers botocore's
    own clients sign. `Authorization`, `X-Amz-Date` and `X-Amz-Security-Token` are set on
    the request; the body is hashed whole (`requires_request_body`).
    """

    requires_request_body = True

    def __init__(
        self,
        credentials: AwsCredentials,
        *,
        service: str,
        region: str,
        clock: Clock | None = None,
    ) -> None:
        self._where = f"{service}, {region}"
        self._signer = _ClockedSigV4Auth(
            Credentials(
                credentials.access_key_id,
                credentials.secret_access_key,
                credentials.session_token,
            ),
            service,
            region,
            clock or SystemClock(),
        )

    def __repr__(self) -> str:
        return f"SigV4({self._where})"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        self.sign(request)
        yield request

    def sign(self, request: httpx.Request) -> None:
        """Set the SigV4 headers on `request` (its body already read), dated now."""
        headers = {"Host": request.headers["host"]}
        if content_type := request.headers.get("content-type"):
            headers["Content-Type"] = content_type
        signed = AWSRequest(
            method=request.method,
            url=str(request.url),
            data=request.content,
            headers=headers,
        )
        self._signer.add_auth(signed)
        for name in ("X-Amz-Date", "X-Amz-Security-Token", "Authorization"):
            value = signed.headers.get(name)
            if value is not None:
                request.headers[name] = value


# --- SNS messages in -----------------------------------------------------------------------

#: Hosts that serve SNS signing certificates and subscription confirmations.
_SNS_HOST = re.compile(r"sns\.[a-z0-9-]+\.amazonaws\.com(?:\.cn)?")
#: Hosts that serve the Amazon Trust Services intermediates a signing certificate names in
#: its Authority Information Access (SNS serves the leaf alone).
_ISSUER_HOST = re.compile(r"(?:[a-z0-9-]+\.)*amazontrust\.com")
_TOPIC_ARN = re.compile(
    r"arn:(aws[a-z-]*):sns:([a-z]{2}(?:-[a-z]+)+-\d{1,2}):(\d{12}):([A-Za-z0-9_-]{1,256})"
)
#: The name the SNS signing certificates are issued to (the regional host is accepted too).
SNS_CERT_NAME: Final = "sns.amazonaws.com"
#: The largest certificate file dripd reads.
MAX_CERT_BYTES: Final = 64 * 1024
#: Certificates (signing and intermediate) kept, by URL: SNS signs with few at a time.
CERT_CACHE_SIZE: Final = 32
#: Seconds one fetch (a certificate, a subscription confirmation) may take in all.
FETCH_TIMEOUT: Final = 10.0

# The fields each message type signs, in the order of the string to sign.
_CONFIRMATION_FIELDS: Final = (
    "Message",
    "MessageId",
    "SubscribeURL",
    "Timestamp",
    "Token",
    "TopicArn",
    "Type",
)
_SIGNED_FIELDS: Final = {
    "Notification": ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    "SubscriptionConfirmation": _CONFIRMATION_FIELDS,
    "UnsubscribeConfirmation": _CONFIRMATION_FIELDS,
}
_OPTIONAL_FIELDS: Final = frozenset({"Subject"})
_HASHES: Final = {"1": hashes.SHA1, "2": hashes.SHA256}


@dataclass(frozen=True, slots=True, kw_only=True)
class TopicArn:
    """An SNS topic's ARN, `arn:<partition>:sns:<region>:<account>:<name>`."""

    text: str
    partition: str
    region: str

    @classmethod
    def parse(cls, text: str) -> TopicArn | None:
        match = _TOPIC_ARN.fullmatch(text)
        if match is None:
            return None
        return cls(text=text, partition=match[1], region=match[2])

    @property
    def sns_host(self) -> str:
        """The SNS endpoint host of the topic's region (where its confirmations point)."""
        suffix = ".amazonaws.com.cn" if self.partition == "aws-cn" else ".amazonaws.com"
        return f"sns.{self.region}{suffix}"


def check_topic_arn(config: Mapping[str, Any], provider: str) -> TopicArn | None:
    """The adapter config `sns_topic_arn` (None when absent); ConfigError naming the key
    when it is not a topic ARN."""
    text = config_str(config, "sns_topic_arn", max_length=400)
    if text is None:
        return None
    topic = TopicArn.parse(text)
    if topic is None:
        raise ConfigError(
            f"{provider} adapter config `sns_topic_arn` {text!r} is not an SNS topic ARN "
            "like arn:aws:sns:eu-west-1:123456789012:ses-feedback"
        )
    return topic


@functools.cache
def default_trust() -> tuple[x509.Certificate, ...]:
    """The root certificates SNS signing certificates are checked against: certifi's
    bundle (Mozilla's roots, the bundle httpx trusts). Certificates that cryptography
    cannot read are left out."""
    with open(certifi.where(), "rb") as file:
        text = file.read()
    roots = []
    for block in re.findall(
        rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", text, re.S
    ):
        with warnings.catch_warnings():
            # A few old roots carry a non-positive serial number: readable, but warned about.
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            try:
                roots.append(x509.load_pem_x509_certificate(block))
            except ValueError:
                continue
    return tuple(roots)


@dataclass(frozen=True, slots=True, kw_only=True)
class SnsMessage:
    """A verified SNS message (the fields of "HTTP/HTTPS notification JSON format")."""

    type: str
    message_id: str
    topic_arn: str
    message: str
    timestamp: datetime
    subject: str | None = None
    subscribe_url: str | None = field(default=None, repr=False)  # holds the token


class SnsVerifier:
    """Verifies the messages one SNS topic posts to an HTTP(S) subscription.

    `topic`: the only topic accepted (None: every message is refused). `client`: the
    HTTP client that fetches signing certificates and confirms subscriptions (the caller
    closes it). `trust`: the root certificates (default: `default_trust()`).
    """

    def __init__(
        self,
        *,
        topic: TopicArn | None,
        replay_window: timedelta,
        client: httpx.AsyncClient,
        trust: Sequence[x509.Certificate] | None = None,
    ) -> None:
        roots = list(default_trust() if trust is None else trust)
        self._topic = topic
        self._window = replay_window
        self._client = client
        self._store = Store(roots)
        self._root_subjects = {root.subject for root in roots}
        self._certs: OrderedDict[str, tuple[x509.Certificate, ...]] = OrderedDict()

    async def verify(self, body: bytes, received_at: datetime) -> SnsMessage:
        """The message in `body` once proven SNS's, for the configured topic, signed within
        the replay window of `received_at`; Unverified (saying why) otherwise."""
        if self._topic is None:
            raise Unverified("the adapter has no `sns_topic_arn`: SNS messages are refused")
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise Unverified("the body is not an SNS message (not JSON)") from None
        if not isinstance(doc, dict):
            raise Unverified("the body is not an SNS message (not a JSON object)")
        kind = doc.get("Type")
        if not isinstance(kind, str) or kind not in _SIGNED_FIELDS:
            raise Unverified("the body is not an SNS message of a known type")
        signed = _SIGNED_FIELDS[kind]
        if doc.get("TopicArn") != self._topic.text:
            raise Unverified("the SNS message is not from the adapter's `sns_topic_arn`")
        timestamp = parse_timestamp(doc.get("Timestamp"))
        if timestamp is None:
            raise Unverified("the SNS message has no readable Timestamp")
        check_window(timestamp, received_at, self._window, "SNS message")
        version = doc.get("SignatureVersion")
        algorithm = _HASHES.get(version) if isinstance(version, str) else None
        if algorithm is None:
            raise Unverified("the SNS message's SignatureVersion is not 1 or 2")
        signature = _base64(doc.get("Signature"))
        canonical = _string_to_sign(doc, signed)
        cert_url = doc.get("SigningCertURL")
        host = _check_cert_url(cert_url)
        leaf = await self._certificate(str(cert_url), host, received_at)
        key = leaf.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise Unverified("the SNS signing certificate does not hold an RSA key")
        try:
            key.verify(signature, canonical, padding.PKCS1v15(), algorithm())
        except InvalidSignature:
            raise Unverified("the SNS message signature does not verify") from None
        subject = doc.get("Subject")
        subscribe_url = doc.get("SubscribeURL")
        return SnsMessage(
            type=kind,
            message_id=doc["MessageId"],
            topic_arn=self._topic.text,
            message=doc["Message"],
            timestamp=timestamp,
            subject=subject if isinstance(subject, str) else None,
            subscribe_url=subscribe_url if isinstance(subscribe_url, str) else None,
        )

    async def confirm(self, message: SnsMessage) -> bool:
        """Confirm the subscription `message` (a verified SubscriptionConfirmation) asks
        for, by a GET of its SubscribeURL when that is https on the topic region's SNS
        host. False (logged; the URL is not: it holds the token) when it was not done."""
        assert self._topic is not None  # verify() refused every message otherwise
        url = message.subscribe_url or ""
        parts = urlsplit(url)
        if (
            parts.scheme != "https"
            or parts.hostname != self._topic.sns_host
            or parts.port not in (None, 443)
            or parts.username is not None
        ):
            log.warning(
                "SNS subscription not confirmed: SubscribeURL is not https on the topic's host",
                topic=message.topic_arn,
                host=parts.hostname,
            )
            return False
        try:
            response, _ = await self._get(url, MAX_ERROR_BYTES)
        except (httpx.HTTPError, TimeoutError) as exc:
            log.warning(
                "SNS subscription not confirmed", topic=message.topic_arn, error=type(exc).__name__
            )
            return False
        if response.status_code != 200:
            log.warning(
                "SNS subscription not confirmed",
                topic=message.topic_arn,
                status=response.status_code,
            )
            return False
        log.info("SNS subscription confirmed", topic=message.topic_arn)
        return True

    async def _certificate(self, url: str, host: str, when: datetime) -> x509.Certificate:
        """The signing certificate at `url`, verified at `when` (Unverified otherwise)."""
        certs = await self._fetch_certificates(url, what="the SNS signing certificate")
        leaf, extra = certs[0], list(certs[1:])
        if leaf.issuer not in self._root_subjects and all(
            cert.subject != leaf.issuer for cert in extra
        ):
            extra.extend(await self._issuers(leaf))
        names = list(dict.fromkeys((SNS_CERT_NAME, host)))
        error: VerificationError | None = None
        for name in names:
            verifier = (
                PolicyBuilder()
                .store(self._store)
                .time(when)
                .build_server_verifier(x509.DNSName(name))
            )
            try:
                verifier.verify(leaf, extra)
            except VerificationError as exc:
                error = exc
                continue
            break
        else:
            raise Unverified(
                f"the SNS signing certificate from {host} is not trusted for {SNS_CERT_NAME}: "
                f"{clip(str(error), 200)}"
            )
        common_names = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if common_names and common_names[0].value not in names:
            raise Unverified(f"the SNS signing certificate is not issued to {SNS_CERT_NAME}")
        return leaf

    async def _issuers(self, leaf: x509.Certificate) -> list[x509.Certificate]:
        """The intermediates the leaf's Authority Information Access names on an Amazon
        Trust Services host (a chain check follows, so plain http is safe here)."""
        try:
            access = leaf.extensions.get_extension_for_class(x509.AuthorityInformationAccess)
        except x509.ExtensionNotFound:
            return []
        found: list[x509.Certificate] = []
        for description in access.value:
            location = description.access_location
            if description.access_method != AuthorityInformationAccessOID.CA_ISSUERS or not (
                isinstance(location, x509.UniformResourceIdentifier)
            ):
                continue
            parts = urlsplit(location.value)
            if parts.scheme in ("http", "https") and _ISSUER_HOST.fullmatch(parts.hostname or ""):
                found.extend(
                    await self._fetch_certificates(location.value, what="the issuer certificate")
                )
        return found

    async def _get(self, url: str, limit: int) -> tuple[httpx.Response, bool]:
        """GET `url` within FETCH_TIMEOUT in all: the answer, its body cut at `limit` bytes
        (the rest is never downloaded), and whether that is all of it."""
        async with asyncio.timeout(FETCH_TIMEOUT), self._client.stream("GET", url) as response:
            return await read_capped(response, limit)

    async def _fetch_certificates(self, url: str, *, what: str) -> tuple[x509.Certificate, ...]:
        """The certificates at `url` (PEM, or one DER), from the cache when fetched before."""
        cached = self._certs.get(url)
        if cached is not None:
            self._certs.move_to_end(url)
            return cached
        try:
            response, whole = await self._get(url, MAX_CERT_BYTES)
        except (httpx.HTTPError, TimeoutError) as exc:
            raise Unverified(f"cannot fetch {what}: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise Unverified(f"cannot fetch {what}: HTTP {response.status_code}")
        data = response.content
        if not whole:
            raise Unverified(f"{what} is larger than {MAX_CERT_BYTES} bytes")
        try:
            if b"-----BEGIN CERTIFICATE-----" in data:
                certs = tuple(x509.load_pem_x509_certificates(data))
            else:
                certs = (x509.load_der_x509_certificate(data),)
        except ValueError:
            raise Unverified(f"{what} is not a readable X.509 certificate") from None
        self._certs[url] = certs
        while len(self._certs) > CERT_CACHE_SIZE:
            self._certs.popitem(last=False)
        return certs


def _check_cert_url(url: object) -> str:
    """The host of a SigningCertURL that is https on an SNS host with a .pem path;
    Unverified otherwise."""
    if not isinstance(url, str):
        raise Unverified("the SNS message has no SigningCertURL")
    parts = urlsplit(url)
    host = parts.hostname or ""
    if (
        parts.scheme != "https"
        or not _SNS_HOST.fullmatch(host)
        or parts.port not in (None, 443)
        or parts.username is not None
        or not parts.path.endswith(".pem")
    ):
        raise Unverified("the SNS SigningCertURL is not an https .pem URL on an SNS host")
    return host


def _string_to_sign(doc: Mapping[str, Any], signed: Sequence[str]) -> bytes:
    """The string SNS signs: `<name>` LF `<value>` LF for each signed field, in order
    (Subject only when the message has one); Unverified when a required one is missing."""
    lines: list[str] = []
    for name in signed:
        value = doc.get(name)
        if value is None and name in _OPTIONAL_FIELDS:
            continue
        if not isinstance(value, str):
            raise Unverified(f"the SNS message has no {name}")
        lines.append(f"{name}\n{value}\n")
    return "".join(lines).encode()


def _base64(value: object) -> bytes:
    if not isinstance(value, str):
        raise Unverified("the SNS message has no Signature")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise Unverified("the SNS message's Signature is not base64") from None


def parse_timestamp(value: object) -> datetime | None:
    """An SNS/SES ISO 8601 time (`2026-01-02T03:04:05.678Z`) as aware UTC, or None."""
    if not isinstance(value, str) or len(value) > 40:
        return None
    when = iso_time(value, naive_utc=True)
    return when.astimezone(UTC) if when is not None else None
