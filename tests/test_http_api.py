"""The HTTP API on a real listener and a real Postgres: tokens, tenants, bodies, idempotency."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from background import background
from support import apply_text, one_email

from dripd import api as core
from dripd.cli import main
from dripd.clock import SystemClock
from dripd.config import from_dict
from dripd.db import intake, store
from dripd.http.api import OPERATIONS, routes
from dripd.http.app import HttpServer, build_app
from dripd.http.bodies import decode_json
from dripd.http.context import HttpContext
from dripd.http.errors import ApiError
from dripd.http.openapi import Operation, Reply, error_replies, openapi_route
from dripd.metrics import Metrics

LIMIT = 4096  # http.max_body_bytes of these tests

ONBOARDING = """
[sequence]
key = "onboarding"
entry_events = ["signed_up"]
exit_events = ["purchased"]

[[steps]]
key = "hello"
channel = "email"
subject = "Hello"
text = "Hi"
"""

WAITING = """
[sequence]
key = "activation"

[[steps]]
key = "wait_confirmed"
wait_for = { event = "confirmed", timeout = "3d" }

[[steps]]
key = "thanks"
channel = "email"
subject = "Thanks"
text = "Thanks"
"""


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DRIPD_DSN", raising=False)
    monkeypatch.setenv("DRIPD_CONFIG", str(tmp_path / "none.toml"))
    (tmp_path / "none.toml").write_text("")


@pytest.fixture
async def ctx(dsn: str) -> AsyncIterator[HttpContext]:
    pool = await store.create_pool(dsn, min_size=1, max_size=10)
    try:
        yield HttpContext(
            pool=pool,
            config=from_dict({"http": {"max_body_bytes": LIMIT}}),
            clock=SystemClock(),
            metrics=Metrics(),
            vault=None,
        )
    finally:
        await pool.close()


async def _ready() -> dict[str, Any]:
    return {"ready": True}


@pytest.fixture
async def client(ctx: HttpContext) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(
        metrics=ctx.metrics, readiness=_ready, routes=[*routes(ctx), openapi_route(OPERATIONS)]
    )
    server = HttpServer(app)
    async with (
        background(server.serve, "127.0.0.1", 0),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as c,
    ):
        yield c


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`dripd ARGV…` in a thread (it runs its own event loop), with its output."""
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def create_token(capsys: pytest.CaptureFixture[str], dsn: str, *argv: str) -> dict[str, Any]:
    code, out, err = await cli(capsys, "token", "create", *argv, "--dsn", dsn, "--json")
    assert code == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


def bearer(token: dict[str, Any] | str) -> dict[str, str]:
    value = token if isinstance(token, str) else token["token"]
    return {"Authorization": f"Bearer {value}"}


@pytest.fixture
async def acme(capsys: pytest.CaptureFixture[str], dsn: str) -> dict[str, str]:
    """Headers of a token of tenant `acme`."""
    return bearer(await create_token(capsys, dsn, "--tenant", "acme", "--name", "crm"))


@pytest.fixture
async def globex(capsys: pytest.CaptureFixture[str], dsn: str) -> dict[str, str]:
    return bearer(await create_token(capsys, dsn, "--tenant", "globex"))


@pytest.fixture
async def root(capsys: pytest.CaptureFixture[str], dsn: str) -> dict[str, str]:
    """Headers of a global token."""
    return bearer(await create_token(capsys, dsn, "--name", "ops"))


async def count(pool: asyncpg.Pool, table: str) -> int:
    return int(await pool.fetchval(f"SELECT count(*) FROM dripd.{table}"))


