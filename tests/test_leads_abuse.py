"""The lead form's defences (issue 12, "Lead form abuse"), on a real listener and Postgres:
a shared per-client budget of posts, the honeypot, the daily cap per mailbox (sub-addresses
are one mailbox), double opt-in, answers that reveal no address, and `Idempotency-Key` on
every POST route of the daemon."""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from background import background
from starlette.requests import Request
from support import add_adapter, apply_text, one_email, outbox_messages, wait_for

from dripd import api
from dripd.addresses import mailbox
from dripd.channels.credentials import ENV_VAR, Vault, generate_key
from dripd.clock import ManualClock, SystemClock
from dripd.config import Config, from_dict
from dripd.db import intake, store
from dripd.db.migrate import migrate, migrations
from dripd.errors import ConfigError
from dripd.http.app import HttpServer, build_app
from dripd.http.clients import client_address, client_key
from dripd.http.context import HttpContext
from dripd.http.routes import admin_routes, http_routes
from dripd.metrics import Metrics
from dripd.rules.leadconfirm import (
    ConfirmLinks,
    InvalidConfirmToken,
    make_confirm_token,
    read_confirm_token,
)
from dripd.rules.unsubscribe import make_token

TENANT = "acme"
KEY = generate_key()
VAULT = Vault.from_env({ENV_VAR: KEY})

CONFIRM = """
[sequence]
key = "confirm"

[[steps]]
key = "ask"
channel = "email"
subject = "Please confirm, {{ first_name }}"
text = "Confirm here: {{ confirm_url }}"
"""

LEADS = """
[sequence]
key = "leads"

[[steps]]
key = "welcome"
channel = "email"
subject = "Welcome, {{ first_name }}"
text = "Hi {{ first_name }}"
"""


def _config(**leads: Any) -> Config:
    return from_dict(
        {
            "http": {"max_body_bytes": 4096},
            "leads": {"enabled": True, "sequence": "leads", "tenant": TENANT, **leads},
        }
    )


def _double_opt_in(**leads: Any) -> Config:
    defaults = {
        "double_opt_in": True,
        "confirm_sequence": "confirm",
        "base_url": "https://leads.example.com",
    }
    return _config(**(defaults | leads))


async def _ready() -> dict[str, Any]:
    return {"ready": True}


@dataclass
class Served:
    client: httpx.AsyncClient
    ctx: HttpContext

    def count(self, outcome: str) -> float:
        value = self.ctx.metrics.registry.get_sample_value(
            "dripd_leads_total", {"outcome": outcome}
        )
        return value or 0.0


@contextlib.asynccontextmanager
async def serving(dsn: str, config: Config, *, clock: Any = None) -> AsyncIterator[Served]:
    """Every route of the daemon's HTTP surface on a real listener, and a client of it."""
    db = await store.create_pool(dsn, min_size=1, max_size=4)
    ctx = HttpContext(
        pool=db, config=config, clock=clock or SystemClock(), metrics=Metrics(), vault=VAULT
    )
    app = build_app(
        metrics=ctx.metrics, readiness=_ready, routes=[*http_routes(ctx), *admin_routes(ctx)]
    )
    server = HttpServer(app)
    try:
        async with (
            background(server.serve, "127.0.0.1", 0),
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=60) as c,
        ):
            yield Served(client=c, ctx=ctx)
    finally:
        await db.close()


async def _count(db: asyncpg.Pool, table: str) -> int:
    count: int = await db.fetchval(f"SELECT count(*) FROM dripd.{table}")
    return count


async def _token(db: asyncpg.Pool, tenant: str | None = TENANT) -> str:
    token, _ = await intake.create_token(db, tenant=tenant, name="abuse", now=datetime.now(UTC))
    return token


def _lead(n: int, **fields: str) -> dict[str, str]:
    return {"name": f"Lead {n}", "email": f"lead{n}@example.com", **fields}


# --- the budget of posts per client -------------------------------------------------------


async def test_300_form_posts_from_one_client_take_only_the_budget(
    dsn: str, pool: asyncpg.Pool
) -> None:
    # The flood: 300 posts in under 2 s from one client. With "10/1h" ten leads are
    # taken; the other 290 are 429 with Retry-After, and store nothing.
    await apply_text(pool, LEADS)
    async with serving(dsn, _config(rate_limit="10/1h")) as served:
        responses = await asyncio.gather(
            *(served.client.post("/leads/new", data=_lead(n)) for n in range(300))
        )
        statuses = [r.status_code for r in responses]
        assert (statuses.count(200), statuses.count(429)) == (10, 290)
        refused = [r for r in responses if r.status_code == 429]
        assert all(1 <= int(r.headers["retry-after"]) <= 3600 for r in refused)
        assert "Too many requests" in refused[0].text
        assert served.count("rate_limited") == 290
        assert served.count("created") == 10
    assert await _count(pool, "leads") == 10
    assert await _count(pool, "enrollments") == 10
    (budget,) = await pool.fetch("SELECT client, cardinality(posts) AS n FROM dripd.lead_budgets")
    assert (budget["client"], budget["n"]) == ("addr:127.0.0.1", 10)


async def test_300_api_posts_of_one_token_take_only_its_budget(
    dsn: str, pool: asyncpg.Pool
) -> None:
    await apply_text(pool, LEADS)
    token = await _token(pool)
    headers = {"authorization": f"Bearer {token}"}
    async with serving(dsn, _config(api_rate_limit="10/1h")) as served:
        responses = await asyncio.gather(
            *(served.client.post("/v1/leads", json=_lead(n), headers=headers) for n in range(300))
        )
    statuses = [r.status_code for r in responses]
    assert (statuses.count(201), statuses.count(429)) == (10, 290)
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["code"] == "rate_limited"
    assert refused.json()["error"]["message"] == (
        "this token may add at most 10 leads in 1h; try again later"
    )
    assert 3590 <= int(refused.headers["retry-after"]) <= 3600
    assert await _count(pool, "leads") == 10


