"""The smtp provider against a real aiosmtpd server on loopback, and adapter validation."""

from __future__ import annotations

import asyncio
import datetime as dt
import email
import email.policy
import ipaddress
import ssl
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from support import free_port, stop_controller

from dripd.channels import registry
from dripd.channels.base import Message, PermanentError, RedactedChannel, TransientError
from dripd.channels.smtp import SmtpChannel, SmtpSettings
from dripd.errors import ConfigError
from dripd.model import Adapter

pytestmark = pytest.mark.filterwarnings(
    # aiosmtpd warns when AUTH is required without TLS; these servers only listen on loopback.
    "ignore:Requiring AUTH while not requiring TLS:UserWarning"
)


@dataclass
class Received:
    peer: Any
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    tls: bool

    def parsed(self) -> EmailMessage:
        parsed = email.message_from_bytes(self.content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


@dataclass
class Collector:
    """An aiosmtpd handler that keeps what it receives and refuses chosen recipients."""

    received: list[Received] = field(default_factory=list)
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str | None = None  # e.g. "451 4.3.0 Try later" to refuse every DATA
    quits: int = 0
    loop: asyncio.AbstractEventLoop | None = None
    servers: list[Any] = field(default_factory=list)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if reply := self.rcpt_replies.get(address):
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.data_reply is not None:
            return self.data_reply
        self.received.append(
            Received(
                peer=session.peer,
                mail_from=envelope.mail_from,
                rcpt_tos=list(envelope.rcpt_tos),
                content=envelope.original_content,
                tls=server.transport.get_extra_info("ssl_object") is not None,
            )
        )
        self.servers.append(server)
        return "250 Message accepted for delivery"

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        self.quits += 1
        return "221 Bye"

    def drop_connections(self) -> None:
        """Close every open connection from the server side, as an idle timeout would."""
        assert self.loop is not None
        done = threading.Event()

        def close_all() -> None:
            for server in self.servers:
                if server.transport is not None:
                    server.transport.close()
            done.set()

        self.loop.call_soon_threadsafe(close_all)
        assert done.wait(5)

    @property
    def connections(self) -> int:
        return len({r.peer for r in self.received})


ServerFactory = Callable[..., tuple[Collector, int]]


@pytest.fixture
def smtp_server() -> Iterator[ServerFactory]:
    controllers: list[Controller] = []

    def start(**kwargs: Any) -> tuple[Collector, int]:
        collector = Collector()
        port = free_port()
        controller = Controller(
            collector,
            hostname="127.0.0.1",
            port=port,
            server_hostname="mx.test",
            **kwargs,
        )
        controller.start()
        controllers.append(controller)
        collector.loop = controller.loop
        return collector, port

    yield start
    for controller in controllers:
        stop_controller(controller)


def settings(port: int, **overrides: Any) -> SmtpSettings:
    config: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "tls": "none",
        "timeout": 5,
        "from": "Acme <hello@acme.test>",
    }
    credentials = overrides.pop("credentials", {})
    config.update(overrides)
    return SmtpSettings.parse(config, credentials)


def make_message(n: int = 0, **overrides: Any) -> Message:
    execution_id = uuid.uuid4()
    values: dict[str, Any] = {
        "execution_id": execution_id,
        "idempotency_key": f"{execution_id}:{n}",
        "message_id": f"<{execution_id}.{n}@dripd.local>",
        "channel": "email",
        "to": "Ada <ada@example.test>",
        "subject": "Welcome, Ada",
        "text": "Hi Ada, thanks for joining.",
        "html": "<p>Hi Ada</p>",
        "headers": {"List-Unsubscribe": "<https://acme.test/u/1>"},
    }
    values.update(overrides)
    return Message(**values)