def error_of(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert {"code", "message"} <= set(error) <= {"code", "message", "field"}
    return error


# --- tokens -------------------------------------------------------------------------------


async def test_token_create_list_revoke_through_the_cli(
    capsys: pytest.CaptureFixture[str], dsn: str, ctx: HttpContext, client: httpx.AsyncClient
) -> None:
    created = await create_token(capsys, dsn, "--tenant", "acme", "--name", "crm")
    assert set(created) == {"token", "id", "tenant_key", "name"}
    assert created["tenant_key"] == "acme"
    assert created["token"].startswith("dripd_")
    assert len(created["token"]) == len("dripd_") + 43
    glob = await create_token(capsys, dsn)
    assert glob["tenant_key"] is None
    assert glob["name"] == "api"

    # Only the SHA-256 is stored.
    stored = {bytes(r[0]) for r in await ctx.pool.fetch("SELECT token_hash FROM dripd.api_tokens")}
    secrets = [created["token"], glob["token"]]
    assert stored == {hashlib.sha256(t.encode()).digest() for t in secrets}

    code, out, _ = await cli(capsys, "token", "list", "--all-tenants", "--dsn", dsn, "--json")
    assert code == 0
    listed = json.loads(out)
    assert {r["id"] for r in listed} == {created["id"], glob["id"]}
    for row in listed:
        assert set(row) == {"id", "tenant_key", "name", "created_at", "revoked_at"}
    code, human, _ = await cli(capsys, "token", "list", "--all-tenants", "--dsn", dsn)
    assert code == 0
    assert created["id"] in human
    for text in (out, human):
        for secret in secrets:
            assert secret not in text
            assert secret[len("dripd_") :] not in text
            assert hashlib.sha256(secret.encode()).hexdigest() not in text

    _, out, _ = await cli(capsys, "token", "list", "--dsn", dsn, "--json")
    assert [r["id"] for r in json.loads(out)] == [glob["id"]]  # the global scope only
    _, out, _ = await cli(capsys, "token", "list", "--tenant", "acme", "--dsn", dsn, "--json")
    assert [r["id"] for r in json.loads(out)] == [created["id"]]

    missing = f"/v1/enrollments/{uuid.uuid4()}"
    assert (await client.get(missing, headers=bearer(created))).status_code == 404

    code, out, _ = await cli(capsys, "token", "revoke", created["id"], "--dsn", dsn, "--json")
    assert code == 0
    assert json.loads(out)["revoked_at"] is not None
    response = await client.get(missing, headers=bearer(created))
    assert response.status_code == 401
    assert error_of(response)["message"] == "the token was revoked"
    assert (await client.get(missing, headers=bearer(glob))).status_code == 404

    code, _, err = await cli(capsys, "token", "revoke", str(uuid.uuid4()), "--dsn", dsn)
    assert code == 1
    assert "no API token" in err
    code, _, err = await cli(capsys, "token", "revoke", "not-a-uuid", "--dsn", dsn)
    assert code == 2
    assert "ID" in err


@pytest.mark.parametrize(
    ("authorization", "invalid"),
    [
        (None, False),
        ("", False),
        ("Basic dXNlcjpwYXNz", True),
        ("Bearer", True),
        ("Bearer two words", True),
        ("Bearer dripd_short", True),
        ("Bearer dripd_" + "A" * 43, True),  # the right shape, but unknown
        ("Bearer " + "x" * 49, True),
    ],
)
async def test_requests_without_a_valid_token_are_401(
    client: httpx.AsyncClient, ctx: HttpContext, authorization: str | None, invalid: bool
) -> None:
    await apply_text(ctx.pool, one_email("welcome"))
    headers = {} if authorization is None else {"Authorization": authorization}
    for response in (
        await client.get(f"/v1/enrollments/{uuid.uuid4()}", headers=headers),
        # Authentication comes first: an invalid body is not even read.
        await client.post("/v1/enrollments", headers=headers, content=b"{"),
        await client.post(
            "/v1/enrollments", headers=headers, json={"sequence": "welcome", "subscriber_id": "u"}
        ),
    ):
        assert response.status_code == 401
        assert error_of(response)["code"] == "unauthorized"
        challenge = response.headers["www-authenticate"]
        assert challenge.startswith('Bearer realm="dripd"')
        assert ('error="invalid_token"' in challenge) is invalid
    assert await count(ctx.pool, "enrollments") == 0


async def test_a_revoked_token_is_401(client: httpx.AsyncClient, ctx: HttpContext) -> None:
    token, row = await intake.create_token(ctx.pool, tenant=None, name="x", now=datetime.now(UTC))
    path = f"/v1/enrollments/{uuid.uuid4()}"
    assert (await client.get(path, headers=bearer(token))).status_code == 404
    await intake.revoke_token(ctx.pool, row.id, datetime.now(UTC))
    response = await client.get(path, headers=bearer(token))
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


# --- enrollments and tenants --------------------------------------------------------------


async def test_enroll_is_201_then_200_and_reads_back(
    client: httpx.AsyncClient, ctx: HttpContext, acme: dict[str, str]
) -> None:
    await apply_text(ctx.pool, one_email("welcome"))  # global: every tenant may use it
    body = {"sequence": "welcome", "subscriber_id": "u1", "data": {"email": "u1@example.com"}}
    first = await client.post("/v1/enrollments", headers=acme, json=body)
    assert first.status_code == 201, first.text
    enrollment = first.json()
    assert enrollment["created"] is True
    assert enrollment["tenant_key"] == "acme"
    assert enrollment["status"] == "active"
    assert enrollment["next_step"] == "hello"
    assert enrollment["data"] == {"email": "u1@example.com"}
    assert first.headers["location"] == f"/v1/enrollments/{enrollment['id']}"
    assert "idempotent-replayed" not in first.headers

    again = await client.post("/v1/enrollments", headers=acme, json=body)
    assert again.status_code == 200
    assert again.json()["id"] == enrollment["id"]
    assert again.json()["created"] is False
    assert "location" not in again.headers

    read = await client.get(first.headers["location"], headers=acme)
    assert read.status_code == 200
    assert read.json() == {**enrollment, "created": False}
    assert await count(ctx.pool, "enrollments") == 1


async def test_a_tenant_token_naming_another_tenant_is_403(
    client: httpx.AsyncClient, ctx: HttpContext, acme: dict[str, str], root: dict[str, str]
) -> None:
    await apply_text(ctx.pool, one_email("welcome"))
    for path, body in [
        ("/v1/enrollments", {"sequence": "welcome", "subscriber_id": "u1"}),
        ("/v1/events", {"subscriber_id": "u1", "key": "signed_up"}),
        ("/v1/suppressions", {"channel": "email", "address": "a@example.com"}),
    ]:
        response = await client.post(path, headers=acme, json={**body, "tenant": "globex"})
        assert response.status_code == 403, path
        assert error_of(response) == {
            "code": "forbidden_tenant",
            "message": "this token acts in tenant 'acme' only",
            "field": "tenant",
        }
    for table in ("enrollments", "events", "suppressions"):
        assert await count(ctx.pool, table) == 0

    # Naming its own tenant is fine; a global token names any tenant, or none.
    own = {"sequence": "welcome", "subscriber_id": "u1", "tenant": "acme"}
    response = await client.post("/v1/enrollments", headers=acme, json=own)
    assert (response.status_code, response.json()["tenant_key"]) == (201, "acme")
    other = {"sequence": "welcome", "subscriber_id": "u1", "tenant": "globex"}
    response = await client.post("/v1/enrollments", headers=root, json=other)
    assert (response.status_code, response.json()["tenant_key"]) == (201, "globex")
    response = await client.post(
        "/v1/enrollments", headers=root, json={"sequence": "welcome", "subscriber_id": "u1"}
    )
    assert (response.status_code, response.json()["tenant_key"]) == (201, None)


async def test_another_tenants_enrollment_is_404_never_403(
    client: httpx.AsyncClient,
    ctx: HttpContext,
    acme: dict[str, str],
    globex: dict[str, str],
    root: dict[str, str],
) -> None:
    await apply_text(ctx.pool, one_email("welcome"))
    created = await client.post(
        "/v1/enrollments", headers=acme, json={"sequence": "welcome", "subscriber_id": "u1"}
    )
    path = created.headers["location"]
    assert (await client.get(path, headers=acme)).status_code == 200

    unknown = await client.get(f"/v1/enrollments/{uuid.uuid4()}", headers=globex)
    for response in (
        await client.get(path, headers=globex),
        await client.get(path, headers=globex, params={"tenant": "acme"}),
        await client.get(path, headers=root),  # the global scope has no such enrollment
        await client.get(path, headers=root, params={"tenant": "globex"}),
    ):
        assert response.status_code == 404
        assert error_of(response)["code"] == error_of(unknown)["code"] == "not_found"
    response = await client.get(path, headers=root, params={"tenant": "acme"})
    assert response.status_code == 200
    assert response.json()["id"] == created.json()["id"]

    # A malformed id is 404 too, in the same shape.
    response = await client.get("/v1/enrollments/not-a-uuid", headers=acme)
    assert response.status_code == 404
    assert error_of(response)["code"] == "not_found"
    response = await client.get(path, headers=root, params={"tenant": ""})
    assert response.status_code == 422
    assert error_of(response)["field"] == "tenant"


async def test_unknown_sequence_is_404_and_a_refused_reenrollment_409(
    client: httpx.AsyncClient, ctx: HttpContext, acme: dict[str, str]
) -> None:
    response = await client.post(
        "/v1/enrollments", headers=acme, json={"sequence": "nope", "subscriber_id": "u1"}
    )
    assert response.status_code == 404
    assert error_of(response)["field"] == "sequence"

    await apply_text(ctx.pool, one_email("welcome"))  # reenroll = "never"
    body = {"sequence": "welcome", "subscriber_id": "u1"}
    first = (await client.post("/v1/enrollments", headers=acme, json=body)).json()
    await core.unenroll(ctx.pool, tenant="acme", enrollment_id=uuid.UUID(first["id"]))
    response = await client.post("/v1/enrollments", headers=acme, json=body)
    assert response.status_code == 409
    error = error_of(response)
    assert error["code"] == "conflict"
    assert "reenroll policy is 'never'" in error["message"]
    assert await count(ctx.pool, "enrollments") == 1


async def test_a_sequence_that_cannot_be_scheduled_is_422_and_its_entry_event_is_recorded(
    client: httpx.AsyncClient, ctx: HttpContext, acme: dict[str, str]
) -> None:
    await apply_text(ctx.pool, ONBOARDING)
    # A delay stored before `after` was range-checked: the due time would pass year 9999.
    await ctx.pool.execute("UPDATE dripd.steps SET delay = '3000000 days'")
    response = await client.post(
        "/v1/enrollments", headers=acme, json={"sequence": "onboarding", "subscriber_id": "u1"}
    )
    assert response.status_code == 422
    error = error_of(response)
    assert error["field"] == "sequence"
    assert "its first step cannot be scheduled" in error["message"]
    assert await count(ctx.pool, "enrollments") == 0

    response = await client.post(
        "/v1/events", headers=acme, json={"subscriber_id": "u1", "key": "signed_up"}
    )
    assert response.status_code == 202, response.text
    [refused] = response.json()["not_enrolled"]
    assert refused["sequence"] == "onboarding"
    assert "its first step cannot be scheduled" in refused["reason"]
    assert await count(ctx.pool, "events") == 1
    assert await count(ctx.pool, "enrollments") == 0


# --- events and suppressions --------------------------------------------------------------


async def test_an_event_is_202_with_what_it_did(
    client: httpx.AsyncClient, ctx: HttpContext, acme: dict[str, str]
) -> None:
    await apply_text(ctx.pool, ONBOARDING)
    await apply_text(ctx.pool, WAITING)

    async def event(key: str, **extra: Any) -> dict[str, Any]:
        response = await client.post(
            "/v1/events", headers=acme, json={"subscriber_id": "u1", "key": key, **extra}
        )
        assert response.status_code == 202, response.text
        result: dict[str, Any] = response.json()
        return result

    signed_up = await event("signed_up", data={"email": "u1@example.com"}, id="e-1")
    onboarding = await ctx.pool.fetchval(
        "SELECT e.id FROM dripd.enrollments e JOIN dripd.sequences s ON s.id = e.sequence_id "
        "WHERE s.key = 'onboarding' AND e.tenant_key = 'acme'"
    )
    assert signed_up["created"] is True
    assert signed_up["enrolled"] == [str(onboarding)]
    assert signed_up["not_enrolled"] == signed_up["exited"] == signed_up["released"] == []

    same = await event("signed_up", id="e-1")  # the event's own idempotency id
    assert same == {**signed_up, "enrolled": [], "created": False}

    activation = await client.post(
        "/v1/enrollments", headers=acme, json={"sequence": "activation", "subscriber_id": "u1"}
    )
    waiting = await ctx.pool.fetchval(
        "SELECT id FROM dripd.step_executions WHERE enrollment_id = $1",
        uuid.UUID(activation.json()["id"]),
    )
    confirmed = await event("confirmed")
    assert confirmed["released"] == [str(waiting)]
    assert confirmed["enrolled"] == confirmed["exited"] == []

    purchased = await event("purchased")
    assert purchased["exited"] == [str(onboarding)]
    again = await event("signed_up")
    assert again["not_enrolled"] == [
        {"sequence": "onboarding", "reason": again["not_enrolled"][0]["reason"]}
    ]
    assert "reenroll" in again["not_enrolled"][0]["reason"]
    assert await count(ctx.pool, "events") == 4


async def test_suppression_is_201_then_200(
    client: httpx.AsyncClient, ctx: HttpContext, acme: dict[str, str]
) -> None:
    body = {"channel": "email", "address": " Ann@Example.com ", "reason": "unsubscribe"}
    first = await client.post("/v1/suppressions", headers=acme, json=body)
    assert first.status_code == 201
    assert first.json() == {
        "tenant_key": "acme",
        "channel": "email",
        "address": "ann@example.com",
        "reason": "unsubscribe",
        "created": True,
    }
    again = await client.post("/v1/suppressions", headers=acme, json=body)
    assert again.status_code == 200
    assert again.json()["created"] is False
    response = await client.post("/v1/suppressions", headers=acme, json={**body, "reason": "spam"})
    assert response.status_code == 422
    assert error_of(response)["field"] == "reason"
    response = await client.post("/v1/suppressions", headers=acme, json={**body, "address": "  "})
    assert response.status_code == 422
    assert error_of(response)["field"] == "address"
    assert await count(ctx.pool, "suppressions") == 1


# --- bodies -------------------------------------------------------------------------------


def padded(size: int) -> bytes:
    """A valid enrollment body of exactly `size` bytes."""
    head = b'{"sequence":"welcome","subscriber_id":"u1","data":{"pad":"'
    tail = b'"}}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


async def test_bodies_over_the_limit_are_413_declared_or_streamed(
    client: httpx.AsyncClient, ctx: HttpContext, acme: dict[str, str]
) -> None:
    await apply_text(ctx.pool, one_email("welcome"))
    json_headers = {**acme, "Content-Type": "application/json"}
    response = await client.post("/v1/enrollments", headers=json_headers, content=padded(LIMIT + 1))
    assert response.status_code == 413
    assert error_of(response)["code"] == "payload_too_large"

    async def chunks() -> AsyncIterator[bytes]:
        body = padded(2 * LIMIT)
        for i in range(0, len(body), 512):
            yield body[i : i + 512]

    response = await client.post("/v1/enrollments", headers=json_headers, content=chunks())
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert error_of(response)["code"] == "payload_too_large"
    assert await count(ctx.pool, "enrollments") == 0

    response = await client.post("/v1/enrollments", headers=json_headers, content=padded(LIMIT))
    assert response.status_code == 201  # the limit itself is allowed


async def test_a_body_that_is_not_json_is_415(
    client: httpx.AsyncClient, ctx: HttpContext, acme: dict[str, str]
) -> None:
    await apply_text(ctx.pool, one_email("welcome"))
    body = b'{"sequence":"welcome","subscriber_id":"u1"}'
    for headers in ({"Content-Type": "text/plain"}, {}, {"Content-Type": "application/jsonx"}):
        response = await client.post("/v1/enrollments", headers={**acme, **headers}, content=body)
        assert response.status_code == 415, headers
        assert error_of(response)["code"] == "unsupported_media_type"
    response = await client.post(
        "/v1/enrollments",
        headers={**acme, "Content-Type": "application/json", "Content-Encoding": "gzip"},
        content=gzip.compress(body),
    )
    assert response.status_code == 415
    assert response.headers["accept-encoding"] == "identity"
    response = await client.post(
        "/v1/enrollments",
        headers={**acme, "Content-Type": "Application/JSON; charset=utf-8"},
        content=body,
    )
    assert response.status_code == 201


def nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


DEEP = "data.a" + "[0]" * 31  # the first value at level 33


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"subscriber_id": "u1"}, "sequence"),
        ({"sequence": "welcome", "subscriber_id": "u1", "data": "x"}, "data"),
        ({"sequence": "welcome", "subscriber_id": "u1", "bogus": 1}, "bogus"),
        ({"sequence": 7, "subscriber_id": "u1"}, "sequence"),
        ({"sequence": "welcome", "subscriber_id": ""}, "subscriber_id"),
        ({"sequence": "welcome", "subscriber_id": "  "}, "subscriber_id"),
        ({"sequence": "welcome", "subscriber_id": "u1", "tenant": ""}, "tenant"),
        (
            {"sequence": "welcome", "subscriber_id": "u1", "data": {"timezone": "Mars/Olympus"}},
            "data.timezone",
        ),
        ({"sequence": "welcome", "subscriber_id": "u1", "data": {"n": "a\u0000b"}}, "data.n"),
        ({"sequence": "welcome\u0000", "subscriber_id": "u1"}, "sequence"),
        # Deeper than MAX_DEPTH (32): `data` is level 1, `data.a` level 2.
        ({"sequence": "welcome", "subscriber_id": "u1", "data": {"a": nested(40)}}, DEEP),
    ],
)
async def test_invalid_fields_are_422_naming_the_field(
    client: httpx.AsyncClient,
    ctx: HttpContext,
    acme: dict[str, str],
    body: dict[str, Any],
    field: str,
) -> None:
    await apply_text(ctx.pool, one_email("welcome"))
    response = await client.post("/v1/enrollments", headers=acme, json=body)
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["code"] == "invalid_input"
    assert error["field"] == field
    assert await count(ctx.pool, "enrollments") == 0


