"""Lead intake: api.create_lead against a real Postgres, the lead form and `POST /v1/leads`
on a real uvicorn listener."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from html.parser import HTMLParser
from typing import Any

import asyncpg
import httpx
import pytest
from background import background
from support import apply_text, one_email

from dripd import api
from dripd.clock import SystemClock
from dripd.config import Config, from_dict
from dripd.db import intake, store
from dripd.errors import NotFound
from dripd.http.app import HttpServer, build_app
from dripd.http.context import HttpContext
from dripd.http.leads import openapi_components, openapi_paths, routes
from dripd.http.openapi import openapi_document
from dripd.metrics import Metrics

TENANT = "acme"


async def _lead_rows(db: asyncpg.Pool) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await db.fetch("SELECT * FROM dripd.leads ORDER BY created_at")
    return rows


async def _count(db: asyncpg.Pool, table: str) -> int:
    count: int = await db.fetchval(f"SELECT count(*) FROM dripd.{table}")
    return count


async def _create(db: asyncpg.Pool, **overrides: Any) -> api.Lead:
    kwargs: dict[str, Any] = {
        "tenant": None,
        "sequence_key": "leads",
        "name": "Ada Lovelace",
        "email": "ada@example.com",
        "phone": None,
        "notes": None,
    }
    return await api.create_lead(db, **(kwargs | overrides))


# --- api.create_lead ------------------------------------------------------------------------


async def test_create_lead_stores_normalizes_and_enrolls(pool: asyncpg.Pool) -> None:
    await apply_text(pool, one_email("leads"))
    lead = await _create(
        pool,
        name="  Ada   King Lovelace ",
        email=" Ada.Lovelace@Example.COM ",
        phone="(202) 555-0143",
        notes="  Wants the annual plan.\nCall after 5.  ",
    )
    assert lead.name == "Ada   King Lovelace"
    assert lead.email == "ada.lovelace@example.com"
    assert lead.phone == "+12025550143"
    assert lead.notes == "Wants the annual plan.\nCall after 5."
    assert lead.tenant_key is None
    assert lead.enrollment_id is not None
    (row,) = await _lead_rows(pool)
    assert row["id"] == lead.id
    assert row["enrollment_id"] == lead.enrollment_id
    assert row["email"] == "ada.lovelace@example.com"
    assert row["phone"] == "+12025550143"
    enrollment = await api.get_enrollment(pool, tenant=None, enrollment_id=lead.enrollment_id)
    assert enrollment.sequence_key == "leads"
    assert enrollment.subscriber_type == "lead"
    assert enrollment.subscriber_id == str(lead.id)
    assert enrollment.next_step == "hello"
    assert enrollment.data == {
        "name": "Ada   King Lovelace",
        "first_name": "Ada",
        "email": "ada.lovelace@example.com",
        "phone": "+12025550143",
        "notes": "Wants the annual plan.\nCall after 5.",
        "lead_id": str(lead.id),
    }
    as_dict = lead.to_dict()
    assert as_dict["id"] == str(lead.id)
    assert as_dict["enrollment_id"] == str(lead.enrollment_id)
    assert as_dict["created_at"] == lead.created_at.isoformat()
    json.dumps(as_dict)


@pytest.mark.parametrize(
    ("phone", "region", "stored"),
    [
        ("(202) 555-0143", "US", "+12025550143"),
        ("202-555-0143", "US", "+12025550143"),
        ("+1 202 555 0143", "DE", "+12025550143"),
        ("030 901820", "DE", "+4930901820"),
    ],
)
async def test_phone_is_stored_in_e164(
    pool: asyncpg.Pool, phone: str, region: str, stored: str
) -> None:
    await apply_text(pool, one_email("leads"))
    lead = await _create(pool, email=None, phone=phone, default_region=region)
    assert lead.phone == stored
    assert lead.email is None


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"name": "   "}, "name", r"^name: a name is required$"),
        ({"name": "x" * 201}, "name", r"^name: the name must be at most 200 characters$"),
        ({"name": "Ada\nBcc: x@example.com"}, "name", r"^name: the name must be one line of text"),
        ({"email": None, "phone": None}, "email", r"^email: give an email address or a phone"),
        ({"email": "  ", "phone": ""}, "email", r"^email: give an email address or a phone"),
        ({"email": "ada@"}, "email", r"^email: There must be something after the @-sign"),
        ({"email": "ada.example.com"}, "email", r"^email: .*@-sign"),
        (
            {"phone": "call me"},
            "phone",
            r"^phone: this is not a phone number \(write it like \+1 202",
        ),
        ({"phone": "555-0143"}, "phone", r"^phone: this phone number is not valid \("),
        ({"notes": "x" * 2001}, "notes", r"^notes: the notes must be at most 2000 characters$"),
        ({"notes": "a\x00b"}, "notes", r"^notes: the notes must not contain NUL characters$"),
    ],
)
async def test_invalid_fields_are_named(
    pool: asyncpg.Pool, overrides: dict[str, Any], field: str, message: str
) -> None:
    await apply_text(pool, one_email("leads"))
    with pytest.raises(api.InvalidLead, match=message) as caught:
        await _create(pool, **overrides)
    assert caught.value.field == field
    assert isinstance(caught.value, api.ConfigError)
    assert await _count(pool, "leads") == 0


async def test_the_longest_name_and_notes_are_taken(pool: asyncpg.Pool) -> None:
    await apply_text(pool, one_email("leads"))
    lead = await _create(pool, name="x" * 200, notes="n" * 2000)
    assert len(lead.name) == 200
    assert lead.notes is not None
    assert len(lead.notes) == 2000


async def test_duplicate_email_and_phone_are_named(pool: asyncpg.Pool) -> None:
    await apply_text(pool, one_email("leads"))
    first = await _create(pool, email="grace@example.com", phone="+1 202 555 0143")
    with pytest.raises(api.DuplicateLead) as by_email:
        await _create(pool, name="Other", email="GRACE@example.com", phone=None)
    assert by_email.value.field == "email"
    assert by_email.value.message == "email: a lead with this email already exists"
    assert isinstance(by_email.value, api.ConfigError)
    with pytest.raises(api.DuplicateLead) as by_phone:
        await _create(pool, name="Other", email="other@example.com", phone="(202) 555-0143")
    assert by_phone.value.field == "phone"
    assert by_phone.value.message == "phone: a lead with this phone already exists"
    # Neither refused lead left a row or an enrollment behind.
    assert [r["id"] for r in await _lead_rows(pool)] == [first.id]
    assert await _count(pool, "enrollments") == 1


async def test_duplicates_are_per_tenant(pool: asyncpg.Pool) -> None:
    await apply_text(pool, one_email("leads"))
    global_lead = await _create(pool, phone="+12025550143")
    tenant_lead = await _create(pool, tenant=TENANT, phone="+12025550143")
    assert global_lead.tenant_key is None
    assert tenant_lead.tenant_key == TENANT
    with pytest.raises(api.DuplicateLead, match=r"^email: "):
        await _create(pool, tenant=TENANT, phone=None)


async def test_a_failing_enrollment_leaves_no_lead(pool: asyncpg.Pool) -> None:
    # The lead is inserted before the sequence is looked up: only the rollback removes it.
    with pytest.raises(NotFound, match="no sequence 'leads'"):
        await _create(pool)
    assert await _count(pool, "leads") == 0
    assert await _count(pool, "enrollments") == 0
    await apply_text(pool, one_email("leads"))
    lead = await _create(pool)  # the same email is free: nothing of the first try remains
    assert lead.enrollment_id is not None


async def test_inside_the_callers_transaction_it_rolls_back_with_it(pool: asyncpg.Pool) -> None:
    await apply_text(pool, one_email("leads"))

    async with pool.acquire() as conn:
        outer = conn.transaction()
        await outer.start()
        try:
            await _create(conn)
            assert await conn.fetchval("SELECT count(*) FROM dripd.leads") == 1
        finally:
            await outer.rollback()
    assert await _count(pool, "leads") == 0
    assert await _count(pool, "enrollments") == 0


# --- HTTP -----------------------------------------------------------------------------------


def _config(**leads: Any) -> Config:
    return from_dict(
        {
            "http": {"max_body_bytes": 4096},
            "leads": {"enabled": True, "sequence": "leads", "tenant": TENANT, **leads},
        }
    )


async def _ready() -> dict[str, Any]:
    return {"ready": True}


@contextlib.asynccontextmanager
async def serving(dsn: str, config: Config) -> AsyncIterator[httpx.AsyncClient]:
    """The lead routes on a real listener, and a client of it."""
    db = await store.create_pool(dsn, min_size=1, max_size=4)
    ctx = HttpContext(pool=db, config=config, clock=SystemClock(), metrics=Metrics(), vault=None)
    server = HttpServer(build_app(metrics=ctx.metrics, readiness=_ready, routes=routes(ctx)))
    try:
        async with (
            background(server.serve, "127.0.0.1", 0),
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client,
        ):
            yield client
    finally:
        await db.close()


@pytest.fixture
async def client(dsn: str, pool: asyncpg.Pool) -> AsyncIterator[httpx.AsyncClient]:
    await apply_text(pool, one_email("leads"))
    async with serving(dsn, _config()) as c:
        yield c


async def create_token(db: asyncpg.Pool, tenant: str | None) -> str:
    """A bearer token, made as `dripd token create` makes one."""
    token, _ = await intake.create_token(
        db, tenant=tenant, name="leads test", now=datetime.now(UTC)
    )
    return token


class _Tags(HTMLParser):
    """Every start tag with its attributes, and the text of each <label> by its `for`."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.labels: dict[str, str] = {}
        self._label: str | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "label":
            self._label = dict(attrs).get("for") or ""
            self.labels[self._label] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "label":
            self._label = None

    def handle_data(self, data: str) -> None:
        if self._label is not None:
            self.labels[self._label] += data

    def by_id(self, element_id: str) -> tuple[str, dict[str, str | None]]:
        (found,) = [(t, a) for t, a in self.tags if a.get("id") == element_id]
        return found


