"""The Unix control socket: newline-delimited JSON requests to the running daemon, and its client.

A request is `{"cmd": "...", "args": {...}}`; the answer is `{"ok": true, "result": ...}` or
`{"ok": false, "error": {"code": "...", "message": "..."}}`. One connection may carry many,
within the limits of `Limits`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgspec

from dripd import logs
from dripd.config import Config
from dripd.errors import ConfigError, DripdError
from dripd.inputs import json_fault

Handler = Callable[[str, dict[str, Any]], Awaitable[Any]]

MAX_LINE = 1 << 20
"""The longest request line the server reads (1 MiB); a longer one ends the connection."""

# Answers (e.g. listings) may be larger than requests.
_CLIENT_LIMIT = 64 << 20
# How long serve() waits for an existing socket to answer before calling it stale.
_PROBE_TIMEOUT = 1.0
_INTERNAL_MESSAGE = "internal error; see the daemon log"

_log = logs.get("dripd.control")


class ControlError(DripdError):
    """The daemon refused the control request."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        if code in {"bad_input", "bad_request", "credentials"}:
            self.exit_code = 2


class _Request(msgspec.Struct, forbid_unknown_fields=True):
    cmd: str
    args: dict[str, Any] = msgspec.field(default_factory=dict)


class _ErrorBody(msgspec.Struct):
    code: str
    message: str


class _Response(msgspec.Struct):
    ok: bool
    result: Any = None
    error: _ErrorBody | None = None


_decode_request = msgspec.json.Decoder(_Request).decode
_decode_response = msgspec.json.Decoder(_Response).decode
_encoder = msgspec.json.Encoder()


def _error_line(code: str, message: str) -> bytes:
    return _encoder.encode({"ok": False, "error": {"code": code, "message": message}}) + b"\n"


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """What the control socket allows a client (config `[control]`; seconds).

    - `read_timeout`: a request line must arrive whole within this long of its first byte,
      and its answer be read within this long;
    - `idle_timeout`: a connection without a request in progress is closed after this long;
    - `max_connections`: connections served at once; one more is answered with the error
      `busy` and closed.

    Either timeout is answered with the error `timeout` before the connection is closed. A
    request line is at most `MAX_LINE` bytes.
    """

    read_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_connections: int = 32

    @classmethod
    def of(cls, cfg: Config) -> Limits:
        return cls(
            read_timeout=cfg.control.seconds("read_timeout"),
            idle_timeout=cfg.control.seconds("idle_timeout"),
            max_connections=cfg.control.max_connections,
        )


class _Timeout(Exception):
    """The client took too long; the message says what it did not do."""


