"""The `postgres` provider of the `pubsub` channel: each message is a Postgres `NOTIFY` on a
configured channel of dripd's own database, so any session there that ran `LISTEN
<channel>` hears it (https://www.postgresql.org/docs/current/sql-notify.html).

Adapter config:

    channel   the NOTIFY channel (required): a lower-case identifier of letters, digits
              and `_`, not starting with a digit, at most 63 bytes. Lower case because
              an unquoted `LISTEN MyChannel` listens on `mychannel`.
    timeout   seconds to get a connection and notify (default 10)

No credentials: it uses the daemon's database pool (`ChannelContext.pool`), one connection
per send, outside any transaction, so the notification is delivered at once.

The payload: the step's rendered `body` itself when it is a JSON object (byte for byte),
else the JSON document

    {"execution_id": "…", "to": "…", "subject": null, "text": null, "body": "<the body>",
     "metadata": {"enrollment_id": "…", "sequence_key": "…", "step_key": "…"}}

(`tenant_key` joins `metadata` for a tenant's enrollment). Postgres refuses a payload of
8000 bytes or more: such a message fails permanently. Notifications carry no id: the
receipt has none. No pool (a channel built outside the daemon) pauses the adapter; a
driver or connection error, or no connection in time, is transient for the whole adapter.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Mapping
from typing import Any, Final

import msgspec

from dripd.channels.base import (
    AdapterError,
    ChannelContext,
    Message,
    PermanentError,
    Receipt,
    TransientError,
)
from dripd.channels.http import check_timeout, json_object
from dripd.channels.spec import ProviderSpec
from dripd.errors import ConfigError
from dripd.model import Adapter

__all__ = ["MAX_PAYLOAD_BYTES", "SPEC", "PubsubChannel", "check", "from_adapter", "payload"]

#: Postgres's limit: a NOTIFY payload must be shorter than this, in bytes (server encoding
#: UTF-8), in the default configuration.
MAX_PAYLOAD_BYTES: Final = 8000
#: NAMEDATALEN - 1: the longest identifier Postgres keeps whole.
MAX_CHANNEL_BYTES: Final = 63

_CHANNEL = re.compile(r"[a-z_][a-z0-9_]*")
_SQL: Final = "SELECT pg_notify($1, $2)"


def check(config: Mapping[str, Any], credentials: Mapping[str, Any]) -> None:
    """Registry hook: ConfigError naming the key when `channel` or `timeout` is wrong."""
    channel = config.get("channel")
    if not isinstance(channel, str) or not _CHANNEL.fullmatch(channel):
        raise ConfigError(
            "adapter config `channel` must be a lower-case Postgres identifier: letters, "
            "digits and `_`, not starting with a digit (e.g. dripd_messages)"
        )
    if len(channel.encode()) > MAX_CHANNEL_BYTES:
        raise ConfigError(f"adapter config `channel` is longer than {MAX_CHANNEL_BYTES} bytes")
    check_timeout(config)


def from_adapter(adapter: Adapter, context: ChannelContext | None = None) -> PubsubChannel:
    """Registry factory: the channel of a validated adapter."""
    return PubsubChannel(adapter, context)


def payload(message: Message) -> str:
    """The NOTIFY payload for `message` (see the module docstring); PermanentError when it
    is MAX_PAYLOAD_BYTES or longer."""
    body = message.body
    if body is not None and json_object(body) is not None:
        text = body
    else:
        document = {
            "execution_id": str(message.execution_id),
            "to": message.to,
            "subject": message.subject,
            "text": message.text,
            "body": body,
            "metadata": dict(message.metadata),
        }
        text = msgspec.json.encode(document).decode()
    size = len(text.encode())
    if size >= MAX_PAYLOAD_BYTES:
        raise PermanentError(
            f"postgres: the NOTIFY payload is {size} bytes; Postgres takes fewer than "
            f"{MAX_PAYLOAD_BYTES}"
        )
    return text


def _driver_errors(pool: Any) -> tuple[type[Exception], ...]:
    """What the pool's driver raises when the database or the connection fails: OSError,
    TimeoutError, and asyncpg's `PostgresError` and `InterfaceError`, found in the package
    the pool's class comes from. dripd.channels imports no database driver (the import
    contracts keep asyncpg out of what the pipeline imports): it uses the pool it is given."""
    found: list[type[Exception]] = [OSError, TimeoutError]
    package = sys.modules.get(type(pool).__module__.partition(".")[0])
    for name in ("PostgresError", "InterfaceError"):
        error = getattr(package, name, None)
        if isinstance(error, type) and issubclass(error, Exception):
            found.append(error)
    return tuple(found)


class PubsubChannel:
    """NOTIFYs each message on the adapter's `channel` (see the module docstring)."""

    provider = "postgres"

    def __init__(self, adapter: Adapter, context: ChannelContext | None = None) -> None:
        self.adapter = adapter
        self.channel = str(adapter.config["channel"])
        self.timeout = float(adapter.config.get("timeout", 10.0))
        self._pool = (context or ChannelContext()).pool
        self._errors = _driver_errors(self._pool)

    def __repr__(self) -> str:
        return f"PubsubChannel({self.adapter.name!r}, {self.channel})"

    async def send(self, message: Message) -> Receipt:
        """`pg_notify(channel, payload)` on a connection of the pool; a Receipt without id.

        Raises PermanentError for a payload over the limit, AdapterError without a pool,
        TransientError(provider_wide) when the database fails or gives no connection in
        `timeout` seconds.
        """
        text = payload(message)
        if self._pool is None:
            raise AdapterError("the postgres provider needs the daemon's database pool")
        try:
            async with asyncio.timeout(self.timeout):
                async with self._pool.acquire() as connection:
                    await connection.execute(_SQL, self.channel, text)
        except TimeoutError as exc:
            raise TransientError(
                f"postgres: no connection or answer within {self.timeout:g} s",
                provider_wide=True,
            ) from exc
        except self._errors as exc:
            sqlstate = getattr(exc, "sqlstate", None)
            code = f" [{sqlstate}]" if isinstance(sqlstate, str) else ""
            raise TransientError(
                f"postgres: NOTIFY failed: {type(exc).__name__}{code}: {str(exc)[:200]}",
                provider_wide=True,
            ) from exc
        return Receipt()

    async def aclose(self) -> None:
        """Nothing to release: the pool is the daemon's."""


SPEC = ProviderSpec(
    name="postgres",
    channels=frozenset({"pubsub"}),
    config_keys=frozenset({"channel", "timeout"}),
    required_config=frozenset({"channel"}),
    credential_keys=frozenset(),
    required_credentials=frozenset(),
    factory=from_adapter,
    check=check,
)
