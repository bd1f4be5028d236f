"""Shared parts of the provider tests: an `httpx.MockTransport` that records each request
and answers from a script, and builders for adapters and messages.

A provider test builds its channel through the registry, as the daemon does:

    mock = Mock(Answer(200, json={"MessageID": "m-1", "ErrorCode": 0}))
    channel = build("postmark", "email", {"from": "a@x.example"}, {"server_token": "t"}, mock)
    receipt = await channel.send(message())
    request = mock.requests[0]   # method, url, headers, content, as sent
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from dripd.channels import registry
from dripd.channels.base import ChannelContext, Message, RedactedChannel
from dripd.model import Adapter

__all__ = ["Answer", "Mock", "build", "make_adapter", "message"]

EXECUTION = uuid.UUID("0193c1d2-0000-7000-8000-000000000001")


@dataclass(frozen=True)
class Answer:
    """One scripted answer: status, and a JSON body, raw content or text, and headers."""

    status: int = 200
    json: Any = None
    content: bytes | None = None
    text: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    def response(self, request: httpx.Request) -> httpx.Response:
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
