"""The `smtp` provider: email over SMTP with a small pool of reused aiosmtplib connections."""

from __future__ import annotations

import asyncio
import email.utils
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from enum import StrEnum
from typing import Any, assert_never

import aiosmtplib

from dripd.channels.base import (
    ChannelError,
    Message,
    PermanentError,
    Receipt,
    TransientError,
    mailbox_header,
)
from dripd.clock import Clock, SystemClock
from dripd.errors import ConfigError
from dripd.model import Adapter

__all__ = ["CONFIG_KEYS", "SmtpChannel", "SmtpSettings", "TlsMode", "check", "from_adapter"]

#: `verify` (default true) and `ca_file` tune certificate checks for private relays.
CONFIG_KEYS = frozenset({"host", "port", "tls", "timeout", "pool_size", "verify", "ca_file"})

IDEMPOTENCY_HEADER = "X-Dripd-Idempotency-Key"
# RCPT TO replies that refuse the mailbox itself (RFC 5321 §4.2.3): hard bounces.
_HARD_BOUNCE_CODES = frozenset({550, 551, 553})
# "Service not available, closing transmission channel": the server, not the message.
_SERVICE_UNAVAILABLE = 421


class TlsMode(StrEnum):
    NONE = "none"
    STARTTLS = "starttls"
    IMPLICIT = "implicit"


def _default_port(tls: TlsMode) -> int:
    match tls:
        case TlsMode.NONE:
            return 25
        case TlsMode.STARTTLS:
            return 587
        case TlsMode.IMPLICIT:
            return 465
        case _:
            assert_never(tls)


@dataclass(frozen=True, slots=True, kw_only=True)
class SmtpSettings:
    """The parsed config and credentials of one `smtp` adapter."""

    host: str
    port: int
    tls: TlsMode
    timeout: float
    sender: str
    pool_size: int = 4
    verify: bool = True
    ca_file: str | None = None
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, config: Mapping[str, Any], credentials: Mapping[str, Any]) -> SmtpSettings:
        """Read and check the adapter maps; ConfigError names the offending key."""
        host = _string(config, "host", required=True)
        tls_text = _string(config, "tls") or TlsMode.STARTTLS.value
        try:
            tls = TlsMode(tls_text)
        except ValueError:
            modes = " | ".join(mode.value for mode in TlsMode)
            raise ConfigError(
                f"smtp adapter config `tls` must be one of {modes}, not {tls_text!r}"
            ) from None
        port = _number(config, "port", integer=True, low=1, high=65535)
        timeout = _number(config, "timeout", low=0.001)
        pool_size = _number(config, "pool_size", integer=True, low=1, high=100)
        verify = config.get("verify", True)
        if not isinstance(verify, bool):
            raise ConfigError("smtp adapter config `verify` must be true or false")
        username = credentials.get("username")
        password = credentials.get("password")
        for key, value in (("username", username), ("password", password)):
            # The value is never echoed: it may be a secret.
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"smtp adapter credential `{key}` must be a string")
        if (username is None) != (password is None):
            raise ConfigError(
                "smtp adapter credentials `username` and `password` go together: "
                "give both or neither"
            )
        return cls(
            host=host or "",
            port=int(port) if port is not None else _default_port(tls),
            tls=tls,
            timeout=timeout if timeout is not None else 30.0,
            sender=_string(config, "from", required=True) or "",
            pool_size=int(pool_size) if pool_size is not None else 4,
            verify=verify,
            ca_file=_string(config, "ca_file"),
            username=username,
            password=password,
        )


def check(config: Mapping[str, Any], credentials: Mapping[str, Any]) -> None:
    """Registry hook: raise ConfigError if these maps are not a valid `smtp` adapter."""
    SmtpSettings.parse(config, credentials)


def from_adapter(adapter: Adapter) -> SmtpChannel:
    """Registry factory: an unconnected channel; connections open on the first send."""
    return SmtpChannel(SmtpSettings.parse(adapter.config, adapter.credentials))