async def test_event_fields_are_named_as_sent(
    client: httpx.AsyncClient, acme: dict[str, str]
) -> None:
    for body, field in [
        ({"subscriber_id": "u1"}, "key"),
        ({"subscriber_id": "u1", "key": "k", "id": ""}, "id"),
        ({"subscriber_id": "u1", "key": " "}, "key"),
    ]:
        response = await client.post("/v1/events", headers=acme, json=body)
        assert response.status_code == 422, body
        assert error_of(response)["field"] == field


@pytest.mark.parametrize(
    "content",
    [
        b'{"sequence": ',
        b"",
        b"\xff\xfe",
        b"{'sequence': 'welcome'}",
        # Deeper than the decoder recurses (and within the size limit).
        b'{"sequence":"welcome","subscriber_id":"u1","data":{"a":'
        + b"[" * 1900
        + b"]" * 1900
        + b"}}",
    ],
)
async def test_a_body_that_does_not_parse_is_400(
    client: httpx.AsyncClient, acme: dict[str, str], content: bytes
) -> None:
    response = await client.post(
        "/v1/enrollments", headers={**acme, "Content-Type": "application/json"}, content=content
    )
    assert response.status_code == 400
    assert error_of(response)["code"] == "invalid_json"


async def test_a_lone_surrogate_escape_is_named(
    client: httpx.AsyncClient, acme: dict[str, str]
) -> None:
    response = await client.post(
        "/v1/enrollments",
        headers={**acme, "Content-Type": "application/json"},
        content=b'{"sequence": "welcome", "subscriber_id": "u1", "data": {"n": "\\ud800"}}',
    )
    assert response.status_code == 400
    assert error_of(response)["message"] == (
        "the body is not valid JSON: a \\u escape names a lone UTF-16 surrogate, which is "
        "not a character"
    )


