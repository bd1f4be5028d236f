"""The HTTP listeners' limits over real sockets: header, body and idle timeouts, the connection
cap, ambiguous heads, the admin listener, accept failures and the descriptor budget."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import json
import logging
import resource
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from background import background
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from structlog.testing import capture_logs
from support import daemon_env, free_port, running_daemon, wait_for

from dripd import logs
from dripd.config import from_dict
from dripd.engine import descriptors
from dripd.errors import ConfigError
from dripd.http.app import MAX_HEAD_BYTES, HttpServer, Limits, build_app, public_app
from dripd.http.responses import json_response
from dripd.metrics import Metrics

# A safety net for reads that the server ends: never reached when the code works.
SAFETY = 30.0


async def _ready() -> dict[str, Any]:
    return {"ready": True}


@contextlib.asynccontextmanager
async def serving(routes: Sequence[BaseRoute] = (), **limits: Any) -> AsyncIterator[HttpServer]:
    """An HttpServer with health routes and `routes` on a free loopback port."""
    server = HttpServer(
        build_app(metrics=Metrics(), readiness=_ready, routes=routes), limits=Limits(**limits)
    )
    async with background(server.serve, "127.0.0.1", 0):
        yield server


async def connect(server: HttpServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert server.port is not None
    return await asyncio.open_connection("127.0.0.1", server.port)


async def until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection."""
    async with asyncio.timeout(SAFETY):
        return await reader.read()


async def one_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One response with a Content-Length, read off a connection that stays open."""
    async with asyncio.timeout(SAFETY):
        head = await reader.readuntil(b"\r\n\r\n")
        status, headers = parse_head(head)
        body = await reader.readexactly(int(headers["content-length"]))
    return status, headers, body


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return status, headers


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """A whole response, as a client that read until the server closed sees it."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status, headers = parse_head(head)
    return status, headers, body


def error_of(body: bytes) -> dict[str, Any]:
    error: dict[str, Any] = json.loads(body)["error"]
    return error


# --- timeouts ----------------------------------------------------------------------------------


async def test_slow_heads_are_cut_at_the_header_timeout_while_healthz_answers() -> None:
    async with serving(header_timeout=1.0) as server:
        slow = [await connect(server) for _ in range(50)]
        for _, writer in slow:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: dripd\r\n")  # never the blank line
            await writer.drain()
        silent_reader, silent_writer = await connect(server)  # sends nothing at all
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{server.port}/healthz")
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}
        for reader, writer in slow:
            status, headers, body = parse(await until_closed(reader))
            assert status == 408
            assert headers["connection"] == "close"
            assert error_of(body) == {
                "code": "request_timeout",
                "message": "the request head did not arrive within 1s",
            }
            writer.close()
        assert await until_closed(silent_reader) == b""  # nothing came, nothing to answer
        silent_writer.close()


async def test_a_head_sent_a_byte_at_a_time_is_cut_before_it_is_whole() -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: dripd\r\nX-Padding: " + b"a" * 200 + b"\r\n\r\n"
    sent = 0

    async def trickle(writer: asyncio.StreamWriter) -> None:
        # A byte every 0.2 s: 45 s for the whole head. The timer counts the head, not the
        # gaps between its bytes.
        nonlocal sent
        with contextlib.suppress(ConnectionError):
            for byte in head:
                writer.write(bytes([byte]))
                await writer.drain()
                sent += 1
                await asyncio.sleep(0.2)

    async with serving(header_timeout=0.5) as server:
        reader, writer = await connect(server)
        sender = asyncio.create_task(trickle(writer))
        raw = await until_closed(reader)
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        writer.close()
    status, _, body = parse(raw)
    assert sent < len(head)
    assert status == 408
    assert error_of(body)["message"] == "the request head did not arrive within 0.5s"


