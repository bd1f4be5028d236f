"""Secrets never leave a channel: not in errors, logs, receipts, the database or metrics.

Every adapter's credentials here are recognisable canaries (`CANARY-<provider>-<key>-<hex>`,
or the provider's own format around such a tail: Twilio's `AC` + 32 hex digits, Telegram's
`<bot id>:<secret>`, Standard Webhooks' `whsec_<base64>`, a Slack incoming-webhook URL, AWS
keys, an OAuth client). A stand-in provider echoes back whatever it was sent (the request's
URL, each header, the body) and every credential in every encoding (raw, base64 at each of
its three alignments in both alphabets, percent- and form-encoded, inside JSON), in the
provider's own error format and as plain text, under every status dripd maps (400, 401, 403,
429, 500, and the provider's own: Postmark's 422 and batch element errors), and fails
transports with exceptions whose text holds the URL and the credentials.

What is checked, for each canary: the value in each of those encodings, and any run of 12 of
its distinctive characters (a provider that clips an echo must not leave a readable piece),
is absent from every ChannelError's str, repr, notes and attributes (and the error has no
cause or context to lead back to the unredacted text), from every Receipt field, from every
log line, and (through the daemon) from every text column of the database, from the
metrics exposition and from the webhook route's 401 answers.

Each echoed piece must also be shown to have reached an error text (its `ECHO-MARK`), so a
provider that drops the provider's words entirely cannot pass for one that redacts them.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_network
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus
from xml.sax.saxutils import escape

import asyncpg
import httpx
import prometheus_client
import pytest
from httpmock import make_adapter, message
from support import add_adapter, apply_text, free_port, running_daemon, wait_for

from dripd import api
from dripd.channels import registry
from dripd.channels.base import ChannelContext, ChannelError, Receipt
from dripd.channels.credentials import Vault, generate_key
from dripd.channels.twilio import signature as twilio_signature
from dripd.clock import ManualClock
from dripd.netguard import NetPolicy

MARK = "ECHO-MARK"
#: The shortest run of a secret's distinctive part that must not be readable anywhere.
FRAGMENT = 12
STATUSES = (400, 401, 403, 429, 500)
LOOPBACK = NetPolicy(allow_http=True, allowed_networks=(ip_network("127.0.0.0/8"),))


# -- canaries and the oracle ------------------------------------------------------------------


def tail(label: str) -> str:
    """16 hex digits that belong to `label` alone."""
    return hashlib.sha256(label.encode()).hexdigest()[:16]


def canary(label: str) -> str:
    return f"CANARY-{label}-{tail(label)}"


@dataclass(frozen=True)
class Secret:
    """A value that must never be readable. `identifier`: an account name, found whole in
    every encoding but not by fragment (dripd redacts identifiers' fragments only inside
    base64). `distinct`: the part whose every run of FRAGMENT characters is looked for."""

    label: str
    value: str
    identifier: bool = False
    distinct: str | None = None


def _b64_cores(data: bytes) -> Iterator[str]:
    """The base64 characters that encode `data` alone, at each of the three alignments it
    can have inside longer base64 text, in both alphabets."""
    for offset in range(3):
        encoded = base64.b64encode(bytes(offset) + data).decode()
        start, end = -(-8 * offset // 6), (8 * offset + 8 * len(data)) // 6
        core = encoded[start:end]
        yield core
        yield core.translate(str.maketrans("+/", "-_"))


def needles(secret: Secret) -> dict[str, str]:
    """What would reveal `secret`: needle -> how it is encoded."""
    value = secret.value
    found = {
        value: "raw",
        quote(value, safe=""): "percent-encoded",
        quote_plus(value): "form-encoded",
        json.dumps(value)[1:-1]: "JSON-escaped",
        repr(value)[1:-1]: "repr",
    }
    for core in _b64_cores(value.encode()):
        found.setdefault(core, "base64")
    if not secret.identifier:
        distinct = secret.distinct or value[max(value.find("CANARY"), 0) :]
        for start in range(len(distinct) - FRAGMENT + 1):
            found.setdefault(distinct[start : start + FRAGMENT], "fragment")
    return found


class Oracle:
    """Finds the secrets of one test in text, and keeps what it found, by where."""

    def __init__(self, secrets: Sequence[Secret]) -> None:
        # A fragment that is also part of another secret (a shared prefix) names neither.
        self.table = [
            (s.label, needle, how)
            for s in secrets
            for needle, how in needles(s).items()
            if how != "fragment" or not any(needle in o.value for o in secrets if o is not s)
        ]
        self.leaks: list[str] = []

    def scan(self, where: str, text: str) -> None:
        for label, needle, how in self.table:
            if needle in text:
                at = text.find(needle)
                context = text[max(0, at - 60) : at + len(needle) + 20]
                self.leaks.append(f"{where}: {label} ({how}) in …{context!r}…")

    def assert_clean(self) -> None:
        shown = "\n".join(self.leaks[:30])
        more = f"\n… and {len(self.leaks) - 30} more" if len(self.leaks) > 30 else ""
        assert not self.leaks, f"{len(self.leaks)} leaks:\n{shown}{more}"


def encodings(value: str) -> dict[str, str]:
    """`value` as a provider might echo it back."""
    data = value.encode()
    return {
        "raw": value,
        "b64": base64.b64encode(data).decode(),
        "b64+1": base64.b64encode(b"u:" + data).decode(),
        "b64+2": base64.b64encode(b"api:" + data).decode(),
        "b64url": base64.urlsafe_b64encode(data).decode().rstrip("="),
        "pct": quote(value, safe=""),
        "form": quote_plus(value),
        "json": json.dumps({"key": value}),
        "query": f"https://api.example/v1?key={quote(value, safe='')}&x=1",
    }


# -- the providers ----------------------------------------------------------------------------


def _json(status: int, body: Any, **headers: str) -> httpx.Response:
    return httpx.Response(status, json=body, headers=headers)


@dataclass(frozen=True)
class Case:
    """One built-in provider, its canary credentials, and its answers: `success(request,
    echo)` accepts a message (echoing everything it got outside the id fields), `error(request,
    status, echo)` refuses one in the provider's documented error format."""

    provider: str
    channel: str
    config: dict[str, Any]
    credentials: dict[str, str]
    to: str
    success: Callable[[httpx.Request, str], httpx.Response]
    error: Callable[[httpx.Request, int, str], httpx.Response]
    identifiers: frozenset[str] = frozenset()
    statuses: tuple[int, ...] = STATUSES
    shapes: tuple[str, ...] = ("json", "text")
    context: dict[str, Any] = field(default_factory=dict)
    #: OAuth: the token endpoint's answer (the access token, a rotated refresh token).
    token: dict[str, Any] | None = None

    def secrets(self, *, issued: bool = True) -> list[Secret]:
        found = [
            Secret(f"{self.provider}.{key}", value, identifier=key in self.identifiers)
            for key, value in self.credentials.items()
        ]
        if self.provider == "webhook":
            # The signing key inside `whsec_<base64>`: HMAC material in its own right.
            key = base64.b64decode(self.credentials["secret"].removeprefix("whsec_")).decode()
            found.append(Secret("webhook.secret(key)", key))
            found[0] = dataclasses.replace(
                found[0], distinct=self.credentials["secret"].removeprefix("whsec_")
            )
        for key in ("access_token", "refresh_token"):
            if issued and self.token and key in self.token:
                found.append(Secret(f"{self.provider}.issued {key}", self.token[key]))
        return found

    def message(self) -> Any:
        if self.channel == "email":
            return message(to=self.to)
        return message(channel=self.channel, to=self.to, subject=None, text=None, body="Hi Ana")