async def suppress_failing(
    client: httpx.AsyncClient, ctx: HttpContext, token: dict[str, str], exception: str
) -> httpx.Response:
    """`POST /v1/suppressions` while a trigger makes Postgres raise `exception` (PL/pgSQL)."""
    await ctx.pool.execute(
        f"""
        CREATE FUNCTION dripd.fail() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION {exception}; END $$;
        CREATE TRIGGER fail BEFORE INSERT ON dripd.suppressions
            FOR EACH ROW EXECUTE FUNCTION dripd.fail();
        """
    )
    return await client.post(
        "/v1/suppressions", headers=token, json={"channel": "email", "address": "a@example.com"}
    )


async def test_a_statement_postgres_refuses_is_a_logged_500_not_the_servers_text(
    client: httpx.AsyncClient,
    ctx: HttpContext,
    acme: dict[str, str],
    json_logs: io.StringIO,
) -> None:
    response = await suppress_failing(client, ctx, acme, "'boom from trigger'")
    assert response.status_code == 500
    assert error_of(response) == {
        "code": "internal",
        "message": "internal error; see the daemon log",
    }
    lines = [json.loads(line) for line in json_logs.getvalue().splitlines()]
    [logged] = [line for line in lines if line.get("level") == "error"]
    assert "Postgres refused: boom from trigger" in logged["exception"]
    assert "Traceback (most recent call last)" in logged["exception"]