async def test_send_delivers_headers_and_both_parts(smtp_server: ServerFactory) -> None:
    collector, port = smtp_server()
    channel = SmtpChannel(settings(port))
    message = make_message()
    try:
        receipt = await channel.send(message)
    finally:
        await channel.aclose()

    assert receipt.provider_message_id == message.message_id
    [got] = collector.received
    assert got.mail_from == "hello@acme.test"
    assert got.rcpt_tos == ["ada@example.test"]
    mail = got.parsed()
    assert mail["From"] == "Acme <hello@acme.test>"
    assert mail["To"] == "Ada <ada@example.test>"
    assert mail["Subject"] == "Welcome, Ada"
    assert mail["Message-ID"] == message.message_id
    assert mail["X-Dripd-Idempotency-Key"] == message.idempotency_key
    assert mail["List-Unsubscribe"] == "<https://acme.test/u/1>"
    assert mail["Date"] is not None
    assert mail.get_content_type() == "multipart/alternative"
    text = mail.get_body(("plain",))
    html = mail.get_body(("html",))
    assert text is not None
    assert html is not None
    assert isinstance(text, EmailMessage)
    assert isinstance(html, EmailMessage)
    assert text.get_content().strip() == "Hi Ada, thanks for joining."
    assert html.get_content().strip() == "<p>Hi Ada</p>"


async def test_message_sender_overrides_the_configured_from(smtp_server: ServerFactory) -> None:
    collector, port = smtp_server()
    channel = SmtpChannel(settings(port))
    try:
        await channel.send(make_message(sender="Bob <bob@acme.test>", html=None))
    finally:
        await channel.aclose()
    [got] = collector.received
    assert got.mail_from == "bob@acme.test"
    mail = got.parsed()
    assert mail["From"] == "Bob <bob@acme.test>"
    assert mail.get_content_type() == "text/plain"


async def test_pooled_connection_is_reused_and_quit_on_close(smtp_server: ServerFactory) -> None:
    collector, port = smtp_server()
    channel = SmtpChannel(settings(port))
    for n in range(5):
        await channel.send(make_message(n))
    assert len(collector.received) == 5
    assert collector.connections == 1
    assert channel.connections_opened == 1
    await channel.aclose()
    assert collector.quits == 1
    with pytest.raises(TransientError, match="closed"):
        await channel.send(make_message())


async def test_concurrent_sends_stay_within_pool_size(smtp_server: ServerFactory) -> None:
    collector, port = smtp_server()
    channel = SmtpChannel(settings(port, pool_size=2))
    try:
        await asyncio.gather(*(channel.send(make_message(n)) for n in range(12)))
    finally:
        await channel.aclose()
    assert len(collector.received) == 12
    assert 1 <= collector.connections <= 2
    assert collector.quits == collector.connections


async def test_a_dropped_pooled_connection_is_replaced(smtp_server: ServerFactory) -> None:
    collector, port = smtp_server()
    channel = SmtpChannel(settings(port))
    try:
        await channel.send(make_message(0))
        collector.drop_connections()
        await channel.send(make_message(1))
    finally:
        await channel.aclose()
    assert len(collector.received) == 2
    assert collector.connections == 2
    assert channel.connections_opened == 2


