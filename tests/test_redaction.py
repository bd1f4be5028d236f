"""Secrets out of errors, events and logs: the redactor, every channel's errors through it,
an SMTP server that echoes the AUTH line, and the other places a secret could leak."""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import logging
import pickle
import re
import traceback
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs
from support import (
    add_adapter,
    apply_text,
    free_port,
    one_email,
    running_daemon,
    smtp_config,
    stop_controller,
    wait_for,
)

from dripd import api, config
from dripd.channels import registry
from dripd.channels.base import (
    ChannelError,
    Message,
    PermanentError,
    Receipt,
    RedactedChannel,
    TransientError,
)
from dripd.channels.credentials import Vault, generate_key
from dripd.channels.smtp import SmtpSettings
from dripd.cli import main
from dripd.clock import ManualClock
from dripd.db import store
from dripd.errors import ConfigError
from dripd.model import Adapter
from dripd.netguard import NetPolicy, parse_target
from dripd.redaction import (
    REDACTED,
    Redactor,
    dsn_secrets,
    fragment_length,
    url_for_log,
    urls_for_log,
)

pytestmark = pytest.mark.filterwarnings(
    # The echoing servers offer AUTH without TLS: they only listen on loopback.
    "ignore:Requiring AUTH while not requiring TLS:UserWarning"
)

LOGIN = "mailer@acme.test"
# '/', '+', a quote, a backslash and non-ASCII: every encoding spells it differently.
PASSWORD = 'p@ss/wörd+Q7"x\\9'


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def leaks(text: str, login: str = LOGIN, password: str = PASSWORD) -> list[str]:
    """What of the credentials `text` shows: the password (or 6 characters of it) in any
    text form, and either credential inside any base64 run, decoded at every offset."""
    found = []
    pw = password.encode()
    forms = {
        password,
        urllib.parse.quote(password, safe=""),
        urllib.parse.quote_plus(password),
        json.dumps(password)[1:-1],
        repr(password)[1:-1],
    }
    for form in forms:
        for start in range(len(form) - 5):
            if form[start : start + 6] in text:
                found.append(f"password text {form[start : start + 6]!r}")
    if login in text:
        found.append("login")
    for run in re.findall(r"[A-Za-z0-9+/_=-]{4,}", text):
        standard = run.replace("-", "+").replace("_", "/").rstrip("=")
        for skip in range(4):
            chunk = standard[skip:]
            chunk = chunk[: len(chunk) - len(chunk) % 4]
            try:
                decoded = base64.b64decode(chunk, validate=True)
            except (binascii.Error, ValueError):
                continue
            if login.encode() in decoded:
                found.append(f"base64 login in {run!r}")
            if any(pw[i : i + 6] in decoded for i in range(len(pw) - 5)):
                found.append(f"base64 password in {run!r}")
    return found


# -- the redactor ------------------------------------------------------------------------------


@pytest.fixture
def smtp_redactor() -> Redactor:
    return Redactor.from_credentials(
        {"username": LOGIN, "password": PASSWORD}, identifiers={"username"}
    )


PLAIN = b"\0" + LOGIN.encode() + b"\0" + PASSWORD.encode()


@pytest.mark.parametrize(
    "shown",
    [
        PASSWORD,
        urllib.parse.quote(PASSWORD, safe=""),
        urllib.parse.quote(PASSWORD),
        urllib.parse.quote_plus(PASSWORD),
        json.dumps(PASSWORD)[1:-1],
        json.dumps(PASSWORD, ensure_ascii=False)[1:-1],
        repr(PASSWORD)[1:-1],
        repr(PASSWORD.encode())[2:-1],
        b64(PASSWORD.encode()),  # AUTH LOGIN's second line
        b64(PASSWORD.encode()).rstrip("="),
        base64.urlsafe_b64encode(PASSWORD.encode()).decode(),
        b64(LOGIN.encode()),  # AUTH LOGIN's first line
        b64(PLAIN),  # AUTH PLAIN, empty authorization identity (what aiosmtplib sends)
        base64.urlsafe_b64encode(PLAIN).decode().rstrip("="),
        b64(LOGIN.encode() + PLAIN),  # AUTH PLAIN with the login as authorization identity
        b64(f"user={LOGIN}\x01auth=Bearer {PASSWORD}\x01\x01".encode()),  # XOAUTH2
        b64(f"{LOGIN}:{PASSWORD}".encode()),  # HTTP Basic
        b64(LOGIN.encode() + b" " + hmac.new(b"k", b"c", "md5").hexdigest().encode()),  # CRAM
        LOGIN,
    ],
)
def test_every_encoding_of_the_credentials_is_redacted(smtp_redactor: Redactor, shown: str) -> None:
    text = f"535 5.7.8 Authentication failed for {shown} (try again)"
    assert smtp_redactor(text) == f"535 5.7.8 Authentication failed for {REDACTED} (try again)"