class ControlServer:
    """Serves control requests on a Unix socket, handing each to `handler(cmd, args)`."""

    def __init__(
        self, path: str, mode: int, handler: Handler, *, limits: Limits | None = None
    ) -> None:
        self.path = path
        self.mode = mode
        self.limits = limits or Limits()
        self._handler = handler
        self._open = 0  # connections being served
        self._refusals = logs.Throttle(10.0)

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on the socket, signal `task_status` once listening, and answer until
        cancelled; then close the listening socket and the open connections, and remove the
        socket file if it is still ours.

        Refuses (ConfigError, before `task_status.started()`) if a live daemon already
        listens there or something else than a socket is in the way; replaces a stale file.
        """
        path = Path(self.path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"control.socket: cannot create directory {path.parent}: {exc.strerror}"
            ) from exc
        await self._remove_stale()
        # asyncio accepts (and rides out errors such as EMFILE); each connection is queued
        # here and served in this method's task group, which owns it.
        accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
        accepted = asyncio.Queue()
        try:
            server = await asyncio.start_unix_server(
                lambda reader, writer: accepted.put_nowait((reader, writer)),
                path=self.path,
                limit=MAX_LINE,
            )
        except OSError as exc:
            raise ConfigError(f"control.socket: cannot listen on {self.path}: {exc}") from exc
        inode: int | None = None
        try:
            try:
                inode = os.stat(self.path).st_ino
                os.chmod(self.path, self.mode)
            except OSError as exc:
                raise ConfigError(f"control.socket: cannot listen on {self.path}: {exc}") from exc
            _log.debug("control_listening", path=self.path)
            async with anyio.create_task_group() as tg:
                task_status.started()
                while True:
                    reader, writer = await accepted.get()
                    if self._open >= self.limits.max_connections:
                        self._refuse(writer)
                        continue
                    self._open += 1
                    tg.start_soon(self._serve_connection, reader, writer)
        finally:
            server.close()
            while not accepted.empty():  # accepted, never served
                _, writer = accepted.get_nowait()
                writer.close()
            with anyio.CancelScope(shield=True):
                await server.wait_closed()
            if inode is not None:
                with contextlib.suppress(FileNotFoundError):
                    if os.stat(self.path).st_ino == inode:
                        os.unlink(self.path)

    async def _remove_stale(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"control.socket: {self.path} exists and is not a socket")
        try:
            # A connect that hangs means a listener with a full backlog: alive, not stale.
            async with asyncio.timeout(_PROBE_TIMEOUT):
                _, writer = await asyncio.open_unix_connection(self.path)
        except (ConnectionRefusedError, FileNotFoundError):
            # Nobody accepts: a daemon died without cleaning up.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return
        except TimeoutError:
            pass
        else:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        raise ConfigError(f"control.socket: another daemon already listens on {self.path}")

    def _refuse(self, writer: asyncio.StreamWriter) -> None:
        # Answered and closed at once: no task, no wait for the client.
        limit = self.limits.max_connections
        message = f"the daemon serves {limit} control connections at once (control.max_connections)"
        writer.write(_error_line("busy", f"{message}; try again later"))
        writer.close()
        held = self._refusals.due()
        if held is not None:
            _log.warning("control connections refused", max_connections=limit, suppressed=held)

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            await self._answer_lines(reader, writer)
        except _Timeout as exc:
            with contextlib.suppress(ConnectionError):
                writer.write(_error_line("timeout", f"{exc}; closing the connection"))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # The client went away; nothing to answer.
        finally:
            self._open -= 1
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _answer_lines(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        limits = self.limits
        while True:
            try:
                # The first byte under the idle timeout, the rest of the line under the read
                # timeout: a client that never sends, or sends a line a byte at a time, is
                # disconnected (`_Timeout`), so it cannot hold a connection for ever.
                async with _deadline(limits.idle_timeout, "no request"):
                    first = await reader.read(1)
                if not first:
                    return
                if first == b"\n":
                    continue
                async with _deadline(limits.read_timeout, "the request line was not whole"):
                    line = first + await reader.readline()
            except ValueError:
                # readline() turns a line over `limit` into ValueError.
                writer.write(_error_line("bad_request", f"request line exceeds {MAX_LINE} bytes"))
                await _drain(writer, limits.read_timeout)
                return
            if not line.strip():
                continue
            writer.write(await self._answer(line))
            await _drain(writer, limits.read_timeout)

    async def _answer(self, line: bytes) -> bytes:
        try:
            request = _decode_request(line)
        except msgspec.DecodeError as exc:
            return _error_line("bad_request", f"malformed request: {json_fault(line, exc)}")
        try:
            result = await self._handler(request.cmd, request.args)
            return _encoder.encode({"ok": True, "result": result}) + b"\n"
        except DripdError as exc:
            return _error_line(exc.code, exc.message)
        except Exception:  # noqa: BLE001 - the client gets a generic error, the log the traceback
            _log.exception("control_command_failed", cmd=request.cmd)
            return _error_line("internal", _INTERNAL_MESSAGE)


@contextlib.asynccontextmanager
async def _deadline(seconds: float, what: str) -> AsyncIterator[None]:
    """`_Timeout` ("<what> within <seconds>s") when the body takes longer than `seconds`."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise _Timeout(f"{what} within {seconds:g}s") from None


async def _drain(writer: asyncio.StreamWriter, seconds: float) -> None:
    async with _deadline(seconds, "the answer was not read"):
        await writer.drain()


async def request(
    path: str, cmd: str, args: dict[str, Any] | None = None, *, timeout: float = 10.0
) -> Any:
    """Send one command to the daemon listening on `path` and return its result.

    Raises ControlError when the daemon answers with an error, DripdError when no daemon
    answers.
    """
    payload = _encoder.encode({"cmd": cmd, "args": args or {}}) + b"\n"
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await _connect(path)
            try:
                writer.write(payload)
                await writer.drain()
                line = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except TimeoutError as exc:
        raise DripdError(f"the daemon on {path} did not answer within {timeout:g}s") from exc
    except ValueError as exc:
        raise DripdError(f"the answer from {path} is too long") from exc
    except OSError as exc:
        raise DripdError(f"control socket {path}: {exc.strerror or exc}") from exc
    if not line:
        raise DripdError(f"the daemon on {path} closed the connection without answering")
    try:
        response = _decode_response(line)
    except msgspec.DecodeError as exc:
        raise DripdError(f"malformed answer from {path}: {exc}") from exc
    if response.ok:
        return response.result
    if response.error is None:
        raise DripdError(f"malformed answer from {path}: error without details")
    raise ControlError(response.error.code, response.error.message)


async def _connect(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        return await asyncio.open_unix_connection(path, limit=_CLIENT_LIMIT)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise DripdError(
            f"no daemon is listening on {path} (is `dripd run` running? check control.socket)"
        ) from exc
    except PermissionError as exc:
        raise DripdError(
            f"permission denied on {path} (check control.mode and your user's groups)"
        ) from exc