async def test_the_budget_is_shared_by_every_daemon(dsn: str, pool: asyncpg.Pool) -> None:
    # Two daemons (two listeners, two pools) on one database: one budget between them.
    await apply_text(pool, LEADS)
    config = _config(rate_limit="6/1h")
    async with serving(dsn, config) as one, serving(dsn, config) as two:
        responses = await asyncio.gather(
            *((one if n % 2 else two).client.post("/leads/new", data=_lead(n)) for n in range(40))
        )
    assert sorted(r.status_code for r in responses) == [200] * 6 + [429] * 34
    assert await _count(pool, "leads") == 6


async def test_the_budget_holds_in_every_window(dsn: str, pool: asyncpg.Pool) -> None:
    # "3/1m": three posts, then 429 until the oldest post is a minute old (a sliding
    # window: at most three in ANY minute), told in Retry-After.
    await apply_text(pool, LEADS)
    clock = ManualClock(datetime(2026, 3, 2, 9, 0, tzinfo=UTC))
    async with serving(dsn, _config(rate_limit="3/1m"), clock=clock) as served:
        post = served.client.post
        for n, step in enumerate([0, 20, 20]):
            clock.advance(step)
            assert (await post("/leads/new", data=_lead(n))).status_code == 200
        clock.advance(10)  # 50 s after the first post
        refused = await post("/leads/new", data=_lead(3))
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "10"
        clock.advance(9)
        assert (await post("/leads/new", data=_lead(4))).status_code == 429
        clock.advance(1)  # the first post leaves the window
        assert (await post("/leads/new", data=_lead(5))).status_code == 200
        assert (await post("/leads/new", data=_lead(6))).status_code == 429
    assert await _count(pool, "leads") == 4


async def test_a_forwarded_address_counts_only_from_a_trusted_proxy(
    dsn: str, pool: asyncpg.Pool
) -> None:
    await apply_text(pool, LEADS)
    spoofed = [{"x-forwarded-for": f"198.51.100.{n}"} for n in range(6)]
    # Not configured: the peer is the client, whatever the header says.
    async with serving(dsn, _config(rate_limit="2/1h")) as served:
        responses = [
            await served.client.post("/leads/new", data=_lead(n), headers=h)
            for n, h in enumerate(spoofed)
        ]
    assert [r.status_code for r in responses] == [200, 200, 429, 429, 429, 429]
    await pool.execute("DELETE FROM dripd.lead_budgets")
    # 127.0.0.1 is a trusted proxy: the address it forwards is the client.
    config = _config(rate_limit="2/1h", trusted_proxies=["127.0.0.0/8"])
    async with serving(dsn, config) as served:
        posts = [
            ({"x-forwarded-for": "198.51.100.7"}, 200),
            ({"x-forwarded-for": "203.0.113.9, 198.51.100.7"}, 200),  # what it wrote itself
            ({"x-forwarded-for": "198.51.100.7"}, 429),
            ({"x-forwarded-for": "198.51.100.8"}, 200),
        ]
        for n, (headers, expected) in enumerate(posts, start=10):
            response = await served.client.post("/leads/new", data=_lead(n), headers=headers)
            assert response.status_code == expected, headers
    clients = {r["client"] for r in await pool.fetch("SELECT client FROM dripd.lead_budgets")}
    assert clients == {"addr:198.51.100.7", "addr:198.51.100.8"}


def _request(peer: str, forwarded: str | None = None) -> Request:
    headers = [] if forwarded is None else [(b"x-forwarded-for", forwarded.encode())]
    return Request({"type": "http", "client": (peer, 5000), "headers": headers})


def test_the_client_address_is_read_from_the_right() -> None:
    proxies = [ip_network("10.0.0.0/8"), ip_network("::1/128")]
    cases = [
        ("192.0.2.1", "203.0.113.5", "192.0.2.1"),  # an untrusted peer: its header is no use
        ("10.0.0.2", "203.0.113.5", "203.0.113.5"),
        ("10.0.0.2", "6.6.6.6, 203.0.113.5, 10.0.0.9", "203.0.113.5"),  # proxies skipped
        ("10.0.0.2", "garbage, 10.0.0.9", "10.0.0.9"),  # nothing left of garbage counts
        ("10.0.0.2", "203.0.113.5:4711", "203.0.113.5"),
        ("10.0.0.2", "[2001:db8::1]:4711", "2001:db8::1"),
        ("10.0.0.2", None, "10.0.0.2"),
        ("::1", "2001:db8::7", "2001:db8::7"),
    ]
    for peer, forwarded, expected in cases:
        assert client_address(_request(peer, forwarded), proxies) == ip_address(expected), (
            peer,
            forwarded,
        )
    # IPv6 clients count per /64 (a host holds a whole one); a mapped IPv4 as itself.
    assert client_key(ip_address("2001:db8:1:2:aaaa::1")) == "addr:2001:db8:1:2::/64"
    assert client_key(ip_address("2001:db8:1:2:bbbb::9")) == "addr:2001:db8:1:2::/64"
    assert client_key(ip_address("::ffff:192.0.2.1")) == "addr:192.0.2.1"
    assert client_key(ip_address("192.0.2.1")) == "addr:192.0.2.1"
    assert client_key(None) == "addr:unknown"