@given(
    prefix=st.binary(max_size=12),
    suffix=st.binary(max_size=12),
    secret=st.text(min_size=4, max_size=40).filter(lambda s: "\n" not in s),
    urlsafe=st.booleans(),
)
@settings(max_examples=200, deadline=None)
def test_a_secret_is_found_anywhere_inside_base64(
    prefix: bytes, suffix: bytes, secret: str, urlsafe: bool
) -> None:
    encode = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    line = encode(prefix + secret.encode() + suffix).decode()
    assert Redactor([secret])(f"\n{line}\n") == f"\n{REDACTED}\n"


def test_fragments_of_a_secret_are_redacted_from_the_documented_length() -> None:
    token = "tok_9f8e7d6c5b4a3f2e1d0c"  # 24 characters: fragments of 8 count
    redact = Redactor([token])
    assert fragment_length(len(token)) == 8
    assert redact(f"invalid key {token[:8]}…") == f"invalid key {REDACTED}…"
    assert redact(f"key ending {token[-8:]}") == f"key ending {REDACTED}"
    assert redact(f"invalid key {token[:7]}…") == f"invalid key {token[:7]}…"
    truncated = b64(token.encode())[:12]  # 9 bytes of the token
    assert redact(f"535 {truncated}") == f"535 {REDACTED}"
    # Shorter secrets: more than half of them, never fewer than 4 characters.
    assert [fragment_length(n) for n in (4, 5, 9, 10, 13, 14, 40)] == [4, 4, 5, 6, 7, 8, 8]
    short = Redactor(["abcdefghij"])  # 10 characters: fragments of 6 count
    assert short("got cdefgh!") == f"got {REDACTED}!"
    assert short("got cdefg!") == "got cdefg!"


def test_identifiers_are_redacted_whole_and_by_fragment_only_in_base64(
    smtp_redactor: Redactor,
) -> None:
    # The login's domain is the sender's too: a fragment rule would cut up ordinary errors.
    text = "recipient refused: hello@acme.test"
    assert smtp_redactor(text) == text
    assert smtp_redactor(f"login {LOGIN} refused") == f"login {REDACTED} refused"
    truncated_plain = b64(PLAIN)[:16]  # "\0mailer@acme" and no byte of the password
    assert smtp_redactor(f"535 {truncated_plain}…") == f"535 {REDACTED}…"


def test_short_secrets_are_redacted_only_where_they_stand_alone() -> None:
    redact = Redactor(["pw7"], identifiers=["u"])
    assert redact("password pw7 refused") == f"password {REDACTED} refused"
    assert redact("upw7x stays") == "upw7x stays"
    # Too short to find inside base64 alone, but found in the exact strings dripd sends.
    for sent in (b"pw7", b"\0u\0pw7", b"u\0u\0pw7", b"u:pw7"):
        assert redact(f"535 {b64(sent)}") == f"535 {REDACTED}", sent


def test_ordinary_text_is_left_alone(smtp_redactor: Redactor) -> None:
    for text in [
        "smtp 127.0.0.1:2525: recipient refused, server replied 550 5.1.1 No such user",
        "smtp 127.0.0.1:2525: timed out: Timed out connecting to 127.0.0.1 on port 2525",
        "greeting refused: 421 4.3.2 Service not available",
        "Message-ID <0b5e7c2e-4e5f-4bb0-9d1e-3f6f1a0c2b9d.0@dripd.local>",
        "",
    ]:
        assert smtp_redactor(text) == text
    assert Redactor()("anything") == "anything"
    assert not Redactor()


