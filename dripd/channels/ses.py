"""The `ses` provider: email through Amazon SES v2 `SendEmail` with the raw MIME message, and
SES's feedback (bounces, complaints, deliveries, opens, clicks) through an SNS topic.

Outbound follows the SES v2 API reference (SendEmail, EmailContent/RawMessage; the botocore
model `sesv2/2019-09-27`): `POST /v2/email/outbound-emails`, SigV4 for the service `ses`.
The message goes as dripd composes it (dripd.channels.mime), so its Message-ID,
List-Unsubscribe and idempotency headers reach the recipient unchanged; the execution id
rides along as the message tag `dripd_execution`, which SES echoes in its events.

Inbound: SES publishes its events (a configuration set's event destination, or an
identity's feedback notifications) to an SNS topic, and the topic posts them to
`/webhooks/ses/<adapter>` (dripd.channels.aws.SnsVerifier checks them).

    adapter config     from (required), region (required), configuration_set,
                       sns_topic_arn (the feedback topic; without it nothing is accepted),
                       base_url, timeout, max_connections
    credentials        access_key_id, secret_access_key, session_token (optional)
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage
from typing import Any, Final

import httpx
import msgspec
from cryptography import x509

from dripd.channels import aws, mime
from dripd.channels.base import (
    AdapterError,
    ChannelContext,
    ChannelError,
    Message,
    PermanentError,
    Receipt,
    TransientError,
)
from dripd.channels.feedback import (
    BadPayload,
    FeedbackEvent,
    InboundRequest,
    ReceiverContext,
    parse_uuid,
)
from dripd.channels.http import (
    HTTP_CONFIG_KEYS,
    USER_AGENT,
    HttpProvider,
    check_http_config,
    clip,
    config_str,
    detail,
    error_for_status,
    json_body,
    retry_after,
    transient_status,
)
from dripd.channels.spec import ProviderSpec
from dripd.clock import Clock, SystemClock
from dripd.errors import ConfigError
from dripd.model import Adapter

__all__ = ["SPEC", "SesChannel", "SesReceiver", "SesSettings", "check", "error_for", "ses_events"]

#: The message tag that carries the execution id (SES echoes tags in every event).
EXECUTION_TAG: Final = "dripd_execution"
SEND_PATH: Final = "/v2/email/outbound-emails"

CONFIG_KEYS: Final = HTTP_CONFIG_KEYS | {"region", "configuration_set", "sns_topic_arn"}

# Configuration set names: letters, digits, `_` and `-`, at most 64 (SES v2 reference).
_CONFIGURATION_SET = re.compile(r"[A-Za-z0-9_-]{1,64}")

# SES v2 error codes (x-amzn-ErrorType) by what dripd does about them; the model's
# SendEmail errors, and the codes every AWS API may answer (dripd.channels.aws).
_ADAPTER_CODES: Final = frozenset(
    {
        "AccountSuspendedException",  # the account may not send at all
        "SendingPausedException",  # sending is paused for the account or configuration set
        "MailFromDomainNotVerifiedException",
        "NotFoundException",  # an unknown configuration set: every send fails alike
    }
)
_PERMANENT_CODES: Final = frozenset({"MessageRejected", "BadRequestException"})

#: The longest provider text kept in an event's data.
_MAX_DATA = 300


@dataclass(frozen=True, slots=True, kw_only=True)
class SesSettings:
    """The parsed config and credentials of one `ses` adapter."""

    sender: str
    region: str
    configuration_set: str | None
    topic: aws.TopicArn | None
    credentials: aws.AwsCredentials

    @classmethod
    def parse(cls, config: Mapping[str, Any], credentials: Mapping[str, Any]) -> SesSettings:
        """Read and check the adapter maps; ConfigError names the offending key."""
        check_http_config(config)
        configuration_set = config_str(config, "configuration_set", max_length=64)
        if configuration_set is not None and not _CONFIGURATION_SET.fullmatch(configuration_set):
            raise ConfigError(
                "ses adapter config `configuration_set` must be 1 to 64 letters, digits, `_` or `-`"
            )
        return cls(
            sender=config_str(config, "from", required=True) or "",
            region=aws.check_region(config, "ses"),
            configuration_set=configuration_set,
            topic=aws.check_topic_arn(config, "ses"),
            credentials=aws.AwsCredentials.parse(credentials),
        )


def check(config: Mapping[str, Any], credentials: Mapping[str, Any]) -> None:
    """Registry hook: ConfigError if these maps are not a valid `ses` adapter."""
    SesSettings.parse(config, credentials)


class SesChannel(HttpProvider):
    """Sends email through SES v2 `SendEmail` with `Content.Raw`."""

    provider = "ses"

    def __init__(
        self,
        adapter: Adapter,
        context: ChannelContext | None = None,
        *,
        clock: Clock | None = None,
    ) -> None:
        settings = SesSettings.parse(adapter.config, adapter.credentials)
        self._settings = settings
        self._clock = clock or SystemClock()
        super().__init__(
            adapter,
            context,
            base_url=adapter.config.get("base_url")
            or f"https://email.{settings.region}.amazonaws.com",
            auth=aws.SigV4(
                settings.credentials, service="ses", region=settings.region, clock=self._clock
            ),
        )

    async def send(self, message: Message) -> Receipt:
        """Send `message` as raw MIME; the receipt holds SES's `MessageId` (which its
        events name as `mail.messageId`). TransientError, PermanentError or AdapterError
        by SES's error code (see `error_for`)."""
        mail = mime.compose(
            message, sender=self._settings.sender, now=self._clock.now(), where="ses"
        )
        body: dict[str, Any] = {}
        if sender := _from_address(mail):
            body["FromEmailAddress"] = sender
        body["Destination"] = {"ToAddresses": [message.to]}
        body["Content"] = {"Raw": {"Data": base64.b64encode(mime.to_bytes(mail)).decode()}}
        body["EmailTags"] = [{"Name": EXECUTION_TAG, "Value": str(message.execution_id)}]
        if self._settings.configuration_set:
            body["ConfigurationSetName"] = self._settings.configuration_set
        response = await self.request(
            "POST",
            SEND_PATH,
            content=msgspec.json.encode(body),
            headers={"Content-Type": "application/json"},
        )
        if response.status_code == 200:
            answer = json_body(response)
            found = answer.get("MessageId") if isinstance(answer, dict) else None
            return Receipt(provider_message_id=found if isinstance(found, str) else None)
        raise error_for(response)


