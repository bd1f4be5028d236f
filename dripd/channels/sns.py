"""The `sns` provider: SMS through Amazon SNS `Publish` to a phone number.

Follows the SNS API reference (Publish; the botocore model `sns/2010-03-31`): the Query
protocol, `POST /` with a form body (`Action=Publish&Version=2010-03-31&PhoneNumber=…&
Message=…`), SigV4 for the service `sns`, and an XML answer. The SMS settings go as message
attributes (`MessageAttributes.entry.N.Name`, `.Value.DataType`, `.Value.StringValue`).

    adapter config     region (required), sms_type (Transactional | Promotional),
                       sender_id, origination_number, base_url, timeout, max_connections
    credentials        access_key_id, secret_access_key, session_token (optional)

SNS says nothing at send time about a number that opted out (the publish succeeds and
nothing is delivered), so no error here suppresses a recipient.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlencode

import httpx
from lxml import etree  # type: ignore[import-untyped]  # lxml ships no type hints

from dripd.channels import aws
from dripd.channels.base import (
    AdapterError,
    ChannelContext,
    ChannelError,
    Message,
    PermanentError,
    Receipt,
    TransientError,
)
from dripd.channels.http import (
    HTTP_CONFIG_KEYS,
    HttpProvider,
    check_http_config,
    config_str,
    detail,
    error_for_status,
    retry_after,
)
from dripd.channels.spec import ProviderSpec
from dripd.clock import Clock
from dripd.errors import ConfigError
from dripd.model import Adapter

__all__ = ["SPEC", "SnsChannel", "SnsSettings", "check", "error_for"]

API_VERSION: Final = "2010-03-31"
CONTENT_TYPE: Final = "application/x-www-form-urlencoded; charset=utf-8"

CONFIG_KEYS: Final = HTTP_CONFIG_KEYS | {
    "region",
    "sms_type",
    "sender_id",
    "origination_number",
}
SMS_TYPES: Final = ("Transactional", "Promotional")

# Sender ids: 1 to 11 letters and digits, at least one letter (SNS "SMS attributes").
_SENDER_ID = re.compile(r"(?=.*[A-Za-z])[A-Za-z0-9]{1,11}")
# An E.164 number, or a short code.
_ORIGINATION_NUMBER = re.compile(r"\+[1-9][0-9]{1,14}|[0-9]{3,8}")

_PERMANENT_CODES: Final = frozenset({"InvalidParameter", "ParameterValueInvalid"})
_TRANSIENT_CODES: Final = aws.THROTTLING_CODES | {
    "InternalError",
    "InternalFailure",
    "ServiceUnavailable",
    "KMSThrottling",
}

# A parser that reads no DTD, resolves no entity and fetches nothing.
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class SnsSettings:
    """The parsed config and credentials of one `sns` adapter."""

    region: str
    sms_type: str | None
    sender_id: str | None
    origination_number: str | None
    credentials: aws.AwsCredentials

    @classmethod
    def parse(cls, config: Mapping[str, Any], credentials: Mapping[str, Any]) -> SnsSettings:
        """Read and check the adapter maps; ConfigError names the offending key."""
        check_http_config(config)
        sms_type = config_str(config, "sms_type", max_length=20)
        if sms_type is not None and sms_type not in SMS_TYPES:
            raise ConfigError(
                f"sns adapter config `sms_type` must be one of {' | '.join(SMS_TYPES)}, "
                f"not {sms_type!r}"
            )
        sender_id = config_str(config, "sender_id", max_length=11)
        if sender_id is not None and not _SENDER_ID.fullmatch(sender_id):
            raise ConfigError(
                "sns adapter config `sender_id` must be 1 to 11 letters and digits, "
                "at least one a letter"
            )
        origination = config_str(config, "origination_number", max_length=16)
        if origination is not None and not _ORIGINATION_NUMBER.fullmatch(origination):
            raise ConfigError(
                "sns adapter config `origination_number` must be an E.164 number like "
                "+15555550100, or a short code"
            )
        return cls(
            region=aws.check_region(config, "sns"),
            sms_type=sms_type,
            sender_id=sender_id,
            origination_number=origination,
            credentials=aws.AwsCredentials.parse(credentials),
        )

    def attributes(self) -> list[tuple[str, str]]:
        """The SMS message attributes, by name, in the order they are numbered."""
        named = (
            ("AWS.SNS.SMS.SMSType", self.sms_type),
            ("AWS.SNS.SMS.SenderID", self.sender_id),
            ("AWS.MM.SMS.OriginationNumber", self.origination_number),
        )
        return [(name, value) for name, value in named if value is not None]


def check(config: Mapping[str, Any], credentials: Mapping[str, Any]) -> None:
    """Registry hook: ConfigError if these maps are not a valid `sns` adapter."""
    SnsSettings.parse(config, credentials)


class SnsChannel(HttpProvider):
    """Sends SMS through SNS `Publish` with a `PhoneNumber`."""

    provider = "sns"

    def __init__(
        self,
        adapter: Adapter,
        context: ChannelContext | None = None,
        *,
        clock: Clock | None = None,
    ) -> None:
        settings = SnsSettings.parse(adapter.config, adapter.credentials)
        self._settings = settings
        super().__init__(
            adapter,
            context,
            base_url=adapter.config.get("base_url")
            or f"https://sns.{settings.region}.amazonaws.com",
            auth=aws.SigV4(
                settings.credentials, service="sns", region=settings.region, clock=clock
            ),
        )

    async def send(self, message: Message) -> Receipt:
        """Publish `message.body` (else its text) to `message.to` (E.164); the receipt holds
        `PublishResult/MessageId`. Errors by SNS's code (see `error_for`)."""
        text = message.body if message.body is not None else message.text
        if not text:
            raise PermanentError("sns: the message is empty")
        params = [
            ("Action", "Publish"),
            ("Version", API_VERSION),
            ("PhoneNumber", message.to),
            ("Message", text),
        ]
        for number, (name, value) in enumerate(self._settings.attributes(), start=1):
            entry = f"MessageAttributes.entry.{number}"
            params += [
                (f"{entry}.Name", name),
                (f"{entry}.Value.DataType", "String"),
                (f"{entry}.Value.StringValue", value),
            ]
        response = await self.request(
            "POST", "/", content=urlencode(params).encode(), headers={"Content-Type": CONTENT_TYPE}
        )
        if response.status_code == 200:
            return Receipt(provider_message_id=_find(_xml(response), "PublishResult", "MessageId"))
        raise error_for(response)