def test_a_redactor_never_shows_its_secrets(smtp_redactor: Redactor) -> None:
    assert repr(smtp_redactor) == "Redactor(2 secrets)"
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(smtp_redactor)


def test_redactors_combine() -> None:
    both = Redactor(["first-secret"]) | Redactor(["second-secret"])
    assert both("first-secret second-secret") == f"{REDACTED} {REDACTED}"


def test_credential_values_of_every_shape_are_secrets() -> None:
    redact = Redactor.from_credentials(
        {"account_sid": "AC0123456789", "nested": {"keys": ["key-one-1234", 98765432]}},
        identifiers={"account_sid"},
    )
    assert redact("AC0123456789 key-one-1234 98765432") == " ".join([REDACTED] * 3)
    assert redact("AC01234567") == "AC01234567"  # an identifier's fragment stays


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "https://crm.example.com/score/ann@example.com?email=ann@example.com",
            "https://crm.example.com/…",
        ),
        ("http://user:pw@127.0.0.1:8080/a/b#frag", "http://127.0.0.1:8080/…"),
        ("https://[::1]:8443/?token=t", "https://[::1]:8443/…"),
        ("https://crm.example.com/", "https://crm.example.com"),
        ("https://crm.example.com", "https://crm.example.com"),
        ("https://crm.example.com/#x", "https://crm.example.com/…"),
    ],
)
def test_urls_are_cut_to_scheme_and_host(url: str, shown: str) -> None:
    assert url_for_log(url) == shown
    assert urls_for_log(f'HTTP Request: POST {url} "HTTP/1.1 200 OK"') == (
        f'HTTP Request: POST {shown} "HTTP/1.1 200 OK"'
    )


# -- channels built by the registry ------------------------------------------------------------


def adapter(provider: str, credentials: dict[str, Any], **config: Any) -> Adapter:
    return Adapter(
        id=uuid.uuid4(),
        tenant_key=None,
        name="relay",
        channel="email",
        provider=provider,
        config=config,
        credentials=credentials,
        is_default=True,
        enabled=True,
    )


def message() -> Message:
    execution_id = uuid.uuid4()
    return Message(
        execution_id=execution_id,
        idempotency_key=f"{execution_id}:0",
        message_id=f"<{execution_id}.0@dripd.local>",
        channel="email",
        to="ada@example.test",
        subject="Hi",
        text="Hello",
    )


class Leaky:
    """A provider whose errors quote its credential, as a careless HTTP provider's might."""

    provider = "leaky"
    capacity = 3

    def __init__(self, key: str, error: Exception) -> None:
        self._key, self._error = key, error

    async def send(self, message: Message) -> Receipt:
        raise self._error

    async def aclose(self) -> None:
        raise TransientError(f"close failed for key {self._key}")


@pytest.fixture
def leaky(monkeypatch: pytest.MonkeyPatch) -> dict[str, Exception]:
    """A `leaky` provider (with an `api_key`) registered for this test only; set `error`
    to what its send raises."""
    raising: dict[str, Exception] = {}

    def check(config: Any, credentials: Any) -> None:
        if not str(credentials.get("api_key", "")).startswith("key-"):
            raise ConfigError(f"api_key {credentials.get('api_key')!r} must start with key-")

    spec = registry.ProviderSpec(
        name="leaky",
        channels=None,
        config_keys=frozenset(),
        required_config=frozenset(),
        credential_keys=frozenset({"api_key"}),
        required_credentials=frozenset({"api_key"}),
        factory=lambda a, _context: Leaky(a.credentials["api_key"], raising["error"]),
        check=check,
    )
    monkeypatch.setitem(registry._providers, "leaky", spec)
    return raising


KEY = "key-7Hq2LmZ9xR4tVw8K"
WRONG_KEY = "sk-live-0123456789"


def chain_text(exc: BaseException) -> str:
    """Everything an exception shows: its text, args, notes, traceback, and those of its
    causes and of the contexts it does not suppress (as a printed traceback shows them)."""
    parts = ["".join(traceback.format_exception(exc))]
    seen: BaseException | None = exc
    while seen is not None:
        parts += [str(seen), repr(seen), repr(seen.args), *getattr(seen, "__notes__", [])]
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    return "\n".join(parts)