# --- the honeypot ---------------------------------------------------------------------------


async def test_the_honeypot_is_hidden_from_people_and_catches_bots(
    dsn: str, pool: asyncpg.Pool
) -> None:
    await apply_text(pool, LEADS)
    async with serving(dsn, _config(honeypot_field="homepage")) as served:
        page = (await served.client.get("/leads/new")).text
        block = re.search(r'<div class="hp" aria-hidden="true">\n(.*?)</div>', page, re.S)
        assert block is not None
        assert '<label for="homepage">Leave this field empty</label>' in block.group(1)
        assert (
            '<input id="homepage" name="homepage" type="text" tabindex="-1" '
            'autocomplete="off" value="">' in block.group(1)
        )
        assert ".hp{position:absolute;left:-10000px;" in page
        # A person's post leaves it empty and is taken.
        person = await served.client.post("/leads/new", data={**_lead(1), "homepage": ""})
        assert person.status_code == 200
        # A bot fills every field: the same page, nothing stored, counted.
        bot = await served.client.post(
            "/leads/new", data={**_lead(2, name="Lead 1"), "homepage": "http://spam.example"}
        )
        assert bot.status_code == 200
        assert bot.text == person.text
        assert served.count("honeypot") == 1
        assert served.count("created") == 1
    assert [r["email"] for r in await pool.fetch("SELECT email FROM dripd.leads")] == [
        "lead1@example.com"
    ]
    # "" turns it off.
    async with serving(dsn, _config(honeypot_field="")) as served:
        assert 'class="hp"' not in (await served.client.get("/leads/new")).text


# --- mailboxes ------------------------------------------------------------------------------


def test_a_mailbox_is_the_address_without_its_tag() -> None:
    assert mailbox("victim+1@example.com") == "victim@example.com"
    assert mailbox("victim+a+b@example.com") == "victim@example.com"
    assert mailbox("victim@example.com") == "victim@example.com"
    assert mailbox("+tag@example.com") == "+tag@example.com"
    assert mailbox("first.last@example.com") == "first.last@example.com"  # dots stay
    assert mailbox("victim-1@example.com") == "victim-1@example.com"  # so do `-` tags


async def test_victim_plus_n_is_one_mailbox_and_the_form_reveals_nothing(
    dsn: str, pool: asyncpg.Pool
) -> None:
    # The example: victim+N@example.com passed the duplicate check, 301 mails. Now
    # they are one mailbox: one lead; every post gets the one page a new lead gets.
    await apply_text(pool, LEADS)
    async with serving(dsn, _config(rate_limit="1000/1h")) as served:
        responses = [
            await served.client.post(
                "/leads/new",
                data={"name": "Victim", "email": "victim@example.com" if n == 0 else
                      f"Victim+{n}@Example.com"},
            )
            for n in range(301)
        ]  # fmt: skip
        assert {r.status_code for r in responses} == {200}
        assert len({r.text for r in responses}) == 1
        assert served.count("created") == 1
        assert served.count("duplicate") == 300
    rows = await pool.fetch("SELECT email, mailbox FROM dripd.leads")
    assert [(r["email"], r["mailbox"]) for r in rows] == [
        ("victim@example.com", "victim@example.com")
    ]
    assert await _count(pool, "enrollments") == 1


async def test_the_api_names_a_mailbox_duplicate(dsn: str, pool: asyncpg.Pool) -> None:
    await apply_text(pool, LEADS)
    headers = {"authorization": f"Bearer {await _token(pool)}"}
    async with serving(dsn, _config()) as served:
        first = await served.client.post(
            "/v1/leads", json=_lead(1, email="v+a@example.com"), headers=headers
        )
        assert first.status_code == 201
        again = await served.client.post(
            "/v1/leads", json=_lead(2, email="v+b@example.com"), headers=headers
        )
    assert again.status_code == 422
    assert again.json() == {
        "error": {
            "code": "duplicate",
            "message": "email: a lead with this email already exists",
            "field": "email",
        }
    }


async def test_a_mailbox_gets_at_most_its_cap_of_new_leads_a_day(pool: asyncpg.Pool) -> None:
    # Pending leads that expire free their mailbox for a new lead; the cap bounds how many
    # new leads (and so confirmation messages) one mailbox gets in any 24 hours.
    await apply_text(pool, LEADS)
    await apply_text(pool, CONFIRM)
    start = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)

    async def post(n: int, at: datetime) -> api.Lead:
        return await api.create_lead(
            pool,
            tenant=None,
            sequence_key="leads",
            name="Victim",
            email=f"victim+{n}@example.com",
            phone=None,
            notes=None,
            now=at,
            confirm_sequence="confirm",
            confirm_ttl=timedelta(hours=1),
            max_per_mailbox=3,
        )

    taken = [await post(n, start + timedelta(hours=2 * n)) for n in range(3)]
    assert [lead.status for lead in taken] == [api.LeadStatus.PENDING] * 3
    with pytest.raises(api.MailboxLimited) as limited:
        await post(3, start + timedelta(hours=6))
    assert limited.value.retry_at == start + timedelta(days=1)
    assert limited.value.message == (
        "email: this mailbox got 3 new leads in the last 24 hours; try again later"
    )
    assert await _count(pool, "leads") == 3
    # A rolling day: once the first lead is 24 hours old, one more is taken.
    with pytest.raises(api.MailboxLimited):
        await post(4, start + timedelta(days=1) - timedelta(seconds=1))
    later = await post(5, start + timedelta(days=1))
    assert later.email == "victim+5@example.com"
    statuses = await pool.fetch("SELECT status FROM dripd.leads ORDER BY created_at")
    assert [r["status"] for r in statuses] == ["expired", "expired", "expired", "pending"]
    # Each expired lead's confirmation enrollment ended; one confirmation per new lead.
    ended = await pool.fetch(
        "SELECT status, status_reason FROM dripd.enrollments ORDER BY created_at"
    )
    assert [(r["status"], r["status_reason"]) for r in ended] == [
        ("exited", "confirmation_expired")
    ] * 3 + [("active", None)]