def _from_address(mail: EmailMessage) -> str | None:
    """The bare address of the MIME From (SES checks it against its verified identities);
    None when it is not plain ASCII (SES then reads the From header itself)."""
    header = mail["From"]
    addresses: Sequence[Address] = getattr(header, "addresses", ())
    if len(addresses) != 1:
        return None
    address = addresses[0].addr_spec
    return address if address.isascii() and "@" in address else None


def error_for(response: httpx.Response) -> ChannelError:
    """The error for an SES answer other than 200, by the code in `x-amzn-ErrorType` (else
    the body's `__type`/`code`):

        TooManyRequestsException, LimitExceededException (and botocore's other
        throttling codes), 408, 429, 5xx                  TransientError(provider_wide)
        SendingPausedException, AccountSuspendedException,
        MailFromDomainNotVerifiedException, NotFoundException,
        credential and signature errors, 401/403/404      AdapterError (adapter paused)
        MessageRejected, BadRequestException, other 4xx   PermanentError
    """
    code, text = _error(response)
    status = response.status_code
    where = f"ses: {code}" if code else "ses"
    if code in aws.THROTTLING_CODES:
        return TransientError(
            f"{where}: {detail(response, text)}",
            provider_wide=True,
            retry_after=retry_after(response),
        )
    if transient_status(status):
        return error_for_status(where, response, text)
    if code in _ADAPTER_CODES or code in aws.ACCOUNT_ERROR_CODES:
        return AdapterError(f"{where}: {detail(response, text)}")
    if code in _PERMANENT_CODES:
        return PermanentError(f"{where}: {detail(response, text)}")
    return error_for_status(where, response, text, adapter_statuses=frozenset({401, 403, 404}))


def _error(response: httpx.Response) -> tuple[str | None, str | None]:
    """(code, message) of an AWS rest-json error: the code from `x-amzn-ErrorType`
    (`Code:uri`), else the body's `__type` (`namespace#Code`) or `code`."""
    body = json_body(response)
    body = body if isinstance(body, dict) else {}
    code = response.headers.get("x-amzn-errortype", "").split(":", 1)[0].strip()
    if not code:
        raw = body.get("__type") or body.get("code") or body.get("Code")
        code = raw.rsplit("#", 1)[-1].strip() if isinstance(raw, str) else ""
    message = body.get("message", body.get("Message"))
    return (code[:100] or None), (message if isinstance(message, str) else None)