@pytest.mark.parametrize(
    ("error", "expected_type", "expected"),
    [
        (
            PermanentError(f"401 invalid key {KEY}", bounce=True),
            PermanentError,
            f"401 invalid key {REDACTED}",
        ),
        (
            TransientError(f"429 for Basic {b64(f'api:{KEY}'.encode())}", provider_wide=True),
            TransientError,
            f"429 for Basic {REDACTED}",
        ),
        (
            KeyError(f"https://api.example.com/send?api_key={urllib.parse.quote(KEY)}"),
            TransientError,
            f"leaky adapter error: KeyError: 'https://api.example.com/send?api_key={REDACTED}'",
        ),
    ],
)
async def test_every_channel_error_passes_through_the_redactor(
    leaky: dict[str, Exception],
    error: Exception,
    expected_type: type[ChannelError],
    expected: str,
) -> None:
    leaky["error"] = error
    channel = registry.build(adapter("leaky", {"api_key": KEY}))
    assert isinstance(channel, RedactedChannel)
    assert channel.capacity == 3
    with capture_logs() as events, pytest.raises(ChannelError) as caught:
        await channel.send(message())
    assert type(caught.value) is expected_type
    assert str(caught.value) == expected
    # The class's fields survive the copy.
    assert getattr(caught.value, "bounce", None) == getattr(error, "bounce", None)
    assert getattr(caught.value, "provider_wide", False) == getattr(error, "provider_wide", False)
    assert (caught.value.__cause__, caught.value.__context__) == (None, None)
    assert KEY not in chain_text(caught.value)
    assert KEY[:8] not in chain_text(caught.value)
    if isinstance(error, ChannelError):
        assert events == []
    else:  # a provider bug is logged once, with its traceback redacted
        [event] = events
        assert event["event"] == "adapter raised an unexpected error"
        assert "KeyError" in event["exception"]
        assert KEY not in str(event)
    with pytest.raises(TransientError) as closing:
        await channel.aclose()
    assert str(closing.value) == f"close failed for key {REDACTED}"