def authenticator(
    server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and auth_data == (b"mailer", b"s3cret-pass")
    # handled=False makes aiosmtpd answer the failure itself, with its 535 reply.
    return AuthResult(success=ok, handled=False)


async def test_auth_with_the_right_password_sends(smtp_server: ServerFactory) -> None:
    collector, port = smtp_server(
        authenticator=authenticator, auth_require_tls=False, auth_required=True
    )
    creds = {"username": "mailer", "password": "s3cret-pass"}
    channel = SmtpChannel(settings(port, credentials=creds))
    try:
        await channel.send(make_message())
    finally:
        await channel.aclose()
    assert len(collector.received) == 1


async def test_auth_without_credentials_is_refused(smtp_server: ServerFactory) -> None:
    collector, port = smtp_server(
        authenticator=authenticator, auth_require_tls=False, auth_required=True
    )
    channel = SmtpChannel(settings(port))
    try:
        with pytest.raises(PermanentError, match="530"):
            await channel.send(make_message())
    finally:
        await channel.aclose()
    assert collector.received == []


async def test_wrong_password_is_permanent_and_not_echoed(smtp_server: ServerFactory) -> None:
    collector, port = smtp_server(
        authenticator=authenticator, auth_require_tls=False, auth_required=True
    )
    creds = {"username": "mailer", "password": "wrong-pass-123"}
    channel = registry.build(
        Adapter(
            id=uuid.uuid4(),
            tenant_key=None,
            name="relay",
            channel="email",
            provider="smtp",
            config={"host": "127.0.0.1", "port": port, "tls": "none", "from": "a@acme.test"},
            credentials=creds,
            is_default=True,
            enabled=True,
        )
    )
    try:
        with pytest.raises(PermanentError, match="authentication failed") as caught:
            await channel.send(make_message())
    finally:
        await channel.aclose()
    assert str(caught.value) == (
        f"smtp 127.0.0.1:{port}: authentication failed: 535 5.7.8 Authentication credentials "
        "invalid"
    )
    assert "wrong-pass-123" not in str(caught.value)
    assert "wrong-pass-123" not in repr(channel)
    assert collector.received == []


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        ("550 5.1.1 No such user here", PermanentError),
        ("451 4.3.0 Try again later", TransientError),
        ("452 4.2.2 Mailbox full", TransientError),
    ],
)
async def test_refused_recipient_is_classified_by_reply_code(
    smtp_server: ServerFactory, reply: str, error: type[Exception]
) -> None:
    collector, port = smtp_server()
    collector.rcpt_replies["nobody@example.test"] = reply
    channel = SmtpChannel(settings(port))
    try:
        with pytest.raises(error) as caught:
            await channel.send(make_message(to="nobody@example.test"))
        assert reply in str(caught.value)
        # A refusal of this recipient is the message's: it spends an attempt, and the
        # adapter's circuit breaker does not count it.
        assert not getattr(caught.value, "provider_wide", False)
        # The refusal leaves the session usable: the next send reuses it.
        await channel.send(make_message(1))
    finally:
        await channel.aclose()
    assert len(collector.received) == 1
    assert channel.connections_opened == 1


async def test_invalid_recipient_is_permanent_without_connecting() -> None:
    channel = SmtpChannel(settings(free_port()))
    with pytest.raises(PermanentError, match="invalid recipient"):
        await channel.send(make_message(to="not an address"))
    assert channel.connections_opened == 0


async def test_a_421_to_the_recipient_is_the_servers_failure(smtp_server: ServerFactory) -> None:
    collector, port = smtp_server()
    collector.rcpt_replies["ada@example.test"] = "421 4.3.2 Service shutting down"
    channel = SmtpChannel(settings(port))
    try:
        with pytest.raises(TransientError, match=r"421 4\.3\.2") as caught:
            await channel.send(make_message())
        assert caught.value.provider_wide
        # 421 closes the session: the next send opens a new connection.
        del collector.rcpt_replies["ada@example.test"]
        await channel.send(make_message(1))
    finally:
        await channel.aclose()
    assert channel.connections_opened == 2
    assert len(collector.received) == 1


@pytest.mark.parametrize(
    ("reply", "provider_wide"),
    [("451 4.3.0 Local error in processing", False), ("421 4.3.2 Shutting down", True)],
)
async def test_a_temporary_refusal_of_data_is_classified_by_reply_code(
    smtp_server: ServerFactory, reply: str, provider_wide: bool
) -> None:
    collector, port = smtp_server()
    collector.data_reply = reply
    channel = SmtpChannel(settings(port))
    try:
        with pytest.raises(TransientError) as caught:
            await channel.send(make_message())
    finally:
        await channel.aclose()
    assert reply in str(caught.value)
    assert caught.value.provider_wide is provider_wide
    assert collector.received == []