async def test_the_form_caps_a_mailbox_without_saying_so(dsn: str, pool: asyncpg.Pool) -> None:
    await apply_text(pool, LEADS)
    async with serving(dsn, _config(max_per_mailbox_per_day=1)) as served:
        new = await served.client.post("/leads/new", data=_lead(1, email="v@example.com"))
        # An operator removes the lead; the mailbox's day still counts it.
        await pool.execute("UPDATE dripd.leads SET status = 'expired'")
        capped = await served.client.post("/leads/new", data=_lead(1, email="v+x@example.com"))
        assert (new.status_code, capped.status_code) == (200, 200)
        assert capped.text == new.text
        assert served.count("mailbox_limited") == 1
    assert await _count(pool, "leads") == 1


# --- double opt-in --------------------------------------------------------------------------


def test_a_confirmation_token_opens_only_with_its_vault_and_in_time() -> None:
    lead_id = uuid.uuid4()
    now = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
    token = make_confirm_token(
        VAULT, tenant="acme", lead_id=lead_id, expires_at=now + timedelta(days=2)
    )
    read = read_confirm_token(VAULT, token, now=now)
    assert (read.tenant, read.lead_id) == ("acme", lead_id)
    assert str(lead_id) not in token
    assert lead_id.hex not in token
    for bad, at in [
        (token, now + timedelta(days=2)),  # expired
        (token[:-2], now),
        ("x" * 2000, now),
        ("not a token", now),
    ]:
        with pytest.raises(InvalidConfirmToken):
            read_confirm_token(VAULT, bad, now=at)
    other = Vault.from_env({ENV_VAR: generate_key()})
    with pytest.raises(InvalidConfirmToken):
        read_confirm_token(other, token, now=now)
    links = ConfirmLinks(
        vault=VAULT,
        base_url="https://x.example/",
        tenant="acme",
        sequence_key="confirm",
        ttl=timedelta(days=2),
    )
    names = {"tenant": "acme", "sequence_key": "confirm", "subscriber_type": "lead", "now": now}
    url = links.names(subscriber_id=str(lead_id), **names)["confirm_url"]
    assert url.startswith("https://x.example/leads/confirm/")
    assert read_confirm_token(VAULT, url.rsplit("/", 1)[1], now=now).lead_id == lead_id
    assert links.names(subscriber_id=str(lead_id), **{**names, "sequence_key": "leads"}) == {}
    assert links.names(subscriber_id=str(lead_id), **{**names, "tenant": None}) == {}
    assert links.names(subscriber_id="42", **names) == {}


async def test_double_opt_in_waits_for_the_confirmation(dsn: str, pool: asyncpg.Pool) -> None:
    await apply_text(pool, LEADS)
    await apply_text(pool, CONFIRM)
    async with serving(dsn, _double_opt_in()) as served:
        posted = await served.client.post("/leads/new", data=_lead(1))
        assert posted.status_code == 200
        assert "we have sent you a message to confirm them" in posted.text
        lead = await pool.fetchrow("SELECT * FROM dripd.leads")
        assert (lead["status"], lead["enrollment_id"]) == ("pending", None)
        confirming = await pool.fetchrow(
            "SELECT s.key, e.status FROM dripd.enrollments e "
            "JOIN dripd.sequences s ON s.id = e.sequence_id WHERE e.id = $1",
            lead["confirm_enrollment_id"],
        )
        assert (confirming["key"], confirming["status"]) == ("confirm", "active")
        token = make_confirm_token(
            VAULT, tenant=TENANT, lead_id=lead["id"], expires_at=lead["confirm_expires_at"]
        )
        url = f"/leads/confirm/{token}"
        # Following the link changes nothing (mail scanners follow links): a button does.
        page = await served.client.get(url)
        assert page.status_code == 200
        assert '<form method="post">' in page.text
        assert page.headers["x-robots-tag"] == "noindex"
        assert (await pool.fetchval("SELECT status FROM dripd.leads")) == "pending"
        confirmed = await served.client.post(url)
        assert confirmed.status_code == 200
        assert "Your details are confirmed" in confirmed.text
        again = await served.client.post(url)  # a second click: the same page, no change
        assert again.status_code == 200
        assert again.text == confirmed.text
        assert served.count("confirmed") == 1
        assert served.count("pending") == 1
        # A link of another lead, or none at all.
        bad = await served.client.get("/leads/confirm/nonsense")
        assert bad.status_code == 400
        assert "This link does not work" in bad.text
        foreign = make_confirm_token(
            VAULT, tenant=None, lead_id=lead["id"], expires_at=lead["confirm_expires_at"]
        )
        assert (await served.client.post(f"/leads/confirm/{foreign}")).status_code == 400
    lead = await pool.fetchrow("SELECT * FROM dripd.leads")
    assert lead["status"] == "active"
    assert lead["confirmed_at"] is not None
    rows = await pool.fetch(
        "SELECT s.key, e.status, e.status_reason FROM dripd.enrollments e "
        "JOIN dripd.sequences s ON s.id = e.sequence_id ORDER BY e.created_at"
    )
    assert [(r["key"], r["status"], r["status_reason"]) for r in rows] == [
        ("confirm", "exited", "lead_confirmed"),
        ("leads", "active", None),
    ]
    enrolled = await pool.fetchval(
        "SELECT id FROM dripd.enrollments WHERE id = $1", lead["enrollment_id"]
    )
    assert enrolled is not None


