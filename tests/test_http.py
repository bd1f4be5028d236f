"""The HTTP surface on a real uvicorn listener in the test's own event loop, and the metrics."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator
from types import FrameType
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest
from background import background
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dripd.errors import ConfigError, DatabaseError, HookError, NotFound
from dripd.http.app import HttpServer, build_app
from dripd.http.responses import json_response
from dripd.metrics import OUTCOMES, Metrics
from dripd.model import Verdict


class Readiness:
    def __init__(self) -> None:
        self.state: dict[str, Any] = {"ready": True, "database": "ok"}
        self.error: Exception | None = None

    async def __call__(self) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        return self.state


async def _missing(_request: Request) -> Response:
    raise NotFound("no such enrollment")


async def _broken(_request: Request) -> Response:
    raise RuntimeError("password=hunter2 in a bug")


async def _invalid(_request: Request) -> Response:
    raise ConfigError("data.timezone: 'Mars/Base' is not a time zone")


async def _hook_failed(_request: Request) -> Response:
    raise HookError("hook crm: https://crm.internal/?key=hunter2 answered 500")


async def _echo(request: Request) -> Response:
    return json_response({"got": await request.json()}, 201)


EXTRA = [
    Route("/v1/missing", _missing),
    Route("/v1/broken", _broken),
    Route("/v1/invalid", _invalid),
    Route("/v1/hook", _hook_failed),
    Route("/v1/echo", _echo, methods=["POST"]),
]


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def readiness() -> Readiness:
    return Readiness()


@pytest.fixture
async def server(metrics: Metrics, readiness: Readiness) -> AsyncIterator[HttpServer]:
    srv = HttpServer(build_app(metrics=metrics, readiness=readiness, routes=EXTRA))
    async with background(srv.serve, "127.0.0.1", 0):
        yield srv


@pytest.fixture
async def client(server: HttpServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as c:
        yield c


async def test_healthz(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert response.headers["content-type"] == "application/json"
    assert "server" not in response.headers


async def test_readyz_ready_and_not_ready(client: httpx.AsyncClient, readiness: Readiness) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"ready": True, "database": "ok"}

    readiness.state = {"ready": False, "database": "unreachable"}
    response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {"ready": False, "database": "unreachable"}

    readiness.error = DatabaseError("connection refused")
    response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {"ready": False, "error": "connection refused"}


async def test_metrics_endpoint(client: httpx.AsyncClient, metrics: Metrics) -> None:
    metrics.in_flight.set(3)
    metrics.outcome("sent", "email", "smtp")
    metrics.outcome("sent", "email", "smtp", 2)
    metrics.claimed("email", 5)
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert "dripd_in_flight 3.0" in text
    assert 'dripd_executions_total{channel="email",outcome="sent",provider="smtp"} 3.0' in text
    assert 'dripd_executions_claimed_total{channel="email"} 5.0' in text
    assert 'dripd_info{version="' in text


async def test_unknown_route_and_method_are_json_errors(client: httpx.AsyncClient) -> None:
    response = await client.get("/nope")
    assert response.status_code == 404
    assert response.json() == {"error": {"code": "not_found", "message": "no such route"}}

    response = await client.post("/healthz")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"
    assert "GET" in response.headers["allow"]


async def test_extra_routes_and_error_mapping(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/echo", json={"a": 1})
    assert response.status_code == 201
    assert response.json() == {"got": {"a": 1}}

    response = await client.get("/v1/missing")
    assert response.status_code == 404
    assert response.json() == {"error": {"code": "not_found", "message": "no such enrollment"}}

    response = await client.get("/v1/broken")
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal"
    assert "hunter2" not in response.text

    # Any route's dripd errors are answered as the API's are.
    response = await client.get("/v1/invalid")
    assert response.status_code == 422
    assert response.json() == {
        "error": {
            "code": "invalid_input",
            "message": "data.timezone: 'Mars/Base' is not a time zone",
            "field": "data.timezone",
        }
    }
    response = await client.get("/v1/hook")  # no status of its own: unexpected here
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal"
    assert "hunter2" not in response.text


async def test_port_in_use_is_a_config_error(server: HttpServer, metrics: Metrics) -> None:
    assert server.port
    other = HttpServer(build_app(metrics=metrics, readiness=Readiness()))
    async with anyio.create_task_group() as tg:
        with pytest.raises(ConfigError, match=r"http\.listen") as info:
            await tg.start(other.serve, "127.0.0.1", server.port)
    assert str(server.port) in info.value.message
    assert "in use" in info.value.message
    with pytest.raises(ConfigError, match="in use"):
        await other.serve("127.0.0.1", server.port)  # raised before it signals started


async def test_unresolvable_host_is_a_config_error(metrics: Metrics) -> None:
    srv = HttpServer(build_app(metrics=metrics, readiness=Readiness()))
    async with anyio.create_task_group() as tg:
        with pytest.raises(ConfigError, match=r"http\.listen"):
            await tg.start(srv.serve, "no-such-host.invalid", 0)


@pytest.fixture
def own_signal_handlers() -> Iterator[dict[int, Any]]:
    """Install distinct handlers for SIGTERM and SIGINT, as the daemon does; restore them after."""

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        raise AssertionError("no signal is sent in this test")

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in saved:
        signal.signal(sig, on_signal)
    try:
        yield {sig: signal.getsignal(sig) for sig in saved}
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


async def test_signal_handlers_are_left_alone(
    metrics: Metrics, own_signal_handlers: dict[int, Any]
) -> None:
    def current() -> dict[int, Any]:
        return {sig: signal.getsignal(sig) for sig in own_signal_handlers}

    srv = HttpServer(build_app(metrics=metrics, readiness=Readiness()))
    async with anyio.create_task_group() as tg:
        await tg.start(srv.serve, "127.0.0.1", 0)
        async with httpx.AsyncClient() as c:
            assert (await c.get(f"http://127.0.0.1:{srv.port}/healthz")).status_code == 200
        assert current() == own_signal_handlers
        tg.cancel_scope.cancel()
    assert current() == own_signal_handlers


async def test_stop_is_prompt_with_an_idle_keepalive_connection(metrics: Metrics) -> None:
    srv = HttpServer(build_app(metrics=metrics, readiness=Readiness()))
    async with httpx.AsyncClient() as c:
        async with anyio.create_task_group() as tg:
            await tg.start(srv.serve, "127.0.0.1", 0)
            port = srv.port
            assert (await c.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
            started = time.monotonic()
            tg.cancel_scope.cancel()
        assert time.monotonic() - started < 2.0  # the connection kept alive is left idle
    # The port is free again.
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port or 0))


async def test_stop_waits_for_a_request_in_progress(metrics: Metrics) -> None:
    release = anyio.Event()

    async def slow(_request: Request) -> Response:
        await release.wait()
        return json_response({"done": True})

    srv = HttpServer(build_app(metrics=metrics, readiness=Readiness(), routes=[Route("/s", slow)]))
    serving = anyio.CancelScope()  # cancels `serve` alone, while the request goes on
    stopped = anyio.Event()
    responses: list[httpx.Response] = []

    async def serve(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        with serving:
            await srv.serve("127.0.0.1", 0, task_status=task_status)
        stopped.set()

    async def get(c: httpx.AsyncClient) -> None:
        responses.append(await c.get(f"http://127.0.0.1:{srv.port}/s"))

    async with httpx.AsyncClient() as c, anyio.create_task_group() as tg:
        await tg.start(serve)
        tg.start_soon(get, c)
        await anyio.sleep(0.1)
        serving.cancel()
        await anyio.sleep(0.2)
        assert not stopped.is_set()
        release.set()
        await stopped.wait()
    assert [r.json() for r in responses] == [{"done": True}]


def test_metric_helpers_cache_children_and_check_outcomes() -> None:
    m = Metrics(version="9.9.9")
    for outcome in OUTCOMES:
        m.outcome(outcome, "sms", "twilio")
    m.outcome("skipped", None, None)
    m.verdict(Verdict.RETRY, "sms", "twilio")
    m.observe_send("sms", "twilio", 0.25)
    with pytest.raises(ValueError, match="unknown outcome"):
        m.outcome("exploded", "sms", "twilio")
    body, content_type = m.render()
    text = body.decode()
    assert content_type.startswith("text/plain")
    assert 'dripd_executions_total{channel="sms",outcome="retried",provider="twilio"} 2.0' in text
    assert 'dripd_executions_total{channel="none",outcome="skipped",provider="none"} 1.0' in text
    assert 'dripd_send_duration_seconds_count{channel="sms",provider="twilio"} 1.0' in text
    assert 'dripd_info{version="9.9.9"} 1.0' in text
    for name in (
        "dripd_executions_claimed_total",
        "dripd_claim_duration_seconds",
        "dripd_record_duration_seconds",
        "dripd_claim_to_record_seconds",
        "dripd_due_backlog",
        "dripd_oldest_due_age_seconds",
        "dripd_in_flight",
        "dripd_listen_reconnects_total",
    ):
        assert f"# TYPE {name} " in text
    # Two registries do not collide: every daemon (and test) has its own.
    assert Metrics().registry is not m.registry
