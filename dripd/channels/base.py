"""The Channel protocol every provider implements, and the send error taxonomy.

    ChannelError             the message was not sent (a DripdError)
    ├── TransientError       retry later: network, timeouts, SMTP 4xx, HTTP 429/5xx, disk full
    │     .provider_wide       True: the provider failed, not this message (connection refused
    │                          or reset, timeouts, SMTP 421 or a refused greeting/login, HTTP
    │                          5xx and 429, the outbox's disk): the adapter's circuit breaker
    │                          counts it and the send is deferred without spending an attempt.
    │                          False: this message was refused for now (SMTP 451/452 to
    │                          RCPT/DATA): the retry spends one of its attempts.
    │     .retry_after         seconds the provider asked to wait (HTTP `Retry-After`, RFC 9110
    │                          §10.2.3, or the provider's own field), or None: the retry or
    │                          the circuit's next probe waits at least this long.
    ├── PermanentError       do not retry: SMTP 5xx, invalid recipient, bad content
    │     .bounce              True: the recipient's address is refused for good (suppress it)
    └── AdapterError         no message can go through this adapter until an operator acts
                             (credentials refused, OAuth grant revoked, account suspended,
                             webhook URL gone): the adapter is paused with this reason and
                             the message waits for `dripd ctl resume-adapter`, no attempt spent

Providers translate their library's errors into these at the one place they call it,
with `raise … from exc`. Messages never contain credentials: every channel the registry
builds is wrapped in a `RedactedChannel`, which passes each error's text through the
redactor of the adapter's credentials (dripd.redaction) and drops the cause chain (the
library's exception holds the unredacted text, e.g. an SMTP reply echoing the AUTH line).
"""

from __future__ import annotations

import copy
import traceback
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from dripd.errors import DripdError
from dripd.redaction import Redactor

if TYPE_CHECKING:
    import httpx

    from dripd.netguard import NetPolicy

__all__ = [
    "AdapterError",
    "BatchChannel",
    "Channel",
    "ChannelContext",
    "ChannelError",
    "Message",
    "PermanentError",
    "Receipt",
    "RedactedChannel",
    "TransientError",
    "mailbox_header",
]

