"""What the daemon does with a provider's answer: an adapter refused as a whole is paused
and its message waits; a provider's Retry-After is honoured; a step's `from`, `reply_to`
and `headers` reach the provider. A scripted provider stands in for a real one."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest
from support import add_adapter, apply_text, executions, running_daemon, wait_for

from dripd import api
from dripd.channels import registry
from dripd.channels.base import (
    AdapterError,
    ChannelError,
    Message,
    PermanentError,
    Receipt,
    TransientError,
)
from dripd.channels.spec import ProviderSpec
from dripd.clock import ManualClock
from dripd.control import request

SCRIPT: list[ChannelError | None] = []
SEEN: list[Message] = []


class _Scripted:
    """Answers each send with the next scripted error, or accepts it (None, or no script)."""

    provider = "scripted"
    message_id: str | None = None  # the provider message id to answer (else s-<id>)

    async def send(self, message: Message) -> Receipt:
        SEEN.append(message)
        error = SCRIPT.pop(0) if SCRIPT else None
        if error is not None:
            raise error
        return Receipt(provider_message_id=self.message_id or f"s-{message.execution_id}")

    async def aclose(self) -> None:
        pass


@pytest.fixture(autouse=True)
def _scripted() -> Iterator[None]:
    registry.register(
        ProviderSpec(
            name="scripted",
            channels=None,
            config_keys=frozenset(),
            required_config=frozenset(),
            credential_keys=frozenset(),
            required_credentials=frozenset(),
            factory=lambda adapter, context: _Scripted(),
        ),
        replace=True,
    )
    SCRIPT.clear()
    SEEN.clear()
    yield
    registry._providers.pop("scripted", None)


MAIL = """
[sequence]
key = "mail"
[[steps]]
key = "hello"
channel = "email"
subject = "Hello {{ name }}"
text = "Hi"
from = "{{ owner }} <{{ owner_email }}>"
reply_to = "help@example.com"
headers = { "X-Campaign" = "spring-{{ name }}", "Precedence" = "bulk" }
"""


async def _start(pool: asyncpg.Pool, clock: ManualClock, **data: str) -> uuid.UUID:
    await apply_text(pool, MAIL)
    await add_adapter(pool, name="s", channel="email", provider="scripted", config={})
    values = {
        "email": "ana@example.org",
        "name": "Ana",
        "owner": "Bo",
        "owner_email": "bo@x.example",
    }
    enrollment = await api.enroll(
        pool,
        tenant=None,
        sequence_key="mail",
        subscriber_id="ana",
        data=values | data,
        now=clock.now(),
    )
    return enrollment.id


async def _settled(
    pool: asyncpg.Pool, status: str, reason: str | None = None
) -> asyncpg.Record | None:
    rows = await executions(pool)
    row = rows[-1] if rows else None
    if row is None or row["status"] != status or (reason and row["reason"] != reason):
        return None
    return row


async def test_the_steps_sender_reply_to_and_headers_reach_the_provider(
    dsn: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    clock = ManualClock()
    await _start(pool, clock)
    async with running_daemon(dsn, tmp_path, clock=clock):
        await wait_for(lambda: _settled(pool, "sent"))
    [message] = SEEN
    assert message.sender == '"Bo" <bo@x.example>'
    assert message.reply_to == "help@example.com"
    assert message.headers["X-Campaign"] == "spring-Ana"
    assert message.headers["Precedence"] == "bulk"
    row = (await executions(pool))[-1]
    assert row["provider_message_id"] == f"s-{row['id']}"


async def test_a_rendered_from_that_is_no_address_fails_the_step_naming_it(
    dsn: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    clock = ManualClock()
    await _start(pool, clock, owner_email="nobody")
    async with running_daemon(dsn, tmp_path, clock=clock):
        row = await wait_for(lambda: _settled(pool, "failed"))
    assert "from" in row["last_error"]
    assert SEEN == []


async def test_an_adapter_refused_by_its_provider_is_paused_and_its_message_waits(
    dsn: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    clock = ManualClock()
    SCRIPT.append(AdapterError("scripted: HTTP 401: invalid token"))
    await _start(pool, clock)
    async with running_daemon(dsn, tmp_path, clock=clock) as daemon:
        row = await wait_for(lambda: _settled(pool, "scheduled", "adapter_paused"))
        assert row["attempt"] == 0  # no attempt spent
        assert "invalid token" in row["last_error"]
        reason = await pool.fetchval("SELECT paused_reason FROM dripd.channel_adapters")
        assert reason == "provider refused the adapter: scripted: HTTP 401: invalid token"
        # Nothing is claimed while paused; the row waits (its own retry is 5 minutes off).
        clock.advance(timedelta(minutes=1))
        assert daemon.worker is not None
        daemon.worker.wake()
        await wait_for(lambda: daemon.worker is not None and daemon.worker.idle)
        assert len(SEEN) == 1
        # Resumed, the row the pause deferred goes out at once, not at its retry time.
        await request(str(tmp_path / "control.sock"), "resume-adapter", {"name": "s"})
        await wait_for(lambda: _settled(pool, "sent"))
    assert len(SEEN) == 2


@pytest.mark.parametrize("provider_wide", [False, True])
async def test_the_providers_retry_after_is_honoured(
    dsn: str, pool: asyncpg.Pool, tmp_path: Path, provider_wide: bool
) -> None:
    clock = ManualClock()
    SCRIPT.append(TransientError("scripted: 429", provider_wide=provider_wide, retry_after=3600))
    await _start(pool, clock)
    async with running_daemon(dsn, tmp_path, clock=clock):
        reason = "provider_unavailable" if provider_wide else "retry"
        row = await wait_for(lambda: _settled(pool, "scheduled", reason))
    assert row["due_at"] - clock.now() >= timedelta(seconds=3600)
    assert row["attempt"] == (0 if provider_wide else 1)


async def test_a_suppressing_refusal_fails_the_step_and_suppresses(
    dsn: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    clock = ManualClock()
    SCRIPT.append(PermanentError("scripted: inactive recipient", bounce=True))
    await _start(pool, clock)
    async with running_daemon(dsn, tmp_path, clock=clock):
        await wait_for(lambda: _settled(pool, "failed"))
    assert (
        await pool.fetchval("SELECT address FROM dripd.suppressions WHERE reason = 'bounce'")
        == "ana@example.org"
    )


WHATSAPP = """
[sequence]
key = "wa"
[[steps]]
key = "order"
channel = "whatsapp"
[steps.whatsapp_template]
name = "order_update"
language = "en_US"
params = ["{{ name }}", "#{{ order }}"]
"""


async def test_a_whatsapp_template_reaches_the_provider_rendered(
    dsn: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    clock = ManualClock()
    await apply_text(pool, WHATSAPP)
    await add_adapter(pool, name="w", channel="whatsapp", provider="scripted", config={})
    await api.enroll(
        pool,
        tenant=None,
        sequence_key="wa",
        subscriber_id="ana",
        data={"phone": "+15555550100", "name": "Ana", "order": 42},
        now=clock.now(),
    )
    async with running_daemon(dsn, tmp_path, clock=clock):
        await wait_for(lambda: _settled(pool, "sent"))
    [message] = SEEN
    assert message.body is None
    assert message.metadata["template_name"] == "order_update"
    assert message.metadata["template_language"] == "en_US"
    assert json.loads(message.metadata["template_params"]) == ["Ana", "#42"]


@pytest.mark.parametrize("answer", ["error", "receipt"])
async def test_what_a_provider_said_is_recorded_even_when_postgres_could_not_store_it(
    dsn: str, pool: asyncpg.Pool, tmp_path: Path, answer: str
) -> None:
    # A NUL in an echoed error or a message id made the record fail: the row ran (and
    # was sent) again after its lease.
    clock = ManualClock()
    if answer == "error":
        SCRIPT.append(PermanentError("scripted: 550 no such user \x00\ud800"))
    else:
        _Scripted.message_id = "id\x00\udc00"
    try:
        await _start(pool, clock)
        async with running_daemon(dsn, tmp_path, clock=clock):
            status = "failed" if answer == "error" else "sent"
            row = await wait_for(lambda: _settled(pool, status))
    finally:
        _Scripted.message_id = None
    if answer == "error":
        assert row["last_error"] == "permanent: scripted: 550 no such user \ufffd\ufffd"
    else:
        assert row["provider_message_id"] == "id\ufffd\ufffd"
    assert len(SEEN) == 1  # sent once