async def test_an_expired_confirmation_says_so_and_frees_the_address(
    dsn: str, pool: asyncpg.Pool
) -> None:
    await apply_text(pool, LEADS)
    await apply_text(pool, CONFIRM)
    async with serving(dsn, _double_opt_in()) as served:
        assert (await served.client.post("/leads/new", data=_lead(1))).status_code == 200
        lead = await pool.fetchrow("SELECT * FROM dripd.leads")
        token = make_confirm_token(
            VAULT,
            tenant=TENANT,
            lead_id=lead["id"],
            expires_at=datetime.now(UTC) + timedelta(days=1),
        )
        await pool.execute(
            "UPDATE dripd.leads SET confirm_expires_at = now() - interval '1 second'"
        )
        expired = await served.client.post(f"/leads/confirm/{token}")
        assert expired.status_code == 410
        assert "This confirmation link has expired" in expired.text
        assert await pool.fetchval("SELECT status FROM dripd.leads") == "expired"
        # The same person sends the form again: a new pending lead, a new confirmation.
        assert (await served.client.post("/leads/new", data=_lead(1))).status_code == 200
    statuses = await pool.fetch("SELECT status FROM dripd.leads ORDER BY created_at")
    assert [r["status"] for r in statuses] == ["expired", "pending"]
    assert await _count(pool, "enrollments") == 2


async def test_a_confirmation_racing_duplicate_posts_loses_nothing(
    dsn: str, pool: asyncpg.Pool
) -> None:
    await apply_text(pool, LEADS)
    await apply_text(pool, CONFIRM)
    async with serving(dsn, _double_opt_in(rate_limit="1000/1h")) as served:
        assert (await served.client.post("/leads/new", data=_lead(1))).status_code == 200
        lead = await pool.fetchrow("SELECT * FROM dripd.leads")
        token = make_confirm_token(
            VAULT, tenant=TENANT, lead_id=lead["id"], expires_at=lead["confirm_expires_at"]
        )
        url = f"/leads/confirm/{token}"
        duplicates = [_lead(1, email=f"lead1+{n}@example.com") for n in range(10)]
        responses = await asyncio.gather(
            *(served.client.post(url) for _ in range(5)),
            *(served.client.post("/leads/new", data=d) for d in duplicates),
        )
    assert {r.status_code for r in responses} == {200}
    assert await _count(pool, "leads") == 1
    assert await pool.fetchval("SELECT status FROM dripd.leads") == "active"
    keys = await pool.fetch(
        "SELECT s.key FROM dripd.enrollments e JOIN dripd.sequences s ON s.id = e.sequence_id "
        "ORDER BY e.created_at"
    )
    assert [r["key"] for r in keys] == ["confirm", "leads"]


async def test_housekeeping_expires_pending_leads(pool: asyncpg.Pool) -> None:
    await apply_text(pool, LEADS)
    await apply_text(pool, CONFIRM)
    start = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
    lead = await api.create_lead(
        pool,
        tenant=None,
        sequence_key="leads",
        name="Ada",
        email="ada@example.com",
        phone=None,
        notes=None,
        now=start,
        confirm_sequence="confirm",
        confirm_ttl=timedelta(hours=1),
    )
    assert lead.confirm_expires_at == start + timedelta(hours=1)
    assert await api.expire_leads(pool, now=start + timedelta(minutes=59)) == 0
    assert await api.expire_leads(pool, now=start + timedelta(hours=1)) == 1
    row = await pool.fetchrow(
        "SELECT l.status, e.status AS e_status, e.status_reason FROM dripd.leads l "
        "JOIN dripd.enrollments e ON e.id = l.confirm_enrollment_id"
    )
    assert (row["status"], row["e_status"], row["status_reason"]) == (
        "expired",
        "exited",
        "confirmation_expired",
    )
    skipped = await pool.fetchval(
        "SELECT count(*) FROM dripd.step_executions WHERE status = 'skipped' "
        "AND reason = 'confirmation_expired'"
    )
    assert skipped == 1
    confirmed = await api.confirm_lead(pool, tenant=None, lead_id=lead.id, sequence_key="leads")
    assert confirmed.outcome is api.ConfirmOutcome.EXPIRED