def postmark_success(request: httpx.Request, echo: str) -> httpx.Response:
    count = len(json.loads(request.content))
    return _json(
        200,
        [
            {"ErrorCode": 0, "Message": "OK", "MessageID": f"pm-{n}", "To": echo}
            for n in range(count)
        ],
    )


def postmark_error(request: httpx.Request, status: int, echo: str) -> httpx.Response:
    if status == 200:  # a batch taken, its one element refused
        count = len(json.loads(request.content))
        return _json(200, [{"ErrorCode": 300, "Message": echo}] * count)
    return _json(status, {"ErrorCode": 300 if status == 422 else 10, "Message": echo})


def sns_xml(status: int, inner: str) -> httpx.Response:
    ns = "http://sns.amazonaws.com/doc/2010-03-31/"
    root = "PublishResponse" if status == 200 else "ErrorResponse"
    return httpx.Response(
        status,
        content=f'<{root} xmlns="{ns}">{inner}<RequestId>r-1</RequestId></{root}>'.encode(),
        headers={"Content-Type": "text/xml"},
    )


def google_error(request: httpx.Request, status: int, echo: str) -> httpx.Response:
    reason = {403: "insufficientPermissions", 429: "rateLimitExceeded"}.get(status, "badRequest")
    return _json(
        status,
        {"error": {"code": status, "message": echo, "errors": [{"reason": reason}]}},
    )