class Throttled(TransientError):
    """A provider's own error whose constructor takes more than the message."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message, provider_wide=True)
        self.retry_after = retry_after


async def test_a_providers_own_error_class_keeps_its_kind(leaky: dict[str, Exception]) -> None:
    leaky["error"] = Throttled(f"429 slow down, {KEY}", 30.0)
    channel = registry.build(adapter("leaky", {"api_key": KEY}))
    with pytest.raises(TransientError) as caught:
        await channel.send(message())
    assert str(caught.value) == f"429 slow down, {REDACTED}"
    assert caught.value.provider_wide
    assert (caught.value.__cause__, caught.value.__context__) == (None, None)


def test_validation_errors_never_quote_a_credential(leaky: dict[str, Exception]) -> None:
    wrong = {"api_key": WRONG_KEY}
    with pytest.raises(ConfigError) as caught:
        registry.validate("email", "leaky", {}, wrong)
    assert str(caught.value) == f"api_key '{REDACTED}' must start with key-"
    assert (caught.value.__cause__, caught.value.__context__) == (None, None)
    assert WRONG_KEY not in chain_text(caught.value)
    with pytest.raises(ConfigError) as built:
        registry.build(adapter("leaky", wrong))
    assert str(built.value) == f"adapter 'relay': api_key '{REDACTED}' must start with key-"
    assert WRONG_KEY not in chain_text(built.value)


def test_a_credential_given_as_config_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError) as caught:
        registry.validate(
            "email", "smtp", {"host": "h", "from": "a@b.test", "password": "hunter2-xyz"}, {}
        )
    assert str(caught.value) == (
        "adapter config key 'password' is a credential of provider 'smtp': give it among the "
        "credentials (`--credentials-file`), which are stored encrypted"
    )


# -- an SMTP server that echoes the AUTH line in its 535 -----------------------------------------


class EchoingAuth:
    """An aiosmtpd handler whose AUTH mechanisms answer 535 quoting what the client sent:
    the base64 lines as they came (`echo="line"`), their first 16 characters
    (`"truncated"`), or the decoded text (`"decoded"`)."""

    def __init__(self, echo: str) -> None:
        self.echo = echo
        self.lines: list[str] = []

    def _show(self, line: str) -> str:
        self.lines.append(line)
        if self.echo == "truncated":
            return line[:16]
        if self.echo == "decoded":
            return repr(base64.b64decode(line).decode(errors="replace"))
        return line

    async def _read(self, server: SMTP, challenge: bytes) -> str:
        await server.push(b"334 " + base64.b64encode(challenge))
        return (await server._reader.readline()).decode().strip()

    def _refuse(self, *shown: str) -> AuthResult:
        return AuthResult(
            success=False, handled=False, message=f"535 5.7.8 Bad credentials: {' '.join(shown)}"
        )

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        line = args[1] if len(args) > 1 else await self._read(server, b"")
        return self._refuse(self._show(line))

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        user = args[1] if len(args) > 1 else await self._read(server, b"Username:")
        password = await self._read(server, b"Password:")
        return self._refuse(self._show(user), self._show(password))

    async def auth_CRAM__MD5(self, server: SMTP, args: list[str]) -> AuthResult:
        return self._refuse(self._show(await self._read(server, b"<1896.697170952@mx.test>")))


MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")


@pytest.fixture
def echoing_server() -> Iterator[Any]:
    controllers: list[Controller] = []

    def start(mechanism: str, echo: str = "line") -> tuple[EchoingAuth, int]:
        handler = EchoingAuth(echo)
        port = free_port()
        controller = Controller(
            handler,
            hostname="127.0.0.1",
            port=port,
            auth_require_tls=False,
            auth_exclude_mechanism=[m for m in MECHANISMS if m != mechanism],
        )
        controller.start()
        controllers.append(controller)
        return handler, port

    yield start
    for controller in controllers:
        stop_controller(controller)


def smtp_adapter(port: int, password: str = PASSWORD) -> Adapter:
    return adapter(
        "smtp",
        {"username": LOGIN, "password": password},
        host="127.0.0.1",
        port=port,
        tls="none",
        timeout=5,
        **{"from": "hello@acme.test"},
    )


@pytest.mark.parametrize("echo", ["line", "truncated", "decoded"])
@pytest.mark.parametrize("mechanism", MECHANISMS)
async def test_an_smtp_server_echoing_the_auth_line_shows_no_credential(
    echoing_server: Any, mechanism: str, echo: str
) -> None:
    handler, port = echoing_server(mechanism, echo)
    channel = registry.build(smtp_adapter(port))
    try:
        with pytest.raises(PermanentError) as caught:
            await channel.send(message())
    finally:
        await channel.aclose()
    assert handler.lines, "the client never sent its credentials"
    text = str(caught.value)
    assert text.startswith(f"smtp 127.0.0.1:{port}: authentication failed: 535 5.7.8 Bad ")
    assert REDACTED in text
    assert leaks(chain_text(caught.value)) == []
    # What the client sent does show them: the check above can fail.
    assert leaks(" ".join(handler.lines)) != []


# -- through the daemon: last_error, message_events, logs, metrics -----------------------------


@pytest.mark.parametrize("mechanism", ["LOGIN", "PLAIN"])
async def test_an_echoed_auth_line_reaches_no_row_log_or_metric(
    dsn: str,
    pool: asyncpg.Pool,
    tmp_path: Path,
    echoing_server: Any,
    json_logs: io.StringIO,
    mechanism: str,
) -> None:
    handler, port = echoing_server(mechanism)
    key = generate_key()
    await apply_text(pool, one_email())
    await add_adapter(
        pool,
        name="relay",
        channel="email",
        provider="smtp",
        config=smtp_config(port),
        credentials={"username": LOGIN, "password": PASSWORD},
        vault=Vault.from_text(key),
    )
    clock = ManualClock()
    await api.enroll(
        pool,
        tenant=None,
        sequence_key="hello",
        subscriber_id="ada",
        data={"email": "ada@example.com", "first_name": "Ada"},
        now=clock.now(),
    )

    async def failed() -> asyncpg.Record | None:
        row: asyncpg.Record | None = await pool.fetchrow(
            "SELECT status, last_error FROM dripd.step_executions WHERE status = 'failed'"
        )
        return row

    async with running_daemon(
        dsn, tmp_path, clock=clock, env={"DRIPD_ENCRYPTION_KEY": key}
    ) as daemon:
        row = await wait_for(failed)
        metrics = daemon.metrics.render()[0].decode()
    assert handler.lines, "the client never sent its credentials"
    last_error = row["last_error"]
    assert last_error.startswith(
        f"permanent: smtp 127.0.0.1:{port}: authentication failed: 535 5.7.8 Bad credentials: "
    )
    assert REDACTED in last_error
    events = [
        json.dumps(dict(r)) for r in await pool.fetch("SELECT type, data FROM dripd.message_events")
    ]
    assert any(REDACTED in e for e in events)
    # The echoing server runs in this process and logs its replies ("mail.log"): leave it
    # out, it is not dripd's.
    lines = [json.loads(line) for line in json_logs.getvalue().splitlines()]
    ours = [line for line in lines if line.get("logger") != "mail.log"]
    output = "\n".join(json.dumps(line) for line in ours)
    [failed_line] = [line for line in ours if line["event"] == "execution failed"]
    assert failed_line["error"] == last_error
    for where, text in [
        ("last_error", last_error),
        ("message_events", "\n".join(events)),
        ("logs", output),
        ("metrics", metrics),
    ]:
        assert leaks(text) == [], where


# -- the sweep: DSNs, adapter listings, reprs -----------------------------------------------------

DSN_PASSWORD = "S3cretPw/9x"  # an unencoded '/': parsers read "S3cretPw" as the port


@pytest.mark.parametrize(
    "bad",
    [
        f"postgresql://app:{DSN_PASSWORD}@127.0.0.1:5432/db",
        f"postgresql://app:{DSN_PASSWORD.replace('/', '#')}@127.0.0.1:5432/db",
        f"postgresql://app:{DSN_PASSWORD.replace('/', '?')}@127.0.0.1:5432/db",
    ],
)
def test_a_malformed_dsn_never_shows_its_password(bad: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.check_dsn(bad, where="--dsn")
    assert str(caught.value) == (
        f"--dsn: not a PostgreSQL URI like postgresql://user:password@host:5432/dbname: "
        f"port '{REDACTED}' is not a port number (1 to 65535)"
    )
    assert "S3cret" not in chain_text(caught.value)


def test_dsn_secrets_reads_every_spelling_of_a_password() -> None:
    assert dsn_secrets("postgresql://u:p%40ss@h/db") == {"p%40ss", "p@ss"}
    assert dsn_secrets(f"postgresql://u:{DSN_PASSWORD}@h/db") == {DSN_PASSWORD, "S3cretPw", "9x"}
    assert dsn_secrets("postgresql://h/db?sslmode=require&password=pw%2Bx") == {"pw%2Bx", "pw+x"}
    assert dsn_secrets("host=h password='x y' user=u") == {"x y"}
    # No password, and a numeric port before an '@' in the query: nothing to hide.
    assert dsn_secrets("postgresql://u@h:5432/db?application_name=a@b") == set()


async def test_the_driver_refusing_a_dsn_does_not_show_its_password() -> None:
    # asyncpg reads the password's start as a port: int('S3cretPw') fails.
    with pytest.raises(ConfigError) as caught:
        await store.connect(f"postgresql://app:{DSN_PASSWORD}@127.0.0.1:5432/db")
    assert str(caught.value) == (
        f"the database DSN is invalid: invalid literal for int() with base 10: '{REDACTED}'"
    )
    assert "S3cret" not in chain_text(caught.value)


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`dripd.cli.main` in this process, without the ambient config."""
    for name in ("DRIPD_DSN", "DRIPD_ENCRYPTION_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DRIPD_CONFIG", str(tmp_path / "none.toml"))
    (tmp_path / "none.toml").write_text("")


