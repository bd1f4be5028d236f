"""SMTP DKIM signing: a real aiosmtpd server on loopback receives the message, and dkimpy
verifies the received bytes against the public key, as a receiving server would (RFC 6376,
relaxed/relaxed); a tampered message fails, and a bad key is refused when the adapter is
checked."""

from __future__ import annotations

import base64
import importlib.util
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import dkim
import pytest
from aiosmtpd.controller import Controller
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from support import free_port, stop_controller

from dripd.channels import registry
from dripd.channels.base import Message
from dripd.errors import ConfigError
from dripd.model import Adapter

SELECTOR = "s2026"
DOMAIN = "acme.test"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem(key: Any) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def dns_record(key: rsa.RSAPrivateKey) -> bytes:
    """The TXT record published at <selector>._domainkey.<domain> (RFC 6376 §3.6.1)."""
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


def resolver(key: rsa.RSAPrivateKey) -> Callable[..., bytes]:
    record = dns_record(key)

    def lookup(name: bytes, timeout: int = 5) -> bytes:
        assert name == f"{SELECTOR}._domainkey.{DOMAIN}.".encode()
        return record

    return lookup


@dataclass
class Sink:
    """An aiosmtpd handler that keeps each message's bytes exactly as received."""

    received: list[bytes] = field(default_factory=list)
    recipients: list[list[str]] = field(default_factory=list)
    options: list[list[str]] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append(envelope.original_content)
        self.recipients.append(list(envelope.rcpt_tos))
        self.options.append(list(envelope.mail_options))
        return "250 Message accepted for delivery"


@pytest.fixture
def sink() -> Iterator[tuple[Sink, int]]:
    handler = Sink()
    port = free_port()
    controller = Controller(
        handler, hostname="127.0.0.1", port=port, server_hostname="mx.test", enable_SMTPUTF8=True
    )
    controller.start()
    try:
        yield handler, port
    finally:
        stop_controller(controller)


def adapter(port: int, credentials: dict[str, Any], **config: Any) -> Adapter:
    return Adapter(
        id=uuid.uuid4(),
        tenant_key=None,
        name="mx",
        channel="email",
        provider="smtp",
        config={
            "host": "127.0.0.1",
            "port": port,
            "tls": "none",
            "timeout": 5,
            "from": "Acme <news@acme.test>",
            "dkim_selector": SELECTOR,
            "dkim_domain": DOMAIN,
            **config,
        },
        credentials=credentials,
        is_default=True,
        enabled=True,
    )