def telegram_error(request: httpx.Request, status: int, echo: str) -> httpx.Response:
    body: dict[str, Any] = {"ok": False, "error_code": status, "description": echo}
    if status == 429:
        body["parameters"] = {"retry_after": 3}
    return _json(status, body)


GRANT = {
    "client_id": f"{tail('client')}-CANARYclient.apps.googleusercontent.com",
    "client_secret": f"GOCSPX-{canary('oauth-secret')}",
    "refresh_token": f"1//0{canary('oauth-refresh')}",
}

CASES = [
    Case(
        "postmark",
        "email",
        {"from": "Acme <news@acme.example>"},
        {
            "server_token": canary("postmark-token"),
            "webhook_username": f"hooks-{tail('postmark-user')}",
            "webhook_password": canary("postmark-hookpass"),
        },
        "ana@example.org",
        postmark_success,
        postmark_error,
        identifiers=frozenset({"webhook_username"}),
        statuses=(200, *STATUSES, 422),
    ),
    Case(
        "mailersend",
        "email",
        {"from": "Acme <news@acme.example>"},
        {"api_key": f"mlsn.{canary('mailersend-key')}", "webhook_secret": canary("ms-hook")},
        "ana@example.org",
        lambda request, echo: _json(202, {"echo": echo}, **{"X-Message-Id": "ms-1"}),
        lambda request, status, echo: _json(status, {"message": echo, "errors": {"to": [echo]}}),
    ),
    Case(
        "sendgrid",
        "email",
        {"from": "Acme <news@acme.example>"},
        {"api_key": f"SG.CANARYkeyid.{canary('sendgrid-key')}"},
        "ana@example.org",
        lambda request, echo: _json(202, {"echo": echo}, **{"X-Message-Id": "sg-1.filter"}),
        lambda request, status, echo: _json(
            status, {"errors": [{"message": echo, "field": "from", "help": None}]}
        ),
    ),
    Case(
        "mailgun",
        "email",
        {"from": "Acme <news@mg.acme.example>", "domain": "mg.acme.example"},
        {"api_key": canary("mailgun-key"), "webhook_signing_key": canary("mailgun-signing")},
        "ana@example.org",
        lambda request, echo: _json(
            200, {"id": "<m-1@mg.acme.example>", "message": f"Queued. {echo}"}
        ),
        lambda request, status, echo: _json(status, {"message": echo}),
    ),
    Case(
        "ses",
        "email",
        {"from": "Acme <news@acme.example>", "region": "eu-west-1"},
        {
            "access_key_id": "AKIA" + tail("ses-key-id").upper(),
            "secret_access_key": f"CANARY+ses/secret+{tail('ses-secret')}",
            "session_token": f"IQoJ/CANARY+ses-session/{tail('ses-session')}==",
        },
        "ana@example.org",
        lambda request, echo: _json(200, {"MessageId": "ses-1", "Echo": echo}),
        lambda request, status, echo: _json(
            status,
            {"__type": "BadRequestException", "message": echo},
            **({"x-amzn-ErrorType": "TooManyRequestsException"} if status == 429 else {}),
        ),
        identifiers=frozenset({"access_key_id"}),
    ),
    Case(
        "sns",
        "sms",
        {"region": "eu-west-1"},
        {
            "access_key_id": "AKIA" + tail("sns-key-id").upper(),
            "secret_access_key": f"CANARY+sns/secret+{tail('sns-secret')}",
            "session_token": f"IQoJ/CANARY+sns-session/{tail('sns-session')}==",
        },
        "+15005550100",
        lambda request, echo: sns_xml(
            200,
            f"<PublishResult><MessageId>sns-1</MessageId></PublishResult>"
            f"<Echo>{escape(echo)}</Echo>",
        ),
        lambda request, status, echo: sns_xml(
            status,
            "<Error><Type>Sender</Type><Code>InvalidParameter</Code>"
            f"<Message>{escape(echo)}</Message></Error>",
        ),
        identifiers=frozenset({"access_key_id"}),
    ),
    Case(
        "gmail",
        "email",
        {"from": "news@x.example"},
        dict(GRANT),
        "ana@example.org",
        lambda request, echo: _json(200, {"id": "gm-1", "threadId": "t-1", "labelIds": [echo]}),
        google_error,
        identifiers=frozenset({"client_id"}),
        token={"access_token": f"ya29.{canary('gmail-access')}", "expires_in": 0},
    ),
    Case(
        "ms365",
        "email",
        {"from": "Mailer <mailer@contoso.example>", "user": "mailer@contoso.example"},
        dict(GRANT),
        "ana@example.org",
        lambda request, echo: httpx.Response(202, text=""),
        lambda request, status, echo: _json(
            status, {"error": {"code": "ErrorInvalidRequest", "message": echo}}
        ),
        identifiers=frozenset({"client_id"}),
        token={
            "access_token": f"eyJ0.{canary('ms365-access')}",
            "expires_in": 0,
            "refresh_token": f"0.AAAA{canary('ms365-rotated')}",
        },
    ),
    Case(
        "twilio",
        "sms",
        {"from": "+15005550006"},
        {"account_sid": "AC" + tail("twilio-sid") * 2, "auth_token": canary("twilio-auth")},
        "+15005550100",
        lambda request, echo: _json(201, {"sid": "SM" + "0" * 32, "body": echo}),
        lambda request, status, echo: _json(
            status,
            {
                "code": {400: 21211, 401: 20003, 429: 20429}.get(status),
                "message": echo,
                "status": status,
            },
        ),
        identifiers=frozenset({"account_sid"}),
    ),
    Case(
        "whatsapp_cloud",
        "whatsapp",
        {"phone_number_id": "106540352242922"},
        {
            "access_token": f"EAAG{canary('whatsapp-token')}",
            "app_secret": canary("whatsapp-app"),
            "verify_token": canary("whatsapp-verify"),
        },
        "+15005550100",
        lambda request, echo: _json(
            200,
            {
                "messaging_product": "whatsapp",
                "contacts": [{"input": echo, "wa_id": "15005550100"}],
                "messages": [{"id": "wamid.HBgL"}],
            },
        ),
        lambda request, status, echo: _json(
            status,
            {
                "error": {
                    "message": echo,
                    "type": "OAuthException",
                    "code": {401: 190, 429: 80007}.get(status, 100),
                    "error_data": {"details": echo},
                    "fbtrace_id": "A1",
                }
            },
        ),
    ),
    Case(
        "telegram",
        "chat",
        {},
        {"bot_token": f"7012345678:{canary('telegram-bot')}"},
        "123456789",
        lambda request, echo: _json(200, {"ok": True, "result": {"message_id": 7, "text": echo}}),
        telegram_error,
    ),
    Case(
        "slack",
        "chat",
        {},
        {"url": f"https://127.0.0.1/services/T0CANARY/B0CANARY/{canary('slack-hook')}"},
        "sub-1",
        lambda request, echo: httpx.Response(200, text="ok"),
        lambda request, status, echo: httpx.Response(status, text=echo),
        shapes=("text",),
        context={"net_policy": LOOPBACK},
    ),
    Case(
        "webhook",
        "webhook",
        {"url": "http://127.0.0.1:8080/hooks/dripd"},
        {"secret": "whsec_" + base64.b64encode(canary("webhook-key").encode()).decode()},
        "ana@example.org",
        lambda request, echo: httpx.Response(200, text=echo),
        lambda request, status, echo: httpx.Response(status, text=echo),
        shapes=("text",),
        context={"net_policy": LOOPBACK},
    ),
]