async def test_an_unreachable_database_is_a_logged_503(
    client: httpx.AsyncClient,
    ctx: HttpContext,
    acme: dict[str, str],
    json_logs: io.StringIO,
) -> None:
    response = await suppress_failing(client, ctx, acme, "'too many' USING ERRCODE = '53300'")
    assert response.status_code == 503
    assert error_of(response)["code"] == "database"
    lines = [json.loads(line) for line in json_logs.getvalue().splitlines()]
    [logged] = [line for line in lines if line.get("event") == "HTTP request answered 503"]
    assert logged["level"] == "warning"
    assert logged["error"] == error_of(response)["message"]


class Contact(msgspec.Struct, forbid_unknown_fields=True):
    email: str


class Body(msgspec.Struct, forbid_unknown_fields=True):
    contact: Contact
    tags: list[int] = []


def test_read_json_names_nested_fields_as_dotted_paths() -> None:
    def field_of(raw: bytes) -> str | None:
        with pytest.raises(ApiError) as info:
            decode_json(raw, Body)
        assert info.value.status == 422
        return info.value.field

    assert field_of(b'{"contact": {"email": 1}}') == "contact.email"
    assert field_of(b'{"contact": {}}') == "contact.email"
    assert field_of(b'{"contact": {"email": "a", "x": 1}}') == "contact.x"
    assert field_of(b'{"contact": {"email": "a"}, "tags": [1, "2"]}') == "tags[1]"
    assert field_of(b"[]") is None
    assert decode_json(b'{"contact": {"email": "a"}}', Body).contact.email == "a"