def temporarily_failing_authenticator(
    server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
) -> AuthResult:
    return AuthResult(
        success=False, handled=False, message="454 4.7.0 Temporary authentication failure"
    )


async def test_a_temporary_authentication_failure_is_the_servers(
    smtp_server: ServerFactory,
) -> None:
    collector, port = smtp_server(
        authenticator=temporarily_failing_authenticator,
        auth_require_tls=False,
        auth_required=True,
    )
    creds = {"username": "mailer", "password": "s3cret-pass"}
    channel = SmtpChannel(settings(port, credentials=creds))
    try:
        with pytest.raises(TransientError, match="authentication temporarily failed") as caught:
            await channel.send(make_message())
    finally:
        await channel.aclose()
    assert caught.value.provider_wide
    assert "454" in str(caught.value)
    assert "s3cret-pass" not in str(caught.value)
    assert collector.received == []


@pytest.mark.parametrize(
    "greeting", ["421 mx.test Service not available", "554 mx.test No SMTP service here"]
)
async def test_a_refused_greeting_is_the_servers_failure(greeting: str) -> None:
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(f"{greeting}\r\n".encode())
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    channel = SmtpChannel(settings(port))
    try:
        with pytest.raises(TransientError, match="greeting refused") as caught:
            await channel.send(make_message())
        assert greeting.split()[0] in str(caught.value)
        assert caught.value.provider_wide
    finally:
        await channel.aclose()
        server.close()
        await server.wait_closed()


async def test_server_not_listening_is_transient() -> None:
    channel = SmtpChannel(settings(free_port()))
    try:
        with pytest.raises(TransientError, match="connection failed") as caught:
            await channel.send(make_message())
    finally:
        await channel.aclose()
    assert caught.value.provider_wide


async def test_a_server_that_hangs_up_mid_session_is_the_servers_failure() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 mx.test ESMTP\r\n")
        await writer.drain()
        await reader.readline()  # EHLO
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    channel = SmtpChannel(settings(port))
    try:
        with pytest.raises(TransientError, match="connection failed") as caught:
            await channel.send(make_message())
        assert caught.value.provider_wide
    finally:
        await channel.aclose()
        server.close()
        await server.wait_closed()


