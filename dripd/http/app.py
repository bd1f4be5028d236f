"""The public and admin Starlette apps, and their server with the limits uvicorn lacks."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final, cast

import anyio
import anyio.abc
import h11
import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from dripd import logs
from dripd.config import Config
from dripd.errors import ConfigError, DripdError
from dripd.http.errors import dripd_error_response
from dripd.http.responses import error_response, json_response
from dripd.metrics import Metrics

Readiness = Callable[[], Awaitable[dict[str, Any]]]


_log = logs.get("dripd.http")

# The listen backlog, and how many connections asyncio accepts per turn of the loop (it
# accepts up to `backlog` at once, before any is refused at the cap: uvicorn's 2048 ran a
# 1024-descriptor daemon out of them in one burst).
BACKLOG = 128

ADMIN_MAX_CONNECTIONS = 64
"""The admin listener's connection cap (when it has its own address): health checks and
scrapers need few."""


def health_routes(*, metrics: Metrics, readiness: Readiness) -> list[BaseRoute]:
    """`/healthz`, `/readyz` and `/metrics`: the admin listener's."""

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
    # What maps to 500 is raised again: `_internal_error` answers, uvicorn logs the traceback.
    assert isinstance(exc, DripdError)
    return dripd_error_response(exc)


async def _internal_error(_request: Request, _exc: Exception) -> Response:
    # Starlette re-raises after this, so uvicorn logs the traceback; the client sees none.
    return error_response(500, "internal", "internal error; see the daemon log")


async def _client_gone(_request: Request, _exc: Exception) -> Response:
    # The client went away, or its body timed out (the connection is closed already): no
    # one reads this answer, and it is no error of ours to log with a traceback.
    return error_response(400, "client_disconnected", "the client closed the connection")


def _app(routes: Sequence[BaseRoute]) -> Starlette:
    return Starlette(
        routes=list(routes),
        exception_handlers={
            ClientDisconnect: _client_gone,
            HTTPException: _http_error,
            DripdError: _dripd_error,
            Exception: _internal_error,
        },
    )


def build_app(
    *,
    metrics: Metrics,
    readiness: Readiness,
    routes: Sequence[BaseRoute] = (),
) -> Starlette:
    """An app with the health routes first, then `routes`: the admin listener's app (its
    `routes` are `/openapi.json`), or the one app of a daemon whose `http.admin_listen` is
    its `http.listen` (then `routes` are all of them)."""
    return _app([*health_routes(metrics=metrics, readiness=readiness), *routes])


def public_app(routes: Sequence[BaseRoute]) -> Starlette:
    """The app of the public listener (`http.listen`) beside an admin listener: `routes`
    (the API, the lead form, unsubscribe) and no health, metrics or API document."""
    return _app(routes)


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """What one listener allows a client (config `[http]`; seconds).

    - `header_timeout`: a request head must arrive whole within this long of the
      connection's opening, or of the first byte of a later request on a kept-alive one
      (408, then the connection is closed; closed without an answer if nothing came).
    - `body_timeout`: its body must arrive whole within this long of the head (408 unless
      an answer has started, then closed).
    - `idle_timeout`: a kept-alive connection without a request is closed after this long.
    - `max_connections`: connections open at once; one more is answered 503 and closed as
      soon as it is accepted, so the daemon never runs out of descriptors.
    """

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    idle_timeout: float = 5.0
    max_connections: int = 512

    @classmethod
    def of(cls, cfg: Config, *, max_connections: int | None = None) -> Limits:
        """The limits the configuration sets (`max_connections` overrides its key)."""
        return cls(
            header_timeout=cfg.http.seconds("header_timeout"),
            body_timeout=cfg.http.seconds("body_timeout"),
            idle_timeout=cfg.http.seconds("idle_timeout"),
            max_connections=max_connections or cfg.http.max_connections,
        )


_encode = msgspec.json.Encoder().encode


def _raw_response(status: int, code: str, message: str, *extra: tuple[str, str]) -> bytes:
    """A whole HTTP/1.1 answer with the API's error body that closes the connection: for the
    moments h11 has no request to answer (a head that never came, a connection refused)."""
    body = _encode({"error": {"code": code, "message": message}})
    head = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        *(f"{name}: {value}" for name, value in extra),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