def test_every_built_in_http_provider_is_covered() -> None:
    http_providers = set(registry.names()) - {"smtp", "outbox", "postgres"}
    assert {case.provider for case in CASES} >= http_providers


# -- the echoing stand-in ---------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """How the stand-in answers: at `target` ("api", or "token": an OAuth token endpoint),
    `status` with the piece `selector` names in `shape`, or raise `transport`."""

    target: str
    status: int = 0
    shape: str = "json"
    selector: tuple[str, ...] = ()
    transport: Callable[[httpx.Request], Exception] | None = None

    def __str__(self) -> str:
        if self.transport is not None:
            return f"{self.target} transport {self.selector}"
        return f"{self.target} {self.status} {self.shape} {'/'.join(self.selector)}"


class Echo:
    """The provider's API (and token endpoint): answers per the current scenario, echoing."""

    def __init__(self, case: Case) -> None:
        self.case = case
        self.scenario: Scenario | None = None
        self.requests: list[tuple[str, httpx.Request]] = []
        self.everything = " ".join(
            f"{key}={encoded}"
            for key, value in case.credentials.items()
            for encoded in encodings(value).values()
        )

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        request.read()
        target = "token" if self.case.token and request.url.path.endswith("/token") else "api"
        self.requests.append((target, request))
        scenario = self.scenario
        if scenario is None or scenario.target != target:
            if target == "token":
                assert self.case.token is not None
                return _json(200, {**self.case.token, "token_type": "Bearer"})
            return self.case.success(request, f"{MARK} {full(request)} {self.everything}")
        if scenario.transport is not None:
            raise scenario.transport(request)
        echo = f"{MARK} {self.piece(request, scenario.selector)}"
        if scenario.shape == "text":
            return httpx.Response(scenario.status, text=echo)
        if target == "token":
            return _json(scenario.status, {"error": "invalid_grant", "error_description": echo})
        return self.case.error(request, scenario.status, echo)

    def piece(self, request: httpx.Request, selector: tuple[str, ...]) -> str:
        match selector:
            case ("url",):
                return f"url={request.url}"
            case ("body",):
                return f"body={request.content.decode('utf-8', 'replace')}"
            case ("header", name):
                return f"{name}: {request.headers.get(name, '')}"
            case ("credential", key, form):
                return f"{key}={encodings(self.case.credentials[key])[form]}"
            case ("issued", key, form):
                assert self.case.token is not None
                return f"{key}={encodings(self.case.token[key])[form]}"
        raise AssertionError(selector)