async def test_a_body_that_does_not_arrive_is_answered_408_and_logs_no_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    handled = asyncio.Event()

    async def echo(request: Request) -> Response:
        try:
            return json_response({"got": len(await request.body())})
        finally:
            handled.set()

    caplog.set_level(logging.INFO)
    async with serving([Route("/echo", echo, methods=["POST"])], body_timeout=0.5) as server:
        reader, writer = await connect(server)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: dripd\r\nContent-Length: 100\r\n\r\n0123456789")
        await writer.drain()
        status, _, body = parse(await until_closed(reader))
        writer.close()
        async with asyncio.timeout(SAFETY):
            await handled.wait()  # the route saw the client go, and answered nobody
        # A whole body still gets its answer.
        async with httpx.AsyncClient() as client:
            response = await client.post(f"http://127.0.0.1:{server.port}/echo", content=b"x" * 10)
        assert response.json() == {"got": 10}
    assert status == 408
    assert error_of(body) == {
        "code": "request_timeout",
        "message": "the request body did not arrive within 0.5s",
    }
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_an_idle_kept_alive_connection_is_closed() -> None:
    async with serving(idle_timeout=0.3, header_timeout=30.0) as server:
        reader, writer = await connect(server)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: dripd\r\n\r\n")
        await writer.drain()
        status, headers, body = await one_response(reader)
        assert status == 200
        assert "connection" not in headers  # kept alive…
        assert json.loads(body) == {"status": "ok"}
        assert await until_closed(reader) == b""  # …until idle for idle_timeout
        writer.close()


# --- the connection cap ------------------------------------------------------------------------


async def test_connections_past_the_cap_are_refused_while_requests_complete() -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow(_request: Request) -> Response:
        entered.set()
        await release.wait()
        return json_response({"done": True})

    async with serving([Route("/slow", slow)], max_connections=3, header_timeout=30.0) as server:
        kept = []
        for _ in range(2):  # two kept-alive connections, known to the server
            reader, writer = await connect(server)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: dripd\r\n\r\n")
            await writer.drain()
            assert (await one_response(reader))[0] == 200
            kept.append((reader, writer))
        busy_reader, busy_writer = await connect(server)
        busy_writer.write(b"GET /slow HTTP/1.1\r\nHost: dripd\r\n\r\n")
        await busy_writer.drain()
        async with asyncio.timeout(SAFETY):
            await entered.wait()

        reader, writer = await connect(server)  # the fourth
        status, headers, body = parse(await until_closed(reader))
        writer.close()
        assert status == 503
        assert headers["retry-after"] == "1"
        assert error_of(body) == {
            "code": "service_unavailable",
            "message": "too many connections; try again later",
        }

        release.set()  # the request in progress completes
        status, _, body = await one_response(busy_reader)
        assert (status, json.loads(body)) == (200, {"done": True})

        _, first = kept.pop()
        first.close()  # a place frees up

        async def served() -> bool:
            async with httpx.AsyncClient() as client:
                response = await client.get(f"http://127.0.0.1:{server.port}/healthz")
            return response.status_code == 200

        await wait_for(served, timeout=SAFETY)
        for _, w in [*kept, (busy_reader, busy_writer)]:
            w.close()


# --- heads that h11 accepts but a proxy may read otherwise -------------------------------------


async def test_ambiguous_heads_are_refused_before_the_route_runs() -> None:
    calls: list[bytes] = []

    async def echo(request: Request) -> Response:
        calls.append(await request.body())
        return json_response({"ok": True})

    cases = {
        b"POST /echo HTTP/1.1\r\nHost: dripd\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n": (
            "a request must not carry both Transfer-Encoding and Content-Length "
            "(RFC 9112, section 6.3)"
        ),
        b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\nHost: dripd\r\n"
        b"content-length: 0\r\n\r\n0\r\n\r\n": (
            "a request must not carry both Transfer-Encoding and Content-Length "
            "(RFC 9112, section 6.3)"
        ),
        b"POST /echo HTTP/1.1\r\nHost: dripd\r\nHost: evil\r\nContent-Length: 0\r\n\r\n": (
            "Found multiple Host: headers"  # h11's own refusal, named
        ),
        b"POST /echo HTTP/1.1\r\nHost: dripd\r\nTransfer-Encoding: gzip\r\n\r\n": (
            "Only Transfer-Encoding: chunked is supported"
        ),
    }
    async with serving([Route("/echo", echo, methods=["POST"])]) as server:
        for request, message in cases.items():
            reader, writer = await connect(server)
            writer.write(request)
            await writer.drain()
            status, headers, body = parse(await until_closed(reader))
            writer.close()
            assert status == 400
            assert headers["content-type"] == "application/json"
            assert headers["connection"] == "close"
            assert error_of(body) == {"code": "bad_request", "message": message}
        # Either framing alone is served.
        for request in (
            b"POST /echo HTTP/1.1\r\nHost: dripd\r\nContent-Length: 5\r\n\r\nhello",
            b"POST /echo HTTP/1.1\r\nHost: dripd\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n",
        ):
            reader, writer = await connect(server)
            writer.write(request)
            await writer.drain()
            assert (await one_response(reader))[0] == 200
            writer.close()
    assert calls == [b"hello", b"hello"]