class SesReceiver:
    """The webhook receiver of one `ses` adapter: SNS messages from its `sns_topic_arn`.

    A SubscriptionConfirmation of that topic is confirmed (and yields no event); a
    Notification's `Message` is an SES event, mapped by `ses_events`. `trust`: the root
    certificates the SNS signing certificate must chain to (default: certifi's bundle).
    """

    def __init__(
        self,
        adapter: Adapter,
        context: ReceiverContext,
        *,
        trust: Sequence[x509.Certificate] | None = None,
    ) -> None:
        settings = SesSettings.parse(adapter.config, adapter.credentials)
        self._client = httpx.AsyncClient(
            transport=context.transport,
            timeout=httpx.Timeout(10.0),
            headers={"User-Agent": USER_AGENT},
            follow_redirects=False,
            trust_env=False,
        )
        self._sns = aws.SnsVerifier(
            topic=settings.topic,
            replay_window=context.replay_window,
            client=self._client,
            trust=trust,
        )

    async def receive(self, request: InboundRequest) -> list[FeedbackEvent]:
        """Verify the SNS message (Unverified) and map its SES event (BadPayload)."""
        note = await self._sns.verify(request.body, request.received_at)
        if note.type == "SubscriptionConfirmation":
            await self._sns.confirm(note)
            return []
        if note.type != "Notification":
            return []  # UnsubscribeConfirmation: nothing to record
        return ses_events(note.message, event_id=note.message_id, published_at=note.timestamp)

    async def aclose(self) -> None:
        await self._client.aclose()


def ses_events(
    text: str, *, event_id: str, published_at: datetime | None = None
) -> list[FeedbackEvent]:
    """The feedback in one SES event (the JSON of an SNS notification's `Message`): SES
    event publishing (`eventType`) and identity notifications (`notificationType`), as
    "Amazon SES event data" / "notification contents" describe them.

        Bounce           bounced, one per bouncedRecipients[]; permanent when bounceType
                         is Permanent (Transient and Undetermined are temporary)
        Complaint        complained, one per complainedRecipients[]
        Delivery         delivered, one per delivery.recipients[]
        DeliveryDelay    deferred, one per deliveryDelay.delayedRecipients[]
        Open, Click      opened, clicked (the clicked link in data.url)
        Reject, Rendering Failure   failed
        others (Send, Subscription, …)   none

    `event_id`: the SNS MessageId, suffixed `:<n>` per recipient when there are several.
    The execution comes from the `dripd_execution` tag, the provider id from
    `mail.messageId`; `occurred_at` is the event's own timestamp, else `published_at`
    (the SNS message's). BadPayload when the text is not an SES event.
    """
    try:
        event = json.loads(text)
    except (ValueError, RecursionError):
        raise BadPayload("the SNS message is not an SES event (not JSON)") from None
    if not isinstance(event, dict):
        raise BadPayload("the SNS message is not an SES event (not a JSON object)")
    kind = event.get("eventType") or event.get("notificationType")
    mail = _dict(event.get("mail"))
    message_id = mail.get("messageId")
    base = _Base(
        event_id=event_id,
        provider_message_id=message_id if isinstance(message_id, str) else None,
        execution_id=_execution(mail.get("tags")),
        destination=[d for d in _list(mail.get("destination")) if isinstance(d, str)],
        published_at=published_at,
    )
    match kind:
        case "Bounce":
            bounce = _dict(event.get("bounce"))
            bounce_type = bounce.get("bounceType")
            return base.per_recipient(
                "bounced",
                [
                    (
                        r.get("emailAddress"),
                        _data(
                            status=r.get("status"),
                            action=r.get("action"),
                            diagnostic=r.get("diagnosticCode"),
                        ),
                    )
                    for r in map(_dict, _list(bounce.get("bouncedRecipients")))
                ],
                permanent=bounce_type == "Permanent",
                reason=_text(bounce.get("bounceSubType")),
                occurred_at=aws.parse_timestamp(bounce.get("timestamp")),
                data=_data(bounce_type=bounce_type),
            )
        case "Complaint":
            complaint = _dict(event.get("complaint"))
            return base.per_recipient(
                "complained",
                [
                    (r.get("emailAddress"), {})
                    for r in map(_dict, _list(complaint.get("complainedRecipients")))
                ],
                reason=_text(complaint.get("complaintFeedbackType")),
                occurred_at=aws.parse_timestamp(complaint.get("timestamp")),
                data=_data(sub_type=complaint.get("complaintSubType")),
            )
        case "Delivery":
            delivery = _dict(event.get("delivery"))
            return base.per_recipient(
                "delivered",
                [(r, {}) for r in _list(delivery.get("recipients"))],
                occurred_at=aws.parse_timestamp(delivery.get("timestamp")),
                data=_data(smtp_response=delivery.get("smtpResponse")),
            )
        case "DeliveryDelay":
            delay = _dict(event.get("deliveryDelay"))
            return base.per_recipient(
                "deferred",
                [
                    (
                        r.get("emailAddress"),
                        _data(status=r.get("status"), diagnostic=r.get("diagnosticCode")),
                    )
                    for r in map(_dict, _list(delay.get("delayedRecipients")))
                ],
                reason=_text(delay.get("delayType")),
                occurred_at=aws.parse_timestamp(delay.get("timestamp")),
            )
        case "Open":
            opened = _dict(event.get("open"))
            return [base.one("opened", occurred_at=aws.parse_timestamp(opened.get("timestamp")))]
        case "Click":
            click = _dict(event.get("click"))
            return [
                base.one(
                    "clicked",
                    occurred_at=aws.parse_timestamp(click.get("timestamp")),
                    data=_data(url=click.get("link")),
                )
            ]
        case "Reject":
            reject = _dict(event.get("reject"))
            return [
                base.one(
                    "failed",
                    reason=_text(reject.get("reason")) or "rejected",
                    occurred_at=aws.parse_timestamp(mail.get("timestamp")),
                )
            ]
        case "Rendering Failure":
            failure = _dict(event.get("failure"))
            return [
                base.one(
                    "failed",
                    reason="rendering failure",
                    data=_data(error=failure.get("errorMessage")),
                )
            ]
        case _:
            return []


