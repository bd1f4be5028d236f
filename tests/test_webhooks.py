"""`POST /webhooks/{provider}/{adapter}`: the route, and how feedback is recorded.

A test provider (`hooktest`) stands in for the real ones: its receiver accepts a body
whose `X-Sig` header is the hex HMAC-SHA256 of the body under the adapter's credential
`secret`, and reads the body as a JSON list of events. Each real provider's verification
is tested in its own test file; here: the route's answers, and what recording does.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import json
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest

from dripd import api
from dripd.channels import registry
from dripd.channels.base import ChannelContext, Message, Receipt
from dripd.channels.credentials import Vault, generate_key
from dripd.channels.feedback import (
    BadPayload,
    FeedbackEvent,
    InboundRequest,
    ReceiverContext,
    Unverified,
    decode_json,
    equal,
)
from dripd.channels.spec import ProviderSpec
from dripd.clock import SystemClock
from dripd.config import from_dict
from dripd.db import store
from dripd.engine.adapters import AdapterSet, adapter_aad
from dripd.engine.thresholds import check_thresholds
from dripd.http.app import HttpServer, build_app
from dripd.http.context import HttpContext
from dripd.http.routes import http_routes
from dripd.metrics import Metrics
from dripd.model import Adapter
from tests.background import background
from tests.support import apply_text, one_email, wait_for

SECRET = "hooktest-secret-0123456789"
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


class _Channel:
    provider = "hooktest"

    async def send(self, message: Message) -> Receipt:
        return Receipt(provider_message_id=f"pm-{message.execution_id}")

    async def aclose(self) -> None:
        pass


class _Receiver:
    def __init__(self, adapter: Adapter, context: ReceiverContext) -> None:
        self.secret = str(adapter.credentials["secret"]).encode()
        self.closed = False

    async def receive(self, request: InboundRequest) -> Sequence[FeedbackEvent]:
        expected = hmac.new(self.secret, request.body, hashlib.sha256).hexdigest()
        if not equal(request.headers.get("x-sig", ""), expected):
            raise Unverified("X-Sig does not match")
        try:
            items = json.loads(request.body)
        except ValueError:
            raise BadPayload("not JSON") from None
        return [
            FeedbackEvent(
                type=item["type"],
                event_id=item["id"],
                provider_message_id=item.get("message"),
                execution_id=uuid.UUID(item["execution"]) if "execution" in item else None,
                recipient=item.get("to"),
                permanent=item.get("permanent", False),
                reason=item.get("reason"),
                data={"n": item.get("n", 0), **item.get("data", {})},
                nonce=item.get("nonce"),
            )
            for item in items
        ]

    async def aclose(self) -> None:
        self.closed = True


SPEC = ProviderSpec(
    name="hooktest",
    channels=frozenset({"email"}),
    config_keys=frozenset(),
    required_config=frozenset(),
    credential_keys=frozenset({"secret"}),
    required_credentials=frozenset({"secret"}),
    factory=lambda adapter, context: _Channel(),
    receiver=_Receiver,
)


@pytest.fixture(autouse=True)
def _provider() -> Iterator[None]:
    registry.register(SPEC, replace=True)
    yield
    registry._providers.pop("hooktest", None)


@pytest.fixture
def vault() -> Vault:
    return Vault.from_env({"DRIPD_ENCRYPTION_KEY": generate_key()})


async def add_adapter(
    pool: asyncpg.Pool,
    vault: Vault,
    name: str = "hooks1",
    *,
    tenant: str | None = None,
    provider: str = "hooktest",
) -> uuid.UUID:
    adapter_id = uuid.uuid4()
    async with pool.acquire() as conn:
        await store.insert_adapter(
            conn,
            adapter_id=adapter_id,
            tenant=tenant,
            name=name,
            channel="email",
            provider=provider,
            config={},
            credentials=vault.encrypt({"secret": SECRET}, aad=adapter_aad(adapter_id)),
            is_default=False,
            now=NOW,
        )
    return adapter_id


class Site:
    """The daemon's public listener with the webhook route, over the test's database."""

    def __init__(self, client: httpx.AsyncClient, adapters: AdapterSet, ctx: HttpContext):
        self.client, self.adapters, self.ctx = client, adapters, ctx

    async def post(
        self,
        body: bytes,
        *,
        path: str = "/webhooks/hooktest/hooks1",
        secret: str = SECRET,
        **kw: Any,
    ) -> httpx.Response:
        sig = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        return await self.client.post(path, content=body, headers={"X-Sig": sig}, **kw)


@pytest.fixture
async def site(pool: asyncpg.Pool, vault: Vault) -> AsyncIterator[Site]:
    await add_adapter(pool, vault)
    await add_adapter(pool, vault, tenant="acme")
    adapters = AdapterSet(vault, receiver_context=ReceiverContext())
    await adapters.load(await store.load_adapters(pool))
    ctx = HttpContext(
        pool=pool,
        config=from_dict({"webhooks": {"max_body_bytes": 4096}}),
        clock=SystemClock(),
        metrics=Metrics(),
        vault=vault,
        webhooks=adapters,
    )

    async def ready() -> dict[str, Any]:
        return {"ready": True}

    server = HttpServer(build_app(metrics=ctx.metrics, readiness=ready, routes=http_routes(ctx)))
    try:
        async with (
            background(server.serve, "127.0.0.1", 0),
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client,
        ):
            yield Site(client, adapters, ctx)
    finally:
        await adapters.aclose()


def body(*events: dict[str, Any]) -> bytes:
    return json.dumps(list(events)).encode()


async def sent(
    pool: asyncpg.Pool, adapter: str = "hooks1", address: str = "ana@example.org"
) -> uuid.UUID:
    """An execution that adapter `adapter` sent, with provider message id `pm-<id>`."""
    await apply_text(pool, one_email("welcome"))
    enrollment = await api.enroll(
        pool, tenant=None, sequence_key="welcome", subscriber_id=address, data={"email": address}
    )
    adapter_id = await pool.fetchval(
        "SELECT id FROM dripd.channel_adapters WHERE name = $1 AND tenant_key IS NULL", adapter
    )
    execution_id: uuid.UUID = await pool.fetchval(
        "UPDATE dripd.step_executions SET status = 'sent', finished_at = now(), "
        "channel = 'email', provider = 'hooktest', adapter_id = $2, recipient = $3, "
        "provider_message_id = 'pm-' || id WHERE enrollment_id = $1 RETURNING id",
        enrollment.id,
        adapter_id,
        address,
    )
    return execution_id


async def feedback_rows(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await pool.fetch(
        "SELECT * FROM dripd.message_events WHERE provider_event_id IS NOT NULL ORDER BY id"
    )
    return rows


async def suppressions(pool: asyncpg.Pool) -> list[tuple[Any, ...]]:
    rows = await pool.fetch(
        "SELECT tenant_key, channel, address, reason, source FROM dripd.suppressions ORDER BY id"
    )
    return [tuple(r) for r in rows]


async def test_a_verified_event_is_recorded_on_the_execution_its_message_id_names(
    site: Site, pool: asyncpg.Pool
) -> None:
    execution_id = await sent(pool)
    response = await site.post(
        body({"type": "delivered", "id": "e1", "message": f"pm-{execution_id}"})
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"recorded": 1, "matched": 1, "duplicates": 0, "suppressed": 0}
    [row] = await feedback_rows(pool)
    assert (row["type"], row["execution_id"], row["recipient"], row["provider"]) == (
        "delivered",
        execution_id,
        "ana@example.org",
        "hooktest",
    )
    assert row["enrollment_id"] is not None
    assert row["provider_event_id"] == "e1"


async def test_the_execution_id_echoed_back_wins_over_the_message_id(
    site: Site, pool: asyncpg.Pool
) -> None:
    first = await sent(pool, address="ana@example.org")
    second = await sent(pool, address="bob@example.org")
    await site.post(
        body({"type": "opened", "id": "e1", "execution": str(second), "message": f"pm-{first}"})
    )
    [row] = await feedback_rows(pool)
    assert row["execution_id"] == second


async def test_an_execution_of_another_adapter_is_never_matched(
    site: Site, pool: asyncpg.Pool, vault: Vault
) -> None:
    await add_adapter(pool, vault, "hooks2")
    other = await sent(pool, adapter="hooks2")
    response = await site.post(
        body({"type": "bounced", "id": "e1", "execution": str(other), "message": f"pm-{other}"})
    )
    assert response.json()["matched"] == 0
    [row] = await feedback_rows(pool)
    assert row["execution_id"] is None


async def test_a_redelivered_webhook_changes_nothing(site: Site, pool: asyncpg.Pool) -> None:
    execution_id = await sent(pool)
    payload = body(
        {"type": "bounced", "id": "b1", "message": f"pm-{execution_id}", "permanent": True},
        {"type": "opened", "id": "o1", "message": f"pm-{execution_id}"},
    )
    first = await site.post(payload)
    again = await site.post(payload)
    assert first.json() == {"recorded": 2, "matched": 2, "duplicates": 0, "suppressed": 1}
    assert again.status_code == 200
    assert again.json() == {"recorded": 0, "matched": 0, "duplicates": 2, "suppressed": 0}
    assert len(await feedback_rows(pool)) == 2
    assert len(await suppressions(pool)) == 1
    metrics = site.ctx.metrics.registry
    assert (
        metrics.get_sample_value(
            "dripd_feedback_events_total", {"provider": "hooktest", "type": "duplicate"}
        )
        == 2
    )


async def test_permanent_bounces_complaints_and_unsubscribes_suppress_and_others_do_not(
    site: Site, pool: asyncpg.Pool
) -> None:
    await site.post(
        body(
            {"type": "bounced", "id": "1", "to": "Hard@Example.org", "permanent": True},
            {"type": "bounced", "id": "2", "to": "soft@example.org", "permanent": False},
            {"type": "complained", "id": "3", "to": "spam@example.org"},
            {"type": "unsubscribed", "id": "4", "to": "leave@example.org"},
            {"type": "delivered", "id": "5", "to": "fine@example.org"},
            {"type": "bounced", "id": "6", "to": "not an address", "permanent": True},
        )
    )
    assert await suppressions(pool) == [
        (None, "email", "hard@example.org", "bounce", "hooktest webhook"),
        (None, "email", "spam@example.org", "complaint", "hooktest webhook"),
        (None, "email", "leave@example.org", "unsubscribe", "hooktest webhook"),
    ]
    rows = {r["provider_event_id"]: r for r in await feedback_rows(pool)}
    assert rows["1"]["reason"] == "permanent"
    assert rows["2"]["reason"] == "temporary"
    assert json.loads(rows["2"]["data"]) == {"n": 0, "permanent": False}
    assert len(rows) == 6  # the unreadable address is recorded, not suppressed


async def test_a_tenant_adapter_suppresses_in_its_tenant(site: Site, pool: asyncpg.Pool) -> None:
    response = await site.post(
        body({"type": "complained", "id": "1", "to": "ana@example.org"}),
        path="/webhooks/hooktest/hooks1?tenant=acme",
    )
    assert response.status_code == 200
    assert await suppressions(pool) == [
        ("acme", "email", "ana@example.org", "complaint", "hooktest webhook")
    ]


async def test_provider_feedback_feeds_the_bounce_threshold_only_when_permanent(
    site: Site, pool: asyncpg.Pool
) -> None:
    for n in range(4):
        await sent(pool, address=f"user{n}@example.org")
    await pool.execute(
        "INSERT INTO dripd.message_events (type, adapter_id, occurred_at) "
        "SELECT 'sent', adapter_id, now() FROM dripd.step_executions"
    )
    await site.post(
        body(*({"type": "bounced", "id": f"s{n}", "to": f"user{n}@example.org"} for n in range(4)))
    )
    thresholds = from_dict({"thresholds": {"min_volume": 4, "bounce_rate": 0.5}}).thresholds
    metrics = Metrics()
    assert await check_thresholds(pool, thresholds, clock=SystemClock(), metrics=metrics) == []
    await site.post(
        body(
            *(
                {"type": "bounced", "id": f"h{n}", "to": f"user{n}@example.org", "permanent": True}
                for n in range(2)
            )
        )
    )
    assert await check_thresholds(pool, thresholds, clock=SystemClock(), metrics=metrics) == [
        "hooks1"
    ]


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("/webhooks/hooktest/nobody", "no such adapter"),
        ("/webhooks/smtp/hooks1", "the adapter's provider is another"),
        ("/webhooks/hooktest/hooks1?tenant=other", "no such adapter in that tenant"),
        ("/webhooks/hooktest/hooks1?tenant=%ff", "a tenant that is no name"),
    ],
)
async def test_an_unknown_webhook_is_404(
    site: Site, pool: asyncpg.Pool, path: str, why: str
) -> None:
    response = await site.post(body({"type": "delivered", "id": "1"}), path=path)
    assert response.status_code == 404, why
    assert await feedback_rows(pool) == []


async def test_an_adapter_without_a_receiver_is_404(
    site: Site, pool: asyncpg.Pool, vault: Vault
) -> None:
    adapter_id = uuid.uuid4()
    async with pool.acquire() as conn:
        await store.insert_adapter(
            conn,
            adapter_id=adapter_id,
            tenant=None,
            name="box",
            channel="email",
            provider="outbox",
            config={"path": "/tmp/unused-outbox"},
            credentials=None,
            is_default=False,
            now=NOW,
        )
    await site.adapters.load(await store.load_adapters(pool))
    response = await site.post(body(), path="/webhooks/outbox/box")
    assert response.status_code == 404


@pytest.mark.parametrize(
    ("headers", "secret"),
    [({}, SECRET), (None, "another-secret")],
    ids=["no signature", "wrong secret"],
)
async def test_an_unverified_request_is_401_and_writes_nothing(
    site: Site, pool: asyncpg.Pool, headers: dict[str, str] | None, secret: str
) -> None:
    payload = body({"type": "complained", "id": "1", "to": "ana@example.org"})
    if headers is None:
        response = await site.post(payload, secret=secret)
    else:
        response = await site.client.post("/webhooks/hooktest/hooks1", content=payload)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unverified"
    assert await feedback_rows(pool) == []
    assert await suppressions(pool) == []
    assert await pool.fetchval("SELECT count(*) FROM dripd.provider_events") == 0
    assert (
        site.ctx.metrics.registry.get_sample_value(
            "dripd_webhooks_total", {"provider": "hooktest", "outcome": "unverified"}
        )
        == 1
    )


async def test_a_body_over_the_limit_is_413_before_it_is_read(
    site: Site, pool: asyncpg.Pool
) -> None:
    big = body(*({"type": "delivered", "id": str(n), "pad": "x" * 64} for n in range(60)))
    assert len(big) > 4096
    response = await site.post(big)
    assert response.status_code == 413

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: read until the limit
        yield b"[" + b" " * 5000
        yield b"]"

    streamed = await site.client.post("/webhooks/hooktest/hooks1", content=chunks())
    assert streamed.status_code == 413
    assert await feedback_rows(pool) == []


async def test_an_unreadable_payload_is_400(site: Site, pool: asyncpg.Pool) -> None:
    response = await site.post(b"not json")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "bad_payload"


async def test_a_reload_closes_the_receivers_of_changed_adapters(
    site: Site, pool: asyncpg.Pool
) -> None:
    target = site.adapters.webhook_target("hooktest", None, "hooks1")
    assert target is not None
    receiver = target[1]
    assert isinstance(receiver, _Receiver)
    await pool.execute(
        "UPDATE dripd.channel_adapters SET is_default = true "
        "WHERE name = 'hooks1' AND tenant_key IS NULL"
    )
    await site.adapters.load(await store.load_adapters(pool))
    await wait_for(lambda: receiver.closed)  # closed in the background
    again = site.adapters.webhook_target("hooktest", None, "hooks1")
    assert again is not None
    assert again[1] is not receiver


def test_channel_context_reaches_the_factory() -> None:
    seen: list[ChannelContext] = []
    spec = ProviderSpec(
        name="ctxtest",
        channels=None,
        config_keys=frozenset(),
        required_config=frozenset(),
        credential_keys=frozenset(),
        required_credentials=frozenset(),
        factory=lambda adapter, context: seen.append(context) or _Channel(),  # type: ignore[func-returns-value]
    )
    registry.register(spec, replace=True)
    try:
        context = ChannelContext(webhook_url="https://d.example/webhooks/ctxtest/a")
        adapter = Adapter(
            id=uuid.uuid4(),
            tenant_key=None,
            name="a",
            channel="email",
            provider="ctxtest",
            config={},
            credentials={},
            is_default=False,
            enabled=True,
        )
        registry.build(adapter, context)
        assert seen == [context]
    finally:
        registry._providers.pop("ctxtest", None)


class _SlowToClose(_Channel):
    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def aclose(self) -> None:
        await self.release.wait()  # a send still in flight


async def test_a_reload_never_waits_for_a_replaced_channel_to_close(
    pool: asyncpg.Pool, vault: Vault
) -> None:
    built: list[_SlowToClose] = []

    def factory(adapter: Adapter, context: ChannelContext) -> _SlowToClose:
        built.append(_SlowToClose())
        return built[-1]

    registry.register(replace(SPEC, name="slowclose", factory=factory), replace=True)
    try:
        await add_adapter(pool, vault, "slow", provider="slowclose")
        adapters = AdapterSet(vault)
        await adapters.load(await store.load_adapters(pool))
        await pool.execute("UPDATE dripd.channel_adapters SET is_default = true")
        # The old channel's close waits for its send; the reload does not wait for it.
        await asyncio.wait_for(adapters.load(await store.load_adapters(pool)), timeout=30)
        assert len(built) == 2
        closing = asyncio.create_task(adapters.aclose())
        built[0].release.set()
        built[1].release.set()
        await asyncio.wait_for(closing, timeout=30)
    finally:
        registry._providers.pop("slowclose", None)


async def test_a_provider_that_fails_to_build_leaves_its_adapter_unusable_not_the_daemon(
    pool: asyncpg.Pool, vault: Vault
) -> None:
    def factory(adapter: Adapter, context: ChannelContext) -> _Channel:
        "tokén".encode("ascii")  # what httpx does with a non-ASCII header value
        return _Channel()

    registry.register(replace(SPEC, name="brittle", factory=factory), replace=True)
    try:
        await add_adapter(pool, vault, "brittle", provider="brittle")
        adapters = AdapterSet(vault)
        await adapters.load(await store.load_adapters(pool))
        problem = adapters.resolve(None, "email", "brittle")
        assert isinstance(problem, str)
        assert "cannot build it: UnicodeEncodeError" in problem
        assert adapters.webhook_target("brittle", None, "brittle") is None
        await adapters.aclose()
    finally:
        registry._providers.pop("brittle", None)


async def test_what_postgres_cannot_store_is_kept_with_a_replacement_not_refused(
    site: Site, pool: asyncpg.Pool
) -> None:
    # A NUL or a lone surrogate in what a provider sent would make Postgres refuse the
    # whole request: answered 503, redelivered for ever, the other events lost with it.
    payload = json.dumps(
        [
            {
                "type": "bounced",
                "id": "e\u0000\ud800",
                "to": "nul\u0000@example.org",
                "reason": "550 \u0000 no",
                "message": "m\u0000",
                "permanent": True,
                "data": {"k\u0000": "v\udc00"},
            },
            {"type": "delivered", "id": "plain", "to": "ann@example.org"},
        ]
    ).encode()
    response = await site.post(payload)
    assert response.status_code == 200, response.text
    assert response.json()["recorded"] == 2
    rows = await feedback_rows(pool)
    first = rows[0]
    assert first["provider_event_id"] == "e\ufffd\ufffd"
    assert first["reason"] == "permanent: 550 \ufffd no"
    assert first["provider_message_id"] == "m\ufffd"
    assert json.loads(first["data"])["k\ufffd"] == "v\ufffd"
    again = await site.post(payload)
    assert again.json()["duplicates"] == 2


async def test_a_signed_nonce_seen_before_records_nothing_whatever_the_body_says(
    site: Site, pool: asyncpg.Pool
) -> None:
    # Mailgun signs a timestamp and a one-time token, not the event: a captured signature
    # must not carry other events (another address to suppress) in its replay window.
    first = await site.post(
        body({"type": "delivered", "id": "1", "to": "a@example.org", "nonce": "t1"})
    )
    assert first.json()["recorded"] == 1
    forged = await site.post(
        body({"type": "complained", "id": "2", "to": "victim@example.org", "nonce": "t1"})
    )
    assert forged.status_code == 200
    assert forged.json() == {"recorded": 0, "matched": 0, "duplicates": 1, "suppressed": 0}
    assert await suppressions(pool) == []
    other = await site.post(body({"type": "delivered", "id": "3", "nonce": "t2"}))
    assert other.json()["recorded"] == 1


async def test_a_receivers_own_failure_is_500_and_logged_without_a_traceback(
    site: Site, pool: asyncpg.Pool, json_logs: io.StringIO
) -> None:
    nested = b"[" * 2000 + b"]" * 2000  # json.loads: RecursionError (under the 4 KiB limit)
    response = await site.post(nested)
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal"
    logged = json_logs.getvalue()
    assert "webhook receiver failed" in logged
    assert "RecursionError" in logged
    assert "Traceback" not in logged
    assert await feedback_rows(pool) == []


def test_feedbacks_json_decoder_refuses_json_nested_too_deep() -> None:
    with pytest.raises(BadPayload, match="nested too deep"):
        decode_json(b"[" * 100_000 + b"]" * 100_000, "the body")
