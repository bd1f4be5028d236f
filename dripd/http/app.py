"""The Starlette app (health, readiness, metrics; API routes join the route list) and its server."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Awaitable, Callable, Generator, Sequence
from http import HTTPStatus
from typing import Any

import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from dripd.errors import ConfigError, DripdError
from dripd.metrics import Metrics

Readiness = Callable[[], Awaitable[dict[str, Any]]]

# HTTP status for each DripdError code raised by a route.
_STATUS_OF_CODE = {
    "bad_input": 400,
    "credentials": 400,
    "not_found": 404,
    "conflict": 409,
    "schema": 503,
    "database": 503,
}

_encode = msgspec.json.Encoder().encode


def json_response(body: Any, status: int = 200) -> Response:
    """A JSON response encoded with msgspec (datetimes, UUIDs and Structs included)."""
    return Response(_encode(body), status_code=status, media_type="application/json")


def error_response(status: int, code: str, message: str) -> Response:
    """The one error shape of the HTTP surface: `{"error": {"code": ..., "message": ...}}`."""
    return json_response({"error": {"code": code, "message": message}}, status)


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
    assert isinstance(exc, DripdError)
    return error_response(_STATUS_OF_CODE.get(exc.code, 500), exc.code, exc.message)


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
        self.listening = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # The daemon owns SIGTERM and SIGINT; uvicorn must not replace its handlers.
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.listening.set()


class HttpServer:
    """Serves an ASGI app in the running event loop until `stop()`."""

    def __init__(self, app: Starlette, *, graceful_timeout: float = 5.0) -> None:
        self.app = app
        self.graceful_timeout = graceful_timeout
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None
        self.host: str | None = None
        self.port: int | None = None

    async def start(self, host: str, port: int) -> None:
        """Bind `host:port` (port 0 picks a free one, see `.port`) and return once listening."""
        if self._task is not None:
            raise RuntimeError("HttpServer already started")
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
        server = self._server = _EmbeddedServer(config)
        task = self._task = asyncio.create_task(server.serve(sockets=[sock]), name="dripd-http")
        listening = asyncio.create_task(server.listening.wait())
        try:
            await asyncio.wait({task, listening}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            await self.stop(timeout=1.0)
            raise
        finally:
            listening.cancel()
        if not server.listening.is_set():
            self._server = self._task = None
            sock.close()
            exc = task.exception() if not task.cancelled() else None
            raise ConfigError(f"http.listen: the HTTP server did not start: {exc!r}") from exc

    async def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, let requests in progress finish (bounded), and return."""
        server, task = self._server, self._task
        self._server = self._task = None
        if server is None or task is None:
            return
        server.should_exit = True
        deadline = self.graceful_timeout + 1.0 if timeout is None else timeout
        try:
            await asyncio.wait_for(asyncio.shield(task), deadline)
        except TimeoutError:
            server.force_exit = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        except asyncio.CancelledError:
            server.force_exit = True
            task.cancel()
            raise


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
