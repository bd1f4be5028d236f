"""The Starlette app (health, readiness, metrics; API routes join the route list) and its server."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Awaitable, Callable, Generator, Sequence
from http import HTTPStatus
from typing import Any

import anyio
import anyio.abc
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from dripd.errors import ConfigError, DripdError
from dripd.http.errors import api_error_response, error_from_dripd
from dripd.http.responses import error_response, json_response
from dripd.metrics import Metrics

Readiness = Callable[[], Awaitable[dict[str, Any]]]


def health_routes(*, metrics: Metrics, readiness: Readiness) -> list[BaseRoute]:
    """`/healthz`, `/readyz` and `/metrics`."""

    async def healthz(_request: Request) -> Response:
        return json_response({"status": "ok"})

    async def readyz(_request: Request) -> Response:
        try:
            state = await readiness()
        except DripdError as exc:
            return json_response({"ready": False, "error": exc.message}, 503)
        return json_response(state, 200 if state.get("ready") is True else 503)

    async def metrics_text(_request: Request) -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_text, methods=["GET"]),
    ]


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        code, message = "not_found", "no such route"
    else:
        phrase = HTTPStatus(exc.status_code).phrase
        code, message = phrase.lower().replace(" ", "_").replace("-", "_"), exc.detail
    response = error_response(exc.status_code, code, message)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def _dripd_error(_request: Request, exc: Exception) -> Response:
    # The API's mapping, for every route: one answer per error (e.g. bad input is 422 and
    # names its field).
    assert isinstance(exc, DripdError)
    mapped = error_from_dripd(exc)
    if mapped.status == 500:
        raise exc  # unexpected: `_internal_error` answers, and uvicorn logs the traceback
    return api_error_response(mapped)


async def _internal_error(_request: Request, _exc: Exception) -> Response:
    # Starlette re-raises after this, so uvicorn logs the traceback; the client sees none.
    return error_response(500, "internal", "internal error; see the daemon log")


def build_app(
    *,
    metrics: Metrics,
    readiness: Readiness,
    routes: Sequence[BaseRoute] = (),
) -> Starlette:
    """The daemon's HTTP app: health routes first, then `routes` (webhooks, intake, …)."""
    return Starlette(
        routes=[*health_routes(metrics=metrics, readiness=readiness), *routes],
        exception_handlers={
            HTTPException: _http_error,
            DripdError: _dripd_error,
            Exception: _internal_error,
        },
    )


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signals to the daemon and reports when it listens."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.settled = anyio.Event()  # listening, or ended without
        self.ended = anyio.Event()
        self.failure: OSError | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # The daemon owns SIGTERM and SIGINT; uvicorn must not replace its handlers.
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.settled.set()

    async def run_on(self, sock: socket.socket, scope: anyio.CancelScope) -> None:
        """uvicorn's whole life on `sock`: until `should_exit`, or `scope` is cancelled."""
        try:
            with scope:
                await self.serve(sockets=[sock])
        except OSError as exc:  # asyncio could not listen on the socket
            self.failure = exc
        finally:
            self.ended.set()
            self.settled.set()


class HttpServer:
    """Serves an ASGI app in the running event loop: `serve` runs in the caller's task group."""

    def __init__(self, app: Starlette, *, graceful_timeout: float = 5.0) -> None:
        self.app = app
        self.graceful_timeout = graceful_timeout
        self.host: str | None = None
        self.port: int | None = None

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Bind `host:port` (port 0 picks a free one, see `.port`), signal `task_status` once
        listening, and serve until cancelled; then stop accepting and let requests in progress
        finish, for at most `graceful_timeout` (and a second's margin) before cutting them off.

        A taken port, an unresolvable host or a listener that does not start is a ConfigError
        naming `http.listen`, raised before `task_status.started()`.
        """
        sock = await _bind(host, port)
        self.host, self.port = host, sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            http="h11",
            ws="none",
            lifespan="off",  # the daemon creates and closes every resource itself
            log_config=None,  # never configure logging globally
            log_level="warning",
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=max(1, round(self.graceful_timeout)),
        )
        server = _EmbeddedServer(config)
        # uvicorn runs shielded: cancelling `serve` asks it to exit (`should_exit`), so
        # requests in progress finish; only past the deadline is its scope cancelled.
        uvicorn_scope = anyio.CancelScope(shield=True)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(server.run_on, sock, uvicorn_scope)
                try:
                    await server.settled.wait()
                    if server.started:
                        task_status.started()
                        await server.ended.wait()
                finally:
                    with anyio.CancelScope(shield=True):
                        await self._shut_down(server, uvicorn_scope)
        finally:
            sock.close()
        if not server.started:
            raise ConfigError(
                f"http.listen: the HTTP server did not start: {server.failure!r}"
            ) from server.failure

    async def _shut_down(self, server: _EmbeddedServer, scope: anyio.CancelScope) -> None:
        server.should_exit = True
        with anyio.move_on_after(self.graceful_timeout + 1.0):
            await server.ended.wait()
        if not server.ended.is_set():
            server.force_exit = True
            scope.cancel()
            await server.ended.wait()


async def _bind(host: str, port: int) -> socket.socket:
    """Bind a listening socket ourselves, so a taken port is a clear ConfigError."""
    where = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ConfigError(f"http.listen: cannot resolve {host!r}: {exc.strerror}") from exc
    family, socktype, proto, _, address = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise ConfigError(f"http.listen: cannot listen on {where}: {reason}") from exc
    return sock
