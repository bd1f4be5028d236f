"""A local stand-in for Postmark's email API, for the `http` phase of bench/throughput.py.

    .venv/bin/python bench/stub_provider.py --token T     # prints `ready <port>`

It runs in its own process, so its CPU is not the daemon's, and answers HTTP/1.1 with
keep-alive (a connection stays open until the client closes it or sends
`Connection: close`):

    POST /email/batch   a JSON array; 200 with one
                        {"ErrorCode": 0, "Message": "OK", "MessageID": <uuid>, "To": …,
                         "SubmittedAt": …} per element, in order
    POST /email         one such object for one message
    anything else       404

A request without the header `X-Postmark-Server-Token: <token>` gets Postmark's 401
(ErrorCode 10) and counts as refused: the bench checks that the daemon decrypted the
adapter's credentials.

Commands on stdin, one a line: `stats` prints `stats {json}` (connections accepted,
requests, batch and single requests, messages, refused, malformed, and this process's CPU
seconds, user + sys);
`stop` or end of input stops the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import threading
import uuid
from datetime import UTC, datetime
from typing import Any

import msgspec

_ENCODE = msgspec.json.Encoder().encode
_DECODE = msgspec.json.Decoder().decode
_MAX_HEAD = 65_536


class Stats:
    __slots__ = (
        "batches",
        "connections",
        "malformed",
        "messages",
        "refused",
        "requests",
        "singles",
    )

    def __init__(self) -> None:
        self.connections = self.requests = self.batches = self.singles = 0
        self.messages = self.refused = self.malformed = 0

    def as_dict(self) -> dict[str, Any]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "connections": self.connections,
            "requests": self.requests,
            "batches": self.batches,
            "singles": self.singles,
            "messages": self.messages,
            "refused": self.refused,
            "malformed": self.malformed,
            "cpu_seconds": usage.ru_utime + usage.ru_stime,
        }


def _accepted(element: Any, submitted: str) -> dict[str, Any]:
    to = element.get("To") if isinstance(element, dict) else None
    return {
        "ErrorCode": 0,
        "Message": "OK",
        "MessageID": str(uuid.uuid4()),
        "To": to,
        "SubmittedAt": submitted,
    }


def _response(status: str, body: bytes, *, close: bool) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n" + ("Connection: close\r\n" if close else "") + "\r\n"
    )
    return head.encode("ascii") + body


class PostmarkStub(asyncio.Protocol):
    """One client connection: parses pipelined HTTP/1.1 requests with a Content-Length."""

    def __init__(self, token: bytes, stats: Stats) -> None:
        self._token = token
        self._stats = stats
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._stats.connections += 1

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while self._transport is not None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > _MAX_HEAD:
                    self._fail()
                return
            lines = bytes(self._buffer[:end]).split(b"\r\n")
            headers: dict[bytes, bytes] = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            try:
                length = int(headers.get(b"content-length", b"0"))
            except ValueError:
                self._fail()
                return
            if len(self._buffer) < end + 4 + length:
                return
            body = bytes(self._buffer[end + 4 : end + 4 + length])
            del self._buffer[: end + 4 + length]
            parts = lines[0].split(b" ")
            close = headers.get(b"connection", b"").lower() == b"close"
            self._transport.write(self._handle(parts, headers, body, close=close))
            if close:
                self._transport.close()
                self._transport = None

    def _handle(
        self, parts: list[bytes], headers: dict[bytes, bytes], body: bytes, *, close: bool
    ) -> bytes:
        stats = self._stats
        stats.requests += 1
        if len(parts) != 3 or parts[0] != b"POST" or parts[1] not in (b"/email", b"/email/batch"):
            return _response("404 Not Found", b'{"ErrorCode":404,"Message":"no"}', close=close)
        if headers.get(b"x-postmark-server-token") != self._token:
            stats.refused += 1
            answer = b'{"ErrorCode":10,"Message":"Bad or missing Server API token."}'
            return _response("401 Unauthorized", answer, close=close)
        try:
            payload = _DECODE(body)
        except msgspec.DecodeError:
            payload = None
        submitted = datetime.now(UTC).isoformat()
        if parts[1] == b"/email/batch" and isinstance(payload, list):
            stats.batches += 1
            stats.messages += len(payload)
            answer = _ENCODE([_accepted(element, submitted) for element in payload])
        elif parts[1] == b"/email" and isinstance(payload, dict):
            stats.singles += 1
            stats.messages += 1
            answer = _ENCODE(_accepted(payload, submitted))
        else:
            stats.malformed += 1
            return _response(
                "422 Unprocessable Entity",
                b'{"ErrorCode":402,"Message":"Received invalid JSON input."}',
                close=close,
            )
        return _response("200 OK", answer, close=close)

    def _fail(self) -> None:
        self._stats.malformed += 1
        if self._transport is not None:
            self._transport.write(_response("400 Bad Request", b"{}", close=True))
            self._transport.close()
            self._transport = None


async def serve(token: str, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stats = Stats()
    stop = asyncio.Event()
    server = await loop.create_server(
        lambda: PostmarkStub(token.encode(), stats), host, port, backlog=1024
    )
    bound = server.sockets[0].getsockname()[1]

    def say(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def read_commands() -> None:
        for line in sys.stdin:
            word = line.strip()
            if word == "stats":
                loop.call_soon_threadsafe(lambda: say("stats " + json.dumps(stats.as_dict())))
            elif word == "stop":
                break
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=read_commands, daemon=True).start()
    say(f"ready {bound}")
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--token", required=True, help="the server token requests must carry")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="default: any free port")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.token, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