# --- idempotency --------------------------------------------------------------------------


async def test_an_idempotency_key_replays_the_first_response(
    client: httpx.AsyncClient,
    ctx: HttpContext,
    acme: dict[str, str],
    globex: dict[str, str],
) -> None:
    await apply_text(ctx.pool, one_email("welcome"))
    await apply_text(ctx.pool, ONBOARDING)
    body = {"sequence": "welcome", "subscriber_id": "u1"}
    keyed = {**acme, "Idempotency-Key": "k1"}
    first = await client.post("/v1/enrollments", headers=keyed, json=body)
    assert first.status_code == 201
    retry = await client.post("/v1/enrollments", headers=keyed, json=body)
    # The stored first response (201, created), not a new answer (200, not created).
    assert retry.status_code == 201
    assert retry.content == first.content
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.headers["location"] == first.headers["location"]
    assert "idempotent-replayed" not in first.headers
    assert await count(ctx.pool, "enrollments") == 1

    event = {"subscriber_id": "u1", "key": "signed_up"}
    keyed_event = {**acme, "Idempotency-Key": "e1"}
    first = await client.post("/v1/events", headers=keyed_event, json=event)
    retry = await client.post("/v1/events", headers=keyed_event, json=event)
    assert (first.status_code, retry.status_code) == (202, 202)
    assert retry.content == first.content
    assert retry.headers["idempotent-replayed"] == "true"
    assert await count(ctx.pool, "events") == 1

    # Keys belong to their token: another token's same key is another request.
    other = await client.post(
        "/v1/enrollments", headers={**globex, "Idempotency-Key": "k1"}, json=body
    )
    assert other.status_code == 201
    assert "idempotent-replayed" not in other.headers
    assert other.json()["tenant_key"] == "globex"