async def test_a_head_over_the_limit_is_refused_however_it_arrives() -> None:
    async def hello(_request: Request) -> Response:
        return json_response({"ok": True})

    def head(size: int) -> bytes:
        start, end = b"GET /hi HTTP/1.1\r\nHost: dripd\r\nX-A: ", b"\r\n\r\n"
        return start + b"a" * (size - len(start) - len(end)) + end

    async with serving([Route("/hi", hello, methods=["GET"])]) as server:
        many = b"GET /hi HTTP/1.1\r\nHost: dripd\r\n" + b"X-B: 0123456789abcdef\r\n" * 800 + b"\r\n"
        cases = [(head(MAX_HEAD_BYTES + 1), 1), (head(70_000), 1), (many, 1)]
        for request, pieces in [*cases, (head(MAX_HEAD_BYTES + 1), 17)]:
            reader, writer = await connect(server)
            step = -(-len(request) // pieces)
            for at in range(0, len(request), step):  # in one write, or in pieces
                writer.write(request[at : at + step])
                await writer.drain()
            status, _, body = parse(await until_closed(reader))
            writer.close()
            assert status == 400, len(request)
            message = error_of(body)["message"]
            if pieces == 1:  # whole in one read: dripd's check (h11 bounds only a partial one)
                assert message == f"the request head is {len(request)} bytes, more than 16384"
        # At the limit, served.
        reader, writer = await connect(server)
        writer.write(head(MAX_HEAD_BYTES))
        await writer.drain()
        assert (await one_response(reader))[0] == 200
        writer.close()


async def test_malformed_requests_are_logged_once_per_period(json_logs: io.StringIO) -> None:
    async with serving([]) as server:
        for _ in range(20):
            reader, writer = await connect(server)
            writer.write(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
            await writer.drain()
            assert parse(await until_closed(reader))[0] == 400
            writer.close()
    lines = [json.loads(line) for line in json_logs.getvalue().splitlines()]
    warned = [line for line in lines if line["event"].startswith("Invalid HTTP request")]
    assert [(w["event"], w["level"]) for w in warned] == [
        ("Invalid HTTP request received.", "warning")
    ]


# --- a 500's log line --------------------------------------------------------------------------


async def test_a_500_logs_the_formatted_traceback_without_locals(json_logs: io.StringIO) -> None:
    def explode(token: str) -> None:
        raise RuntimeError("the route broke")

    async def broken(_request: Request) -> Response:
        api_token = "dripd_secret_local_value"  # a local: never in the log
        explode(api_token)
        return json_response({})

    async with serving([Route("/broken", broken)]) as server, httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{server.port}/broken")
    assert response.status_code == 500
    [line] = [
        json.loads(text)
        for text in json_logs.getvalue().splitlines()
        if "Exception in ASGI application" in text
    ]
    assert line["level"] == "error"
    assert line["logger"] == "uvicorn.error"
    assert "exc_info" not in line
    trace = line["exception"]
    assert trace.startswith("Traceback (most recent call last):\n")
    assert "in broken\n" in trace
    assert "in explode\n" in trace
    assert trace.endswith("RuntimeError: the route broke")
    assert "dripd_secret_local_value" not in json_logs.getvalue()


# --- accept failures ---------------------------------------------------------------------------


def emfile(listener: socket.socket) -> dict[str, Any]:
    return {
        "message": logs.ACCEPT_FAILED,
        "exception": OSError(errno.EMFILE, "Too many open files"),
        "socket": listener,
    }


async def test_accept_failures_are_logged_once_per_period_with_a_count() -> None:
    now = [1000.0]
    others: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: others.append(context))
    handler = logs.AcceptErrors(10.0, clock=lambda: now[0])
    with socket.socket() as listener, capture_logs() as events:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        handler.install(loop)
        try:
            for _ in range(500):
                loop.call_exception_handler(emfile(listener))
            now[0] = 1009.5
            loop.call_exception_handler(emfile(listener))
            loop.call_exception_handler({"message": "something else"})
            now[0] = 1010.0
            for _ in range(3):
                loop.call_exception_handler(emfile(listener))
        finally:
            handler.uninstall(loop)
        assert loop.get_exception_handler() is not handler
        loop.call_exception_handler(emfile(listener))  # the previous handler's again
        loop.set_exception_handler(previous)
    lines = [(e["event"], e.get("suppressed"), e.get("error")) for e in events]
    failed = "connections not accepted: out of file descriptors or memory (each listener " + (
        "retries a second later)"
    )
    assert lines == [
        (failed, 0, "EMFILE"),
        (failed, 500, "EMFILE"),
        ("connections not accepted since the last report", 2, None),
    ]
    assert events[0]["listener"] == f"127.0.0.1:{port}"
    assert events[0]["reason"] == "Too many open files"
    assert [c["message"] for c in others] == ["something else", logs.ACCEPT_FAILED]


EMFILE_SERVER = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    import anyio
    from dripd import logs
    from dripd.http.app import HttpServer, Limits, public_app

    async def main() -> None:
        logs.configure("info", "json")
        loop = asyncio.get_running_loop()
        errors = logs.AcceptErrors(3600.0)
        errors.install(loop)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        server = HttpServer(public_app([]), limits=Limits(max_connections=100_000))
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve, "127.0.0.1", 0)
            print(server.port, flush=True)
            held = []
            try:  # leave no descriptor free
                while True:
                    held.append(os.open("/dev/null", os.O_RDONLY))
            except OSError:
                pass
            await stop.wait()
            for fd in held:
                os.close(fd)
            tg.cancel_scope.cancel()
        errors.uninstall(loop)

    asyncio.run(main())
    """
)


async def test_accept_failures_out_of_descriptors_are_rate_limited() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", EMFILE_SERVER,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)),
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stderr is not None
    clients: list[socket.socket] = []
    try:
        async with asyncio.timeout(SAFETY):
            port = int(await proc.stdout.readline())
            for _ in range(5):  # queued by the kernel; the server cannot accept them
                clients.append(socket.create_connection(("127.0.0.1", port)))
            before = []
            while b"connections not accepted" not in (line := await proc.stderr.readline()):
                assert line, "the server ended without reporting a failed accept"
                before.append(line)
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(SAFETY):
            _, rest = await proc.communicate()
    finally:
        for client in clients:
            client.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    lines = [json.loads(text) for text in [*before, line, *rest.splitlines()]]
    failed = [e for e in lines if e["event"].startswith("connections not accepted: ")]
    summary = [e for e in lines if e["event"] == "connections not accepted since the last report"]
    # Python 3.11 reports a failure once per pending connection up to the backlog, and
    # again every second: one line, and a count of the rest.
    assert len(failed) == 1, lines
    assert failed[0]["error"] == "EMFILE"
    assert failed[0]["listener"] == f"127.0.0.1:{port}"
    assert len(summary) == 1, lines
    assert summary[0]["suppressed"] >= 1
    assert proc.returncode == 0


# --- the descriptor budget ---------------------------------------------------------------------


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one() -> None:
    calls: list[tuple[int, int]] = []
    cfg = from_dict({})
    budget = descriptors.Budget.of(cfg)
    assert budget.total == 512 + 64 + 32 + 10 + 16 + 256 + 128 == 1018  # fits 1024

    def set_(_resource: int, limits: tuple[int, int]) -> None:
        calls.append(limits)

    assert descriptors.fit(cfg, get=lambda _r: (256, 4096), set_=set_) == (256, 4096)
    assert calls == [(4096, 4096)]
    assert descriptors.fit(cfg, get=lambda _r: (1024, 4096), set_=set_) is None  # fits
    assert calls == [(4096, 4096)]
    # One listener for public and admin routes: no admin connections of its own.
    same = from_dict({"http": {"listen": "127.0.0.1:9000", "admin_listen": "127.0.0.1:9000"}})
    assert descriptors.Budget.of(same).admin == 0
    assert descriptors.Budget.of(from_dict({"http": {"enabled": False}})).http == 0


def test_a_budget_past_the_hard_limit_is_a_config_error() -> None:
    cfg = from_dict({"http": {"max_connections": 5000}})
    with pytest.raises(ConfigError) as info:
        descriptors.fit(cfg, get=lambda _r: (1024, 2048), set_=lambda _r, _l: None)
    assert info.value.message == (
        "http.max_connections: 5000 HTTP connections (http.max_connections), 64 on the admin "
        "listener, 32 control connections (control.max_connections), 10 database connections "
        "(database.pool_max), 400 others (files, outbound connections, refusals) need 5506 file "
        "descriptors, but RLIMIT_NOFILE allows 2048 (its hard limit); lower "
        "http.max_connections, or raise the limit (LimitNOFILE= in the systemd unit, "
        "--ulimit nofile= for a container)"
    )


@pytest.mark.slow
def test_dripd_run_under_a_low_hard_limit_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "dripd.toml"
    config.write_text(
        '[database]\ndsn = "postgresql://nobody@127.0.0.1:1/none"\n'
        f'[control]\nsocket = "{tmp_path / "c.sock"}"\n'
    )
    out = subprocess.run(
        [sys.executable, "-m", "dripd.cli", "run", "--config", str(config)],
        env=daemon_env(),
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)),
    )
    assert out.returncode == 2, out.stderr
    assert "http.max_connections: 512 HTTP connections" in out.stderr
    assert "need 1018 file descriptors, but RLIMIT_NOFILE allows 256" in out.stderr
    assert "Traceback" not in out.stderr


def test_the_new_keys_are_checked_at_load() -> None:
    for raw, message in [
        ({"http": {"header_timeout": "0s"}}, "http.header_timeout: '0s' is out of range"),
        ({"http": {"idle_timeout": "2h"}}, "http.idle_timeout: '2h' is out of range"),
        ({"http": {"max_connections": 0}}, "http.max_connections: 0 is out of range"),
        ({"control": {"read_timeout": "0s"}}, "control.read_timeout: '0s' is out of range"),
        ({"control": {"max_connections": 10_001}}, "control.max_connections: 10001 is out of"),
        ({"http": {"admin_listen": "[::1:8026"}}, "http.admin_listen: '[::1:8026' is not a"),
    ]:
        with pytest.raises(ConfigError) as info:
            from_dict(raw)
        assert info.value.message.startswith(f"config: {message}"), info.value.message
    assert from_dict({"http": {"admin_listen": ""}}).admin_host_port is None


# --- the admin listener, in a daemon -----------------------------------------------------------


async def test_admin_routes_are_on_the_admin_listener_only(dsn: str, tmp_path: Path) -> None:
    public, admin = free_port(), free_port()
    sections = {"http": {"listen": f"127.0.0.1:{public}", "admin_listen": f"127.0.0.1:{admin}"}}
    async with running_daemon(dsn, tmp_path, sections=sections), httpx.AsyncClient() as client:
        for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
            assert (await client.get(f"http://127.0.0.1:{admin}{path}")).status_code == 200
            response = await client.get(f"http://127.0.0.1:{public}{path}")
            assert response.status_code == 404, path
            assert response.json() == {"error": {"code": "not_found", "message": "no such route"}}
        # The API is public, and only public.
        response = await client.post(f"http://127.0.0.1:{public}/v1/events", json={})
        assert response.status_code == 401
        response = await client.post(f"http://127.0.0.1:{admin}/v1/events", json={})
        assert response.status_code == 404
        metrics = (await client.get(f"http://127.0.0.1:{admin}/metrics")).text
        assert 'dripd_info{version="' in metrics


async def test_one_listener_serves_both_when_the_addresses_are_equal(
    dsn: str, tmp_path: Path
) -> None:
    port = free_port()
    listen = f"127.0.0.1:{port}"
    sections = {"http": {"listen": listen, "admin_listen": listen}}
    async with running_daemon(dsn, tmp_path, sections=sections), httpx.AsyncClient() as client:
        for path in ("/healthz", "/metrics", "/openapi.json"):
            assert (await client.get(f"http://{listen}{path}")).status_code == 200
        assert (await client.post(f"http://{listen}/v1/events", json={})).status_code == 401


async def test_two_authorization_headers_are_refused(dsn: str, tmp_path: Path) -> None:
    port = free_port()
    sections = {"http": {"listen": f"127.0.0.1:{port}", "admin_listen": ""}}
    body = b'{"subscriber_id": "1", "key": "signup"}'
    async with running_daemon(dsn, tmp_path, sections=sections):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/events HTTP/1.1\r\nHost: dripd\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer drp_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n"
            b"Authorization: Bearer drp_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        await writer.drain()
        status, headers, answer = await one_response(reader)
        writer.close()
        # Without an admin listener, health is served nowhere.
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 404
    assert status == 400
    assert headers["www-authenticate"] == 'Bearer realm="dripd", error="invalid_request"'
    assert error_of(answer) == {
        "code": "bad_request",
        "message": "2 Authorization headers: send exactly one",
    }


def test_the_public_app_has_no_admin_routes() -> None:
    async def page(_request: Request) -> Response:
        return json_response({})

    assert [getattr(r, "path", None) for r in public_app([Route("/x", page)]).routes] == ["/x"]
