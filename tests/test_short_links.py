"""Short links of a message: dripd's codes and the `webhook` shortener, one link per
(execution, destination), reused on retry and under concurrent attempts."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import httpx
import pytest
from httpmock import Answer, Mock, Trickle
from support import apply_text, one_email, wait_for

from dripd import api, config
from dripd.db import links as link_store
from dripd.engine import links
from dripd.engine.links import LinkMaker, ShortenError
from dripd.metrics import Metrics

TOKEN = "sk_live_8f3a9c2e7b1d4f60"
HOOK = "https://short.example.com/api/links?team=7"
BASE = "https://go.example.com"
CODE = re.compile(r"[A-Za-z0-9]{10}")


def settings(**short_links: Any) -> config.ShortLinks:
    return config.from_dict({"short_links": short_links}).short_links


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


NewMaker = Callable[..., LinkMaker]


@pytest.fixture
async def new_maker(pool: asyncpg.Pool, metrics: Metrics) -> AsyncIterator[NewMaker]:
    """LinkMakers on `pool` (or another `db`) with `[short_links]` keys; closed at the end."""
    made: list[LinkMaker] = []

    def make(db: Any = pool, base_url: str = BASE, **keys: Any) -> LinkMaker:
        made.append(
            LinkMaker(pool=db, settings=settings(**keys), base_url=base_url, metrics=metrics)
        )
        return made[-1]

    yield make
    for maker in made:
        await maker.aclose()


@pytest.fixture
def maker(new_maker: NewMaker) -> LinkMaker:
    return new_maker()


async def execution(db: asyncpg.Pool, who: str = "ada", tenant: str | None = None) -> uuid.UUID:
    """The first execution of a new enrollment of `who` in a one-email sequence."""
    await apply_text(db, one_email("welcome"))
    enrollment = await api.enroll(
        db, tenant=None, sequence_key="welcome", subscriber_id=who, data={"email": f"{who}@x.org"}
    )
    execution_id: uuid.UUID = await db.fetchval(
        "UPDATE dripd.step_executions SET tenant_key = $2 WHERE enrollment_id = $1 RETURNING id",
        enrollment.id,
        tenant,
    )
    return execution_id


async def stored(db: asyncpg.Pool) -> list[dict[str, Any]]:
    rows = await db.fetch(
        "SELECT id, execution_id, tenant_key, provider, destination, code, short_url, track "
        "FROM dripd.short_links ORDER BY id"
    )
    return [dict(r) for r in rows]


def created(metrics: Metrics, provider: str) -> float:
    value = metrics.registry.get_sample_value(
        "dripd_short_links_created_total", {"provider": provider}
    )
    return value or 0.0


def errors(metrics: Metrics, provider: str) -> float:
    value = metrics.registry.get_sample_value(
        "dripd_short_link_errors_total", {"provider": provider}
    )
    return value or 0.0


async def own(
    maker: LinkMaker, execution_id: uuid.UUID, wanted: list[tuple[str, bool]]
) -> dict[str, str]:
    """`wanted` shortened by dripd's own provider for a global execution."""
    return await maker.shorten(
        execution_id=execution_id, tenant=None, provider="dripd", links=wanted
    )


def pages(n: int) -> list[tuple[str, bool]]:
    return [(f"https://shop.example.com/p/{i}?ref=mail", True) for i in range(n)]


# -- dripd's own codes -------------------------------------------------------------------------


async def test_codes_are_well_formed_unique_and_stored(
    pool: asyncpg.Pool, maker: LinkMaker, metrics: Metrics
) -> None:
    execution_id = await execution(pool, tenant="acme")
    wanted = pages(40)
    urls = await maker.shorten(
        execution_id=execution_id, tenant="acme", provider="dripd", links=wanted
    )
    assert sorted(urls) == sorted(d for d, _ in wanted)
    codes = [url.removeprefix(f"{BASE}/l/") for url in urls.values()]
    assert all(CODE.fullmatch(code) for code in codes), codes
    assert len(set(codes)) == len(codes)
    rows = await stored(pool)
    assert {(r["destination"], r["code"], r["short_url"]) for r in rows} == {
        (d, url.removeprefix(f"{BASE}/l/"), url) for d, url in urls.items()
    }
    assert {(r["execution_id"], r["tenant_key"], r["provider"], r["track"]) for r in rows} == {
        (execution_id, "acme", "dripd", True)
    }
    assert created(metrics, "dripd") == 40


