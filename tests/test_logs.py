"""Log setup: JSON lines, console output, level filtering, redaction, stdlib routing."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from dripd import logs


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        structlog.reset_defaults()
        root.handlers[:] = handlers
        root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_with_utc_timestamp_level_and_bound_keys() -> None:
    out = io.StringIO()
    logs.configure("info", "json", out)
    log = logs.get("dripd.test").bind(worker=3)
    log.info("claimed", n=5)
    [event] = lines(out)
    assert event["event"] == "claimed"
    assert event["level"] == "info"
    assert event["logger"] == "dripd.test"
    assert event["worker"] == 3
    assert event["n"] == 5
    stamp = datetime.fromisoformat(event["timestamp"])
    assert stamp.utcoffset() is not None
    assert stamp.utcoffset().total_seconds() == 0  # type: ignore[union-attr]


def test_disabled_levels_are_dropped() -> None:
    out = io.StringIO()
    logs.configure("warning", "json", out)
    log = logs.get("dripd.test")
    log.debug("noise")
    log.info("noise")
    log.warning("kept")
    log.error("kept too")
    assert [e["event"] for e in lines(out)] == ["kept", "kept too"]
    assert log.is_enabled_for(logging.INFO) is False


def test_secrets_are_redacted() -> None:
    out = io.StringIO()
    logs.configure("debug", "json", out)
    headers = {"Authorization": "Bearer abc", "X-Request-Id": "r1"}
    logs.get("dripd.test").info(
        "adapter",
        password="hunter2",
        SMTP_Password="x",
        api_key="k",
        access_token="t",
        client_secret="s",
        credentials={"username": "u", "password": "p"},
        headers=headers,
        address="a@example.com",
    )
    [event] = lines(out)
    for key in ("password", "SMTP_Password", "api_key", "access_token", "client_secret"):
        assert event[key] == logs.REDACTED, key
    assert event["credentials"] == logs.REDACTED
    assert event["headers"] == {"Authorization": logs.REDACTED, "X-Request-Id": "r1"}
    assert event["address"] == "a@example.com"
    assert headers["Authorization"] == "Bearer abc"  # the caller's dict is not modified
    assert "hunter2" not in out.getvalue()


def test_exceptions_are_rendered_in_json() -> None:
    out = io.StringIO()
    logs.configure("info", "json", out)
    try:
        raise ValueError("bad thing")
    except ValueError:
        logs.get("dripd.test").exception("failed")
    [event] = lines(out)
    assert event["level"] == "error"
    assert "ValueError: bad thing" in event["exception"]


def test_console_format() -> None:
    out = io.StringIO()
    logs.configure("info", "console", out)
    logs.get("dripd.test").info("started", port=8025, token="abc")
    text = out.getvalue()
    assert "started" in text
    assert "port=8025" in text
    assert "abc" not in text
    assert "\x1b[" not in text  # no colours when the stream is not a terminal


def test_stdlib_logging_goes_to_the_same_stream() -> None:
    out = io.StringIO()
    logs.configure("info", "json", out)
    logs.configure("info", "json", out)  # configuring again does not duplicate output
    logging.getLogger("uvicorn.error").warning("port %d is busy", 8025)
    [event] = lines(out)
    assert event["event"] == "port 8025 is busy"
    assert event["level"] == "warning"
    assert event["logger"] == "uvicorn.error"
    assert "timestamp" in event


def test_capture_logs_sees_events() -> None:
    logs.configure("info", "json", io.StringIO())
    with capture_logs() as events:
        logs.get("dripd.test").info("hello", n=1)
    assert events == [{"event": "hello", "n": 1, "log_level": "info"}]


def test_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        logs.configure("verbose", "json", io.StringIO())