async def test_silent_server_times_out_as_transient() -> None:
    hung_up = asyncio.Event()

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()
        await writer.wait_closed()
        hung_up.set()

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    channel = SmtpChannel(settings(port, timeout=0.2))
    try:
        with pytest.raises(TransientError, match="timed out") as caught:
            await channel.send(make_message())
        assert caught.value.provider_wide
        # The client gave up and hung up rather than leaving the socket open.
        await asyncio.wait_for(hung_up.wait(), 5)
    finally:
        await channel.aclose()
        server.close()
        await server.wait_closed()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dripd test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def server_tls(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    return context


async def test_starttls_verifies_against_ca_file(
    smtp_server: ServerFactory, certificate: tuple[Path, Path]
) -> None:
    collector, port = smtp_server(tls_context=server_tls(certificate), require_starttls=True)
    channel = SmtpChannel(settings(port, tls="starttls", ca_file=str(certificate[0])))
    try:
        await channel.send(make_message())
    finally:
        await channel.aclose()
    [got] = collector.received
    assert got.tls


async def test_starttls_with_an_untrusted_certificate_fails(
    smtp_server: ServerFactory, certificate: tuple[Path, Path]
) -> None:
    collector, port = smtp_server(tls_context=server_tls(certificate), require_starttls=True)
    channel = SmtpChannel(settings(port, tls="starttls"))
    try:
        with pytest.raises(TransientError, match="CERTIFICATE_VERIFY_FAILED"):
            await channel.send(make_message())
    finally:
        await channel.aclose()
    assert collector.received == []


async def test_implicit_tls_without_verification(
    smtp_server: ServerFactory, certificate: tuple[Path, Path]
) -> None:
    collector, port = smtp_server(ssl_context=server_tls(certificate))
    channel = SmtpChannel(settings(port, tls="implicit", verify=False))
    try:
        await channel.send(make_message())
    finally:
        await channel.aclose()
    [got] = collector.received
    assert got.tls


# Adapter validation through the registry.

GOOD_CONFIG = {"host": "smtp.acme.test", "from": "hello@acme.test"}


def test_valid_smtp_adapter_passes_and_takes_defaults() -> None:
    registry.validate("email", "smtp", GOOD_CONFIG, {"username": "u", "password": "p"})
    parsed = SmtpSettings.parse(GOOD_CONFIG, {})
    assert (parsed.port, parsed.tls, parsed.timeout, parsed.pool_size) == (587, "starttls", 30, 4)
    assert SmtpSettings.parse({**GOOD_CONFIG, "tls": "implicit"}, {}).port == 465
    assert SmtpSettings.parse({**GOOD_CONFIG, "tls": "none"}, {}).port == 25


@pytest.mark.parametrize(
    ("channel", "provider", "config", "credentials", "match"),
    [
        (
            "email",
            "mailgun-ish",
            GOOD_CONFIG,
            {},
            r"unknown provider 'mailgun-ish'.*outbox, .*smtp",
        ),
        ("email", "smtp", {**GOOD_CONFIG, "hots": "x"}, {}, r"key 'hots' is not known"),
        ("email", "smtp", {"from": "a@b.test"}, {}, r"key 'host' is required"),
        ("email", "smtp", {**GOOD_CONFIG, "tls": "ssl"}, {}, r"`tls` must be one of"),
        ("email", "smtp", {**GOOD_CONFIG, "port": "587"}, {}, r"`port` must be a whole number"),
        ("email", "smtp", {**GOOD_CONFIG, "port": True}, {}, r"`port` must be a whole number"),
        ("email", "smtp", {**GOOD_CONFIG, "timeout": 0}, {}, r"`timeout` must be at least"),
        ("email", "smtp", {**GOOD_CONFIG, "from": ""}, {}, r"`from` must be a non-empty"),
        ("email", "smtp", GOOD_CONFIG, {"username": "u"}, r"give both or neither"),
        ("email", "smtp", GOOD_CONFIG, {"token": "x"}, r"credentials key 'token' is not known"),
        ("sms", "smtp", GOOD_CONFIG, {}, r"does not serve channel 'sms'"),
        ("sms", "outbox", {}, {}, r"key 'path' is required"),
    ],
)
def test_validate_names_the_offending_key(
    channel: str, provider: str, config: dict[str, Any], credentials: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        registry.validate(channel, provider, config, credentials)


def test_bad_credential_types_do_not_echo_the_value() -> None:
    with pytest.raises(ConfigError, match="`password` must be a string") as caught:
        registry.validate("email", "smtp", GOOD_CONFIG, {"username": "u", "password": 123456789})
    assert "123456789" not in str(caught.value)


def test_build_names_the_adapter_and_makes_an_smtp_channel() -> None:
    adapter = Adapter(
        id=uuid.uuid4(),
        tenant_key=None,
        name="transactional",
        channel="email",
        provider="smtp",
        config=dict(GOOD_CONFIG),
        credentials={"username": "u", "password": "hunter22"},
        is_default=True,
        enabled=True,
    )
    channel = registry.build(adapter)
    assert isinstance(channel, RedactedChannel)
    assert isinstance(channel.wrapped, SmtpChannel)
    assert channel.provider == "smtp"
    assert channel.capacity == 4  # the pool size, which the claim reads
    assert "hunter22" not in repr(channel)
    broken = Adapter(**{**_fields(adapter), "config": {**GOOD_CONFIG, "tls": "tlsv1"}})
    with pytest.raises(ConfigError, match=r"^adapter 'transactional': .*`tls`"):
        registry.build(broken)


def _fields(adapter: Adapter) -> dict[str, Any]:
    return {name: getattr(adapter, name) for name in Adapter.__dataclass_fields__}