def test_codes_come_from_the_whole_alphabet() -> None:
    codes = [links.new_code() for _ in range(2000)]
    assert all(CODE.fullmatch(code) for code in codes)
    assert set("".join(codes)) == set(links.CODE_ALPHABET)
    assert len(set(codes)) == len(codes)


@pytest.mark.parametrize(
    ("base_url", "prefix"),
    [
        ("http://127.0.0.1:8025", "http://127.0.0.1:8025/l/"),
        ("https://go.example.com/r/", "https://go.example.com/r/l/"),
    ],
)
async def test_the_short_url_is_under_the_base_url(
    pool: asyncpg.Pool, new_maker: NewMaker, base_url: str, prefix: str
) -> None:
    urls = await own(new_maker(base_url=base_url), await execution(pool), pages(1))
    [url] = urls.values()
    assert url.startswith(prefix)
    assert CODE.fullmatch(url.removeprefix(prefix))


async def test_a_retry_reuses_the_links_and_adds_only_new_ones(
    pool: asyncpg.Pool, maker: LinkMaker, metrics: Metrics
) -> None:
    execution_id = await execution(pool)
    first = await own(maker, execution_id, pages(3))
    before = await stored(pool)
    assert await own(maker, execution_id, pages(3)) == first
    assert await stored(pool) == before
    assert created(metrics, "dripd") == 3
    more = await own(maker, execution_id, pages(4))
    assert {d: more[d] for d in first} == first
    assert len(await stored(pool)) == 4
    assert created(metrics, "dripd") == 4
    # Another execution's links to the same pages are its own.
    other = await own(maker, await execution(pool, "bo"), pages(3))
    assert set(other.values()).isdisjoint(first.values())


async def test_concurrent_attempts_end_with_one_link_per_destination(
    pool: asyncpg.Pool, maker: LinkMaker
) -> None:
    execution_id = await execution(pool)
    results = await asyncio.gather(*(own(maker, execution_id, pages(20)) for _ in range(6)))
    assert all(result == results[0] for result in results)
    rows = await stored(pool)
    assert len(rows) == 20
    assert {r["destination"]: r["short_url"] for r in rows} == results[0]


async def test_a_link_committed_while_the_insert_waits_is_the_one_returned(
    pool: asyncpg.Pool, maker: LinkMaker
) -> None:
    # The insert's snapshot predates the other attempt's commit: the row must still come back.
    execution_id = await execution(pool)
    [(destination, _)] = pages(1)
    async with pool.acquire() as other:
        transaction = other.transaction()
        await transaction.start()
        stored_by_them = await link_store.insert_links(
            other,
            "dripd",
            [(execution_id, None, destination, "TheirCode1", f"{BASE}/l/TheirCode1", True)],
        )
        theirs = {d: url for (_, d), url in stored_by_them.items()}
        ours = asyncio.create_task(own(maker, execution_id, pages(1)))
        await wait_for(
            lambda: pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE wait_event_type = 'Lock' AND query LIKE '%short_links%'"
            )
        )
        await transaction.commit()
    assert await ours == theirs == {destination: f"{BASE}/l/TheirCode1"}
    assert len(await stored(pool)) == 1