@dataclass(frozen=True, slots=True, kw_only=True)
class _Base:
    """What every event from one SES event shares."""

    event_id: str
    provider_message_id: str | None
    execution_id: uuid.UUID | None
    destination: list[str]
    published_at: datetime | None

    def one(
        self,
        kind: str,
        *,
        reason: str | None = None,
        occurred_at: datetime | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> FeedbackEvent:
        """One event about the message (its only recipient, when it had one)."""
        return FeedbackEvent(
            type=kind,
            event_id=self.event_id,
            provider_message_id=self.provider_message_id,
            execution_id=self.execution_id,
            recipient=self.destination[0] if len(self.destination) == 1 else None,
            reason=reason,
            occurred_at=occurred_at or self.published_at,
            data=dict(data or {}),
        )

    def per_recipient(
        self,
        kind: str,
        recipients: Sequence[tuple[object, Mapping[str, Any]]],
        *,
        permanent: bool = False,
        reason: str | None = None,
        occurred_at: datetime | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> list[FeedbackEvent]:
        """One event per recipient named (`:<n>` on the event id when several)."""
        named = [(r.strip(), extra) for r, extra in recipients if isinstance(r, str) and r.strip()]
        return [
            FeedbackEvent(
                type=kind,
                event_id=self.event_id if len(named) == 1 else f"{self.event_id}:{index}",
                provider_message_id=self.provider_message_id,
                execution_id=self.execution_id,
                recipient=recipient,
                permanent=permanent,
                reason=reason,
                occurred_at=occurred_at or self.published_at,
                data={**(data or {}), **extra},
            )
            for index, (recipient, extra) in enumerate(named)
        ]


def _execution(tags: object) -> uuid.UUID | None:
    """The execution id from `mail.tags.dripd_execution[0]`, if it is one."""
    values = _dict(tags).get(EXECUTION_TAG)
    return parse_uuid(values[0]) if isinstance(values, list) and values else None


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _text(value: object) -> str | None:
    """Non-blank text, on one line and clipped; None for anything else."""
    return clip(value, _MAX_DATA) if isinstance(value, str) and value.strip() else None


def _data(**fields: object) -> dict[str, str]:
    """The fields that are non-empty text, clipped."""
    return {name: text for name, value in fields.items() if (text := _text(value)) is not None}


def _receiver(adapter: Adapter, context: ReceiverContext) -> SesReceiver:
    return SesReceiver(adapter, context)


SPEC = ProviderSpec(
    name="ses",
    channels=frozenset({"email"}),
    config_keys=CONFIG_KEYS,
    required_config=frozenset({"from", "region"}),
    credential_keys=aws.CREDENTIAL_KEYS,
    required_credentials=aws.REQUIRED_CREDENTIALS,
    identifier_keys=aws.IDENTIFIER_KEYS,
    factory=SesChannel,
    check=check,
    receiver=_receiver,
)