def make_message(**fields: Any) -> Message:
    execution = uuid.uuid4()
    values: dict[str, Any] = {
        "execution_id": execution,
        "idempotency_key": f"{execution}:0",
        "message_id": f"<{execution}.0@acme.test>",
        "channel": "email",
        "to": "ada@example.test",
        "to_name": "Ada Lovelace",
        "subject": "Welcome, Ada",
        "text": "Hi Ada, thanks for joining.\n\n-- \nAcme",
        "html": "<p>Hi Ada</p>",
        "reply_to": "help@acme.test",
        "headers": {
            "List-Unsubscribe": "<https://acme.test/u/1>, <mailto:u@acme.test?subject=1>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        },
    }
    values.update(fields)
    return Message(**values)


async def send(port: int, key: Any, message: Message) -> None:
    channel = registry.build(adapter(port, {"dkim_private_key": pem(key)}))
    try:
        await channel.send(message)
    finally:
        await channel.aclose()


def signature_tags(data: bytes) -> dict[str, str]:
    header, _, _ = data.partition(b"\r\n\r\n")
    unfolded = re.sub(rb"\r\n[ \t]+", b" ", header).decode()
    [field_value] = [
        line.split(":", 1)[1]
        for line in unfolded.split("\r\n")
        if line.lower().startswith("dkim-signature:")
    ]
    tags = (part.strip().split("=", 1) for part in field_value.split(";") if part.strip())
    return {name.strip(): "".join(value.split()) for name, value in tags}


async def test_a_signed_message_verifies_against_the_public_key(
    sink: tuple[Sink, int], rsa_key: rsa.RSAPrivateKey
) -> None:
    handler, port = sink
    await send(port, rsa_key, make_message())

    [data] = handler.received
    assert data.startswith(b"DKIM-Signature:")
    assert dkim.verify(data, dnsfunc=resolver(rsa_key)) is True
    tags = signature_tags(data)
    assert tags["v"] == "1"
    assert tags["a"] == "rsa-sha256"
    assert tags["c"] == "relaxed/relaxed"
    assert tags["d"] == DOMAIN
    assert tags["s"] == SELECTOR
    signed = set(tags["h"].lower().split(":"))
    assert {
        "from",
        "to",
        "subject",
        "date",
        "message-id",
        "reply-to",
        "list-unsubscribe",
        "list-unsubscribe-post",
        "mime-version",
        "content-type",
    } <= signed
    assert handler.recipients == [["ada@example.test"]]


@pytest.mark.parametrize(
    "tamper",
    [
        lambda data: data.replace(b"thanks for joining", b"thanks for paying"),
        lambda data: data.replace(b"Subject: Welcome, Ada", b"Subject: Welcome, Eve"),
        lambda data: data.replace(b"https://acme.test/u/1", b"https://evil.test/u/1"),
    ],
)
async def test_a_tampered_message_fails_verification(
    sink: tuple[Sink, int], rsa_key: rsa.RSAPrivateKey, tamper: Callable[[bytes], bytes]
) -> None:
    handler, port = sink
    await send(port, rsa_key, make_message(html=None))

    [data] = handler.received
    changed = tamper(data)
    assert changed != data
    assert dkim.verify(changed, dnsfunc=resolver(rsa_key)) is False


async def test_a_signature_by_another_key_fails_verification(
    sink: tuple[Sink, int], rsa_key: rsa.RSAPrivateKey
) -> None:
    handler, port = sink
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    await send(port, other, make_message())
    assert dkim.verify(handler.received[0], dnsfunc=resolver(rsa_key)) is False


async def test_a_non_ascii_body_goes_out_seven_bit_and_verifies(
    sink: tuple[Sink, int], rsa_key: rsa.RSAPrivateKey
) -> None:
    handler, port = sink
    await send(
        port,
        rsa_key,
        make_message(
            subject="Olá, Ada — bem-vinda",
            to_name="Adá Lovelace",
            text="Olá Ada, obrigado — ünïcödé.\n",
            html="<p>Olá — ünïcödé</p>",
        ),
    )
    [data] = handler.received
    assert data.isascii()
    assert dkim.verify(data, dnsfunc=resolver(rsa_key)) is True


async def test_an_international_address_is_signed_and_sent_with_smtputf8(
    sink: tuple[Sink, int], rsa_key: rsa.RSAPrivateKey
) -> None:
    handler, port = sink
    await send(port, rsa_key, make_message(to="josé@example.test", to_name="José"))
    [data] = handler.received
    assert handler.recipients == [["josé@example.test"]]
    assert "SMTPUTF8" in [option.upper() for option in handler.options[0]]
    assert dkim.verify(data, dnsfunc=resolver(rsa_key)) is True


def small_rsa_key_pem() -> str:
    # 512 bits: cryptography refuses to generate it, but still loads one.
    return (
        "-----BEGIN RSA PRIVATE KEY-----\n"
        "MIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX6Ppy1tPf9Cnzj4p4WGeKLs1Pt8Qu\n"
        "KUpRKfFLfRYC9AIKjbJTWit+CqvjWYzvQwECAwEAAQJAIJLixBy2qpFoS4DSmoEm\n"
        "o3qGy0t6z09AIJtH+5OeRV1be+N4cDYJKffGzDa88vQENZiRm0GRq6a+HPGQMd2k\n"
        "TQIhAKMSvzIBnni7ot/OSie2TmJLY4SwTQAevXysE2RbFDYdAiEBCUEaRQnMnbp7\n"
        "9mxDXDf6AU0cN/RPBjb9qSHDcWZHGzUCIG2Es59z8ugGrDY+pxLQnwfotadxd+Uy\n"
        "v/Ow5T0q5gIJAiEAyS4RaI9YG8EWx/2w0T67ZUVAw8eOMB6BIUg0Xcu+3okCIBOs\n"
        "/5OiPgoTdSy7bcF9IGpSE8ZgGKzgYQVZeN97YE00\n"
        "-----END RSA PRIVATE KEY-----\n"
    )


def encrypted_pem(key: rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    ).decode()


def public_pem(key: rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.mark.parametrize(
    ("make_key", "says"),
    [
        (lambda key: "not a key at all", "not an unencrypted PEM private key"),
        (lambda key: pem(key).replace("A", "B", 40), "not an unencrypted PEM private key"),
        (encrypted_pem, "not an unencrypted PEM private key"),
        (public_pem, "not an unencrypted PEM private key"),
        (lambda key: pem(ec.generate_private_key(ec.SECP256R1())), "RSA or Ed25519 key, not"),
        (lambda key: small_rsa_key_pem(), "512 bits"),
    ],
)
def test_a_bad_key_is_a_config_error_naming_the_credential(
    rsa_key: rsa.RSAPrivateKey, make_key: Callable[[rsa.RSAPrivateKey], str], says: str
) -> None:
    text = make_key(rsa_key)
    config = adapter(25, {}).config
    with pytest.raises(ConfigError, match="dkim_private_key") as caught:
        registry.validate("email", "smtp", config, {"dkim_private_key": text})
    assert says in str(caught.value)
    body = "".join(line for line in text.splitlines() if not line.startswith("-----"))
    assert body[:16] not in str(caught.value)


@pytest.mark.skipif(importlib.util.find_spec("nacl") is not None, reason="PyNaCl installed")
def test_an_ed25519_key_without_pynacl_says_what_is_missing() -> None:
    config = adapter(25, {}).config
    key = pem(ed25519.Ed25519PrivateKey.generate())
    with pytest.raises(ConfigError, match=r"dkim_private_key.*PyNaCl"):
        registry.validate("email", "smtp", config, {"dkim_private_key": key})


@pytest.mark.parametrize(
    ("config", "credentials", "key"),
    [
        ({"dkim_domain": None}, "with-key", "dkim_domain"),
        ({"dkim_selector": None}, "with-key", "dkim_selector"),
        ({}, None, "dkim_private_key"),
        ({"dkim_selector": None, "dkim_domain": None}, "with-key", "dkim_private_key"),
        ({"dkim_selector": "bad selector"}, "with-key", "dkim_selector"),
        ({"dkim_domain": "acme.test/evil"}, "with-key", "dkim_domain"),
    ],
)
def test_selector_domain_and_key_go_together(
    rsa_key: rsa.RSAPrivateKey, config: dict[str, Any], credentials: str | None, key: str
) -> None:
    full = {**adapter(25, {}).config, **config}
    full = {name: value for name, value in full.items() if value is not None}
    secrets = {"dkim_private_key": pem(rsa_key)} if credentials else {}
    with pytest.raises(ConfigError, match=key):
        registry.validate("email", "smtp", full, secrets)


def test_a_good_key_passes_the_check(rsa_key: rsa.RSAPrivateKey) -> None:
    config = adapter(25, {}).config
    registry.validate("email", "smtp", config, {"dkim_private_key": pem(rsa_key)})
    pkcs1 = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()
    registry.validate("email", "smtp", config, {"dkim_private_key": pkcs1.replace("\n", "\r\n")})