@pytest.mark.usefixtures("cli")
def test_the_cli_shows_no_dsn_password(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["migrate", "--dsn", f"postgresql://app:{DSN_PASSWORD}@127.0.0.1:5432/db"])
    out, err = capsys.readouterr()
    assert code == 2
    assert "port '[REDACTED]' is not a port number" in err
    assert "S3cret" not in out + err


@pytest.mark.usefixtures("cli")
def test_adapter_listings_show_config_but_never_credentials(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    dsn: str,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("DRIPD_ENCRYPTION_KEY", generate_key())
    creds = tmp_path / "creds.json"
    creds.write_text(json.dumps({"username": LOGIN, "password": PASSWORD}))
    config_json = json.dumps(smtp_config(2525))
    add = ["adapter", "add", "relay", "--channel", "email", "--provider", "smtp", "--dsn", dsn]
    assert main([*add, "--config", config_json, "--credentials-file", str(creds)]) == 0
    misplaced = json.dumps({**smtp_config(2525), "password": PASSWORD})
    assert main([*add[:2], "other", *add[3:], "--config", misplaced]) == 2
    assert main(["adapter", "list", "--dsn", dsn, "--json"]) == 0
    assert main(["adapter", "list", "--dsn", dsn]) == 0
    out, err = capsys.readouterr()
    assert "is a credential of provider 'smtp'" in err
    listed = json.loads(out.splitlines()[1])  # after the add's one line
    assert [a["config"] for a in listed] == [smtp_config(2525)]
    assert "credentials" not in listed[0]
    assert leaks(out + err) == []


def test_objects_holding_credentials_never_show_them_in_repr() -> None:
    built = smtp_adapter(2525)
    settings = SmtpSettings.parse(built.config, built.credentials)
    vault = Vault.from_text(generate_key())
    channel = registry.build(built)
    target = parse_target(
        "https://crm.example.com/score?email=ann@example.com", NetPolicy(allow_http=True)
    )
    for shown in (built, settings, vault, channel, channel.wrapped, target):
        assert leaks(repr(shown)) == [], type(shown).__name__
    assert "ann@example.com" not in repr(target)


def test_the_config_repr_hides_the_dsn_password() -> None:
    cfg = config.from_dict({"database": {"dsn": "postgresql://app:S3cret-pw@db.example/app"}})
    assert repr(cfg.database) == (
        f"Database(dsn='postgresql://app:{REDACTED}@db.example/app', pool_min=2, pool_max=10, "
        "connect_timeout='10s')"
    )
    assert "S3cret" not in repr(cfg)
    assert cfg.database.dsn == "postgresql://app:S3cret-pw@db.example/app"


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        (base64.urlsafe_b64encode(b"k" * 31).decode(), "decodes to 31 bytes"),
        ("kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk!=", "is not valid base64"),
    ],
)
def test_a_bad_encryption_key_is_never_shown(key: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as caught:
        Vault.from_env({"DRIPD_ENCRYPTION_KEY": key})
    assert "kkkkkk" not in chain_text(caught.value)
    assert key[:8] not in chain_text(caught.value)
    good = generate_key()
    with pytest.raises(ConfigError, match=r"DRIPD_ENCRYPTION_KEYS_RETIRED \(key #2\)") as retired:
        Vault.from_env(
            {"DRIPD_ENCRYPTION_KEY": good, "DRIPD_ENCRYPTION_KEYS_RETIRED": f"{good},{key}"}
        )
    assert "kkkkkk" not in chain_text(retired.value)
    assert good[:8] not in chain_text(retired.value)


def test_http_client_log_lines_show_no_query_or_headers(json_logs: io.StringIO) -> None:
    url = "https://svc:pw-7Hq2@api.example.com/v1/send?api_key=key-7Hq2LmZ9&to=ann@example.com"
    logging.getLogger("httpx").info(
        'HTTP Request: %s %s "%s %d %s"', "POST", url, "HTTP/1.1", 200, "OK"
    )
    logging.getLogger("httpcore.http11").debug(
        "receive_response_headers.complete return_value=(b'HTTP/1.1', 200, b'OK', "
        "[(b'Set-Cookie', b'session=cookie-9f3')])"
    )
    logging.getLogger("dripd.other").info("left alone: %s", url)
    events = [json.loads(line)["event"] for line in json_logs.getvalue().splitlines()]
    assert events == [
        'HTTP Request: POST https://api.example.com/… "HTTP/1.1 200 OK"',
        "receive_response_headers.complete",
        f"left alone: {url}",
    ]