def test_no_routes_unless_enabled() -> None:
    ctx = HttpContext(
        pool=None,
        config=from_dict({}),
        clock=SystemClock(),
        metrics=Metrics(),
        vault=None,
    )
    assert routes(ctx) == []


async def test_form_has_labelled_inputs_and_no_script(client: httpx.AsyncClient) -> None:
    response = await client.get("/leads/new")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert "script-src" not in response.headers["content-security-policy"]
    assert "default-src 'none'" in response.headers["content-security-policy"]
    page = _Tags(response.text)
    assert "<script" not in response.text
    (form,) = [a for t, a in page.tags if t == "form"]
    assert form["method"] == "post"
    assert form["action"] == "/leads/new"
    assert form.get("enctype") in (None, "application/x-www-form-urlencoded")
    expected = {"name": ("input", "text"), "email": ("input", "email"), "phone": ("input", "tel")}
    for field, (tag, kind) in expected.items():
        found_tag, attrs = page.by_id(field)
        assert (found_tag, attrs["type"], attrs["name"]) == (tag, kind, field)
        assert page.labels[field].strip()
    notes_tag, notes = page.by_id("notes")
    assert (notes_tag, notes["name"]) == ("textarea", "notes")
    assert page.labels["notes"].strip() == "Notes"
    assert [a for t, a in page.tags if t == "button" and a.get("type") == "submit"]
    assert '<html lang="en">' in response.text