def _ambiguous(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """Why a request head that h11 accepts must be refused, or None: both Transfer-Encoding
    and Content-Length (RFC 9112 section 6.3: a server may refuse it, and should, for a
    proxy in front may frame the body by the other one: request smuggling). h11 refuses
    the other ambiguous heads itself (two Host headers, conflicting Content-Lengths, a
    Transfer-Encoding other than chunked)."""
    names = {name.lower() for name, _ in headers}
    if b"transfer-encoding" in names and b"content-length" in names:
        return (
            "a request must not carry both Transfer-Encoding and Content-Length "
            "(RFC 9112, section 6.3)"
        )
    return None


MAX_HEAD_BYTES: Final = 16384
"""The longest request head (request line and header fields) the listeners take."""


def _head_bytes(request: h11.Request) -> int:
    """The size of a request head as sent: its request line and header lines with CRLFs."""
    line = len(request.method) + len(request.target) + len(b" HTTP/1.1\r\n") + 1
    return line + sum(len(name) + len(value) + 4 for name, value in request.headers) + 2


class _StrictConnection(h11.Connection):
    """h11's server side, refusing the request heads `_ambiguous` names (h11 accepts them)
    and heads over `MAX_HEAD_BYTES` (h11 bounds only a head that arrives in pieces: one
    read of 70 000 bytes passed), and keeping why it refused a request (`refusal`), for the
    400's message."""

    refusal: str | None = None

    def __init__(self) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)

    def next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as exc:
            self.refusal = str(exc)
            raise
        if isinstance(event, h11.Request):
            size = _head_bytes(event)
            problem = _ambiguous(event.headers) or (
                f"the request head is {size} bytes, more than {MAX_HEAD_BYTES}"
                if size > MAX_HEAD_BYTES
                else None
            )
            if problem is not None:
                self.refusal = problem
                raise h11.RemoteProtocolError(problem, error_status_hint=400)
        return event