def full(request: httpx.Request) -> str:
    """The whole request as text."""
    headers = " ".join(f"{k}: {v}" for k, v in request.headers.items())
    return f"{request.method} {request.url} {headers} {request.content.decode('utf-8', 'replace')}"


def connect_error(request: httpx.Request) -> Exception:
    return httpx.ConnectError(
        f"[Errno 111] Connection refused: {request.url} {dict(request.headers)}", request=request
    )


def read_timeout(request: httpx.Request) -> Exception:
    return httpx.ReadTimeout(f"timed out reading {request.url}", request=request)


def selectors(case: Case, echo: Echo, target: str, *, issued: bool) -> list[tuple[str, ...]]:
    """The pieces to echo: the request's URL, body and each header (as the probe sent
    them), and each credential (and issued token) in each encoding."""
    names = sorted({n for t, r in echo.requests if t == target for n in r.headers})
    found: list[tuple[str, ...]] = [("url",), ("body",), *(("header", n) for n in names)]
    forms = list(encodings("x"))
    found += [("credential", key, form) for key in case.credentials for form in forms]
    if issued and case.token:
        found += [("issued", key, form) for key in case.token if key != "expires_in"
                  for form in forms]  # fmt: skip
    return found


# -- what an error may show -------------------------------------------------------------------


def error_texts(exc: BaseException) -> dict[str, str]:
    texts = {"str": str(exc), "repr": repr(exc)}
    for n, note in enumerate(getattr(exc, "__notes__", None) or []):
        texts[f"note {n}"] = str(note)
    for name, value in vars(exc).items():
        texts[f"attribute {name}"] = repr(value)
    return texts


def receipt_texts(receipt: Receipt) -> dict[str, str]:
    return {f.name: repr(getattr(receipt, f.name)) for f in dataclasses.fields(receipt)}


async def attempt(channel: Any, message: Any) -> Receipt | ChannelError:
    """The send's receipt, or the ChannelError it raised (any other exception fails)."""
    try:
        receipt: Receipt = await channel.send(message)
    except ChannelError as exc:
        return exc
    return receipt


