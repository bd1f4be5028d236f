"""The Channel protocol every provider implements, and the send error taxonomy.

    ChannelError             the message was not sent (a DripdError)
    ├── TransientError       retry later: network, timeouts, SMTP 4xx, HTTP 429/5xx, disk full
    │     .provider_wide       True: the provider failed, not this message (connection refused
    │                          or reset, timeouts, SMTP 421 or a refused greeting/login, HTTP
    │                          5xx and 429, the outbox's disk): the adapter's circuit breaker
    │                          counts it and the send is deferred without spending an attempt.
    │                          False: this message was refused for now (SMTP 451/452 to
    │                          RCPT/DATA): the retry spends one of its attempts.
    └── PermanentError       do not retry: SMTP 5xx, invalid recipient, bad configuration
          .bounce              True: the recipient's address is refused for good (suppress it)

Providers translate their library's errors into these at the one place they call it,
with `raise … from exc`. Messages never contain credentials.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from dripd.errors import DripdError

__all__ = [
    "Channel",
    "ChannelError",
    "Message",
    "PermanentError",
    "Receipt",
    "TransientError",
    "mailbox_header",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """One rendered message, ready for a channel to deliver."""

    execution_id: uuid.UUID
    idempotency_key: str
    message_id: str
    channel: str
    # The bare recipient (email: local@domain, the domain in ASCII; phones: E.164).
    to: str
    to_name: str | None = None  # email: the recipient's display name, as text (unquoted)
    subject: str | None = None
    text: str | None = None
    html: str | None = None
    body: str | None = None
    sender: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    metadata: Mapping[str, str] = field(default_factory=dict)


def mailbox_header(name: str | None, address: str) -> str:
    """An RFC 5322 mailbox for a header: `address`, or `"name" <address>` with the name as
    one quoted-string (RFC 5322 §3.2.4: backslash and double quote escaped), so no comma,
    colon or `<` in a name can read as a second address or a group. `name` holds no line
    break (dripd.addresses folds it); a non-ASCII name is encoded by the email library
    (RFC 2047) or sent as UTF-8 under SMTPUTF8 (RFC 6532)."""
    if not name:
        return address
    quoted = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{quoted}" <{address}>'


@dataclass(frozen=True, slots=True, kw_only=True)
class Receipt:
    """What the provider acknowledged for one accepted message."""

    provider_message_id: str | None = None


class ChannelError(DripdError):
    """The channel could not send the message."""

    code = "channel"


class TransientError(ChannelError):
    """The channel failed for now; the send may succeed if retried later."""

    code = "transient"

    def __init__(self, message: str | None = None, *, provider_wide: bool = False) -> None:
        super().__init__(message)
        # The provider failed, not this message: every send through it would fail now.
        self.provider_wide = provider_wide


class PermanentError(ChannelError):
    """The channel refused the message; retrying will not help."""

    code = "permanent"

    def __init__(self, message: str | None = None, *, bounce: bool = False) -> None:
        super().__init__(message)
        # The recipient's address is refused for good (a hard bounce): suppress it.
        self.bounce = bounce


class Channel(Protocol):
    """A connected provider that delivers messages of one or more channels."""

    provider: str

    async def send(self, message: Message) -> Receipt:
        """Deliver `message`, or raise TransientError or PermanentError."""
        ...

    async def aclose(self) -> None:
        """Release connections and files; the channel is not used afterwards."""
        ...