class _Config(uvicorn.Config):
    """uvicorn's configuration, carrying what `_GuardedProtocol` needs."""

    def __init__(self, app: Starlette, *, limits: Limits, key: str, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.limits = limits
        self.key = key  # the config key of this listener, for the log
        self.refusals = logs.Throttle(10.0)
        self.malformed = logs.Throttle(10.0)


class _ThrottledWarnings:
    """uvicorn's logger for one listener, except that its warning for each request h11
    refuses ("Invalid HTTP request received.") is logged at most once per `throttle` period
    with the count held back: a client may send thousands (the client gets each reason in
    its 400)."""

    def __init__(self, logger: logging.Logger, throttle: logs.Throttle) -> None:
        self._logger = logger
        self._throttle = throttle

    def warning(self, msg: str, *args: Any, **kwargs: Any) -> None:
        if msg == _MALFORMED:
            held = self._throttle.due()
            if held is None:
                return
            if held:
                msg = f"{msg} ({held} more held back since the last such line)"
        self._logger.warning(msg, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._logger, name)


_MALFORMED: Final = "Invalid HTTP request received."  # uvicorn's words (h11_impl)


class _GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol with the limits it lacks.

    uvicorn (0.54) arms one timer: keep-alive, after a response. A connection that sends
    nothing, or a head or a body a byte at a time, is held for ever, and connections are
    accepted until descriptors run out. This adds a header timer (armed when a connection
    opens, or when the first byte of a later request arrives), a body timer (armed when a
    head that announces a body has arrived), the cap on connections, and refuses the heads
    `_ambiguous` names; `idle_timeout` is uvicorn's keep-alive timer.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        assert isinstance(config, _Config)
        self.limits = config.limits
        self._refusals = config.refusals
        self._key = config.key
        # uvicorn only calls its logger's level methods: the wrapper stands in for it.
        self.logger = cast(logging.Logger, _ThrottledWarnings(self.logger, config.malformed))
        self._strict = _StrictConnection()
        self.conn = self._strict
        self._timer: asyncio.TimerHandle | None = None
        self._waiting_for: str | None = None  # "head" or "body", while its timer runs
        self._got_bytes = False  # of the request whose head is awaited
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(transport)
            return
        self._arm("head")

    def _refuse(self, transport: asyncio.Transport) -> None:
        self._refused = True
        self.connections.discard(self)
        transport.write(
            _raw_response(
                503,
                "service_unavailable",
                "too many connections; try again later",
                ("retry-after", "1"),
            )
        )
        transport.close()
        held = self._refusals.due()
        if held is not None:
            _log.warning(
                "HTTP connections refused: as many are open as allowed",
                listener=self._key,
                max_connections=self.limits.max_connections,
                suppressed=held,
            )

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self.conn.their_state is h11.IDLE:
            if self._waiting_for is None:
                self._arm("head")  # the first byte of a later request on this connection
            self._got_bytes = True
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        self._follow()

    def _follow(self) -> None:
        """Arm or disarm the timers by what h11 has received of the request."""
        state = self.conn.their_state
        if self.transport.is_closing() or state not in (h11.IDLE, h11.SEND_BODY):
            self._disarm()  # the request is whole (DONE), or the connection ends
        elif state is h11.SEND_BODY and self._waiting_for != "body":
            self._arm("body")

    def _arm(self, what: str) -> None:
        self._disarm()
        seconds = self.limits.header_timeout if what == "head" else self.limits.body_timeout
        self._waiting_for = what
        self._timer = self.loop.call_later(seconds, self._expired, what)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._waiting_for, self._got_bytes = None, None, False

    def _expired(self, what: str) -> None:
        got_bytes = self._got_bytes
        self._timer, self._waiting_for, self._got_bytes = None, None, False
        if self.transport.is_closing():
            return
        answered = self.cycle is not None and self.cycle.response_started
        if what == "head" and got_bytes:
            seconds = self.limits.header_timeout
            self.transport.write(
                _raw_response(
                    408,
                    "request_timeout",
                    f"the request head did not arrive within {seconds:g}s",
                )
            )
        elif what == "body" and not answered:
            seconds = self.limits.body_timeout
            self.transport.write(
                _raw_response(
                    408,
                    "request_timeout",
                    f"the request body did not arrive within {seconds:g}s",
                )
            )
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        # uvicorn's answers in plain text; this one in the API's error shape, and names why.
        message = self._strict.refusal or msg
        body = _encode({"error": {"code": "bad_request", "message": message}})
        for event in (
            h11.Response(
                status_code=400,
                headers=[
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
                reason=b"Bad Request",
            ),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event) or b"")
        self.transport.close()


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
    """Serves an ASGI app in the running event loop: `serve` runs in the caller's task group.

    `limits` bound what clients may hold (see `Limits`); `key` is the config key of the
    address, named by its errors and logs.
    """

    def __init__(
        self,
        app: Starlette,
        *,
        graceful_timeout: float = 5.0,
        limits: Limits | None = None,
        key: str = "http.listen",
    ) -> None:
        self.app = app
        self.graceful_timeout = graceful_timeout
        self.limits = limits or Limits()
        self.key = key
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
        naming the listener's key (`http.listen`), raised before `task_status.started()`.
        """
        sock = await _bind(host, port, key=self.key)
        self.host, self.port = host, sock.getsockname()[1]
        config = _Config(
            self.app,
            limits=self.limits,
            key=self.key,
            http=_GuardedProtocol,
            # uvicorn annotates an int; it only hands it to loop.call_later.
            timeout_keep_alive=self.limits.idle_timeout,
            ws="none",
            lifespan="off",  # the daemon creates and closes every resource itself
            log_config=None,  # never configure logging globally
            log_level="warning",
            access_log=False,
            server_header=False,
            # The client is the socket's peer; only `leads.trusted_proxies` may name another
            # (dripd.http.clients), never uvicorn's default trust of loopback proxies.
            proxy_headers=False,
            timeout_graceful_shutdown=max(1, round(self.graceful_timeout)),
            backlog=BACKLOG,
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
                f"{self.key}: the HTTP server did not start: {server.failure!r}"
            ) from server.failure

    async def _shut_down(self, server: _EmbeddedServer, scope: anyio.CancelScope) -> None:
        server.should_exit = True
        with anyio.move_on_after(self.graceful_timeout + 1.0):
            await server.ended.wait()
        if not server.ended.is_set():
            server.force_exit = True
            scope.cancel()
            await server.ended.wait()


async def _bind(host: str, port: int, *, key: str) -> socket.socket:
    """Bind a listening socket ourselves, so a taken port is a clear ConfigError naming `key`."""
    where = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ConfigError(f"{key}: cannot resolve {host!r}: {exc.strerror}") from exc
    family, socktype, proto, _, address = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise ConfigError(f"{key}: cannot listen on {where}: {reason}") from exc
    return sock
