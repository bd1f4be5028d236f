"""The outbox provider: one whole JSON line per message, even with many writers."""

from __future__ import annotations

import asyncio
import datetime as dt
import stat
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest

from dripd.channels import registry
from dripd.channels.base import Message, RedactedChannel, TransientError
from dripd.channels.outbox import OutboxChannel, OutboxSettings
from dripd.clock import ManualClock
from dripd.model import Adapter


def make_message(n: int = 0, **overrides: Any) -> Message:
    execution_id = uuid.uuid4()
    values: dict[str, Any] = {
        "execution_id": execution_id,
        "idempotency_key": f"{execution_id}:{n}",
        "message_id": f"<{execution_id}.{n}@dripd.local>",
        "channel": "sms",
        "to": "+4915112345678",
        "body": f"Need a hand? ({n})",
        "metadata": {"tenant_key": "acme", "step_key": "nudge"},
    }
    values.update(overrides)
    return Message(**values)


def outbox(path: Path, clock: ManualClock | None = None) -> OutboxChannel:
    return OutboxChannel(OutboxSettings.parse({"path": str(path)}, {}), clock=clock)


def read_lines(path: Path) -> list[dict[str, Any]]:
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    return [msgspec.json.decode(line) for line in raw.splitlines()]


async def test_each_send_appends_one_line_without_none_fields(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "outbox.jsonl"
    clock = ManualClock(dt.datetime(2026, 1, 5, 12, 0, tzinfo=dt.UTC))
    channel = outbox(path, clock)
    first, second = make_message(0), make_message(1, channel="email", subject="Hi", text="x")
    receipt = await channel.send(first)
    await channel.send(second)
    await channel.aclose()

    assert receipt.provider_message_id == f"outbox:{first.idempotency_key}"
    one, two = read_lines(path)
    assert one == {
        "execution_id": str(first.execution_id),
        "idempotency_key": first.idempotency_key,
        "message_id": first.message_id,
        "channel": "sms",
        "to": "+4915112345678",
        "body": "Need a hand? (0)",
        "headers": {},
        "metadata": {"tenant_key": "acme", "step_key": "nudge"},
        "sent_at": "2026-01-05T12:00:00Z",
    }
    assert (two["channel"], two["subject"], two["text"]) == ("email", "Hi", "x")
    assert "html" not in two
    assert stat.S_IMODE(path.stat().st_mode) & 0o027 == 0


async def test_concurrent_appends_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "outbox.jsonl"
    # Several channels stand in for several daemons sharing one file.
    channels = [outbox(path) for _ in range(4)]
    # Lines far larger than a pipe buffer, so a split write would show as torn lines.
    big = "é" * 50_000
    messages = [make_message(n, body=f"{n}:{big}") for n in range(200)]
    await asyncio.gather(*(channels[n % 4].send(message) for n, message in enumerate(messages)))
    lines = read_lines(path)
    assert len(lines) == 200
    assert {line["idempotency_key"] for line in lines} == {m.idempotency_key for m in messages}
    assert all(line["body"].endswith(big) for line in lines)


async def test_unwritable_path_is_transient_and_named(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where a directory should be")
    channel = outbox(blocker / "outbox.jsonl")
    with pytest.raises(
        TransientError, match=r"outbox .*not-a-dir/outbox\.jsonl: cannot append"
    ) as caught:
        await channel.send(make_message())
    # The file fails every message alike: the adapter's circuit breaker takes it.
    assert caught.value.provider_wide


async def test_a_directory_as_path_is_transient(tmp_path: Path) -> None:
    with pytest.raises(TransientError, match="cannot append") as caught:
        await outbox(tmp_path).send(make_message())
    assert caught.value.provider_wide


def test_registry_builds_an_outbox_for_any_channel(tmp_path: Path) -> None:
    for channel_name in ("email", "sms", "chat", "webhook"):
        adapter = Adapter(
            id=uuid.uuid4(),
            tenant_key="acme",
            name=f"dev-{channel_name}",
            channel=channel_name,
            provider="outbox",
            config={"path": str(tmp_path / "o.jsonl"), "from": "dev@acme.test"},
            credentials={},
            is_default=False,
            enabled=True,
        )
        built = registry.build(adapter)
        assert isinstance(built, RedactedChannel)
        assert isinstance(built.wrapped, OutboxChannel)
        assert built.provider == "outbox"
