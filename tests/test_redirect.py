"""dripd's short-link redirect `/l/{code}` on the public listener: 302, clicks as events."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from background import background
from support import apply_text, one_email

from dripd import api, config
from dripd.clock import ManualClock
from dripd.db import links as link_store
from dripd.http.app import HttpServer, public_app
from dripd.http.context import HttpContext
from dripd.http.routes import http_routes
from dripd.metrics import Metrics

NOW = datetime(2026, 3, 9, 15, 30, tzinfo=UTC)
ADAPTER = uuid.UUID("5e1d7a3b-9c2f-4e8a-b1d0-6f4a2c8e9b17")
PAGE = "https://shop.example.com/spring?utm_source=dripd&utm_medium=email"


class Site:
    def __init__(self, client: httpx.AsyncClient, ctx: HttpContext, clock: ManualClock) -> None:
        self.client, self.ctx, self.clock = client, ctx, clock

    def clicks(self, outcome: str) -> float:
        value = self.ctx.metrics.registry.get_sample_value(
            "dripd_short_link_clicks_total", {"outcome": outcome}
        )
        return value or 0.0


Serve = Callable[[asyncpg.Pool], Awaitable[Site]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Serves the public listener's routes (dripd.http.routes) on a pool; stopped at the end."""
    async with AsyncExitStack() as stack:

        async def start(pool: asyncpg.Pool) -> Site:
            clock = ManualClock(NOW)
            ctx = HttpContext(
                pool=pool, config=config.from_dict({}), clock=clock, metrics=Metrics(), vault=None
            )
            server = HttpServer(public_app(http_routes(ctx)))
            await stack.enter_async_context(background(server.serve, "127.0.0.1", 0))
            client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}")
            await stack.enter_async_context(client)
            return Site(client, ctx, clock)

        yield start


@pytest.fixture
async def site(pool: asyncpg.Pool, serve: Serve) -> Site:
    return await serve(pool)


async def sent_execution(db: asyncpg.Pool) -> tuple[uuid.UUID, uuid.UUID]:
    """(execution id, enrollment id) of a one-email sequence's message, marked sent."""
    await apply_text(db, one_email("welcome"))
    enrollment = await api.enroll(
        db, tenant=None, sequence_key="welcome", subscriber_id="ada", data={"email": "a@x.org"}
    )
    execution_id: uuid.UUID = await db.fetchval(
        "UPDATE dripd.step_executions SET status = 'sent', finished_at = now(), tenant_key = "
        "'acme', channel = 'email', provider = 'smtp', adapter_id = $2, recipient = 'a@x.org', "
        "provider_message_id = '<m1@x.org>' WHERE enrollment_id = $1 RETURNING id",
        enrollment.id,
        ADAPTER,
    )
    return execution_id, enrollment.id


async def link(
    db: asyncpg.Pool, code: str, destination: str = PAGE, *, track: bool = True
) -> uuid.UUID:
    """A stored dripd link `code` of a sent message; its execution id."""
    execution_id, _ = await sent_execution(db)
    await link_store.insert_links(
        db,
        "dripd",
        [(execution_id, "acme", destination, code, f"https://go.example/l/{code}", track)],
    )
    return execution_id


async def events(db: asyncpg.Pool) -> list[dict[str, Any]]:
    rows = await db.fetch("SELECT * FROM dripd.message_events ORDER BY id")
    return [dict(r) | {"data": json.loads(r["data"])} for r in rows]


async def test_a_click_redirects_and_records_a_clicked_event(
    site: Site, pool: asyncpg.Pool
) -> None:
    execution_id = await link(pool, "Abc123XyZ0")
    enrollment_id = await pool.fetchval(
        "SELECT enrollment_id FROM dripd.step_executions WHERE id = $1", execution_id
    )
    response = await site.client.get("/l/Abc123XyZ0")
    assert response.status_code == 302
    assert response.headers["location"] == PAGE
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["referrer-policy"] == "no-referrer"
    [event] = await events(pool)
    assert {k: v for k, v in event.items() if k != "id"} == {
        "tenant_key": "acme",
        "execution_id": execution_id,
        "enrollment_id": enrollment_id,
        "type": "clicked",
        "channel": "email",
        "provider": "smtp",
        "adapter_id": ADAPTER,
        "recipient": "a@x.org",
        "reason": None,
        "provider_message_id": "<m1@x.org>",
        "data": {"url": PAGE},
        "occurred_at": NOW,
        "provider_event_id": None,
    }
    assert site.clicks("redirected") == 1


async def test_every_click_is_an_event_at_the_clock_s_time(site: Site, pool: asyncpg.Pool) -> None:
    await link(pool, "Abc123XyZ0")
    for _ in range(2):
        assert (await site.client.get("/l/Abc123XyZ0")).status_code == 302
        site.clock.advance(timedelta(minutes=5))
    assert [(e["type"], e["occurred_at"]) for e in await events(pool)] == [
        ("clicked", NOW),
        ("clicked", NOW + timedelta(minutes=5)),
    ]
    assert site.clicks("redirected") == 2


async def test_head_redirects_without_recording(site: Site, pool: asyncpg.Pool) -> None:
    await link(pool, "Abc123XyZ0")
    response = await site.client.head("/l/Abc123XyZ0")
    assert (response.status_code, response.headers["location"]) == (302, PAGE)
    assert response.content == b""
    assert await events(pool) == []


async def test_an_untracked_link_redirects_without_an_event(site: Site, pool: asyncpg.Pool) -> None:
    image = "https://cdn.example.com/logo.png"
    await link(pool, "Img0000001", image, track=False)
    response = await site.client.get("/l/Img0000001")
    assert (response.status_code, response.headers["location"]) == (302, image)
    assert await events(pool) == []


async def test_the_location_is_percent_encoded_where_a_header_needs_it(
    site: Site, pool: asyncpg.Pool
) -> None:
    await link(pool, "Odd0000001", "https://x.example/a b/café?q=1&r=%2F\r\nSet-Cookie: x=1")
    response = await site.client.get("/l/Odd0000001")
    assert response.status_code == 302
    assert response.headers["location"] == (
        "https://x.example/a%20b/caf%C3%A9?q=1&r=%2F%0D%0ASet-Cookie:%20x=1"
    )
    assert "set-cookie" not in response.headers


@pytest.mark.parametrize(
    "code",
    ["Unknown123", "short", "a" * 33, "abc-def-ghi", "abc_def_ghi", "%C3%A9abcdefgh", "Abc123XyZ"],
)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_a_malformed_or_unknown_code_is_404(
    site: Site, pool: asyncpg.Pool, code: str, method: str
) -> None:
    await link(pool, "Abc123XyZ0")
    response = await site.client.request(method, f"/l/{code}")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("text/plain")
    assert "location" not in response.headers
    if method == "GET":
        assert response.text == "Not found\n"
    assert await events(pool) == []
    assert site.clicks("unknown") == 1


async def test_a_database_failure_is_503_with_retry_after(serve: Serve, dsn: str) -> None:
    closed = await asyncpg.create_pool(dsn, min_size=0, max_size=1)
    await closed.close()
    site = await serve(closed)
    response = await site.client.get("/l/Abc123XyZ0")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert response.headers["content-type"].startswith("text/plain")
    assert "Traceback" not in response.text
    assert "pool" not in response.text