async def test_a_taken_code_is_replaced_by_a_fresh_one(
    pool: asyncpg.Pool, maker: LinkMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await execution(pool)
    await link_store.insert_links(
        pool,
        "dripd",
        [(first, None, "https://a.example/", "Collide123", f"{BASE}/l/Collide123", True)],
    )
    codes = iter(["Collide123", "Fresh45678"])
    monkeypatch.setattr(links, "new_code", lambda: next(codes))
    urls = await own(maker, await execution(pool, "bo"), pages(1))
    assert list(urls.values()) == [f"{BASE}/l/Fresh45678"]
    assert [r["code"] for r in await stored(pool)] == ["Collide123", "Fresh45678"]


async def test_codes_that_keep_colliding_are_a_shorten_error(
    pool: asyncpg.Pool, maker: LinkMaker, metrics: Metrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await execution(pool)
    await link_store.insert_links(
        pool,
        "dripd",
        [(first, None, "https://a.example/", "Collide123", f"{BASE}/l/Collide123", True)],
    )
    monkeypatch.setattr(links, "new_code", lambda: "Collide123")
    with pytest.raises(ShortenError, match="codes were taken 3 times in a row"):
        await own(maker, await execution(pool, "bo"), pages(1))
    assert errors(metrics, "dripd") == 1
    assert len(await stored(pool)) == 1


async def test_src_links_are_untracked_and_a_repeated_one_tracked_only_if_always(
    pool: asyncpg.Pool, maker: LinkMaker
) -> None:
    given = [
        ("https://x.example/a", True),
        ("https://x.example/logo.png", False),
        ("https://x.example/both", True),
        ("https://x.example/both", False),
        ("https://x.example/a", True),
    ]
    urls = await own(maker, await execution(pool), given)
    assert len(urls) == 3
    assert {r["destination"]: r["track"] for r in await stored(pool)} == {
        "https://x.example/a": True,
        "https://x.example/logo.png": False,
        "https://x.example/both": False,
    }


@pytest.fixture
async def closed(dsn: str) -> asyncpg.Pool:
    """A pool that was closed: every statement on it fails."""
    pool = await asyncpg.create_pool(dsn, min_size=0, max_size=1)
    await pool.close()
    return pool


async def test_no_links_make_no_round_trip(closed: asyncpg.Pool, new_maker: NewMaker) -> None:
    assert await own(new_maker(closed), uuid.uuid4(), []) == {}


@pytest.mark.parametrize("provider", ["dripd", "webhook"])
async def test_a_database_failure_is_a_shorten_error(
    closed: asyncpg.Pool, new_maker: NewMaker, metrics: Metrics, provider: Any
) -> None:
    maker = new_maker(closed, webhook_url=HOOK)
    with pytest.raises(ShortenError, match=r"^the database failed: "):
        await maker.shorten(
            execution_id=uuid.uuid4(), tenant=None, provider=provider, links=pages(2)
        )
    assert errors(metrics, provider) == 1


async def test_a_destination_too_long_to_store_is_a_shorten_error(
    pool: asyncpg.Pool, maker: LinkMaker
) -> None:
    long = "https://x.example/" + "a" * 9000
    with pytest.raises(
        ShortenError, match=r"longer than the 8192 a short link may lead to: https://x\.example/…$"
    ):
        await own(maker, await execution(pool), [(long, True)])
    assert await stored(pool) == []


# -- the webhook shortener ---------------------------------------------------------------------


class Shortener:
    """A LinkMaker on the `webhook` provider, its shortener an httpx.MockTransport."""

    def __init__(self, pool: asyncpg.Pool, metrics: Metrics, mock: Mock, **hook: Any) -> None:
        self.mock = mock
        self.client = httpx.AsyncClient(transport=mock)
        keys = {"url": HOOK, "token": TOKEN, **hook}
        self.maker = LinkMaker(
            pool=pool,
            settings=settings(**{f"webhook_{key}": value for key, value in keys.items()}),
            base_url=BASE,
            metrics=metrics,
            client=self.client,
        )

    async def shorten(
        self, execution_id: uuid.UUID, wanted: list[tuple[str, bool]]
    ) -> dict[str, str]:
        return await self.maker.shorten(
            execution_id=execution_id, tenant="acme", provider="webhook", links=wanted
        )

    async def aclose(self) -> None:
        await self.maker.aclose()
        await self.client.aclose()


def short_for(request: httpx.Request) -> httpx.Response:
    """A shortener that answers each destination with a short URL of its own."""
    url = json.loads(request.content)["url"]
    slug = hashlib.sha256(url.encode()).hexdigest()[:8]
    return httpx.Response(201, json={"shortUrl": f"https://sho.rt/{slug}", "id": slug})


Make = Callable[..., Shortener]
Handler = Callable[[httpx.Request], httpx.Response]


@pytest.fixture
async def make_shortener(pool: asyncpg.Pool, metrics: Metrics) -> AsyncIterator[Make]:
    """Shorteners answering `answers` in turn (else `short_for`), with `hook` config keys;
    all closed at the end."""
    made: list[Shortener] = []

    def make(*answers: Any, handler: Handler = short_for, **hook: Any) -> Shortener:
        mock = Mock(*answers) if answers else Mock(handler=handler)
        made.append(Shortener(pool, metrics, mock, **hook))
        return made[-1]

    yield make
    for shortener in made:
        await shortener.aclose()


async def test_the_shortener_gets_the_documented_request(
    pool: asyncpg.Pool, metrics: Metrics, make_shortener: Make
) -> None:
    shortener = make_shortener()
    execution_id = await execution(pool, tenant="acme")
    destination = "https://shop.example.com/p/1?utm_source=dripd&x=é"
    urls = await shortener.shorten(execution_id, [(destination, True)])
    [request] = shortener.mock.requests
    assert (request.method, str(request.url)) == ("POST", HOOK)
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["accept"] == "application/json"
    assert request.headers["user-agent"].startswith("dripd/")
    key = hashlib.sha256(f"{execution_id}{destination}".encode()).hexdigest()
    assert json.loads(request.content) == {
        "url": destination,
        "idempotency_key": key,
        "execution_id": str(execution_id),
    }
    assert urls == {destination: short_for(request).json()["shortUrl"]}
    [row] = await stored(pool)
    assert (row["provider"], row["code"], row["tenant_key"], row["short_url"]) == (
        "webhook",
        None,
        "acme",
        urls[destination],
    )
    assert created(metrics, "webhook") == 1


async def test_without_a_token_no_authorization_is_sent(
    pool: asyncpg.Pool, make_shortener: Make
) -> None:
    shortener = make_shortener(token="")
    await shortener.shorten(await execution(pool), pages(1))
    assert "authorization" not in shortener.mock.last.headers


async def test_the_answer_field_is_configurable(pool: asyncpg.Pool, make_shortener: Make) -> None:
    answer = Answer(200, json={"data": "x", "link": "https://sho.rt/Ab1"})
    shortener = make_shortener(answer, field="link")
    urls = await shortener.shorten(await execution(pool), pages(1))
    assert list(urls.values()) == ["https://sho.rt/Ab1"]


async def test_a_retry_never_calls_the_shortener_again(
    pool: asyncpg.Pool, metrics: Metrics, make_shortener: Make
) -> None:
    shortener = make_shortener()
    execution_id = await execution(pool)
    first = await shortener.shorten(execution_id, pages(5))
    assert len(shortener.mock.requests) == 5
    assert await shortener.shorten(execution_id, pages(5)) == first
    assert len(shortener.mock.requests) == 5
    more = await shortener.shorten(execution_id, pages(6))
    assert [json.loads(r.content)["url"] for r in shortener.mock.requests[5:]] == [pages(6)[5][0]]
    assert {d: more[d] for d in first} == first
    assert len(await stored(pool)) == 6
    assert created(metrics, "webhook") == 6


async def test_concurrent_webhook_attempts_store_one_link_per_destination(
    pool: asyncpg.Pool, make_shortener: Make
) -> None:
    shortener = make_shortener()
    execution_id = await execution(pool)
    results = await asyncio.gather(*(shortener.shorten(execution_id, pages(10)) for _ in range(4)))
    assert all(result == results[0] for result in results)
    assert len(await stored(pool)) == 10


async def test_answers_that_came_are_kept_when_another_failed(
    pool: asyncpg.Pool, metrics: Metrics, make_shortener: Make
) -> None:
    def half(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content)["url"].endswith("/1?ref=mail"):
            return httpx.Response(503, text="busy")
        return short_for(request)

    failing = make_shortener(handler=half)
    execution_id = await execution(pool)
    with pytest.raises(ShortenError, match="HTTP 503: busy"):
        await failing.shorten(execution_id, pages(3))
    assert len(await stored(pool)) == 2
    assert errors(metrics, "webhook") == 1
    working = make_shortener()
    urls = await working.shorten(execution_id, pages(3))
    assert [json.loads(r.content)["url"] for r in working.mock.requests] == [pages(3)[1][0]]
    assert len(urls) == 3


LONG = "https://sho.rt/" + "a" * 2040


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (Answer(200, text="https://sho.rt/abc"), "the answer is not a JSON object"),
        (Answer(200, json=["https://sho.rt/abc"]), "the answer is not a JSON object"),
        (
            Answer(200, json={"url": "https://sho.rt/abc"}),
            "no string at 'shortUrl' (short_links.webhook_field)",
        ),
        (Answer(200, json={"shortUrl": 17}), "no string at 'shortUrl'"),
        (Answer(200, json={"shortUrl": "/abc"}), "'/abc' is not an absolute http(s) URL"),
        (Answer(200, json={"shortUrl": "ftp://sho.rt/abc"}), "is not an absolute http(s) URL"),
        (Answer(200, json={"shortUrl": "https://[::1/abc"}), "is not an absolute http(s) URL"),
        (
            Answer(200, json={"shortUrl": "https://sho.rt/a b"}),
            "holds spaces or control characters",
        ),
        (Answer(200, json={"shortUrl": LONG}), "is longer than 2048 characters"),
        (Answer(500, text=f"crashed handling Bearer {TOKEN}"), "answered HTTP 500: crashed"),
        (Answer(401, json={"error": f"bad token {TOKEN}"}), "answered HTTP 401: "),
        (Answer(200, stream=Trickle(b"{", pause=0.001)), "no whole answer within 50ms"),
        (
            httpx.ReadTimeout("timed out"),
            "no whole answer within 50ms (short_links.webhook_timeout)",
        ),
        (
            httpx.ConnectError(f"cannot reach {HOOK}&token={TOKEN}"),
            "ConnectError: cannot reach https://short.example.com/…",
        ),
    ],
    ids=[
        "text",
        "array",
        "missing",
        "number",
        "relative",
        "ftp",
        "bad-host",
        "space",
        "long",
        "500",
        "401",
        "hangs",
        "timeout",
        "transport",
    ],
)
async def test_a_bad_answer_is_a_shorten_error_without_the_token(
    pool: asyncpg.Pool, metrics: Metrics, answer: Any, message: str, make_shortener: Make
) -> None:
    shortener = make_shortener(answer, timeout="50ms")
    with pytest.raises(ShortenError) as caught:
        await shortener.shorten(await execution(pool), pages(1))
    text = str(caught.value)
    assert text.startswith("short_links.webhook_url: ")
    assert message in text
    assert TOKEN not in text
    assert TOKEN[-8:] not in text
    assert await stored(pool) == []
    assert errors(metrics, "webhook") == 1


async def test_a_huge_answer_is_not_read_whole(pool: asyncpg.Pool, make_shortener: Make) -> None:
    body = json.dumps({"shortUrl": "https://sho.rt/a", "pad": "x" * 100_000})
    shortener = make_shortener(Answer(200, text=body))
    with pytest.raises(ShortenError, match="the answer is larger than 65536 bytes"):
        await shortener.shorten(await execution(pool), pages(1))


async def test_a_step_on_webhook_without_a_url_is_told_so(
    pool: asyncpg.Pool, maker: LinkMaker
) -> None:
    with pytest.raises(ShortenError, match=r"^short_links\.webhook_url: not set"):
        await maker.shorten(
            execution_id=await execution(pool), tenant=None, provider="webhook", links=pages(1)
        )
