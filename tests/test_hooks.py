"""Hooks: parsing, the SSRF guard, signed HTTP calls to a real local server, and Python hooks."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import secrets as random_secrets
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from pathlib import Path
from typing import Any

import hookmods
import httpx
import pytest
from background import Background
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from standardwebhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dripd.conditions.hooks import (
    MAX_RESPONSE_BYTES,
    HookEnrollment,
    HookError,
    Hooks,
    HookStep,
    PythonHook,
    build_client,
    load_python,
)
from dripd.conditions.hookspecs import (
    BasicAuth,
    BearerAuth,
    HttpHookSpec,
    PythonHookSpec,
    parse_hooks,
)
from dripd.errors import SequenceFileError
from dripd.http.app import HttpServer
from dripd.netguard import NetPolicy, check_url

SIGNING_KEY = "whsec_" + base64.b64encode(random_secrets.token_bytes(24)).decode()
SECRETS = {
    "crm_signing": SIGNING_KEY,
    "crm_token": "tok-SECRET-5f3a9c",
    "crm_pw": "pw-SECRET-81b2d4",
    "crm_key": "key-SECRET-77e0aa",
}
LOCAL = NetPolicy(allow_http=True, allowed_networks=(ip_network("127.0.0.1/32"),))
ENROLLMENT = HookEnrollment(
    id="00000000-0000-4000-8000-000000000042",
    tenant_key="acme",
    sequence_key="onboarding",
    subscriber_type="user",
    subscriber_id="sub-42",
    data={"plan": "pro"},
)
STEP = HookStep(key="welcome", channel="email")
CONTEXT = {"subscriber_id": "sub-42", "email": "ann@example.com", "team": "growth"}
WEBHOOK_ID = "0b5e7c2e-exec.score"


# -- a real HTTP server on loopback that checks signatures and records requests -------------


@dataclass
class Seen:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    signed: bool
    client_port: int


Reply = Response | Callable[[], Awaitable[Response]]


@dataclass
class Receiver:
    seen: list[Seen] = field(default_factory=list)
    replies: list[Reply] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0

    async def handle(self, request: Request) -> Response:
        body = await request.body()
        headers = dict(request.headers)
        try:
            Webhook(SIGNING_KEY).verify(body, headers, json_parse=False)
            signed = True
        except WebhookVerificationError:
            signed = False
        self.seen.append(
            Seen(
                method=request.method,
                path=request.url.path,
                query=request.url.query,
                headers=headers,
                body=body,
                signed=signed,
                client_port=request.client.port if request.client else 0,
            )
        )
        reply = self.replies.pop(0) if self.replies else JSONResponse({"ok": True})
        return reply if isinstance(reply, Response) else await reply()

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    app = Starlette(routes=[Route("/{path:path}", receiver.handle, methods=methods)])
    server = HttpServer(app, graceful_timeout=1.0)
    running = Background(server.serve, "127.0.0.1", 0)
    await running.start()
    assert server.port is not None
    receiver.port = server.port
    try:
        yield receiver
    finally:
        receiver.release.set()
        await running.stop()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with build_client() as c:
        yield c


@dataclass
class Harness:
    client: httpx.AsyncClient
    sleeps: list[float] = field(default_factory=list)
    secrets: dict[str, str] = field(default_factory=lambda: dict(SECRETS))

    async def secret(self, name: str) -> str:
        if name not in self.secrets:
            raise HookError(f"no secret named {name!r}")
        return self.secrets[name]

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    def hooks(self, table: dict[str, Any], **kwargs: Any) -> Hooks:
        kwargs.setdefault("policy", LOCAL)
        return Hooks(
            parse_hooks(table, where="test.toml"),
            secrets=self.secret,
            client=self.client,
            sleep=self.sleep,
            **kwargs,
        )


@pytest.fixture
def harness(client: httpx.AsyncClient) -> Harness:
    return Harness(client=client)


async def run(hooks: Hooks, name: str, context: dict[str, Any] | None = None) -> Any:
    return await hooks.run(
        name,
        context=CONTEXT if context is None else context,
        webhook_id=WEBHOOK_ID,
        enrollment=ENROLLMENT,
        step=STEP,
    )


def http_hook(url: str, **extra: Any) -> dict[str, Any]:
    return {"url": url, "signing_secret": "crm_signing", **extra}


def assert_no_secret(exc: BaseException) -> None:
    chain: BaseException | None = exc
    while chain is not None:
        for name, value in SECRETS.items():
            assert value not in str(chain), f"secret {name} leaked into {chain!r}"
            assert value not in repr(chain.args)
        chain = chain.__cause__ or chain.__context__


# -- HTTP hooks against the local server ------------------------------------------------------


async def test_post_is_rendered_signed_and_authenticated(
    receiver: Receiver, harness: Harness
) -> None:
    receiver.replies = [JSONResponse({"score": 87, "tier": "gold"})]
    hooks = harness.hooks(
        {
            "score": http_hook(
                receiver.url("/score/{{ subscriber_id }}?src=dripd"),
                method="POST",
                headers={"X-Team": "{{ team }}", "X-Static": "yes"},
                body='{"email": "{{ email }}"}',
                auth={"type": "bearer", "secret": "crm_token"},
            )
        }
    )
    assert await run(hooks, "score") == {"score": 87, "tier": "gold"}
    [seen] = receiver.seen
    assert seen.signed
    assert seen.method == "POST"
    assert seen.path == "/score/sub-42"
    assert seen.query == "src=dripd"
    assert seen.headers["x-team"] == "growth"
    assert seen.headers["x-static"] == "yes"
    assert seen.headers["authorization"] == "Bearer tok-SECRET-5f3a9c"
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["webhook-id"] == WEBHOOK_ID
    assert seen.body == b'{"email": "ann@example.com"}'
    assert seen.headers["user-agent"].startswith("dripd/")


async def test_signature_uses_the_injected_wall_clock(receiver: Receiver, harness: Harness) -> None:
    stamp = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    hooks = harness.hooks({"score": http_hook(receiver.url("/s"))}, now=lambda: stamp)
    await run(hooks, "score")
    [seen] = receiver.seen
    assert not seen.signed  # 2030 is outside the receiver's tolerance of its own clock
    assert seen.headers["webhook-timestamp"] == str(int(stamp.timestamp()))
    expected = Webhook(SIGNING_KEY).sign(WEBHOOK_ID, stamp, "")
    assert seen.headers["webhook-signature"] == expected


@pytest.mark.parametrize(
    ("auth", "header", "expected"),
    [
        (
            {"type": "basic", "username": "svc", "secret": "crm_pw"},
            "authorization",
            "Basic " + base64.b64encode(b"svc:pw-SECRET-81b2d4").decode(),
        ),
        (
            {"type": "header", "name": "X-Api-Key", "secret": "crm_key"},
            "x-api-key",
            SECRETS["crm_key"],
        ),
        (
            {"type": "bearer", "secret": "crm_token"},
            "authorization",
            "Bearer " + SECRETS["crm_token"],
        ),
    ],
)
async def test_auth_kinds(
    receiver: Receiver, harness: Harness, auth: dict[str, str], header: str, expected: str
) -> None:
    hooks = harness.hooks({"score": http_hook(receiver.url("/a"), auth=auth)})
    await run(hooks, "score")
    [seen] = receiver.seen
    assert seen.signed
    assert seen.method == "GET"
    assert seen.body == b""
    assert seen.headers[header] == expected


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (Response("gold", media_type="text/plain"), "gold"),
        (Response(b"caf\xe9", headers={"content-type": "text/plain; charset=latin-1"}), "café"),
        (Response(status_code=204), None),
        (Response(b"", status_code=200, media_type="application/json"), None),
        (Response(b'{"a": [1, 2]}', media_type="application/problem+json"), {"a": [1, 2]}),
        (JSONResponse(["x", 1.5, None]), ["x", 1.5, None]),
    ],
)
async def test_response_bodies(
    receiver: Receiver, harness: Harness, reply: Response, expected: Any
) -> None:
    receiver.replies = [reply]
    hooks = harness.hooks({"score": http_hook(receiver.url("/r"), method="PUT", body="x")})
    assert await run(hooks, "score") == expected


async def test_invalid_json_and_oversized_responses_fail(
    receiver: Receiver, harness: Harness
) -> None:
    receiver.replies = [
        Response(b"{nope", media_type="application/json"),
        Response(b"x" * (MAX_RESPONSE_BYTES + 1), media_type="text/plain"),
    ]
    hooks = harness.hooks({"score": http_hook(receiver.url("/big"))})
    with pytest.raises(HookError, match=r"hook 'score'.*not valid JSON"):
        await run(hooks, "score")
    with pytest.raises(HookError, match=r"hook 'score'.*larger than 1048576 bytes"):
        await run(hooks, "score")
    assert len(receiver.seen) == 2  # neither is retried


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_retries_with_backoff_then_succeeds(
    receiver: Receiver, harness: Harness, status: int
) -> None:
    receiver.replies = [Response(status_code=status), Response(status_code=status)]
    hooks = harness.hooks({"score": http_hook(receiver.url("/flaky"))})
    assert await run(hooks, "score") == {"ok": True}
    assert len(receiver.seen) == 3
    assert harness.sleeps == [0.2, 0.4]
    assert all(seen.signed for seen in receiver.seen)
    assert {seen.headers["webhook-id"] for seen in receiver.seen} == {WEBHOOK_ID}


async def test_backoff_is_capped(receiver: Receiver, harness: Harness) -> None:
    receiver.replies = [Response(status_code=503)] * 6
    hooks = harness.hooks({"score": http_hook(receiver.url("/down"), retries=5)})
    with pytest.raises(HookError, match=r"gave up after 6 attempts"):
        await run(hooks, "score")
    assert harness.sleeps == [0.2, 0.4, 0.8, 1.6, 3.2]
    assert len(receiver.seen) == 6


async def test_exhausted_retries_name_the_hook(receiver: Receiver, harness: Harness) -> None:
    receiver.replies = [Response(status_code=503)] * 3
    hooks = harness.hooks({"score": http_hook(receiver.url("/down"))})
    with pytest.raises(HookError) as caught:
        await run(hooks, "score")
    assert str(caught.value) == (
        "hook 'score' (GET 127.0.0.1): HTTP 503 (gave up after 3 attempts)"
    )
    assert len(receiver.seen) == 3


async def test_client_error_is_not_retried(receiver: Receiver, harness: Harness) -> None:
    receiver.replies = [Response(status_code=400), JSONResponse({"never": "asked"})]
    hooks = harness.hooks({"score": http_hook(receiver.url("/bad"))})
    with pytest.raises(HookError) as caught:
        await run(hooks, "score")
    assert str(caught.value) == "hook 'score' (GET 127.0.0.1): answered HTTP 400"
    assert len(receiver.seen) == 1
    assert harness.sleeps == []


async def test_redirect_is_an_error_and_not_followed(receiver: Receiver, harness: Harness) -> None:
    receiver.replies = [Response(status_code=302, headers={"location": "/elsewhere"})]
    hooks = harness.hooks({"score": http_hook(receiver.url("/moved"))})
    with pytest.raises(HookError, match=r"answered HTTP 302 \(redirects are not followed\)"):
        await run(hooks, "score")
    assert [seen.path for seen in receiver.seen] == ["/moved"]


async def test_timeout_per_attempt(receiver: Receiver, harness: Harness) -> None:
    async def stall() -> Response:
        await receiver.release.wait()
        return Response("late")

    receiver.replies = [stall, stall]
    hooks = harness.hooks({"score": http_hook(receiver.url("/slow"), timeout="200ms", retries=1)})
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(HookError) as caught:
        await run(hooks, "score")
    assert str(caught.value) == (
        "hook 'score' (GET 127.0.0.1): timed out after 200ms (gave up after 2 attempts)"
    )
    assert 0.4 <= loop.time() - started < 5
    assert len(receiver.seen) == 2


async def test_connection_refused_is_retried_and_names_the_hook(harness: Harness) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    hooks = harness.hooks(
        {
            "score": http_hook(
                f"http://127.0.0.1:{port}/", auth={"type": "bearer", "secret": "crm_token"}
            )
        }
    )
    with pytest.raises(HookError, match=r"hook 'score' .*ConnectError.*gave up after 3") as caught:
        await run(hooks, "score")
    assert harness.sleeps == [0.2, 0.4]
    assert_no_secret(caught.value)


async def test_request_goes_to_the_checked_address_with_the_original_host(
    receiver: Receiver, harness: Harness
) -> None:
    lookups: list[tuple[str, int]] = []

    async def resolve(host: str, port: int) -> list[IPv4Address | IPv6Address]:
        lookups.append((host, port))
        return [ip_address("127.0.0.1")]

    # `.test` never resolves in real DNS: the request can only arrive through the checked address.
    url = f"http://crm.hooks.test:{receiver.port}/who"
    hooks = harness.hooks({"score": http_hook(url)}, resolve=resolve)
    assert await run(hooks, "score") == {"ok": True}
    [seen] = receiver.seen
    assert seen.headers["host"] == f"crm.hooks.test:{receiver.port}"
    assert seen.signed
    assert lookups == [("crm.hooks.test", receiver.port)]


async def test_each_attempt_checks_the_address_again(receiver: Receiver, harness: Harness) -> None:
    answers = [[ip_address("127.0.0.1")], [ip_address("10.0.0.1")]]

    async def rebinding(host: str, port: int) -> list[IPv4Address | IPv6Address]:
        return answers.pop(0)

    receiver.replies = [Response(status_code=503)]
    url = f"http://crm.hooks.test:{receiver.port}/rebind"
    hooks = harness.hooks({"score": http_hook(url)}, resolve=rebinding)
    with pytest.raises(
        HookError,
        match=r"refused host 'crm.hooks.test': 10.0.0.1 is not a public address \(private\)",
    ):
        await run(hooks, "score")
    assert len(receiver.seen) == 1


async def test_rendering_errors_name_the_hook_and_field(
    receiver: Receiver, harness: Harness
) -> None:
    hooks = harness.hooks(
        {
            "score": http_hook(receiver.url("/{{ nope }}")),
            "crlf": http_hook(receiver.url("/"), headers={"X-Team": "{{ team }}"}),
        }
    )
    with pytest.raises(HookError, match=r"^hook 'score': cannot render hooks\.score\.url: "):
        await run(hooks, "score")
    with pytest.raises(HookError, match=r"^hook 'crlf': header 'X-Team': .*control character"):
        await run(hooks, "crlf", {**CONTEXT, "team": "a\r\nX-Evil: 1"})
    assert receiver.seen == []


async def test_cookies_are_not_kept_between_calls(receiver: Receiver, harness: Harness) -> None:
    set_cookie = JSONResponse({"ok": True})
    set_cookie.set_cookie("session", "from-another-hook")
    receiver.replies = [set_cookie]
    hooks = harness.hooks({"score": http_hook(receiver.url("/c"))})
    await run(hooks, "score")
    await run(hooks, "score")
    assert "set-cookie" not in receiver.seen[0].headers
    assert "cookie" not in receiver.seen[1].headers


async def test_connections_are_not_reused_across_calls(
    receiver: Receiver, harness: Harness
) -> None:
    # The pool is keyed by address, not name: a reused TLS connection would carry one
    # name's verified session to another name on the same address.
    hooks = harness.hooks({"score": http_hook(receiver.url("/k"))})
    await run(hooks, "score")
    await run(hooks, "score")
    assert receiver.seen[0].client_port != receiver.seen[1].client_port


async def test_unknown_hook(harness: Harness) -> None:
    with pytest.raises(HookError, match=r"no hook named 'nope'"):
        await run(harness.hooks({}), "nope")


# -- secrets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 500])
async def test_secrets_never_appear_in_errors(
    receiver: Receiver, harness: Harness, status: int
) -> None:
    receiver.replies = [Response(SECRETS["crm_token"], status_code=status)] * 3
    hooks = harness.hooks(
        {
            "score": http_hook(
                receiver.url("/auth"),
                method="POST",
                body="{{ email }}",
                auth={"type": "bearer", "secret": "crm_token"},
            )
        }
    )
    with pytest.raises(HookError, match=r"hook 'score'") as caught:
        await run(hooks, "score")
    assert receiver.seen[0].headers["authorization"] == f"Bearer {SECRETS['crm_token']}"
    assert_no_secret(caught.value)


async def test_missing_and_unusable_secrets(receiver: Receiver, harness: Harness) -> None:
    hooks = harness.hooks(
        {
            "score": http_hook(receiver.url("/"), auth={"type": "bearer", "secret": "crm_token"}),
            "nokey": http_hook(receiver.url("/"), signing_secret="nope"),
        }
    )
    harness.secrets["crm_token"] = "tok-SECRET-5f3a9c\n"
    with pytest.raises(HookError) as caught:
        await run(hooks, "score")
    assert str(caught.value) == (
        "hook 'score': secret 'crm_token' is empty, has surrounding whitespace or a control "
        "character"
    )
    assert_no_secret(caught.value)

    with pytest.raises(HookError, match=r"^hook 'nokey': no secret named 'nope'$"):
        await run(hooks, "nokey")

    harness.secrets["crm_token"] = SECRETS["crm_token"]
    harness.secrets["crm_signing"] = "whsec_!"
    with pytest.raises(HookError) as caught:
        await run(hooks, "score")
    assert "secret 'crm_signing' is not a Standard Webhooks key" in str(caught.value)
    assert "whsec_!" not in str(caught.value)
    assert receiver.seen == []


async def test_logs_show_a_hook_url_scheme_and_host_only(
    receiver: Receiver, harness: Harness, json_logs: io.StringIO
) -> None:
    receiver.replies = [
        JSONResponse({"ok": True}, headers={"set-cookie": "session=cookie-SECRET-19c4"}),
        Response(status_code=400),
    ]
    url = receiver.url("/score/{{ subscriber_id }}?email={{ email }}&src=dripd#{{ team }}")
    hooks = harness.hooks({"score": http_hook(url)})
    assert await run(hooks, "score") == {"ok": True}
    with pytest.raises(HookError) as caught:
        await run(hooks, "score")
    assert str(caught.value) == "hook 'score' (GET 127.0.0.1): answered HTTP 400"
    assert receiver.seen[0].query == "email=ann@example.com&src=dripd"  # it was sent
    lines = [json.loads(line) for line in json_logs.getvalue().splitlines()]
    requests = [line["event"] for line in lines if line.get("logger") == "httpx"]
    shown = f"http://127.0.0.1:{receiver.port}/…"  # the path holds the subscriber id
    assert requests == [
        f'HTTP Request: GET {shown} "HTTP/1.1 200 OK"',
        f'HTTP Request: GET {shown} "HTTP/1.1 400 Bad Request"',
    ]
    # httpcore's debug traces keep their step name only (not the response's headers).
    traces = [line["event"] for line in lines if line.get("logger", "").startswith("httpcore")]
    assert "receive_response_headers.complete" in traces
    assert all(" " not in trace for trace in traces)
    output = json_logs.getvalue()
    for private in (
        "ann@example.com",
        "ann%40example.com",
        "email=",
        "growth",
        "cookie-SECRET",
        "sub-42",
    ):
        assert private not in output, private


async def test_hook_errors_show_the_url_scheme_and_host_only(harness: Harness) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        # A transport that quotes the request in its error, as some do.
        raise httpx.ConnectError(
            f"cannot reach {request.url} with {request.headers['authorization']}",
            request=request,
        )

    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as client:
        harness.client = client
        hooks = harness.hooks(
            {
                "score": http_hook(
                    "http://127.0.0.1:9/score/{{ subscriber_id }}?email={{ email }}",
                    auth={"type": "bearer", "secret": "crm_token"},
                    retries=0,
                ),
                "port": http_hook("http://127.0.0.1:{{ team }}/x?email={{ email }}"),
            }
        )
        with pytest.raises(HookError) as caught:
            await run(hooks, "score")
        assert str(caught.value) == (
            "hook 'score' (GET 127.0.0.1): ConnectError: cannot reach "
            "http://127.0.0.1:9/… with Bearer [REDACTED] (gave up after 1 attempt)"
        )
        assert_no_secret(caught.value)
        with pytest.raises(HookError) as bad_url:
            await run(hooks, "port")
    assert str(bad_url.value) == "hook 'port': the URL is not valid: Invalid port: 'growth'"
    assert "ann@example.com" not in chain_text(caught.value) + chain_text(bad_url.value)
    assert "sub-42" not in chain_text(caught.value)


def chain_text(exc: BaseException) -> str:
    seen: BaseException | None = exc
    parts = []
    while seen is not None:
        parts += [str(seen), repr(seen.args)]
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


# -- TLS: the certificate is verified against the host name, not the address -----------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path


def _pki(tmp_path: Path, dns_name: str) -> Pki:
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dripd test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(ca=tmp_path / "ca.pem", cert=tmp_path / "cert.pem", key=tmp_path / "key.pem")
    pki.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pki


@dataclass
class TlsServer:
    port: int = 0
    server_names: list[str | None] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)


@contextlib.asynccontextmanager
async def tls_server(pki: Pki) -> AsyncIterator[TlsServer]:
    """A minimal HTTPS server that records the SNI name and the Host header it receives."""
    state = TlsServer()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.cert, pki.key)

    def on_sni(_sock: Any, server_name: str | None, _context: Any) -> None:
        state.server_names.append(server_name)

    context.sni_callback = on_sni

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.lower() == "host":
                    state.hosts.append(value.strip())
            body = b'{"tls": true}'
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        await server.wait_closed()


async def test_https_connects_to_the_address_and_verifies_the_name(tmp_path: Path) -> None:
    pki = _pki(tmp_path, "crm.hooks.test")

    async def resolve(host: str, port: int) -> list[IPv4Address | IPv6Address]:
        return [ip_address("127.0.0.1")]

    trust = ssl.create_default_context(cafile=str(pki.ca))
    async with tls_server(pki) as server, build_client(verify=trust) as client:
        hooks = Harness(client=client).hooks(
            {
                "good": http_hook(f"https://crm.hooks.test:{server.port}/x"),
                "wrong": http_hook(f"https://evil.hooks.test:{server.port}/x", retries=0),
            },
            resolve=resolve,
            policy=NetPolicy(allowed_networks=(ip_network("127.0.0.1/32"),)),
        )
        assert await run(hooks, "good") == {"tls": True}
        assert server.server_names == ["crm.hooks.test"]
        assert server.hosts == [f"crm.hooks.test:{server.port}"]
        # The same address under a name the certificate does not cover must fail verification.
        with pytest.raises(HookError, match=r"hook 'wrong' .*CERTIFICATE_VERIFY_FAILED"):
            await run(hooks, "wrong")
        assert server.hosts == [f"crm.hooks.test:{server.port}"]


# -- the SSRF guard --------------------------------------------------------------------------


async def no_lookup(host: str, port: int) -> list[IPv4Address | IPv6Address]:
    raise AssertionError(f"an address literal was looked up: {host}")


def resolving_to(*addresses: str) -> Callable[[str, int], Awaitable[Sequence[Any]]]:
    async def resolve(host: str, port: int) -> list[IPv4Address | IPv6Address]:
        return [ip_address(a) for a in addresses]

    return resolve


@pytest.mark.parametrize(
    ("host", "why"),
    [
        ("127.0.0.1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("100.64.0.1", "shared (CGNAT)"),
        ("0.0.0.0", "unspecified"),  # noqa: S104 -- refused, never bound
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "broadcast"),
        ("192.0.2.10", "documentation"),
        ("198.51.100.7", "documentation"),
        ("203.0.113.9", "documentation"),
        ("198.18.0.1", "benchmarking"),
        ("192.0.0.8", "IETF protocol"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("fe80::1", "link-local"),
        ("ff02::1", "multicast"),
        ("2001:db8::1", "documentation"),
        ("::ffff:127.0.0.1", "IPv4-mapped 127.0.0.1: loopback"),
        ("::ffff:169.254.169.254", "IPv4-mapped 169.254.169.254: link-local"),
        # NAT64 (the RFC 6052 well-known prefix) is judged by the IPv4 address it embeds.
        ("64:ff9b::a00:1", "NAT64 10.0.0.1: private"),
        ("2002:a00:1::1", "6to4 10.0.0.1: private"),
        ("::a00:1", "IPv4-compatible 10.0.0.1: private"),
        ("64:ff9b:1::a00:1", "local-use NAT64"),
        ("2001::1", "Teredo"),
    ],
)
async def test_refuses_internal_address_literals(host: str, why: str) -> None:
    literal = f"[{host}]" if ":" in host else host
    with pytest.raises(HookError) as caught:
        await check_url(f"https://{literal}/x", policy=NetPolicy(), resolve=no_lookup)
    address = ip_address(host)  # printed as Python prints it: ::ffff:7f00:1 before 3.13
    assert str(caught.value) == f"refused host {host!r}: {address} is not a public address ({why})"


async def test_refuses_http_by_default() -> None:
    with pytest.raises(HookError, match=r"URL scheme 'http' is not allowed; use https$"):
        await check_url("http://example.com/", policy=NetPolicy(), resolve=no_lookup)
    with pytest.raises(HookError, match=r"URL scheme 'ftp' is not allowed; use https or http$"):
        await check_url("ftp://example.com/", policy=LOCAL, resolve=no_lookup)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("https:///path", "the URL has no host"),
        ("not a url", "URL scheme '' is not allowed"),
        ("https://user:pw@example.com/", "the URL must not contain credentials"),
    ],
)
async def test_refuses_malformed_urls(url: str, why: str) -> None:
    with pytest.raises(HookError, match=why):
        await check_url(url, policy=NetPolicy(), resolve=no_lookup)


async def test_refuses_a_name_when_any_address_is_internal() -> None:
    resolve = resolving_to("93.184.215.14", "10.1.2.3")
    with pytest.raises(HookError) as caught:
        await check_url("https://mixed.example.com/", policy=NetPolicy(), resolve=resolve)
    assert str(caught.value) == (
        "refused host 'mixed.example.com': 10.1.2.3 is not a public address (private)"
    )


async def test_accepts_public_addresses() -> None:
    public = ("93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c", "64:ff9b::808:808")
    found = await check_url(
        "https://crm.example.com/score", policy=NetPolicy(), resolve=resolving_to(*public)
    )
    assert found == [ip_address(a) for a in public]
    assert await check_url("https://8.8.8.8/", policy=NetPolicy(), resolve=no_lookup) == [
        ip_address("8.8.8.8")
    ]


async def test_resolver_gets_host_and_default_port() -> None:
    calls: list[tuple[str, int]] = []

    async def resolve(host: str, port: int) -> list[IPv4Address | IPv6Address]:
        calls.append((host, port))
        return [ip_address("93.184.215.14")]

    await check_url("https://Bücher.Example/", policy=NetPolicy(), resolve=resolve)
    await check_url("http://crm.example.com:8080/", policy=LOCAL, resolve=resolve)
    assert calls == [("xn--bcher-kva.example", 443), ("crm.example.com", 8080)]


async def test_unresolvable_host() -> None:
    async def fail(host: str, port: int) -> list[IPv4Address | IPv6Address]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(HookError, match=r"cannot resolve 'gone.example': Name or service"):
        await check_url("https://gone.example/", policy=NetPolicy(), resolve=fail)
    with pytest.raises(HookError, match=r"cannot resolve 'empty.example'"):
        await check_url("https://empty.example/", policy=NetPolicy(), resolve=resolving_to())


async def test_allowed_networks_let_an_address_through() -> None:
    assert await check_url("http://127.0.0.1:8080/", policy=LOCAL, resolve=no_lookup) == [
        ip_address("127.0.0.1")
    ]
    with pytest.raises(HookError, match=r"127.0.0.2 is not a public address \(loopback\)"):
        await check_url("http://127.0.0.2:8080/", policy=LOCAL, resolve=no_lookup)
    with pytest.raises(HookError, match=r"127.0.0.1 is not a public address \(loopback\)"):
        await check_url("http://127.0.0.1:8080/", policy=NetPolicy(allow_http=True))


async def test_default_resolver_uses_getaddrinfo() -> None:
    loopback = (ip_network("127.0.0.0/8"), ip_network("::1/128"))
    policy = NetPolicy(allow_http=True, allowed_networks=loopback)
    found = await check_url("http://localhost:9/", policy=policy)
    assert found
    assert all(address.is_loopback for address in found)
    with pytest.raises(HookError, match=r"refused host 'localhost': .* \(loopback\)"):
        await check_url("https://localhost/", policy=NetPolicy())


# -- Python hooks ----------------------------------------------------------------------------


def test_load_python() -> None:
    assert load_python("hookmods:plan_for") is hookmods.plan_for
    assert load_python("hookmods.plan_for") is hookmods.plan_for
    assert load_python("hookmods:Namespace.nested") is hookmods.Namespace.nested


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (
            "no_such_module_dripd:fn",
            "no_such_module_dripd:fn: cannot import 'no_such_module_dripd': "
            "ModuleNotFoundError: No module named 'no_such_module_dripd'",
        ),
        ("hookmods:nope", "hookmods:nope: 'hookmods' has no attribute 'nope'"),
        (
            "hookmods:not_async",
            "hookmods:not_async: is not an async function (define it with `async def`)",
        ),
        ("hookmods", "'hookmods' is not a Python path"),
    ],
)
def test_load_python_errors(path: str, message: str) -> None:
    with pytest.raises(HookError) as caught:
        load_python(path)
    assert str(caught.value) == message


def python_hooks(harness: Harness, **table: dict[str, Any]) -> Hooks:
    return harness.hooks(dict(table))


async def test_python_hook_result_is_passed_through(harness: Harness) -> None:
    hooks = python_hooks(harness, plan={"python": "hookmods:plan_for"})
    assert await run(hooks, "plan") == {
        "plan": "pro",
        "enrollment": "00000000-0000-4000-8000-000000000042",
        "tenant": "acme",
        "sequence": "onboarding",
        "subscriber": "user:sub-42",
        "step": "welcome/email",
        "scores": [1, 2.5, None, True],
    }


async def test_python_hook_is_loaded_once(harness: Harness) -> None:
    loads: list[str] = []

    def loader(path: str) -> PythonHook:
        loads.append(path)
        return load_python(path)

    hooks = harness.hooks({"plan": {"python": "hookmods:plan_for"}}, python_loader=loader)
    await run(hooks, "plan")
    await run(hooks, "plan")
    assert loads == ["hookmods:plan_for"]


async def test_python_hook_load_error_names_the_hook(harness: Harness) -> None:
    hooks = python_hooks(harness, plan={"python": "hookmods:missing"})
    with pytest.raises(HookError) as caught:
        await run(hooks, "plan")
    assert str(caught.value) == (
        "hook 'plan': hookmods:missing: 'hookmods' has no attribute 'missing'"
    )


async def test_python_hook_raising(harness: Harness) -> None:
    hooks = python_hooks(harness, plan={"python": "hookmods:raises"})
    with pytest.raises(HookError) as caught:
        await run(hooks, "plan")
    assert (
        str(caught.value) == "hook 'plan' (hookmods:raises) raised ValueError: no plan for sub-42"
    )
    assert isinstance(caught.value.__cause__, ValueError)


async def test_python_hook_timeout(harness: Harness) -> None:
    hooks = python_hooks(
        harness,
        slow={"python": "hookmods:slow", "timeout": "100ms"},
        own={"python": "hookmods:own_timeout"},
    )
    with pytest.raises(HookError) as caught:
        await run(hooks, "slow")
    assert str(caught.value) == "hook 'slow' (hookmods:slow) timed out after 100ms"
    # A TimeoutError of the hook's own is reported as what it is, not as our timeout.
    with pytest.raises(HookError) as caught:
        await run(hooks, "own")
    assert str(caught.value) == (
        "hook 'own' (hookmods:own_timeout) raised TimeoutError: the CRM timed out"
    )


async def test_python_hook_cancellation_is_not_swallowed(harness: Harness) -> None:
    hooks = python_hooks(harness, slow={"python": "hookmods:slow"})
    task = asyncio.create_task(run(hooks, "slow"))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("hookmods:returns_set", "result['tags']: a set is not a JSON value"),
        ("hookmods:returns_tuple", "result[0]: a tuple is not a JSON value"),
        ("hookmods:returns_nan", "result['score']: nan is not a JSON number"),
        ("hookmods:returns_int_key", "result: key 1 is not a string"),
    ],
)
async def test_python_hook_non_json_result(harness: Harness, path: str, why: str) -> None:
    hooks = python_hooks(harness, plan={"python": path})
    with pytest.raises(HookError) as caught:
        await run(hooks, "plan")
    assert str(caught.value) == f"hook 'plan' ({path}) returned a non-JSON value: {why}"


# -- parsing ---------------------------------------------------------------------------------


def test_parse_full_and_default_specs() -> None:
    specs = parse_hooks(
        {
            "score": http_hook(
                "https://crm.example.com/score/{{ subscriber_id }}",
                method="POST",
                headers={"X-Team": "{{ team }}"},
                body='{"email": "{{ email }}"}',
                auth={"type": "basic", "username": "svc", "secret": "crm_pw"},
                timeout="5s",
                retries=0,
            ),
            "plain": http_hook("https://crm.example.com/plain"),
            "plan": {"python": "myapp.hooks:plan_for", "timeout": "2s"},
            "plan2": {"python": "myapp.hooks.plan_for"},
        },
        where="s.toml",
    )
    score, plain, plan, plan2 = specs["score"], specs["plain"], specs["plan"], specs["plan2"]
    assert isinstance(score, HttpHookSpec)
    assert score.name == "score"
    assert score.method == "POST"
    assert score.url.render(CONTEXT) == "https://crm.example.com/score/sub-42"
    assert {k: t.render(CONTEXT) for k, t in score.headers.items()} == {"X-Team": "growth"}
    assert score.body is not None
    assert score.body.render(CONTEXT) == '{"email": "ann@example.com"}'
    assert score.auth == BasicAuth(username="svc", secret="crm_pw")
    assert score.signing_secret == "crm_signing"
    assert (score.timeout, score.retries) == (timedelta(seconds=5), 0)
    assert isinstance(plain, HttpHookSpec)
    assert (plain.method, plain.body, plain.auth) == ("GET", None, None)
    assert (plain.timeout, plain.retries) == (timedelta(seconds=10), 2)
    assert plan == PythonHookSpec(
        name="plan", path="myapp.hooks:plan_for", timeout=timedelta(seconds=2)
    )
    assert plan2 == PythonHookSpec(
        name="plan2", path="myapp.hooks.plan_for", timeout=timedelta(seconds=5)
    )
    bearer = parse_hooks(
        {"b": http_hook("https://x", auth={"type": "bearer", "secret": "t"})}, where="s"
    )["b"]
    assert isinstance(bearer, HttpHookSpec)
    assert bearer == HttpHookSpec(
        name="b",
        url=bearer.url,
        headers={},
        auth=BearerAuth(secret="t"),
        signing_secret="crm_signing",
    )


HTTP = http_hook("https://crm.example.com/{{ subscriber_id }}")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            {"Score": HTTP},
            "hooks.Score: a hook name is lowercase letters, digits and '_', starting with a letter",
        ),
        ({"1score": HTTP}, "hooks.1score: a hook name is lowercase letters"),
        ({"score": "https://x"}, "hooks.score: must be a table"),
        ({"score": {}}, "hooks.score: needs `url` (an HTTP hook) or `python` (a Python hook)"),
        ({"score": {**HTTP, "python": "a:b"}}, "hooks.score: has both `url` and `python`"),
        ({"score": {**HTTP, "retry": 1}}, "hooks.score.retry: unknown key"),
        ({"score": {"url": "https://x"}}, "hooks.score.signing_secret: required key is missing"),
        ({"score": {**HTTP, "url": 5}}, "hooks.score.url: Expected `str`, got `int`"),
        ({"score": {**HTTP, "method": "FETCH"}}, "hooks.score.method: Invalid enum value 'FETCH'"),
        ({"score": {**HTTP, "timeout": "5 sec"}}, "hooks.score.timeout: '5 sec' is not a duration"),
        ({"score": {**HTTP, "timeout": 5}}, "hooks.score.timeout: Expected `str`, got `int`"),
        (
            {"score": {**HTTP, "timeout": "31s"}},
            "hooks.score.timeout: must be more than 0s and at most 30s",
        ),
        (
            {"score": {**HTTP, "timeout": "0s"}},
            "hooks.score.timeout: must be more than 0s and at most 30s",
        ),
        ({"score": {**HTTP, "retries": 6}}, "hooks.score.retries: Expected `int` <= 5"),
        ({"score": {**HTTP, "retries": -1}}, "hooks.score.retries: Expected `int` >= 0"),
        (
            {"score": {**HTTP, "body": "{}"}},
            "hooks.score.body: a GET request has no body; use POST, PUT or PATCH",
        ),
        (
            {"score": {**HTTP, "method": "DELETE", "body": "{}"}},
            "hooks.score.body: a DELETE request has no body",
        ),
        (
            {"score": {**HTTP, "url": "https://x/{{ id "}},
            "hooks.score.url: expected '}}', found end of file",
        ),
        (
            {"score": {**HTTP, "headers": {"X-Team": "{% if %}"}}},
            "hooks.score.headers.X-Team: missing expression",
        ),
        (
            {"score": {**HTTP, "method": "POST", "body": "{{ a | }}"}},
            "hooks.score.body: expected word",
        ),
        (
            {"score": {**HTTP, "headers": {"X Team": "a"}}},
            "hooks.score.headers.X Team: is not a valid header name",
        ),
        (
            {"score": {**HTTP, "headers": {"X-A": 5}}},
            "hooks.score.headers: Expected `str`, got `int`",
        ),
        (
            {"score": {**HTTP, "headers": {"Host": "a"}}},
            "hooks.score.headers.Host: is set by dripd (or by `auth`) and cannot be given",
        ),
        (
            {"score": {**HTTP, "headers": {"Webhook-Id": "a"}}},
            "hooks.score.headers.Webhook-Id: is set by dripd",
        ),
        (
            {"score": {**HTTP, "headers": {"X-A": "a", "x-a": "b"}}},
            "hooks.score.headers.x-a: is given twice (header names ignore case)",
        ),
        (
            {
                "score": {
                    **HTTP,
                    "auth": {"type": "bearer", "secret": "t"},
                    "headers": {"Authorization": "x"},
                }
            },
            "hooks.score.headers.Authorization: is set by dripd (or by `auth`)",
        ),
        (
            {
                "score": {
                    **HTTP,
                    "auth": {"type": "header", "name": "X-Key", "secret": "t"},
                    "headers": {"x-key": "a"},
                }
            },
            "hooks.score.headers.x-key: is set by dripd (or by `auth`)",
        ),
        (
            {"score": {**HTTP, "auth": {"type": "oauth", "secret": "t"}}},
            "hooks.score.auth.type: Invalid value 'oauth'",
        ),
        (
            {"score": {**HTTP, "auth": {"secret": "t"}}},
            "hooks.score.auth.type: required key is missing",
        ),
        (
            {"score": {**HTTP, "auth": {"type": "bearer"}}},
            "hooks.score.auth.secret: required key is missing",
        ),
        (
            {"score": {**HTTP, "auth": {"type": "bearer", "secret": "t", "x": 1}}},
            "hooks.score.auth.x: unknown key",
        ),
        (
            {"score": {**HTTP, "auth": {"type": "basic", "username": "a:b", "secret": "t"}}},
            "hooks.score.auth.username: must not contain ':'",
        ),
        (
            {"score": {**HTTP, "auth": {"type": "header", "name": "Host", "secret": "t"}}},
            "hooks.score.auth.name: 'Host' is not a header name dripd can send",
        ),
        ({"plan": {"python": "myapp"}}, "hooks.plan.python: 'myapp' is not a Python path"),
        ({"plan": {"python": "my-app:fn"}}, "hooks.plan.python: 'my-app:fn' is not a Python path"),
        ({"plan": {"python": "a:b", "retries": 1}}, "hooks.plan.retries: unknown key"),
        (
            {"plan": {"python": "a:b", "timeout": "1m"}},
            "hooks.plan.timeout: must be more than 0s and at most 30s",
        ),
    ],
)
def test_parse_errors(table: dict[str, Any], message: str) -> None:
    with pytest.raises(SequenceFileError) as caught:
        parse_hooks(table, where="seq.toml")
    assert caught.value.message.startswith(f"seq.toml: {message}")


def test_parse_rejects_a_non_table() -> None:
    with pytest.raises(SequenceFileError, match=r"^seq.toml: hooks: must be a table of hooks$"):
        parse_hooks([], where="seq.toml")  # type: ignore[arg-type]