async def test_an_idempotency_key_reused_for_another_request_is_422(
    client: httpx.AsyncClient, ctx: HttpContext, acme: dict[str, str]
) -> None:
    await apply_text(ctx.pool, one_email("welcome"))
    keyed = {**acme, "Idempotency-Key": "k1"}
    body = {"sequence": "welcome", "subscriber_id": "u1"}
    assert (await client.post("/v1/enrollments", headers=keyed, json=body)).status_code == 201
    for path, other in [
        ("/v1/enrollments", {**body, "subscriber_id": "u2"}),
        ("/v1/events", {"subscriber_id": "u1", "key": "k"}),
    ]:
        response = await client.post(path, headers=keyed, json=other)
        assert response.status_code == 422
        assert error_of(response)["code"] == "idempotency_key_reuse"
    assert await count(ctx.pool, "enrollments") == 1
    assert await count(ctx.pool, "events") == 0

    response = await client.post(
        "/v1/enrollments", headers={**acme, "Idempotency-Key": "k" * 256}, json=body
    )
    assert response.status_code == 400
    assert error_of(response)["code"] == "invalid_idempotency_key"
    response = await client.post(
        "/v1/enrollments",
        headers=[*acme.items(), ("Idempotency-Key", "k2"), ("Idempotency-Key", "k3")],
        json={**body, "subscriber_id": "u3"},
    )
    assert response.status_code == 400
    assert error_of(response) == {
        "code": "invalid_idempotency_key",
        "message": "Idempotency-Key must be given once",
    }
    assert await count(ctx.pool, "enrollments") == 1


async def test_what_an_idempotency_key_keeps(
    client: httpx.AsyncClient, ctx: HttpContext, acme: dict[str, str]
) -> None:
    # A body that failed validation did not run: the key stays free.
    keyed = {**acme, "Idempotency-Key": "k3"}
    body = {"sequence": "welcome", "subscriber_id": "u1"}
    response = await client.post("/v1/enrollments", headers=keyed, json={"subscriber_id": "u1"})
    assert response.status_code == 422
    assert await count(ctx.pool, "idempotency_keys") == 0

    # A request that ran and was refused is the answer to its key, like a success.
    refused = await client.post("/v1/enrollments", headers=keyed, json=body)
    assert refused.status_code == 404
    await apply_text(ctx.pool, one_email("welcome"))
    retry = await client.post("/v1/enrollments", headers=keyed, json=body)
    assert retry.status_code == 404
    assert retry.content == refused.content
    assert retry.headers["idempotent-replayed"] == "true"

    # Purged keys are forgotten: the same request runs again.
    assert await intake.purge_idempotency(ctx.pool, datetime.now(UTC) - timedelta(hours=24)) == 0
    assert await intake.purge_idempotency(ctx.pool, datetime.now(UTC) + timedelta(seconds=1)) == 1
    fresh = await client.post("/v1/enrollments", headers=keyed, json=body)
    assert fresh.status_code == 201
    assert "idempotent-replayed" not in fresh.headers


async def _lock_waiters(conn: asyncpg.Connection) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT l.locktype, count(*) AS n FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
        "WHERE NOT l.granted AND a.datname = current_database() GROUP BY l.locktype"
    )
    return {r["locktype"]: int(r["n"]) for r in rows}


async def test_concurrent_requests_with_one_key_run_once(
    client: httpx.AsyncClient, ctx: HttpContext, dsn: str, acme: dict[str, str]
) -> None:
    n = 5
    keyed = {**acme, "Idempotency-Key": "race"}
    event = {"subscriber_id": "u1", "key": "signed_up"}
    blocker = await asyncpg.connect(dsn)
    try:
        # Hold every insert into events, so that all n requests are in flight at once.
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("LOCK TABLE dripd.events IN EXCLUSIVE MODE")
        requests = [
            asyncio.create_task(client.post("/v1/events", headers=keyed, json=event))
            for _ in range(n)
        ]
        for _ in range(200):
            waiters = await _lock_waiters(blocker)
            if sum(waiters.values()) == n:
                break
            await asyncio.sleep(0.05)
        # One request runs (and waits for the events table); the others wait on its key.
        assert waiters == {"relation": 1, "transactionid": n - 1}
        await tx.commit()
        responses = await asyncio.gather(*requests)
    finally:
        await blocker.close()
    assert [r.status_code for r in responses] == [202] * n
    assert len({r.content for r in responses}) == 1
    assert sum("idempotent-replayed" not in r.headers for r in responses) == 1
    assert await count(ctx.pool, "events") == 1