async def test_form_post_thanks_and_stores_the_lead(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    response = await client.post(
        "/leads/new",
        data={"name": "Grace Hopper", "email": "Grace@Example.com", "phone": "", "notes": "hi"},
    )
    assert response.status_code == 200, response.text
    assert "Thanks, Grace Hopper" in response.text
    (row,) = await _lead_rows(pool)
    assert (row["tenant_key"], row["name"], row["email"], row["phone"], row["notes"]) == (
        TENANT,
        "Grace Hopper",
        "grace@example.com",
        None,
        "hi",
    )
    assert row["enrollment_id"] is not None


async def test_form_error_keeps_the_values_escaped(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    entered = {
        "name": "<script>alert(1)</script>",
        "email": '"><script>alert(2)</script>',
        "phone": "+1 202 555 0143",
        "notes": "</textarea><script>alert(3)</script>\nsecond line",
    }
    response = await client.post("/leads/new", data=entered)
    assert response.status_code == 422
    assert "<script" not in response.text
    assert 'value="&lt;script&gt;alert(1)&lt;/script&gt;"' in response.text
    assert "&lt;/textarea&gt;&lt;script&gt;alert(3)&lt;/script&gt;\nsecond line</textarea>" in (
        response.text
    )
    page = _Tags(response.text)
    # The browser's view: each control holds exactly what was typed.
    assert page.by_id("name")[1]["value"] == entered["name"]
    assert page.by_id("email")[1]["value"] == entered["email"]
    assert page.by_id("phone")[1]["value"] == entered["phone"]
    # The message sits by the email field, which is marked invalid and described by it.
    email = page.by_id("email")[1]
    assert email["aria-invalid"] == "true"
    assert email["aria-describedby"] == "email-error"
    assert page.by_id("email-error")[0] == "span"
    assert "aria-invalid" not in page.by_id("name")[1]
    assert response.text.index('id="email-error"') < response.text.index('id="email"')
    assert "Error: An email address must have an @-sign." in response.text
    assert response.text.count('class="error"') == 1
    assert await _count(pool, "leads") == 0


async def test_form_answers_a_duplicate_as_a_new_lead(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    # The form must not tell anyone which addresses it knows (enumeration): a duplicate gets
    # the very page a new lead gets, and nothing is stored or sent.
    first = {"name": "Grace", "email": "grace@example.com", "phone": "202 555 0143"}
    new = await client.post("/leads/new", data=first)
    assert new.status_code == 200
    again = {"name": "Grace", "email": "other@example.com", "phone": "+12025550143"}
    duplicate = await client.post("/leads/new", data=again)
    assert duplicate.status_code == 200
    assert duplicate.text == new.text
    assert "Thanks, Grace" in duplicate.text
    assert await _count(pool, "leads") == 1
    assert await _count(pool, "enrollments") == 1


async def test_form_without_a_name_is_refused(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    response = await client.post("/leads/new", data={"email": "a@example.com"})
    assert response.status_code == 422
    assert _Tags(response.text).by_id("name")[1]["aria-invalid"] == "true"
    assert "Error: A name is required" in response.text
    assert await _count(pool, "leads") == 0


async def test_form_body_limits_and_type(client: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    big = {"name": "Big", "email": "big@example.com", "notes": "x" * 5000}
    assert (await client.post("/leads/new", data=big)).status_code == 413

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit still holds
        yield b"name=Big&email=big%40example.com&notes="
        for _ in range(10):
            yield b"x" * 1000

    form = {"content-type": "application/x-www-form-urlencoded"}
    streamed = await client.post("/leads/new", content=chunks(), headers=form)
    assert streamed.status_code == 413
    as_json = await client.post("/leads/new", json={"name": "J", "email": "j@example.com"})
    assert as_json.status_code == 415
    broken = await client.post(
        "/leads/new",
        content=b"name=%FF&email=a%40example.com",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert broken.status_code == 400
    assert await _count(pool, "leads") == 0


async def test_without_the_sequence_the_lead_is_not_taken(dsn: str, pool: asyncpg.Pool) -> None:
    token = await create_token(pool, TENANT)
    async with serving(dsn, _config(sequence="missing")) as client:
        form = await client.post("/leads/new", data={"name": "A", "email": "a@example.com"})
        assert form.status_code == 503
        assert "try again later" in form.text
        assert "missing" not in form.text  # the operator's log says which; the visitor not
        response = await client.post(
            "/v1/leads",
            json={"name": "A", "email": "a@example.com"},
            headers={"authorization": f"Bearer {token}"},
        )
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "unavailable"
    assert await _count(pool, "leads") == 0


async def test_api_creates_a_lead(client: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    token = await create_token(pool, TENANT)
    response = await client.post(
        "/v1/leads",
        json={"name": "Ada Lovelace", "email": "Ada@Example.com", "phone": "(202) 555-0143"},
        headers={"authorization": f"Bearer {token}"},
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["name"] == "Ada Lovelace"
    assert body["email"] == "ada@example.com"
    assert body["phone"] == "+12025550143"
    assert body["notes"] is None
    assert body["tenant_key"] == TENANT
    (row,) = await _lead_rows(pool)
    assert body["id"] == str(row["id"])
    assert body["enrollment_id"] == str(row["enrollment_id"])
    enrollment = await api.get_enrollment(
        pool, tenant=TENANT, enrollment_id=uuid.UUID(body["enrollment_id"])
    )
    assert enrollment.subscriber_id == body["id"]


async def test_api_global_token_may_add_leads(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    token = await create_token(pool, None)
    response = await client.post(
        "/v1/leads",
        json={"name": "Ada", "phone": "+12025550143"},
        headers={"authorization": f"Bearer {token}"},
    )
    assert response.status_code == 201, response.text


async def test_api_needs_a_token_of_the_leads_tenant(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    lead = {"name": "Ada", "email": "ada@example.com"}
    anonymous = await client.post("/v1/leads", json=lead)
    assert anonymous.status_code == 401
    wrong = await client.post("/v1/leads", json=lead, headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401
    other = await create_token(pool, "other")
    response = await client.post(
        "/v1/leads", json=lead, headers={"authorization": f"Bearer {other}"}
    )
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden_tenant"
    assert await _count(pool, "leads") == 0


async def test_api_names_the_invalid_or_duplicate_field(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    headers = {"authorization": f"Bearer {await create_token(pool, TENANT)}"}
    invalid = await client.post("/v1/leads", json={"name": "Ada", "email": "ada@"}, headers=headers)
    assert invalid.status_code == 422
    error = invalid.json()["error"]
    assert (error["code"], error["field"]) == ("invalid_input", "email")
    assert error["message"].startswith("email: ")
    neither = await client.post("/v1/leads", json={"name": "Ada"}, headers=headers)
    assert neither.status_code == 422
    assert neither.json()["error"]["field"] == "email"
    no_name = await client.post("/v1/leads", json={"email": "a@example.com"}, headers=headers)
    assert no_name.status_code == 422
    assert no_name.json()["error"]["field"] == "name"
    first = await client.post(
        "/v1/leads", json={"name": "Ada", "phone": "+12025550143"}, headers=headers
    )
    assert first.status_code == 201
    duplicate = await client.post(
        "/v1/leads", json={"name": "Bob", "phone": "202-555-0143"}, headers=headers
    )
    assert duplicate.status_code == 422
    assert duplicate.json() == {
        "error": {
            "code": "duplicate",
            "message": "phone: a lead with this phone already exists",
            "field": "phone",
        }
    }
    assert await _count(pool, "leads") == 1


def test_openapi_describes_the_route() -> None:
    paths, components = openapi_paths(), openapi_components()
    operation = paths["/v1/leads"]["post"]
    assert set(operation["responses"]) == {
        "201", "400", "401", "403", "413", "415", "422", "429", "503"
    }  # fmt: skip
    assert operation["security"] == [{"bearer": []}]
    assert "Idempotency-Key" in {p["name"] for p in operation["parameters"]}
    assert "Retry-After" in operation["responses"]["429"]["headers"]
    schemas = components["schemas"]
    assert schemas["NewLead"]["required"] == ["name"]
    assert set(schemas["NewLead"]["properties"]) == {"name", "email", "phone", "notes"}
    assert schemas["NewLead"]["properties"]["name"]["maxLength"] == 200
    assert schemas["NewLead"]["additionalProperties"] is False
    assert "enrollment_id" in schemas["Lead"]["properties"]
    assert schemas["LeadStatus"]["enum"] == ["active", "expired", "pending"]
    # In the API document, every reference resolves and the bearer scheme is declared.
    document = openapi_document(paths, components)
    assert "bearer" in document["components"]["securitySchemes"]
    text = json.dumps(document)
    prefix = '"#/components/schemas/'
    refs = {part.split('"')[0] for part in text.split(prefix)[1:]}
    assert refs >= {"NewLead", "Lead", "Error", "ErrorDetail"}
    assert refs <= set(document["components"]["schemas"])
