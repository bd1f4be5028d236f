"""Shared parts of the provider tests: an `httpx.MockTransport` that records each request
and answers from a script, and builders for adapters and messages.

A provider test builds its channel through the registry, as the daemon does:

    mock = Mock(Answer(200, json={"MessageID": "m-1", "ErrorCode": 0}))
    channel = build("postmark", "email", {"from": "a@x.example"}, {"server_token": "t"}, mock)
    receipt = await channel.send(message())
    request = mock.requests[0]   # method, url, headers, content, as sent
    assert json_of(request)["From"] == "a@x.example"
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any
from urllib.parse import parse_qs

import httpx

from dripd.channels import registry
from dripd.channels.base import ChannelContext, Message, RedactedChannel
from dripd.model import Adapter

__all__ = [
    "EXECUTION",
    "Answer",
    "Endless",
    "Mock",
    "Trickle",
    "body_message",
    "build",
    "form_of",
    "json_of",
    "make_adapter",
    "message",
    "mime_message",
]

EXECUTION = uuid.UUID("0193c1d2-0000-7000-8000-000000000001")


@dataclass(frozen=True)
class Answer:
    """One scripted answer: status, and a JSON body, raw content, text or a body streamed
    (`Trickle`, `Endless`), and headers."""

    status: int = 200
    json: Any = None
    content: bytes | None = None
    text: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    stream: httpx.AsyncByteStream | None = None

    def response(self, request: httpx.Request) -> httpx.Response:
        if self.stream is not None:
            return httpx.Response(
                self.status, stream=self.stream, headers=dict(self.headers), request=request
            )
        if self.json is not None:
            return httpx.Response(
                self.status, json=self.json, headers=dict(self.headers), request=request
            )
        if self.text is not None:
            return httpx.Response(
                self.status, text=self.text, headers=dict(self.headers), request=request
            )
        return httpx.Response(
            self.status, content=self.content or b"", headers=dict(self.headers), request=request
        )


class Trickle(httpx.AsyncByteStream):
    """An answer's body that never ends in practice: `chunk` every `pause` seconds, at most
    `count` times (a server trickling its answer to hold a send open)."""

    def __init__(self, chunk: bytes = b" ", *, pause: float = 0.02, count: int = 100_000) -> None:
        self.chunk, self.pause, self.count = chunk, pause, count
        #: Bytes handed out so far.
        self.sent = 0
        #: Whether the reader closed it.
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.count):
            self.sent += len(self.chunk)
            yield self.chunk
            await asyncio.sleep(self.pause)

    async def aclose(self) -> None:
        self.closed = True


class Endless(httpx.AsyncByteStream):
    """An answer's body of `total` bytes made as it is read, `chunk` bytes at a time (a huge
    answer that costs the test no memory); `sent` says how much was read."""

    def __init__(self, total: int, *, chunk: int = 64 * 1024, fill: bytes = b"x") -> None:
        self.total, self.chunk, self.fill = total, chunk, fill
        self.sent = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while self.sent < self.total:
            size = min(self.chunk, self.total - self.sent)
            self.sent += size
            yield (self.fill * size)[:size]


class Mock(httpx.MockTransport):
    """Records every request; answers with the scripted answers in turn (the last one
    repeats), or with `handler(request)`, or raises the scripted exception."""

    def __init__(
        self,
        *answers: Answer | BaseException,
        handler: Callable[[httpx.Request], httpx.Response] | None = None,
    ) -> None:
        self.requests: list[httpx.Request] = []
        self._answers = list(answers) or [Answer()]
        self._handler = handler
        super().__init__(self._handle)

    def _handle(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        if self._handler is not None:
            return self._handler(request)
        answer = self._answers.pop(0) if len(self._answers) > 1 else self._answers[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer.response(request)

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]


def make_adapter(
    provider: str,
    channel: str,
    config: Mapping[str, Any] | None = None,
    credentials: Mapping[str, Any] | None = None,
    *,
    name: str = "a1",
    tenant: str | None = None,
) -> Adapter:
    return Adapter(
        id=uuid.UUID("0193c1d2-0000-7000-8000-0000000000ad"),
        tenant_key=tenant,
        name=name,
        channel=channel,
        provider=provider,
        config=dict(config or {}),
        credentials=dict(credentials or {}),
        is_default=True,
        enabled=True,
    )


def build(
    provider: str,
    channel: str,
    config: Mapping[str, Any] | None,
    credentials: Mapping[str, Any] | None,
    transport: httpx.AsyncBaseTransport | None,
    **context: Any,
) -> RedactedChannel:
    """The adapter's channel as the daemon builds it (validated, redacted, batched)."""
    return registry.build(
        make_adapter(provider, channel, config, credentials),
        ChannelContext(transport=transport, **context),
    )


def message(**fields: Any) -> Message:
    """A rendered message; any field may be overridden."""
    values: dict[str, Any] = {
        "execution_id": EXECUTION,
        "idempotency_key": f"{EXECUTION}:0",
        "message_id": f"<{EXECUTION}.0@dripd.example>",
        "channel": "email",
        "to": "ana@example.org",
        "subject": "Welcome",
        "text": "Hi Ana",
    }
    values.update(fields)
    return Message(**values)


def body_message(channel: str, to: str, body: str, /, **fields: Any) -> Message:
    """A message as a chat, SMS, WhatsApp or webhook step renders it: a `body`, no subject
    and no text; any field may be overridden (`body`, `to` and `channel` too)."""
    values: dict[str, Any] = {
        "channel": channel,
        "to": to,
        "subject": None,
        "text": None,
        "body": body,
    }
    values.update(fields)
    return message(**values)


def json_of(request: httpx.Request) -> Any:
    """The request's JSON body."""
    return json.loads(request.content)


def form_of(request: httpx.Request) -> dict[str, list[str]]:
    """The request's form body, each field with all its values."""
    return parse_qs(request.content.decode(), keep_blank_values=True, strict_parsing=True)


def mime_message(data: bytes) -> EmailMessage:
    """The MIME message `data` holds (a message dripd composed, as the provider got it)."""
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed
