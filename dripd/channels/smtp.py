"""The `smtp` provider: email over SMTP with a small pool of reused aiosmtplib connections,
optionally DKIM-signed (RFC 6376) with dkimpy."""

from __future__ import annotations

import asyncio
import base64
import email.policy
import email.utils
import importlib.util
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from enum import StrEnum
from typing import Any, Final, assert_never

import aiosmtplib
import dkim
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from dripd.channels import mime
from dripd.channels.base import (
    ChannelContext,
    ChannelError,
    Message,
    PermanentError,
    Receipt,
    TransientError,
)
from dripd.channels.spec import ProviderSpec
from dripd.clock import Clock, SystemClock
from dripd.errors import ConfigError
from dripd.model import Adapter

__all__ = [
    "CONFIG_KEYS",
    "DKIM_HEADERS",
    "DkimKey",
    "SmtpChannel",
    "SmtpSettings",
    "TlsMode",
    "check",
    "from_adapter",
]

#: `verify` (default true) and `ca_file` tune certificate checks for private relays;
#: `dkim_selector` and `dkim_domain` (with credential `dkim_private_key`) turn on DKIM.
CONFIG_KEYS = frozenset(
    {
        "host",
        "port",
        "tls",
        "timeout",
        "pool_size",
        "verify",
        "ca_file",
        "dkim_selector",
        "dkim_domain",
    }
)

IDEMPOTENCY_HEADER = mime.IDEMPOTENCY_HEADER
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
    dkim: DkimKey | None = field(default=None, repr=False)

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
            dkim=_dkim_key(config, credentials),
        )


def check(config: Mapping[str, Any], credentials: Mapping[str, Any]) -> None:
    """Registry hook: raise ConfigError if these maps are not a valid `smtp` adapter."""
    SmtpSettings.parse(config, credentials)


def from_adapter(adapter: Adapter, context: ChannelContext | None = None) -> SmtpChannel:
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
        # Signed before a connection is taken: a message that cannot be signed costs none.
        international = not (envelope_from + envelope_to).isascii()
        signed = (
            self._settings.dkim.sign(composed, international=international, where=self._where)
            if self._settings.dkim is not None
            else None
        )
        async with self._slots:
            client = await self._checkout()
            reusable = False
            try:
                if signed is None:
                    await client.send_message(
                        composed, sender=envelope_from, recipients=[envelope_to]
                    )
                else:
                    await _send_signed(
                        client, signed, envelope_from, envelope_to, international=international
                    )
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
        return mime.compose(
            message, sender=self._settings.sender, now=self._clock.now(), where=self._where
        )

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


# DKIM ---------------------------------------------------------------------------------------

#: The header fields a DKIM signature covers (RFC 6376 §5.4.1), the unsubscribe headers
#: among them (RFC 8058 §4: List-Unsubscribe-Post must be signed).
DKIM_HEADERS: Final = (
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "MIME-Version",
    "Content-Type",
)
# RFC 6376 §3.1 selectors and RFC 5321 domains: dot-separated labels (A-labels for IDNs).
_DNS_NAME: Final = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
# RFC 8301 §3.2: verifiers refuse RSA keys under 1024 bits.
_MIN_RSA_BITS: Final = 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class DkimKey:
    """A DKIM signing key: RSA (`rsa-sha256`, RFC 6376) or Ed25519 (`ed25519-sha256`,
    RFC 8463), published at `<selector>._domainkey.<domain>`."""

    selector: str
    domain: str
    algorithm: bytes
    # As dkimpy takes it: a PKCS#1 PEM (RSA), or the base64 32-byte seed (Ed25519).
    key: bytes = field(repr=False)

    def sign(self, mail: EmailMessage, *, international: bool, where: str) -> bytes:
        """`mail` as the bytes to send, a `DKIM-Signature` field first (relaxed/relaxed
        over `DKIM_HEADERS` and the body). The body is written 7-bit (quoted-printable or
        base64 where it needs it), so no relay re-encodes what the signature covers;
        `international`: headers in UTF-8 (RFC 6532), for an SMTPUTF8 transaction.
        PermanentError (naming `where`) when the message cannot be signed."""
        policy = email.policy.SMTPUTF8 if international else email.policy.SMTP
        try:
            data = mail.as_bytes(policy=policy.clone(cte_type="7bit"))
            header = dkim.sign(
                data,
                self.selector.encode(),
                self.domain.encode(),
                self.key,
                canonicalize=(b"relaxed", b"relaxed"),
                include_headers=[name.encode() for name in DKIM_HEADERS],
                signature_algorithm=self.algorithm,
                linesep=b"\r\n",
            )
        except (dkim.DKIMException, ValueError, TypeError) as exc:
            # The library's text is not kept: it may quote the key.
            raise PermanentError(
                f"{where}: cannot DKIM-sign the message ({type(exc).__name__})"
            ) from None
        return bytes(header) + data


async def _send_signed(
    client: aiosmtplib.SMTP, data: bytes, sender: str, recipient: str, *, international: bool
) -> None:
    """Send `data` exactly as signed; SMTPUTF8 when an address needs it (the body is 7-bit,
    so no BODY=8BITMIME)."""
    if client.is_ehlo_or_helo_needed:
        await client.ehlo()
    options: list[str] = []
    if international:
        if not client.supports_extension("smtputf8"):
            raise aiosmtplib.SMTPNotSupported(
                "an address holds non-ASCII characters, but the server does not offer SMTPUTF8"
            )
        options.append("SMTPUTF8")
    await client.sendmail(sender, [recipient], data, mail_options=options)


def _dkim_key(config: Mapping[str, Any], credentials: Mapping[str, Any]) -> DkimKey | None:
    """The adapter's DKIM key, or None when `dkim_selector` is not set. ConfigError naming
    the key when the three do not go together or the private key cannot be loaded (the
    key itself is never quoted)."""
    selector = _string(config, "dkim_selector")
    domain = _string(config, "dkim_domain")
    private = credentials.get("dkim_private_key")
    if (selector is None) != (domain is None):
        raise ConfigError(
            "smtp adapter config `dkim_selector` and `dkim_domain` go together: "
            "give both or neither"
        )
    if selector is None or domain is None:
        if private is not None:
            raise ConfigError(
                "smtp adapter credential `dkim_private_key` needs config `dkim_selector` "
                "and `dkim_domain`"
            )
        return None
    for key, value in (("dkim_selector", selector), ("dkim_domain", domain)):
        if not _DNS_NAME.fullmatch(value) or len(value) > 253:
            raise ConfigError(
                f"smtp adapter config `{key}` must be a DNS name of letters, digits, '-' "
                f"and '.' (an IDN as its xn-- form), not {value[:100]!r}"
            )
    if private is None:
        raise ConfigError(
            "smtp adapter credential `dkim_private_key` is required when `dkim_selector` is set"
        )
    if not isinstance(private, str):
        raise ConfigError("smtp adapter credential `dkim_private_key` must be a PEM text")
    algorithm, key_bytes = _load_dkim_private_key(private)
    return DkimKey(selector=selector, domain=domain, algorithm=algorithm, key=key_bytes)


def _load_dkim_private_key(text: str) -> tuple[bytes, bytes]:
    try:
        loaded = serialization.load_pem_private_key(text.strip().encode(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(
            "smtp adapter credential `dkim_private_key` is not an unencrypted PEM private key "
            "(RSA or Ed25519) that can be loaded"
        ) from None
    if isinstance(loaded, rsa.RSAPrivateKey):
        if loaded.key_size < _MIN_RSA_BITS:
            raise ConfigError(
                f"smtp adapter credential `dkim_private_key` is an RSA key of "
                f"{loaded.key_size} bits: verifiers refuse keys under {_MIN_RSA_BITS} bits "
                "(RFC 8301); use 2048"
            )
        pem = loaded.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        try:
            dkim.crypto.parse_pem_private_key(pem)
        except dkim.crypto.UnparsableKeyError:
            raise ConfigError(
                "smtp adapter credential `dkim_private_key` cannot be loaded by dkimpy"
            ) from None
        return b"rsa-sha256", pem
    if isinstance(loaded, ed25519.Ed25519PrivateKey):
        if importlib.util.find_spec("nacl") is None:
            raise ConfigError(
                "smtp adapter credential `dkim_private_key` is an Ed25519 key, which dkimpy "
                "signs only when PyNaCl is installed (`pip install pynacl`); or use an RSA key"
            )
        seed = loaded.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return b"ed25519-sha256", base64.b64encode(seed)
    kind = type(loaded).__name__.removeprefix("_")
    raise ConfigError(
        f"smtp adapter credential `dkim_private_key` must be an RSA or Ed25519 key, not {kind}"
    )


SPEC = ProviderSpec(
    name="smtp",
    channels=frozenset({"email"}),
    config_keys=CONFIG_KEYS,
    required_config=frozenset({"host", "from"}),
    credential_keys=frozenset({"username", "password", "dkim_private_key"}),
    required_credentials=frozenset(),
    factory=from_adapter,
    check=check,
    identifier_keys=frozenset({"username"}),
)