async def drive(case: Case, logs: io.StringIO, *, issued: bool) -> None:
    """Send through `case`'s adapter once accepted, then refused in every way; scan what
    comes back. `issued`: also echo and look for the tokens an OAuth token endpoint issued
    (not among the adapter's credentials)."""
    oracle = Oracle(case.secrets(issued=issued))
    echo = Echo(case)
    adapter = make_adapter(case.provider, case.channel, case.config, case.credentials)
    channel = registry.build(adapter, ChannelContext(transport=echo.transport(), **case.context))
    reached: dict[tuple[str, ...], bool] = {}
    errors = 0
    try:
        # A success echoing everything, in the fields that are not the message id.
        receipt = await channel.send(case.message())
        for name, text in receipt_texts(receipt).items():
            oracle.scan(f"success: Receipt.{name}", text)

        scenarios: list[Scenario] = []
        for target in ("api", "token") if case.token else ("api",):
            for selector in selectors(case, echo, target, issued=issued):
                reached.setdefault(selector, False)
                for status in case.statuses:
                    for shape in case.shapes:
                        scenarios.append(Scenario(target, status, shape, selector))
            for transport in (connect_error, read_timeout):
                scenarios.append(Scenario(target, selector=(transport.__name__,),
                                          transport=transport))  # fmt: skip

        for scenario in scenarios:
            echo.scenario = scenario
            outcome = await attempt(channel, case.message())
            if isinstance(outcome, Receipt):
                for name, text in receipt_texts(outcome).items():
                    oracle.scan(f"{scenario}: Receipt.{name}", text)
                continue
            errors += 1
            # Nothing leads back to the provider's unredacted exception.
            assert outcome.__cause__ is None, f"{scenario}: the error has a cause"
            assert outcome.__context__ is None, f"{scenario}: the error has a context"
            for where, text in error_texts(outcome).items():
                oracle.scan(f"{scenario}: error {where}", text)
            if MARK in str(outcome):
                reached[scenario.selector] = True
    finally:
        await channel.aclose()

    oracle.scan("logs", logs.getvalue())
    oracle.assert_clean()
    assert errors > len(reached)
    # Every piece reached an error text somewhere: the redaction, not silence, kept it out.
    unseen = [selector for selector, seen in reached.items() if not seen]
    assert not unseen, f"pieces that never reached an error text: {unseen}"


@pytest.mark.parametrize("case", CASES, ids=[case.provider for case in CASES])
async def test_no_credential_leaves_through_errors_receipts_or_logs(
    case: Case, json_logs: io.StringIO
) -> None:
    await drive(case, json_logs, issued=False)


# An OAuth access token (and Microsoft's rotated refresh token) is not among the credentials
# the adapter's redactor was built from: the channel lists it as `issued_secrets`.
@pytest.mark.parametrize("case", [c for c in CASES if c.token], ids=lambda case: case.provider)
async def test_no_token_the_oauth_endpoint_issued_leaves_through_errors(
    case: Case, json_logs: io.StringIO
) -> None:
    await drive(case, json_logs, issued=True)


# -- through the daemon: the database, the metrics, the logs, the webhook route ---------------

POSTMARK = {
    "server_token": canary("db-postmark-token"),
    "webhook_username": f"hooks-{tail('db-postmark-user')}",
    "webhook_password": canary("db-postmark-hookpass"),
}
TWILIO = {"account_sid": "AC" + tail("db-twilio-sid") * 2, "auth_token": canary("db-twilio")}
TELEGRAM = {"bot_token": f"7012345678:{canary('db-telegram')}"}
DB_SECRETS = [
    *(Secret(f"postmark.{k}", v, identifier=k == "webhook_username") for k, v in POSTMARK.items()),
    *(Secret(f"twilio.{k}", v, identifier=k == "account_sid") for k, v in TWILIO.items()),
    Secret("telegram.bot_token", TELEGRAM["bot_token"]),
]

SEQUENCES = {
    "mail": 'channel = "email"\nsubject = "Hi"\ntext = "Hi {{ name }}"',
    "text": 'channel = "sms"\nbody = "Hi {{ name }}"',
    "chat": 'channel = "chat"\nbody = "Hi {{ name }}"',
}


