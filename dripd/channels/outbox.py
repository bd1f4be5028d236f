"""The `outbox` provider: appends each message as one JSON line to a file, for any channel."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec

from dripd.channels.base import ChannelContext, Message, Receipt, TransientError
from dripd.channels.spec import ProviderSpec
from dripd.clock import Clock, SystemClock
from dripd.errors import ConfigError
from dripd.model import Adapter

__all__ = ["OutboxChannel", "OutboxSettings", "check", "encode_line", "from_adapter"]

_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
_MODE = 0o640


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxSettings:
    path: Path

    @classmethod
    def parse(cls, config: Mapping[str, Any], credentials: Mapping[str, Any]) -> OutboxSettings:
        """Read and check the adapter config; ConfigError names the offending key."""
        path = config.get("path")
        if not isinstance(path, str) or not path.strip():
            raise ConfigError("outbox adapter config `path` must be a non-empty string")
        return cls(path=Path(path).expanduser())


def check(config: Mapping[str, Any], credentials: Mapping[str, Any]) -> None:
    """Registry hook: raise ConfigError if these maps are not a valid `outbox` adapter."""
    OutboxSettings.parse(config, credentials)


def from_adapter(adapter: Adapter, context: ChannelContext | None = None) -> OutboxChannel:
    """Registry factory; the file is opened on each send, so rotating it is safe."""
    return OutboxChannel(OutboxSettings.parse(adapter.config, adapter.credentials))


def encode_line(message: Message, *, sent_at: datetime) -> bytes:
    """One JSON object and a newline, with the message's None fields left out."""
    record: dict[str, Any] = {
        "execution_id": message.execution_id,
        "idempotency_key": message.idempotency_key,
        "message_id": message.message_id,
        "channel": message.channel,
        "to": message.to,
        "to_name": message.to_name,
        "subject": message.subject,
        "text": message.text,
        "html": message.html,
        "body": message.body,
        "sender": message.sender,
        "headers": dict(message.headers),
        "metadata": dict(message.metadata),
        "sent_at": sent_at,
    }
    return msgspec.json.encode({k: v for k, v in record.items() if v is not None}) + b"\n"


class OutboxChannel:
    """Appends messages to a JSON-lines file that several daemons may share."""

    provider = "outbox"

    def __init__(self, settings: OutboxSettings, *, clock: Clock | None = None) -> None:
        self._path = settings.path
        self._clock = clock or SystemClock()

    def __repr__(self) -> str:
        return f"OutboxChannel({str(self._path)!r})"

    async def send(self, message: Message) -> Receipt:
        """Append `message` as one line; TransientError if the file cannot take it."""
        line = encode_line(message, sent_at=self._clock.now())
        await asyncio.to_thread(self._append, line)
        return Receipt(provider_message_id=f"outbox:{message.idempotency_key}")

    async def aclose(self) -> None:
        """Nothing is held open between sends."""

    def _append(self, line: bytes) -> None:
        try:
            try:
                fd = os.open(self._path, _FLAGS, _MODE)
            except FileNotFoundError:
                self._path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self._path, _FLAGS, _MODE)
            try:
                # One write on an O_APPEND descriptor lands whole at the end of the file,
                # so lines from concurrent writers and other processes never interleave.
                written = os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            # The file or its disk fails every message alike (no space, no permission,
            # a read-only mount): the adapter's circuit breaker takes it, not the message.
            raise TransientError(
                f"outbox {self._path}: cannot append: {reason}", provider_wide=True
            ) from exc
        if written != len(line):
            raise TransientError(
                f"outbox {self._path}: short write ({written} of {len(line)} bytes); "
                "the file may be full",
                provider_wide=True,
            )


SPEC = ProviderSpec(
    name="outbox",
    channels=None,
    config_keys=frozenset({"path"}),
    required_config=frozenset({"path"}),
    credential_keys=frozenset(),
    required_credentials=frozenset(),
    factory=from_adapter,
    check=check,
)
