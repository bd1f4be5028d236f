"""The control socket over real Unix sockets: protocol, errors, stale and live socket files."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgspec
import pytest
from background import background
from structlog.testing import capture_logs
from support import wait_for

from dripd.control import MAX_LINE, ControlError, ControlServer, Limits, request
from dripd.errors import ConfigError, DripdError, NotFound


async def handler(cmd: str, args: dict[str, Any]) -> Any:
    if cmd == "echo":
        return {"cmd": cmd, "args": args}
    if cmd == "status":
        return {"version": "0.1.0", "in_flight": 0, "paused": False}
    if cmd == "bad":
        raise ConfigError("args.limit: must be positive")
    if cmd == "boom":
        raise RuntimeError("password=hunter2 leaked through a bug")
    if cmd == "hang":
        await asyncio.sleep(3600)
    raise NotFound(f"unknown command {cmd!r}")


@pytest.fixture
def sock_path() -> Iterator[str]:
    # pytest's tmp_path can exceed the ~107-byte limit of AF_UNIX paths.
    with tempfile.TemporaryDirectory(prefix="dripd-") as tmp:
        yield os.path.join(tmp, "run", "control.sock")


@pytest.fixture
async def server(sock_path: str) -> AsyncIterator[ControlServer]:
    srv = ControlServer(sock_path, 0o660, handler)
    async with background(srv.serve):
        yield srv


def exists(path: str) -> bool:
    return os.path.exists(path)


def write(path: str, text: str) -> None:
    Path(path).write_text(text)


def read(path: str) -> str:
    return Path(path).read_text()


async def exchange(path: str, *lines: bytes) -> list[dict[str, Any]]:
    """Send raw lines on one connection and read one answer per line."""
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        answers = []
        for line in lines:
            writer.write(line)
            await writer.drain()
            answers.append(msgspec.json.decode(await reader.readline()))
        return answers
    finally:
        writer.close()
        await writer.wait_closed()


async def test_request_returns_the_result(server: ControlServer) -> None:
    result = await request(server.path, "echo", {"n": 1, "s": "é"})
    assert result == {"cmd": "echo", "args": {"n": 1, "s": "é"}}
    assert await request(server.path, "echo") == {"cmd": "echo", "args": {}}


async def test_several_requests_on_one_connection(server: ControlServer) -> None:
    answers = await exchange(
        server.path,
        b'{"cmd": "status"}\n',
        b'{"cmd": "echo", "args": {"x": [1, 2]}}\n',
    )
    assert answers == [
        {"ok": True, "result": {"version": "0.1.0", "in_flight": 0, "paused": False}},
        {"ok": True, "result": {"cmd": "echo", "args": {"x": [1, 2]}}},
    ]


async def test_malformed_requests_are_bad_request_and_keep_the_connection(
    server: ControlServer,
) -> None:
    answers = await exchange(
        server.path,
        b"{not json\n",
        b'["status"]\n',
        b'{"args": {}}\n',
        b'{"cmd": "status", "args": [1]}\n',
        b'{"cmd": "status"}\n',
    )
    assert [a["ok"] for a in answers] == [False, False, False, False, True]
    assert {a["error"]["code"] for a in answers[:4]} == {"bad_request"}
    assert all(a["error"]["message"] for a in answers[:4])


async def test_a_lone_surrogate_escape_is_named(server: ControlServer) -> None:
    [answer] = await exchange(server.path, b'{"cmd": "echo", "args": {"x": "\\ud800"}}\n')
    assert answer["error"] == {
        "code": "bad_request",
        "message": "malformed request: a \\u escape names a lone UTF-16 surrogate, which is "
        "not a character",
    }


async def test_an_oversized_line_is_refused_and_closes(server: ControlServer) -> None:
    reader, writer = await asyncio.open_unix_connection(server.path, limit=MAX_LINE * 4)
    writer.write(b'{"cmd": "echo", "args": {"x": "' + b"a" * (MAX_LINE + 10) + b'"}}\n')
    with contextlib.suppress(ConnectionError):
        await writer.drain()  # the server may hang up before reading everything
    answer = msgspec.json.decode(await reader.readline())
    assert answer["ok"] is False
    assert answer["error"]["code"] == "bad_request"
    assert await reader.read() == b""
    writer.close()


async def test_dripd_errors_keep_their_code(server: ControlServer) -> None:
    with pytest.raises(ControlError) as info:
        await request(server.path, "nope")
    assert info.value.code == "not_found"
    assert info.value.message == "unknown command 'nope'"
    assert info.value.exit_code == 1

    with pytest.raises(ControlError) as info:
        await request(server.path, "bad")
    assert info.value.code == "bad_input"
    assert info.value.message == "args.limit: must be positive"
    assert info.value.exit_code == 2


async def test_unexpected_errors_are_internal_and_logged_not_leaked(
    server: ControlServer,
) -> None:
    with capture_logs() as events:
        answers = await exchange(server.path, b'{"cmd": "boom"}\n', b'{"cmd": "status"}\n')
    error = answers[0]["error"]
    assert error["code"] == "internal"
    assert "hunter2" not in error["message"]
    assert "Traceback" not in error["message"]
    assert answers[1]["ok"] is True
    [event] = [e for e in events if e["event"] == "control_command_failed"]
    assert event["cmd"] == "boom"
    assert event["log_level"] == "error"


async def test_serve_creates_the_directory_and_sets_the_mode(sock_path: str) -> None:
    assert not exists(os.path.dirname(sock_path))
    srv = ControlServer(sock_path, 0o600, handler)
    async with anyio.create_task_group() as tg:
        await tg.start(srv.serve)
        st = os.stat(sock_path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        tg.cancel_scope.cancel()
    assert not exists(sock_path)


async def test_a_stale_socket_file_is_replaced(sock_path: str) -> None:
    os.makedirs(os.path.dirname(sock_path))
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(sock_path)
    dead.close()  # leaves the file behind with nobody listening
    assert stat.S_ISSOCK(os.stat(sock_path).st_mode)

    srv = ControlServer(sock_path, 0o660, handler)
    async with anyio.create_task_group() as tg:
        await tg.start(srv.serve)
        assert await request(sock_path, "echo") == {"cmd": "echo", "args": {}}
        tg.cancel_scope.cancel()


async def test_a_live_socket_is_refused(server: ControlServer) -> None:
    second = ControlServer(server.path, 0o660, handler)
    async with anyio.create_task_group() as tg:
        with pytest.raises(ConfigError, match="another daemon already listens on") as info:
            await tg.start(second.serve)
    assert server.path in info.value.message
    # The first daemon keeps its socket.
    assert await request(server.path, "echo") == {"cmd": "echo", "args": {}}


async def test_a_regular_file_in_the_way_is_left_alone(sock_path: str) -> None:
    os.makedirs(os.path.dirname(sock_path))
    write(sock_path, "not mine")
    async with anyio.create_task_group() as tg:
        with pytest.raises(ConfigError, match="is not a socket"):
            await tg.start(ControlServer(sock_path, 0o660, handler).serve)
    assert read(sock_path) == "not mine"


async def test_serve_runs_in_a_task_group_until_cancelled(sock_path: str) -> None:
    srv = ControlServer(sock_path, 0o660, handler)
    with anyio.fail_after(5):  # mostly the shutdown, with a request still hanging
        async with anyio.create_task_group() as tg:
            await tg.start(srv.serve)
            reader, writer = await asyncio.open_unix_connection(sock_path)
            writer.write(b'{"cmd": "hang"}\n')
            await writer.drain()
            await asyncio.sleep(0.05)
            assert await request(sock_path, "echo") == {"cmd": "echo", "args": {}}
            tg.cancel_scope.cancel()
    assert await reader.read() == b""  # the open connection was closed
    writer.close()
    assert not exists(sock_path)


async def test_close_leaves_a_successors_socket(sock_path: str) -> None:
    first = anyio.CancelScope()  # cancels the first server alone
    first_ended = anyio.Event()

    async def serve_first(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        with first:
            await ControlServer(sock_path, 0o660, handler).serve(task_status=task_status)
        first_ended.set()

    async with anyio.create_task_group() as tg:
        await tg.start(serve_first)
        os.unlink(sock_path)  # e.g. removed by an operator, then a new daemon starts
        await tg.start(ControlServer(sock_path, 0o660, handler).serve)
        first.cancel()
        await first_ended.wait()
        assert await request(sock_path, "echo") == {"cmd": "echo", "args": {}}
        tg.cancel_scope.cancel()


async def test_no_daemon_listening(sock_path: str) -> None:
    with pytest.raises(DripdError, match="no daemon is listening on") as info:
        await request(sock_path, "status")
    assert not isinstance(info.value, ControlError)
    assert sock_path in info.value.message
    assert "control.socket" in info.value.message


async def test_request_times_out(server: ControlServer) -> None:
    with pytest.raises(DripdError, match=r"did not answer within 0\.2s"):
        await request(server.path, "hang", timeout=0.2)


# --- limits --------------------------------------------------------------------------------
# A safety net for reads that the server ends: never reached when the code works.
SAFETY = 30.0


async def _until_closed(reader: asyncio.StreamReader) -> list[dict[str, Any]]:
    """The answers the server sends until it closes the connection."""
    async with asyncio.timeout(SAFETY):
        return [msgspec.json.decode(line) for line in (await reader.read()).splitlines()]


async def test_a_client_that_never_sends_is_disconnected(sock_path: str) -> None:
    srv = ControlServer(sock_path, 0o660, handler, limits=Limits(idle_timeout=0.2))
    async with background(srv.serve):
        reader, writer = await asyncio.open_unix_connection(sock_path)
        assert await _until_closed(reader) == [
            {
                "ok": False,
                "error": {
                    "code": "timeout",
                    "message": "no request within 0.2s; closing the connection",
                },
            }
        ]
        writer.close()
        # Between requests too: the idle timer starts again after each answer.
        reader, writer = await asyncio.open_unix_connection(sock_path)
        writer.write(b'{"cmd": "status"}\n')
        answers = await _until_closed(reader)
        writer.close()
    assert [a["ok"] for a in answers] == [True, False]
    assert answers[1]["error"]["code"] == "timeout"


async def test_a_request_line_that_is_not_finished_is_cut(sock_path: str) -> None:
    srv = ControlServer(sock_path, 0o660, handler, limits=Limits(read_timeout=0.2))
    async with background(srv.serve):
        reader, writer = await asyncio.open_unix_connection(sock_path)
        writer.write(b'{"cmd": "sta')  # and never the rest
        await writer.drain()
        assert await _until_closed(reader) == [
            {
                "ok": False,
                "error": {
                    "code": "timeout",
                    "message": "the request line was not whole within 0.2s; closing the connection",
                },
            }
        ]
        writer.close()


async def test_connections_past_the_cap_are_refused(sock_path: str) -> None:
    srv = ControlServer(sock_path, 0o660, handler, limits=Limits(max_connections=2))
    async with background(srv.serve):
        held = []
        for _ in range(2):
            reader, writer = await asyncio.open_unix_connection(sock_path)
            writer.write(b'{"cmd": "echo"}\n')
            assert msgspec.json.decode(await reader.readline())["ok"] is True
            held.append((reader, writer))
        reader, writer = await asyncio.open_unix_connection(sock_path)
        assert await _until_closed(reader) == [
            {
                "ok": False,
                "error": {
                    "code": "busy",
                    "message": "the daemon serves 2 control connections at once "
                    "(control.max_connections); try again later",
                },
            }
        ]
        writer.close()
        with pytest.raises(ControlError, match="at once") as info:
            await request(sock_path, "echo")
        assert info.value.code == "busy"
        # The connections held are still served; once one closes, a new one is too.
        first_reader, first_writer = held.pop()
        first_writer.write(b'{"cmd": "status"}\n')
        assert msgspec.json.decode(await first_reader.readline())["ok"] is True
        first_writer.close()

        async def answered() -> bool:
            try:
                return await request(sock_path, "echo") == {"cmd": "echo", "args": {}}
            except ControlError:
                return False

        await wait_for(answered, timeout=SAFETY)
        for _, w in held:
            w.close()