class EchoServer:
    """A local stand-in for Postmark, Twilio and Telegram that refuses everything, echoing
    the request and the credentials back: Postmark's batch 401 (the adapter is paused),
    Twilio's 400 (the step fails), Telegram's 500 (retried later)."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length).decode("utf-8", "replace")
                stub.requests.append(self.path)
                status, answer = stub.answer(self.path, dict(self.headers.items()), body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, path: str, headers: Mapping[str, str], body: str) -> tuple[int, Any]:
        auth = headers.get("Authorization") or headers.get("X-Postmark-Server-Token") or ""
        if path.startswith("/email"):
            echo = f"{MARK} token={auth} b64={encodings(auth)['b64']} url={path}"
            return 401, {"ErrorCode": 10, "Message": echo}
        if path.startswith("/2010-04-01/"):
            token = TWILIO["auth_token"]
            forms = encodings(token)
            echo = f"{MARK} auth={auth} token={token} {forms['pct']} {forms['json']} url={path}"
            return 400, {"code": 21211, "message": echo, "status": 400}
        echo = f"{MARK} url={path} {encodings(TELEGRAM['bot_token'])['b64']} body={body}"
        return 500, {"ok": False, "error_code": 500, "description": echo}

    def __enter__(self) -> EchoServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def stored_values(pool: asyncpg.Pool) -> dict[str, list[str]]:
    """Every value of every text, JSON, array, enum and bytea column in the dripd schema, as
    text (bytea as Latin-1, so sealed credentials are searched byte for byte), by
    table.column."""
    columns = await pool.fetch(
        "SELECT c.table_name, c.column_name, c.data_type FROM information_schema.columns c "
        "JOIN information_schema.tables t USING (table_schema, table_name) "
        "WHERE c.table_schema = 'dripd' AND t.table_type = 'BASE TABLE' AND c.data_type IN "
        "('text', 'character varying', 'character', 'json', 'jsonb', 'ARRAY', 'USER-DEFINED', "
        "'bytea') ORDER BY 1, 2"
    )
    found: dict[str, list[str]] = {}
    for row in columns:
        table, column = row["table_name"], row["column_name"]
        cast = "" if row["data_type"] == "bytea" else "::text"
        values = await pool.fetch(
            f'SELECT "{column}"{cast} AS v FROM dripd."{table}" WHERE "{column}" IS NOT NULL'
        )
        found[f"{table}.{column}"] = [
            v["v"].decode("latin-1") if isinstance(v["v"], bytes) else v["v"] for v in values
        ]
    return found


async def _settled(pool: asyncpg.Pool) -> dict[str, asyncpg.Record] | None:
    rows = await pool.fetch(
        "SELECT e.*, s.key AS step FROM dripd.step_executions e "
        "JOIN dripd.steps s ON s.id = e.step_id"
    )
    by_channel = {row["channel"]: row for row in rows if row["last_error"]}
    if set(by_channel) != {"email", "sms", "chat"}:
        return None
    return by_channel


async def test_no_credential_reaches_the_database_metrics_logs_or_webhook_answers(
    dsn: str, pool: asyncpg.Pool, tmp_path: Path, json_logs: io.StringIO
) -> None:
    key = generate_key()
    vault = Vault.from_text(key)
    oracle = Oracle(DB_SECRETS)
    port = free_port()
    with EchoServer() as stub:
        for name, channel, provider, config, credentials in (
            ("pm", "email", "postmark", {"from": "news@acme.example"}, POSTMARK),
            ("tw", "sms", "twilio", {"from": "+15005550006"}, TWILIO),
            ("tg", "chat", "telegram", {}, TELEGRAM),
        ):
            await add_adapter(
                pool,
                name=name,
                channel=channel,
                provider=provider,
                config={**config, "base_url": stub.base_url, "timeout": 10},
                credentials=dict(credentials),
                vault=vault,
            )
        for key_name, step in SEQUENCES.items():
            await apply_text(
                pool, f'[sequence]\nkey = "{key_name}"\n[[steps]]\nkey = "one"\n{step}'
            )
        clock = ManualClock()
        for key_name in SEQUENCES:
            await api.enroll(
                pool,
                tenant=None,
                sequence_key=key_name,
                subscriber_id="ana",
                data={
                    "email": "ana@example.org",
                    "phone": "+15005550100",
                    "chat_id": "123456789",
                    "name": "Ana",
                },
                now=clock.now(),
            )
        async with (
            running_daemon(
                dsn,
                tmp_path,
                clock=clock,
                env={"DRIPD_ENCRYPTION_KEY": key},
                sections={"http": {"listen": f"127.0.0.1:{port}"}},
            ) as daemon,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client,
        ):
            # The webhook route: forged requests, carrying the secrets themselves.
            answers = await forged_webhooks(client)
            rows = await wait_for(lambda: _settled(pool), timeout=60)
            paused = await wait_for(
                lambda: pool.fetchval(
                    "SELECT paused_reason FROM dripd.channel_adapters WHERE name = 'pm'"
                ),
                timeout=60,
            )
            metrics = prometheus_client.generate_latest(daemon.metrics.registry).decode()
        assert len(stub.requests) >= 3

    for where, response in answers.items():
        assert response.status_code == 401, (where, response.status_code, response.text)
        oracle.scan(f"webhook {where}: 401 body", response.text)
        oracle.scan(f"webhook {where}: 401 headers", repr(response.headers))
    stored = await stored_values(pool)
    for column in (
        "step_executions.last_error",
        "message_events.reason",
        "message_events.data",
        "channel_adapters.paused_reason",
        "channel_adapters.config",
        "channel_adapters.credentials",
    ):
        assert column in stored, f"dripd.{column} is not scanned"
    for column, values in stored.items():
        for value in values:
            oracle.scan(f"dripd.{column}", value)
    oracle.scan("metrics", metrics)
    oracle.scan("logs", json_logs.getvalue())
    oracle.assert_clean()

    # The echoes did reach the database, the pause reason and the logs: redacted.
    assert rows["email"]["reason"] == "adapter_paused"
    assert rows["sms"]["status"] == "failed"
    assert rows["chat"]["reason"] == "provider_unavailable"
    for row in rows.values():
        assert MARK in row["last_error"], row["last_error"]
        assert "[REDACTED]" in row["last_error"], row["last_error"]
    assert MARK in paused
    assert "[REDACTED]" in paused
    assert MARK in json_logs.getvalue()
    assert "dripd_webhooks_total" in metrics


async def forged_webhooks(client: httpx.AsyncClient) -> dict[str, httpx.Response]:
    """Webhooks that fail verification, each carrying a configured secret where the
    provider's proof goes, or a near miss of it."""
    answers: dict[str, httpx.Response] = {}
    user, password = POSTMARK["webhook_username"], POSTMARK["webhook_password"]
    for label, (u, p) in {
        "postmark wrong password": (user, password[:-1] + "X"),
        "postmark wrong user": (user + "x", password),
        "postmark server token as password": (user, POSTMARK["server_token"]),
    }.items():
        basic = base64.b64encode(f"{u}:{p}".encode()).decode()
        answers[label] = await client.post(
            "/webhooks/postmark/pm",
            content=json.dumps({"RecordType": "Delivery", "MessageID": password}).encode(),
            headers={"Authorization": f"Basic {basic}", "Content-Type": "application/json"},
        )
    form = {
        "MessageSid": "SM" + "1" * 32,
        "MessageStatus": "delivered",
        "AccountSid": TWILIO["account_sid"],
        "Body": TWILIO["auth_token"],
    }
    url = f"{client.base_url}/webhooks/twilio/tw"
    wrong = twilio_signature(b"not-the-token", url, {k: [v] for k, v in form.items()})
    for label, signed in {
        "twilio wrong signature": wrong,
        "twilio auth token as signature": TWILIO["auth_token"],
    }.items():
        answers[label] = await client.post(
            "/webhooks/twilio/tw", data=form, headers={"X-Twilio-Signature": signed}
        )
    return answers


def test_the_oracle_finds_each_encoding() -> None:
    """The scan can fail: each way a secret may be spelled is found."""
    secret = Secret("s", f"CANARY+x/{tail('oracle')}")
    for name, encoded in encodings(secret.value).items():
        oracle = Oracle([secret])
        oracle.scan(name, f"HTTP 400: {encoded} …")
        assert oracle.leaks, name
    oracle = Oracle([secret])
    oracle.scan("clipped", f"HTTP 400: token={secret.value[:-3]}…")
    assert oracle.leaks
    clean = Oracle([secret])
    clean.scan("redacted", "HTTP 400: token=[REDACTED] ECHO-MARK")
    assert not clean.leaks