# --- routes and the document --------------------------------------------------------------


async def test_unknown_routes_are_404_and_wrong_methods_405_in_json(
    client: httpx.AsyncClient, acme: dict[str, str]
) -> None:
    response = await client.get("/v1/nope", headers=acme)
    assert response.status_code == 404
    assert error_of(response)["code"] == "not_found"
    for method, path, allowed in [
        ("GET", "/v1/events", "POST"),
        ("PUT", "/v1/enrollments", "POST"),
        ("DELETE", f"/v1/enrollments/{uuid.uuid4()}", "GET"),
    ]:
        response = await client.request(method, path, headers=acme)
        assert response.status_code == 405
        assert error_of(response)["code"] == "method_not_allowed"
        assert allowed in response.headers["allow"]


EXPECTED_STATUSES = {
    ("/v1/enrollments", "post"): {200, 201, 400, 401, 403, 404, 409, 413, 415, 422, 503},
    ("/v1/enrollments/{id}", "get"): {200, 401, 404, 422, 503},
    ("/v1/events", "post"): {202, 400, 401, 403, 413, 415, 422, 503},
    ("/v1/suppressions", "post"): {200, 201, 400, 401, 403, 413, 415, 422, 503},
}


async def test_the_openapi_document_describes_every_route_and_status(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/openapi.json")  # public: no token
    assert response.status_code == 200
    doc = response.json()
    assert doc["openapi"] == "3.1.0"
    operations = {(p, m): op for p, item in doc["paths"].items() for m, op in item.items()}
    assert set(operations) == set(EXPECTED_STATUSES)
    schemas = doc["components"]["schemas"]
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "An API token from `dripd token create`",
    }
    for where, op in operations.items():
        assert {int(s) for s in op["responses"]} == EXPECTED_STATUSES[where], where
        assert op["security"] == [{"bearer": []}]
        assert "WWW-Authenticate" in op["responses"]["401"]["headers"]
        for status, reply in op["responses"].items():
            ref = reply["content"]["application/json"]["schema"]["$ref"]
            assert ref.startswith("#/components/schemas/")
            assert ref.rsplit("/", 1)[1] in schemas
            if int(status) >= 400:
                assert ref == "#/components/schemas/Error"
        if where[1] == "post":
            assert "Idempotency-Key" in {p["name"] for p in op["parameters"]}
    # Generated from the Structs the routes decode and encode.
    request = schemas["EnrollmentRequest"]
    assert request["required"] == ["sequence", "subscriber_id"]
    assert request["additionalProperties"] is False
    assert set(schemas["SuppressionRequest"]["properties"]["reason"]["enum"]) == (
        core.SUPPRESSION_REASONS
    )
    assert schemas["ErrorDetail"]["required"] == ["code", "message"]
    assert set(schemas["ErrorDetail"]["properties"]) == {"code", "message", "field"}
    assert set(schemas["Enrollment"]["required"]) == set(core.Enrollment.__dataclass_fields__)


class Ping(msgspec.Struct, forbid_unknown_fields=True):
    """A ping."""

    text: str


async def test_the_document_takes_other_modules_routes() -> None:
    extra = Operation(
        method="POST",
        path="/v1/ping",
        operation_id="ping",
        summary="Ping",
        request=Ping,
        responses={200: Reply(description="Pong", body=Ping), **error_replies(422)},
    )
    raw_path = {"/v1/raw": {"get": {"operationId": "raw", "responses": {"204": {}}}}}
    route = openapi_route(
        [*OPERATIONS, extra], paths=raw_path, components={"schemas": {"Raw": {"type": "object"}}}
    )

    app = build_app(metrics=Metrics(), readiness=_ready, routes=[route])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as c:
        doc = (await c.get("/openapi.json")).json()
    assert {"/v1/enrollments", "/v1/ping", "/v1/raw"} <= set(doc["paths"])
    assert {"Ping", "Raw", "Error", "EnrollmentRequest"} <= set(doc["components"]["schemas"])
    ping = doc["paths"]["/v1/ping"]["post"]
    assert set(ping["responses"]) == {"200", "401", "422"}
    assert doc["components"]["schemas"]["Ping"]["description"] == "A ping."