class SmtpChannel:
    """Sends email through one SMTP server, keeping up to `pool_size` connections open."""

    provider = "smtp"

    def __init__(self, settings: SmtpSettings, *, clock: Clock | None = None) -> None:
        self._settings = settings
        self._clock = clock or SystemClock()
        self._idle: list[aiosmtplib.SMTP] = []
        self._slots = asyncio.Semaphore(settings.pool_size)
        # Sends that can run at once: the daemon claims no more of this adapter's rows.
        self.capacity = settings.pool_size
        self._closed = False
        self.connections_opened = 0

    def __repr__(self) -> str:
        return f"SmtpChannel({self._where})"

    @property
    def _where(self) -> str:
        return f"smtp {self._settings.host}:{self._settings.port}"

    async def send(self, message: Message) -> Receipt:
        """Deliver `message`; TransientError or PermanentError say whether to retry."""
        if self._closed:
            raise TransientError(f"{self._where}: the channel is closed")
        envelope_from = _envelope_address(message.sender or self._settings.sender, "sender")
        envelope_to = _envelope_address(message.to, "recipient")
        composed = self._compose(message)
        async with self._slots:
            client = await self._checkout()
            reusable = False
            try:
                await client.send_message(composed, sender=envelope_from, recipients=[envelope_to])
                reusable = True
            except (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused) as exc:
                # aiosmtplib already sent RSET, so the session is clean for the next message.
                reusable = True
                raise self._translate(exc) from exc
            except (aiosmtplib.SMTPException, OSError, ValueError) as exc:
                raise self._translate(exc) from exc
            finally:
                self._release(client, reusable=reusable)
        return Receipt(provider_message_id=message.message_id)

    async def aclose(self) -> None:
        """Quit every idle connection; connections still sending are dropped when they finish."""
        self._closed = True
        idle, self._idle = self._idle, []
        await asyncio.gather(*(_quit(client, self._settings.timeout) for client in idle))
        # One loop turn runs the transports' close callbacks, so every socket is shut on return.
        await asyncio.sleep(0)

    def _compose(self, message: Message) -> EmailMessage:
        mail = EmailMessage()
        try:
            mail["From"] = message.sender or self._settings.sender
            mail["To"] = mailbox_header(message.to_name, message.to)
            if message.subject is not None:
                mail["Subject"] = message.subject
            mail["Date"] = email.utils.format_datetime(self._clock.now())
            for name, value in message.headers.items():
                del mail[name]
                mail[name] = value
            # Set last so that extra headers cannot change how a send is identified.
            for name, value in (
                ("Message-ID", message.message_id),
                (IDEMPOTENCY_HEADER, message.idempotency_key),
            ):
                del mail[name]
                mail[name] = value
            text = message.text if message.text is not None else message.body
            if message.html is None:
                mail.set_content(text or "")
            elif text is None:
                mail.set_content(message.html, subtype="html")
            else:
                mail.set_content(text)
                mail.add_alternative(message.html, subtype="html")
        except (ValueError, TypeError) as exc:
            raise PermanentError(f"{self._where}: cannot build the email: {exc}") from exc
        return mail

    async def _checkout(self) -> aiosmtplib.SMTP:
        while self._idle:
            client = self._idle.pop()
            if not client.is_connected:
                _discard(client)
                continue
            try:
                # Proves a pooled connection still works before a message goes into it;
                # the server may have dropped it while it sat idle.
                await client.rset()
            except (aiosmtplib.SMTPException, OSError):
                _discard(client)
                continue
            except BaseException:
                _discard(client)
                raise
            return client
        return await self._connect()

    async def _connect(self) -> aiosmtplib.SMTP:
        settings = self._settings
        client = aiosmtplib.SMTP(
            hostname=settings.host,
            port=settings.port,
            username=settings.username,
            password=settings.password,
            timeout=settings.timeout,
            use_tls=settings.tls is TlsMode.IMPLICIT,
            start_tls=settings.tls is TlsMode.STARTTLS,
            validate_certs=settings.verify,
            cert_bundle=settings.ca_file,
        )
        try:
            await client.connect()
        except (aiosmtplib.SMTPException, OSError, ValueError) as exc:
            # Nothing of the message was sent yet: a temporary refusal here (greeting, EHLO,
            # STARTTLS, AUTH) is the server's, whatever message comes next.
            raise self._translate(exc, session=True) from exc
        self.connections_opened += 1
        return client

    def _release(self, client: aiosmtplib.SMTP, *, reusable: bool) -> None:
        if reusable and client.is_connected and not self._closed:
            self._idle.append(client)
        else:
            _discard(client)

    def _translate(self, exc: BaseException, *, session: bool = False) -> ChannelError:
        """The channel error for `exc`; `session`: it came while opening the connection,
        before anything of the message was sent. The text is the server's as it came (a
        server may echo the AUTH line): the registry's RedactedChannel redacts it."""
        where = self._where
        match exc:
            case aiosmtplib.SMTPAuthenticationError(code=code, message=text):
                reply = f"{code} {text}"
                if code >= 500:
                    return PermanentError(f"{where}: authentication failed: {reply}")
                return TransientError(
                    f"{where}: authentication temporarily failed: {reply}", provider_wide=True
                )
            case aiosmtplib.SMTPRecipientsRefused(recipients=[refused, *_]):
                return self._by_code(
                    refused.code, refused.message, "recipient refused, ", recipient=True
                )
            case aiosmtplib.SMTPConnectResponseError(code=code, message=text):
                # The greeting refused us (421 busy, 554 no service here): no message of
                # this adapter can go until the server takes connections again.
                reply = f"{code} {text}".rstrip()
                return TransientError(f"{where}: greeting refused: {reply}", provider_wide=True)
            case aiosmtplib.SMTPResponseException(code=code, message=text):
                return self._by_code(code, text, "", session=session)
            case aiosmtplib.SMTPNotSupported():
                return PermanentError(f"{where}: {exc}")
            case aiosmtplib.SMTPTimeoutError() | TimeoutError():
                return TransientError(f"{where}: timed out: {exc}", provider_wide=True)
            case aiosmtplib.SMTPServerDisconnected() | aiosmtplib.SMTPConnectError() | OSError():
                return TransientError(f"{where}: connection failed: {exc}", provider_wide=True)
            case aiosmtplib.SMTPException():
                # What is left (no AUTH offered, no usable mechanism) is a setup mismatch.
                return PermanentError(f"{where}: {exc}")
            case ValueError():
                return PermanentError(f"{where}: cannot send: {exc}")
            case _:
                return TransientError(f"{where}: {type(exc).__name__}")

    def _by_code(
        self,
        code: int,
        text: str,
        what: str,
        *,
        recipient: bool = False,
        session: bool = False,
    ) -> ChannelError:
        reply = f"{self._where}: {what}server replied {code} {text}".rstrip()
        if 500 <= code < 600:
            # A 5xx to RCPT TO (550 no such user, 551, 553 bad mailbox…) refuses the
            # address itself: a hard bounce. Other 5xx refuse this message or this sender.
            return PermanentError(reply, bounce=recipient and code in _HARD_BOUNCE_CODES)
        # 421 at any point closes the session for every message; other 4xx replies to
        # MAIL/RCPT/DATA (451 local error, 452 storage) are about this message's transaction.
        return TransientError(reply, provider_wide=session or code == _SERVICE_UNAVAILABLE)


