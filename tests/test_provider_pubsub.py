"""The postgres pubsub provider against a real Postgres: a listener on another connection
hears each message as a NOTIFY payload (postgresql.org/docs/current/sql-notify.html: the
payload must be shorter than 8000 bytes), and failures map onto dripd's errors."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from httpmock import EXECUTION, body_message, build

from dripd.channels import registry
from dripd.channels.base import AdapterError, PermanentError, TransientError
from dripd.errors import ConfigError

CHANNEL = "dripd_messages"
META = {"enrollment_id": "e-1", "sequence_key": "welcome", "step_key": "tell"}


@pytest.fixture
async def db_pool(server_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(server_dsn, min_size=1, max_size=2)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def heard(server_dsn: str) -> AsyncIterator[asyncio.Queue[tuple[str, str]]]:
    """(channel, payload) of every notification on CHANNEL, heard on a second connection."""
    queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    listener = await asyncpg.connect(server_dsn)

    def hear(_conn: Any, _pid: int, channel: str, payload: str) -> None:
        queue.put_nowait((channel, payload))

    await listener.add_listener(CHANNEL, hear)
    try:
        yield queue
    finally:
        await listener.close()


def pubsub_message(**fields: Any) -> Any:
    return body_message("pubsub", "sub-42", "Ana signed up", **{"metadata": META, **fields})


def channel(pool: Any, config: dict[str, Any] | None = None) -> Any:
    return build("postgres", "pubsub", config or {"channel": CHANNEL}, {}, None, pool=pool)


async def next_heard(queue: asyncio.Queue[tuple[str, str]]) -> tuple[str, str]:
    # A bound on a wait that normally ends at once, not a sleep.
    return await asyncio.wait_for(queue.get(), 10)


async def test_a_listener_hears_the_message_document(
    db_pool: asyncpg.Pool, heard: asyncio.Queue[tuple[str, str]]
) -> None:
    ch = channel(db_pool)
    receipt = await ch.send(pubsub_message())
    await ch.aclose()
    name, payload = await next_heard(heard)
    assert name == CHANNEL
    assert json.loads(payload) == {
        "execution_id": str(EXECUTION),
        "to": "sub-42",
        "subject": None,
        "text": None,
        "body": "Ana signed up",
        "metadata": META,
    }
    assert receipt.provider_message_id is None


async def test_every_field_and_a_json_object_body(
    db_pool: asyncpg.Pool, heard: asyncio.Queue[tuple[str, str]]
) -> None:
    ch = channel(db_pool, {"channel": CHANNEL, "timeout": 5})
    meta = {**META, "tenant_key": "acme"}
    await ch.send(pubsub_message(subject="Hi", text="plain", metadata=meta))
    rendered = '{"event": "lead.created",  "name": "Ana ü"}'
    await ch.send(pubsub_message(body=rendered))
    await ch.aclose()
    _, first = await next_heard(heard)
    assert json.loads(first) == {
        "execution_id": str(EXECUTION),
        "to": "sub-42",
        "subject": "Hi",
        "text": "plain",
        "body": "Ana signed up",
        "metadata": meta,
    }
    _, second = await next_heard(heard)
    assert second == rendered  # byte for byte


async def test_the_payload_limit_is_postgres_own(
    db_pool: asyncpg.Pool, heard: asyncio.Queue[tuple[str, str]]
) -> None:
    ch = channel(db_pool)
    head = '{"x": "'
    largest = head + "a" * (7999 - len(head) - 2) + '"}'
    assert len(largest.encode()) == 7999
    too_long = head + "ü" * 4000 + '"}'  # 2 bytes each: over the limit in bytes
    with pytest.raises(PermanentError) as caught:
        await ch.send(pubsub_message(body=too_long))
    assert "payload is 8009 bytes; Postgres takes fewer than 8000" in str(caught.value)
    await ch.send(pubsub_message(body=largest))
    await ch.aclose()
    assert await next_heard(heard) == (CHANNEL, largest)
    # Postgres itself refuses one byte more: the limit is not ours.
    async with db_pool.acquire() as conn:
        with pytest.raises(asyncpg.InvalidParameterValueError, match="payload string too long"):
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, largest[:-2] + 'a"}')


async def test_no_pool_pauses_the_adapter() -> None:
    ch = channel(None)
    with pytest.raises(AdapterError, match="needs the daemon's database pool"):
        await ch.send(pubsub_message())
    await ch.aclose()


async def test_a_closed_pool_is_transient(server_dsn: str) -> None:
    pool = await asyncpg.create_pool(server_dsn, min_size=1, max_size=1)
    await pool.close()
    ch = channel(pool)
    with pytest.raises(TransientError) as caught:
        await ch.send(pubsub_message())
    await ch.aclose()
    assert caught.value.provider_wide
    assert str(caught.value).startswith("postgres: NOTIFY failed: InterfaceError")


async def test_a_database_that_refuses_connections_is_transient() -> None:
    # Nothing listens on port 1: the pool's first connection attempt is refused.
    pool = await asyncpg.create_pool("postgresql://postgres@127.0.0.1:1/dripd", min_size=0)
    try:
        ch = channel(pool)
        with pytest.raises(TransientError) as caught:
            await ch.send(pubsub_message())
        await ch.aclose()
        assert caught.value.provider_wide
        assert str(caught.value).startswith("postgres: NOTIFY failed: ConnectionRefusedError")
    finally:
        await pool.close()


async def test_no_connection_in_time_is_transient(db_pool: asyncpg.Pool) -> None:
    ch = channel(db_pool, {"channel": CHANNEL, "timeout": 0.05})
    held = [await db_pool.acquire(), await db_pool.acquire()]
    try:
        with pytest.raises(TransientError) as caught:
            await ch.send(pubsub_message())
    finally:
        for conn in held:
            await db_pool.release(conn)
    await ch.aclose()
    assert caught.value.provider_wide
    assert str(caught.value) == "postgres: no connection or answer within 0.05 s"


@pytest.mark.parametrize(
    ("config", "text"),
    [
        ({}, "adapter config key 'channel' is required"),
        ({"channel": ""}, "config `channel` must be a lower-case Postgres identifier"),
        ({"channel": "Dripd"}, "lower-case"),
        ({"channel": "1st"}, "not starting with a digit"),
        ({"channel": "a-b"}, "letters, digits and `_`"),
        ({"channel": 'x"; DROP'}, "lower-case Postgres identifier"),
        ({"channel": 7}, "lower-case Postgres identifier"),
        ({"channel": "a" * 64}, "config `channel` is longer than 63 bytes"),
        ({"channel": CHANNEL, "timeout": 0}, "config `timeout`"),
        ({"channel": CHANNEL, "url": "x"}, "'url' is not known"),
    ],
)
def test_config_errors_name_the_key(config: dict[str, Any], text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        registry.validate("pubsub", "postgres", config, {})
    assert text in str(caught.value)


def test_the_longest_channel_name_and_the_channel_served() -> None:
    registry.validate("pubsub", "postgres", {"channel": "a" * 63}, {})
    with pytest.raises(ConfigError, match="does not serve channel 'webhook'"):
        registry.validate("webhook", "postgres", {"channel": CHANNEL}, {})
    with pytest.raises(ConfigError, match="credentials key 'password' is not known"):
        registry.validate("pubsub", "postgres", {"channel": CHANNEL}, {"password": "x"})