def error_for(response: httpx.Response) -> ChannelError:
    """The error for an SNS answer other than 200, by `ErrorResponse/Error/Code`:

    Throttling (and botocore's other throttling codes), InternalError,
    408, 429, 5xx                                        TransientError(provider_wide)
    AuthorizationError, InvalidClientTokenId, SignatureDoesNotMatch,
    InvalidSecurity (and other credential errors), 401, 403   AdapterError
    InvalidParameter, ParameterValueInvalid, other 4xx   PermanentError
    """
    root = _xml(response)
    code = _find(root, "Error", "Code")
    text = _find(root, "Error", "Message")
    where = f"sns: {code[:100]}" if code else "sns"
    if code in _TRANSIENT_CODES:
        return TransientError(
            f"{where}: {detail(response, text)}",
            provider_wide=True,
            retry_after=retry_after(response),
        )
    if code in aws.ACCOUNT_ERROR_CODES:
        return AdapterError(f"{where}: {detail(response, text)}")
    if code in _PERMANENT_CODES and response.status_code < 500:
        return PermanentError(f"{where}: {detail(response, text)}")
    return error_for_status(where, response, text, adapter_statuses=frozenset({401, 403}))


def _xml(response: httpx.Response) -> Any:
    """The answer's XML root element, or None when the body is not XML."""
    if not response.content:
        return None
    try:
        return etree.fromstring(response.content, parser=_PARSER)
    except etree.XMLSyntaxError:
        return None


def _find(root: Any, *path: str) -> str | None:
    """The text at `path` below `root` (any namespace: SNS answers in
    `http://sns.amazonaws.com/doc/2010-03-31/`), stripped; None when absent or empty."""
    if root is None:
        return None
    found = root.find("/".join(f"{{*}}{name}" for name in path))
    text = found.text if found is not None else None
    if not isinstance(text, str):
        return None
    return text.strip() or None


SPEC = ProviderSpec(
    name="sns",
    channels=frozenset({"sms"}),
    config_keys=CONFIG_KEYS,
    required_config=frozenset({"region"}),
    credential_keys=aws.CREDENTIAL_KEYS,
    required_credentials=aws.REQUIRED_CREDENTIALS,
    identifier_keys=aws.IDENTIFIER_KEYS,
    factory=SnsChannel,
    check=check,
)