async def _quit(client: aiosmtplib.SMTP, timeout: float) -> None:
    transport = client.transport
    try:
        await client.quit(timeout=timeout)
    except (aiosmtplib.SMTPException, OSError):
        pass
    finally:
        _discard(client, transport)


def _discard(client: aiosmtplib.SMTP, transport: asyncio.BaseTransport | None = None) -> None:
    transport = transport or client.transport
    client.close()
    if isinstance(transport, asyncio.Transport):
        # The session is over (QUIT answered, or the connection is unusable): aborting
        # skips the TLS close_notify exchange, so the socket closes on the next loop turn
        # instead of outliving the channel.
        transport.abort()


def _envelope_address(address: str, role: str) -> str:
    _, parsed = email.utils.parseaddr(address)
    if "@" not in parsed:
        raise PermanentError(f"invalid {role} address {address!r}")
    return parsed


def _string(config: Mapping[str, Any], key: str, *, required: bool = False) -> str | None:
    value = config.get(key)
    if value is None:
        if required:
            raise ConfigError(f"smtp adapter config `{key}` is required")
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"smtp adapter config `{key}` must be a non-empty string")
    return value


def _number(
    config: Mapping[str, Any],
    key: str,
    *,
    integer: bool = False,
    low: float,
    high: float | None = None,
) -> float | None:
    value = config.get(key)
    if value is None:
        return None
    # bool is an int subclass, and `port = true` is a mistake rather than port 1.
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (integer and not isinstance(value, int))
    ):
        kind = "a whole number" if integer else "a number of seconds"
        raise ConfigError(f"smtp adapter config `{key}` must be {kind}, not {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
        raise ConfigError(f"smtp adapter config `{key}` must be {bounds}, not {value!r}")
    return float(value)