log = structlog.get_logger("dripd.channels")


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
    sender: str | None = None  # email: the From mailbox (the step's `from`, else the adapter's)
    reply_to: str | None = None  # email: the step's `reply_to` mailbox
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

    def __init__(
        self,
        message: str | None = None,
        *,
        provider_wide: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        # The provider failed, not this message: every send through it would fail now.
        self.provider_wide = provider_wide
        # Seconds the provider asked us to wait before the next try (None: not said).
        self.retry_after = retry_after


class PermanentError(ChannelError):
    """The channel refused the message; retrying will not help."""

    code = "permanent"

    def __init__(self, message: str | None = None, *, bounce: bool = False) -> None:
        super().__init__(message)
        # The recipient's address is refused for good (a hard bounce): suppress it.
        self.bounce = bounce


class AdapterError(ChannelError):
    """The adapter cannot send any message until an operator acts: credentials refused, an
    OAuth grant revoked, an account suspended or paused, a webhook URL gone. The pipeline
    pauses the adapter with this text as the reason; the message is deferred (no attempt
    spent) and goes out after `dripd ctl resume-adapter`."""

    code = "adapter"


@dataclass(frozen=True, slots=True, kw_only=True)
class ChannelContext:
    """What the daemon gives a provider's factory besides the adapter.

    `transport`: the httpx transport every HTTP client of the channel uses (None: httpx's
    own; tests give an `httpx.MockTransport`). `pool`: the daemon's Postgres pool (the
    `postgres` pubsub provider). `net_policy`: where user-configured URLs may point (the
    HTTP hooks' SSRF guard, dripd.netguard). `webhook_url`: the public URL of
    this adapter's `POST /webhooks/{provider}/{adapter}` (config `webhooks.public_url`),
    or None. `save_credentials`: seals and stores the adapter's credentials again (an OAuth
    provider's rotated refresh token); None outside the daemon.
    """

    transport: httpx.AsyncBaseTransport | None = None
    pool: Any = None
    net_policy: NetPolicy | None = None
    webhook_url: str | None = None
    save_credentials: Callable[[Mapping[str, Any]], Awaitable[None]] | None = None


class Channel(Protocol):
    """A connected provider that delivers messages of one or more channels.

    A channel that obtains secrets while it runs (an OAuth access token, a rotated refresh
    token) lists the ones still in use as `issued_secrets`; the RedactedChannel around it
    redacts them from every error as it does the adapter's credentials.
    """

    provider: str

    async def send(self, message: Message) -> Receipt:
        """Deliver `message`, or raise TransientError or PermanentError."""
        ...

    async def aclose(self) -> None:
        """Release connections and files; the channel is not used afterwards."""
        ...


class BatchChannel(Channel, Protocol):
    """A channel whose provider takes many messages in one request (Postmark's batch
    endpoint). The registry wraps it in a `dripd.channels.batching.Batcher`, which gathers
    the sends that fall due together, so the pipeline still sends one message at a time."""

    #: The most messages one request may carry.
    max_batch: int

    async def send_batch(self, messages: Sequence[Message]) -> list[Receipt | ChannelError]:
        """Deliver `messages` in one request: one result per message, in order, so one bad
        recipient never fails the others. Raises only when the whole request failed
        (TransientError, AdapterError); every message then gets that error."""
        ...


class RedactedChannel:
    """A channel whose errors never carry its adapter's credentials, in any encoding.

    Every error leaving `send` or `aclose` is a ChannelError whose message went through
    `redact`, with no cause chain. A provider bug (any other exception) becomes a
    TransientError naming its type, after its redacted traceback is logged: the pipeline
    would otherwise log and store the raw text.
    """

    __slots__ = ("_channel", "_redact", "provider")

    def __init__(self, channel: Channel, redact: Redactor) -> None:
        self._channel = channel
        self._redact = redact
        self.provider = channel.provider

    @property
    def capacity(self) -> int | None:
        """The wrapped channel's `capacity` (sends it can run at once), if it has one."""
        capacity = getattr(self._channel, "capacity", None)
        return capacity if isinstance(capacity, int) else None

    @property
    def wrapped(self) -> Channel:
        """The provider's own channel (for tests and statistics; its errors are raw)."""
        return self._channel

    def __repr__(self) -> str:
        return self._clean(repr(self._channel))

    async def send(self, message: Message) -> Receipt:
        """Deliver `message` through the wrapped channel; its errors redacted."""
        try:
            return await self._channel.send(message)
        except ChannelError as exc:
            error = self._redacted(exc)
        except Exception as exc:  # noqa: BLE001 - a provider bug: its text may hold a credential
            error = self._unexpected(exc, "send", execution_id=str(message.execution_id))
        # Raised outside the handler, so neither `__cause__` nor `__context__` leads back
        # to the unredacted exception.
        raise error from None

    async def aclose(self) -> None:
        """Close the wrapped channel; its errors redacted."""
        try:
            await self._channel.aclose()
            return
        except ChannelError as exc:
            error = self._redacted(exc)
        except Exception as exc:  # noqa: BLE001 - a provider bug: its text may hold a credential
            error = self._unexpected(exc, "aclose")
        raise error from None

    def _clean(self, text: str) -> str:
        """`text` without the adapter's credentials, nor any secret the provider was issued
        since it was built (`issued_secrets`: OAuth access tokens, a rotated refresh
        token), which the credentials' redactor cannot know."""
        issued = getattr(self._channel, "issued_secrets", None)
        if issued:  # first: a rotated token may share a run with the credential it replaced
            text = Redactor(list(issued))(text)
        return self._redact(text)

    def _redacted(self, exc: ChannelError) -> ChannelError:
        # A copy keeps the class and its fields (`provider_wide`, `bounce`, a provider's
        # own); only the text changes.
        text = self._clean(exc.message)
        try:
            clean = copy.copy(exc)
        except TypeError:  # a constructor that takes more than the message
            clean = _same_kind(exc, text)
        clean.args = (text,)
        notes = getattr(exc, "__notes__", None)
        if notes:
            clean.__notes__ = [self._clean(str(note)) for note in notes]
        return clean

    def _unexpected(
        self, exc: Exception, method: str, *, execution_id: str | None = None
    ) -> TransientError:
        log.error(
            "adapter raised an unexpected error",
            provider=self.provider,
            method=method,
            execution_id=execution_id,
            exception=self._clean("".join(traceback.format_exception(exc)).rstrip()),
        )
        text = self._clean(str(exc))
        detail = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
        return TransientError(f"{self.provider} adapter error: {detail}")


def _same_kind(exc: ChannelError, text: str) -> ChannelError:
    """A base-class error with `exc`'s kind and flags, saying `text`."""
    if isinstance(exc, PermanentError):
        return PermanentError(text, bounce=exc.bounce)
    if isinstance(exc, TransientError):
        return TransientError(text, provider_wide=exc.provider_wide, retry_after=exc.retry_after)
    if isinstance(exc, AdapterError):
        return AdapterError(text)
    return ChannelError(text)