# --- the keys fit together ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("leads", "message"),
    [
        (
            {"double_opt_in": True},
            "leads.confirm_sequence: required when leads.double_opt_in",
        ),
        (
            {"double_opt_in": True, "confirm_sequence": "leads", "base_url": "https://x.io"},
            "leads.confirm_sequence: must not be leads.sequence",
        ),
        (
            {"double_opt_in": True, "confirm_sequence": "confirm"},
            "leads.base_url: required when leads.double_opt_in",
        ),
        ({"base_url": "http://mail.example.com"}, "leads.base_url: 'http://mail.example.com'"),
        ({"base_url": "https://x.io/?a=1"}, "leads.base_url: 'https://x.io/?a=1'"),
        ({"honeypot_field": "email"}, "leads.honeypot_field: 'email' is not a field name"),
        ({"honeypot_field": "a b"}, "leads.honeypot_field: 'a b' is not a field name"),
        ({"rate_limit": "1001/1h"}, "leads.rate_limit: '1001/1h': the count must be at most"),
        ({"api_rate_limit": "0/1h"}, "leads.api_rate_limit: '0/1h' is not a rate"),
        ({"trusted_proxies": ["proxy"]}, "leads.trusted_proxies[0]: 'proxy' is not an"),
        ({"max_per_mailbox_per_day": 0}, "leads.max_per_mailbox_per_day: 0 is out of range"),
        ({"max_per_mailbox_per_day": 1001}, "leads.max_per_mailbox_per_day: 1001 is out of"),
        ({"confirm_ttl": "30s"}, "leads.confirm_ttl: '30s' is out of range"),
        ({"confirm_ttl": "31d"}, "leads.confirm_ttl: '31d' is out of range"),
        ({"confirm_sequence": "-x"}, "leads.confirm_sequence: '-x' is not a sequence key"),
    ],
)
def test_lead_keys_are_checked_at_load(leads: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        from_dict({"leads": {"enabled": True, "sequence": "leads", **leads}})
    assert message in refused.value.message


def test_lead_keys_in_range_load() -> None:
    config = _double_opt_in(
        base_url="http://127.0.0.1:8025",
        rate_limit="1000/1s",
        confirm_ttl="30d",
        trusted_proxies=["10.0.0.1", "fd00::/8"],
        max_per_mailbox_per_day=1000,
    )
    assert config.leads.confirm_for == timedelta(days=30)
    assert config.leads.form_rate == (1000, timedelta(seconds=1))
    assert from_dict({}).leads.form_rate == (10, timedelta(hours=1))
    assert from_dict({}).leads.api_rate == (600, timedelta(hours=1))


# --- Idempotency-Key on every POST route ----------------------------------------------------


Example = Callable[[asyncpg.Pool, Served], Awaitable[tuple[str, dict[str, Any]]]]


async def _bearer(pool: asyncpg.Pool) -> dict[str, str]:
    return {"authorization": f"Bearer {await _token(pool)}"}


async def _enrollment(pool: asyncpg.Pool, _s: Served) -> tuple[str, dict[str, Any]]:
    body = {"sequence": "welcome", "subscriber_id": "u1", "data": {"email": "u1@example.com"}}
    return "/v1/enrollments", {"json": body, "headers": await _bearer(pool)}


async def _event(pool: asyncpg.Pool, _s: Served) -> tuple[str, dict[str, Any]]:
    return "/v1/events", {
        "json": {"subscriber_id": "u1", "key": "k"},
        "headers": await _bearer(pool),
    }


async def _suppression(pool: asyncpg.Pool, _s: Served) -> tuple[str, dict[str, Any]]:
    body = {"channel": "email", "address": "ann@example.com"}
    return "/v1/suppressions", {"json": body, "headers": await _bearer(pool)}


async def _api_lead(pool: asyncpg.Pool, _s: Served) -> tuple[str, dict[str, Any]]:
    return "/v1/leads", {"json": _lead(1), "headers": await _bearer(pool)}


async def _form_lead(_pool: asyncpg.Pool, _s: Served) -> tuple[str, dict[str, Any]]:
    return "/leads/new", {"data": _lead(2)}


async def _unsubscribe(_pool: asyncpg.Pool, _s: Served) -> tuple[str, dict[str, Any]]:
    token = make_token(
        VAULT,
        tenant=TENANT,
        channel="email",
        address="bob@example.com",
        execution_id=None,
        expires_at=datetime.now(UTC) + timedelta(days=1),
    )
    return f"/u/{token}", {"data": {"List-Unsubscribe": "One-Click"}}


async def _confirmation(pool: asyncpg.Pool, s: Served) -> tuple[str, dict[str, Any]]:
    posted = await s.client.post("/leads/new", data=_lead(3))
    assert posted.status_code == 200
    lead = await pool.fetchrow("SELECT * FROM dripd.leads WHERE email = 'lead3@example.com'")
    token = make_confirm_token(
        VAULT, tenant=TENANT, lead_id=lead["id"], expires_at=lead["confirm_expires_at"]
    )
    return f"/leads/confirm/{token}", {}


# An example request for each POST route, by its path: a new route without one fails below.
EXAMPLES: dict[str, Example] = {
    "/v1/enrollments": _enrollment,
    "/v1/events": _event,
    "/v1/suppressions": _suppression,
    "/v1/leads": _api_lead,
    "/leads/new": _form_lead,
    "/u/{token}": _unsubscribe,
    "/leads/confirm/{token}": _confirmation,
}


def _post_routes() -> list[str]:
    """Every POST route of the daemon's HTTP surface, with every feature switched on."""
    ctx = HttpContext(
        pool=None,  # type: ignore[arg-type]  # routes are only built, never called
        config=_double_opt_in(),
        clock=SystemClock(),
        metrics=Metrics(),
        vault=VAULT,
    )
    app = build_app(
        metrics=ctx.metrics, readiness=_ready, routes=[*http_routes(ctx), *admin_routes(ctx)]
    )
    paths = {
        route.path for route in app.routes if "POST" in (getattr(route, "methods", None) or ())
    }
    return sorted(paths)


async def _digest(pool: asyncpg.Pool) -> dict[str, str]:
    """Each of dripd's tables and a hash of all its rows."""
    tables = await pool.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'dripd'")
    digest: dict[str, str] = {}
    for row in tables:
        name = row["tablename"]
        digest[name] = await pool.fetchval(
            f"SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) "
            f'FROM dripd."{name}" AS t'
        )
    return digest


def test_every_post_route_has_an_example() -> None:
    # The parametrized test below runs over the routes the app has, so a new POST route
    # is covered by it at once; this names the ones it would fail for.
    assert set(_post_routes()) <= set(EXAMPLES), set(_post_routes()) - set(EXAMPLES)
    assert {"/v1/leads", "/leads/new", "/u/{token}", "/leads/confirm/{token}"} <= set(
        _post_routes()
    )


@pytest.mark.parametrize("path", _post_routes())
async def test_a_retry_with_the_same_key_gets_the_first_answer(
    path: str, dsn: str, pool: asyncpg.Pool
) -> None:
    await apply_text(pool, LEADS)
    await apply_text(pool, CONFIRM)
    await apply_text(pool, one_email("welcome"))
    if path not in EXAMPLES:
        pytest.fail(f"no example request for POST {path}: add one to EXAMPLES")
    async with serving(dsn, _double_opt_in()) as served:
        url, request = await EXAMPLES[path](pool, served)
        headers = {**request.pop("headers", {}), "Idempotency-Key": f"retry-{path}"}
        before = await _digest(pool)
        first = await served.client.post(url, headers=headers, **request)
        assert 200 <= first.status_code < 300, first.text
        assert "idempotent-replayed" not in first.headers
        after = await _digest(pool)
        changed = {t for t in after if after[t] != before[t]} - {"idempotency_keys"}
        assert changed, "the first request wrote nothing: the example proves nothing"
        retry = await served.client.post(url, headers=headers, **request)
        assert retry.status_code == first.status_code
        assert retry.content == first.content
        assert retry.headers["content-type"] == first.headers["content-type"]
        assert retry.headers["idempotent-replayed"] == "true"
        assert await _digest(pool) == after  # the retry wrote nothing


async def test_a_retried_lead_gets_its_201_not_a_duplicate(dsn: str, pool: asyncpg.Pool) -> None:
    # The example: a retry of POST /v1/leads with the same key was 422 duplicate.
    await apply_text(pool, LEADS)
    headers = {**await _bearer(pool), "Idempotency-Key": "lead-42"}
    async with serving(dsn, _config()) as served:
        first = await served.client.post("/v1/leads", json=_lead(42), headers=headers)
        retry = await served.client.post("/v1/leads", json=_lead(42), headers=headers)
        other = await served.client.post("/v1/leads", json=_lead(43), headers=headers)
        fresh = await served.client.post(
            "/v1/leads", json=_lead(42), headers={**headers, "Idempotency-Key": "lead-43"}
        )
    assert (first.status_code, retry.status_code) == (201, 201)
    assert retry.json() == first.json()
    assert retry.headers["idempotent-replayed"] == "true"
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reuse"
    assert fresh.status_code == 422
    assert fresh.json()["error"]["code"] == "duplicate"
    assert await _count(pool, "leads") == 1


async def test_a_429_is_not_kept_for_its_key(dsn: str, pool: asyncpg.Pool) -> None:
    # A refusal that says "later" changes nothing: the key stays free for the retry.
    await apply_text(pool, LEADS)
    clock = ManualClock(datetime(2026, 3, 2, 9, 0, tzinfo=UTC))
    async with serving(dsn, _config(rate_limit="1/1m"), clock=clock) as served:
        assert (await served.client.post("/leads/new", data=_lead(1))).status_code == 200
        keyed = {"Idempotency-Key": "later"}
        refused = await served.client.post("/leads/new", data=_lead(2), headers=keyed)
        assert refused.status_code == 429
        assert await _count(pool, "idempotency_keys") == 0
        clock.advance(60)
        taken = await served.client.post("/leads/new", data=_lead(2), headers=keyed)
        assert taken.status_code == 200
        assert "idempotent-replayed" not in taken.headers
    assert await _count(pool, "leads") == 2
    assert await _count(pool, "idempotency_keys") == 1


# --- end to end: `dripd run` ----------------------------------------------------------------


async def _settled(pool: asyncpg.Pool) -> bool:
    """Nothing is due or in flight (the daemon has done all it can now)."""
    left = await pool.fetchval(
        "SELECT count(*) FROM dripd.step_executions "
        "WHERE status = 'claimed' OR (status = 'scheduled' AND due_at <= now())"
    )
    return int(left) == 0


@pytest.mark.slow
async def test_double_opt_in_end_to_end(launch: Any, pool: asyncpg.Pool, tmp_path: Path) -> None:
    await apply_text(pool, LEADS)
    await apply_text(pool, CONFIRM)
    outbox = tmp_path / "outbox.jsonl"
    await add_adapter(
        pool,
        name="mail",
        channel="email",
        provider="outbox",
        config={"path": str(outbox), "from": "hello@example.com"},
    )
    placeholder = "http://127.0.0.1:1"
    daemon = launch(
        "d",
        http=True,
        sections={
            "leads": {
                "enabled": True,
                "sequence": "leads",
                "double_opt_in": True,
                "confirm_sequence": "confirm",
                "base_url": placeholder,
            },
        },
        poll_interval="1s",
    )
    port = daemon.http_port
    # The links must name the port the launcher picked for the listener.
    text = daemon.config.read_text()
    daemon.config.write_text(text.replace(f'"{placeholder}"', f'"http://127.0.0.1:{port}"'))
    daemon.env = {ENV_VAR: KEY}
    await daemon.start()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        # One person, then the flood of sub-addresses and a bot: one confirmation mail.
        posts = [{"name": "Vic Tim", "email": "victim@example.com"}]
        posts += [{"name": "Vic", "email": f"victim+{n}@example.com"} for n in range(1, 6)]
        posts += [{"name": "Bot", "email": "bot@example.com", "website": "spam"}]
        pages = [await client.post("/leads/new", data=p) for p in posts]
        assert {p.status_code for p in pages} == {200}
        (mail,) = await wait_for(lambda: outbox_messages(outbox), timeout=30)
        await wait_for(lambda: _settled(pool), timeout=30)
        assert len(outbox_messages(outbox)) == 1
        assert mail["to"] == "victim@example.com"
        assert mail["subject"] == "Please confirm, Vic"
        assert mail["metadata"]["sequence_key"] == "confirm"
        link = re.fullmatch(r"Confirm here: (http://\S+)", mail["text"])
        assert link is not None, mail["text"]
        url = link.group(1)
        assert url.startswith(f"http://127.0.0.1:{port}/leads/confirm/")
        lead = await pool.fetchrow("SELECT * FROM dripd.leads")
        assert (lead["status"], lead["enrollment_id"]) == ("pending", None)
        # The token is nowhere in the database: only the lead's state says what it may do.
        token = url.rsplit("/", 1)[1]
        dump = await pool.fetchval(
            "SELECT string_agg(t::text, '') FROM (SELECT l::text AS t FROM dripd.leads l "
            "UNION ALL SELECT e::text FROM dripd.enrollments e "
            "UNION ALL SELECT m::text FROM dripd.message_events m) AS x"
        )
        assert token not in dump
        assert (await client.get(url)).status_code == 200
        assert (await pool.fetchval("SELECT status FROM dripd.leads")) == "pending"
        confirmed = await client.post(url)
        assert confirmed.status_code == 200, confirmed.text
        assert "Your details are confirmed" in confirmed.text
        messages = await wait_for(
            lambda: (m := outbox_messages(outbox)) and len(m) == 2 and m, timeout=30
        )
        assert (await client.post(url)).status_code == 200  # a second click
        await wait_for(lambda: _settled(pool), timeout=30)
        metrics = await daemon.metrics()
    welcome = messages[1]
    assert (welcome["to"], welcome["subject"]) == ("victim@example.com", "Welcome, Vic")
    assert welcome["metadata"]["sequence_key"] == "leads"
    assert len(outbox_messages(outbox)) == 2
    lead = await pool.fetchrow("SELECT * FROM dripd.leads")
    assert lead["status"] == "active"
    assert welcome["metadata"]["enrollment_id"] == str(lead["enrollment_id"])
    assert metrics['dripd_leads_total{outcome="pending"}'] == 1
    assert metrics['dripd_leads_total{outcome="duplicate"}'] == 5
    assert metrics['dripd_leads_total{outcome="honeypot"}'] == 1
    assert metrics['dripd_leads_total{outcome="confirmed"}'] == 1


@pytest.mark.slow
async def test_double_opt_in_needs_the_encryption_key(launch: Any, pool: asyncpg.Pool) -> None:
    daemon = launch(
        "d",
        sections={
            "leads": {
                "enabled": True,
                "sequence": "leads",
                "double_opt_in": True,
                "confirm_sequence": "confirm",
                "base_url": "https://leads.example.com",
            },
        },
    )
    await daemon.start(ready=False)
    assert await daemon.wait(timeout=60) == 2
    assert (
        "leads.double_opt_in: needs DRIPD_ENCRYPTION_KEY (confirmation links are sealed with "
        "it, as unsubscribe links are)" in daemon.tail()
    )


# --- the migration --------------------------------------------------------------------------


async def test_0006_gives_the_leads_stored_before_it_their_mailbox(server_dsn: str) -> None:
    # A flood stored before 0006 (victim+N) keeps its rows: the earliest lead of a mailbox
    # gets it, the others none, so the unique index can be built; keys of 0003 still work.
    conn = await asyncpg.connect(server_dsn)
    try:
        await migrate(conn, available=[m for m in migrations() if m.version < 6])
        rows = [
            (None, "victim+2@example.com", 2),
            (None, "victim@example.com", 1),
            (None, "victim+1@example.com", 3),
            (None, "+x@example.com", 4),
            ("acme", "victim+9@example.com", 5),
            (None, None, 6),  # a phone-only lead
        ]
        for tenant, email, offset in rows:
            await conn.execute(
                "INSERT INTO dripd.leads (tenant_key, name, email, phone, created_at) "
                "VALUES ($1, 'V', $2, $3, now() + make_interval(secs => $4))",
                tenant,
                email,
                None if email else "+12025550143",
                offset,
            )
        token = await conn.fetchval(
            "INSERT INTO dripd.api_tokens (name, token_hash) VALUES ('t', $1) RETURNING id",
            b"\x01" * 32,
        )
        await conn.execute(
            "INSERT INTO dripd.idempotency_keys (token_id, key, method, path, request_hash, "
            "status, body) VALUES ($1, 'k', 'POST', '/v1/events', '', 202, '{}')",
            token,
        )
        await migrate(conn)
        found = await conn.fetch(
            "SELECT tenant_key, email, mailbox, status FROM dripd.leads ORDER BY created_at"
        )
        assert [tuple(r) for r in found] == [
            (None, "victim@example.com", "victim@example.com", "active"),
            (None, "victim+2@example.com", None, "active"),
            (None, "victim+1@example.com", None, "active"),
            (None, "+x@example.com", "+x@example.com", "active"),
            ("acme", "victim+9@example.com", "victim@example.com", "active"),
            (None, None, None, "active"),
        ]
        kept = await conn.fetchrow("SELECT status, headers::text FROM dripd.idempotency_keys")
        assert tuple(kept) == (202, '{"content-type": "application/json"}')
    finally:
        await conn.close()
