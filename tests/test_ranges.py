"""Ranges: every duration, count and instant dripd accepts is range-checked where it is
written, and nothing that passed can overflow later (or lose what already happened)."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import msgspec
import pytest
from support import (
    apply_text,
    executions,
    outbox_adapters,
    outbox_messages,
    running_daemon,
    wait_for,
)

from dripd import api
from dripd.cli import main
from dripd.clock import ManualClock
from dripd.config import DURATIONS, Config, from_dict
from dripd.errors import ConfigError, SequenceFileError
from dripd.model import (
    LATEST_DUE,
    MAX_COUNT,
    MAX_DURATION,
    Span,
    check_due,
    check_instant,
    parse_duration,
    parse_rate,
    scheduling,
)
from dripd.sequences import load_file, load_text

ENTRY = """
[sequence]
key = "welcome"
entry_events = ["signed_up"]

[[steps]]
key = "hello"
channel = "email"
subject = "Hello"
text = "Hi"
"""

TWO_STEPS = """
[sequence]
key = "drip"

[[steps]]
key = "hello"
channel = "email"
subject = "Hello"
text = "Hi"

[[steps]]
key = "later"
channel = "email"
after = "1d"
subject = "Later"
text = "Later"
"""


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DRIPD_DSN", raising=False)
    monkeypatch.setenv("DRIPD_CONFIG", str(tmp_path / "none.toml"))
    (tmp_path / "none.toml").write_text("")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def run_in_thread(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`run` from a test's event loop (the CLI runs its own)."""
    return await asyncio.to_thread(run, capsys, *argv)


async def stored_before_the_ranges(pool: asyncpg.Pool, step: str, delay: str) -> None:
    """Give `step` the delay a file could set before `after` was range-checked."""
    await pool.execute(
        "UPDATE dripd.steps SET delay = $2::text::interval WHERE key = $1", step, delay
    )


# --- durations and rates ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0s", timedelta(0)),
        ("250ms", timedelta(milliseconds=250)),
        (" 90 s ", timedelta(seconds=90)),
        ("3650d", MAX_DURATION),
        ("521w", timedelta(weeks=521)),
        ("00000000000000000000001h", timedelta(hours=1)),  # leading zeros are no magnitude
    ],
)
def test_durations_within_range_parse(text: str, expected: timedelta) -> None:
    assert parse_duration(text, where="k") == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("3651d", "is out of range; use a duration from 0s to 3650d"),
        ("522w", "is out of range"),
        ("9999999999w", "is out of range"),  # overflowed timedelta
        ("9" * 5000 + "s", "is out of range"),  # past int()'s 4300 digits
        ("١٢s", "is not a duration"),  # Arabic-Indic digits
        ("１２s", "is not a duration"),  # full-width digits
        ("12s\u00a0", "is not a duration"),  # only ASCII whitespace around it
        ("-1s", "is not a duration"),
    ],
)
def test_durations_out_of_range_or_not_ascii_are_refused(text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=f"^k: .*{re.escape(problem)}"):
        parse_duration(text, where="k")


def test_a_span_bounds_both_ends_and_says_so() -> None:
    span = Span(timedelta(seconds=1), timedelta(hours=1))
    assert parse_duration("1s", where="k", within=span) == timedelta(seconds=1)
    assert parse_duration("1h", where="k", within=span) == timedelta(hours=1)
    for text in ("999ms", "61m"):
        with pytest.raises(ConfigError, match=r"use a duration from 1s to 1h$"):
            parse_duration(text, where="k", within=span)
    positive = Span(timedelta(milliseconds=1), timedelta(days=1))
    with pytest.raises(ConfigError, match=r"use a duration longer than 0s and at most 1d$"):
        parse_duration("0s", where="k", within=positive)
    with pytest.raises(ValueError, match="a span runs"):
        Span(timedelta(0), MAX_DURATION + timedelta(days=1))


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("0/1s", "is not a rate"),
        ("1/0s", "is not a rate"),
        ("1/000m", "is not a rate"),
        ("١/1s", "is not a rate"),
        ("1/١s", "is not a rate"),
        (f"{MAX_COUNT + 1}/1s", f"the count must be at most {MAX_COUNT}"),
        ("9" * 5000 + "/1s", f"the count must be at most {MAX_COUNT}"),
        ("1/367d", "the window must be at most 366d"),
        ("1/99999999999999999999d", "the window must be at most 366d"),
    ],
)
def test_rates_out_of_range_are_refused(text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=f"^rate_limits.tenant.acme: .*{re.escape(problem)}"):
        parse_rate(text, where="rate_limits.tenant.acme")


def test_rates_within_range_parse() -> None:
    assert parse_rate(f"{MAX_COUNT}/366d") == (MAX_COUNT, timedelta(days=366))
    assert parse_rate("10/15s") == (10, timedelta(seconds=15))
    assert parse_rate("100/m") == (100, timedelta(minutes=1))


# --- sequence files -----------------------------------------------------------------------

_STEP = "[sequence]\nkey='x'\n[[steps]]\nkey='a'\n"
_SMS = _STEP + "channel='sms'\nbody='b'\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_SMS + "after='3000000d'\n", "step 'a': key 'after': '3000000d' is out of range"),
        (_SMS + "after='3651d'\n", "step 'a': key 'after': '3651d' is out of range"),
        (_SMS + "after='9999999999w'\n", "step 'a': key 'after': '9999999999w' is out of"),
        (_SMS + "after='١٢s'\n", "step 'a': key 'after': '١٢s' is not a duration"),
        (
            _STEP + "wait_for={event='e', timeout='3651d'}\n",
            "step 'a': key 'wait_for.timeout': '3651d' is out of range",
        ),
        (
            _STEP + "wait_for={event='e', timeout='0s'}\n",
            "step 'a': key 'wait_for.timeout': '0s' is out of range; use a duration longer than 0s",
        ),
        (_SMS + "max_attempts=1001\n", "step 'a': key 'max_attempts': must be a positive"),
        (_SMS + "max_attempts=10000000000\n", "step 'a': key 'max_attempts': must be a positive"),
        (_SMS + "max_length=2147483648\n", "step 'a': key 'max_length': must be a positive"),
        (
            _SMS + "[[transitions]]\nfrom='a'\npriority=2147483648\n",
            "transition #1 (from 'a'): key 'priority': must be from -2147483647 to 2147483647",
        ),
    ],
)
def test_apply_refuses_out_of_range_values_naming_file_step_and_key(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "far.toml"
    path.write_text(text)
    with pytest.raises(SequenceFileError) as info:
        load_file(path)
    assert info.value.message.startswith(f"{path}: {message}")


def test_the_longest_delays_apply() -> None:
    version = load_text(
        _SMS + "after='3650d'\nmax_attempts=1000\n[[steps]]\nkey='w'\n"
        "wait_for={event='e', timeout='3650d'}\n",
        source="t.toml",
    )
    assert [s.delay for s in version.steps] == [MAX_DURATION, timedelta(0)]
    assert version.steps[1].wait_timeout == MAX_DURATION


def test_dripd_apply_exits_2_naming_file_step_and_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "far.toml"
    path.write_text(TWO_STEPS.replace('after = "1d"', 'after = "3000000d"'))
    # The file is refused before any database is needed.
    code, _, err = run(capsys, "apply", "--dsn", "postgresql://nowhere.invalid/x", str(path))
    assert code == 2
    assert f"{path}: step 'later': key 'after': '3000000d' is out of range" in err
    assert "Traceback" not in err


# --- the configuration --------------------------------------------------------------------


def _config_durations() -> set[str]:
    """Every config key whose default is a duration string."""
    keys = set()
    for section, values in msgspec.to_builtins(Config()).items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            if isinstance(value, str) and re.fullmatch(r"[0-9]+(ms|s|m|h|d|w)", value):
                keys.add(f"{section}.{key}")
    return keys


def test_every_duration_key_of_the_config_has_a_range() -> None:
    assert set(DURATIONS) == _config_durations()
    Config()  # every default is in its range


def test_the_readme_documents_every_config_range() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for key, span in DURATIONS.items():
        assert f"| `{key}` | {span} |" in readme, f"{key}'s range is not in the README"


def _section(key: str, value: str) -> dict[str, Any]:
    section, name = key.split(".")
    return {section: {name: value}}


@pytest.mark.parametrize("key", sorted(DURATIONS))
def test_config_refuses_each_duration_out_of_range_naming_the_key(key: str) -> None:
    span = DURATIONS[key]
    longest = span.maximum // timedelta(milliseconds=1)
    fine = _section(key, f"{longest}ms")
    if key == "circuit.open_for":
        fine["circuit"]["max_open_for"] = f"{longest}ms"  # not shorter than open_for
    from_dict(fine)  # the maximum itself is fine
    for value in (f"{longest + 1}ms", "3000000d", "9999999999w"):
        with pytest.raises(ConfigError, match=f"^config: {re.escape(key)}: '{value}' is out of"):
            from_dict(_section(key, value))
    if span.minimum > timedelta(0):
        shortest = span.minimum // timedelta(milliseconds=1)
        with pytest.raises(ConfigError, match=f"^config: {re.escape(key)}: .* is out of range"):
            from_dict(_section(key, f"{shortest - 1}ms"))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"rate_limits": {"tenant": {"acme": "1/367d"}}}, "rate_limits.tenant.acme: '1/367d'"),
        (
            {"rate_limits": {"recipient_domain": {"*": f"{MAX_COUNT + 1}/1s"}}},
            "rate_limits.recipient_domain.*: ",
        ),
        (
            {"quotas": [{"scope": "global", "limit": MAX_COUNT + 1}]},
            f"quotas[0].limit: {MAX_COUNT + 1} is out of range; "
            f"use an integer from 1 to {MAX_COUNT}",
        ),
        (
            {"worker": {"max_attempts": 1001}},
            "worker.max_attempts: 1001 is out of range; use an integer from 1 to 1000",
        ),
    ],
)
def test_config_refuses_counts_and_rates_out_of_range_naming_the_key(
    raw: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(raw)
    assert info.value.message.startswith(f"config: {message}")


def test_a_config_file_out_of_range_exits_2_naming_the_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[unsubscribe]\ntoken_ttl = "3000000d"\n')
    code, _, err = run(capsys, "--config", str(config), "keygen")
    assert code == 2
    assert f"{config}: unsubscribe.token_ttl: '3000000d' is out of range" in err


# --- instants and due times ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (datetime(9999, 12, 31, tzinfo=UTC), "is out of range; use an instant from 2000-01-01"),
        (datetime(2200, 1, 1, tzinfo=UTC), "is out of range"),
        (datetime(1999, 12, 31, 23, 59, tzinfo=UTC), "is out of range"),
        (datetime(2026, 1, 1), "must be an aware datetime"),  # naive on purpose
    ],
)
def test_instants_out_of_range_are_refused(value: datetime, problem: str) -> None:
    with pytest.raises(ConfigError, match=f"^now: .*{re.escape(problem)}"):
        check_instant(value, where="now")


def test_a_due_time_that_cannot_be_computed_or_is_too_far_is_a_clear_error() -> None:
    overflow = r"^step 'x' cannot be scheduled: it would fall due after 9999$"
    with pytest.raises(ConfigError, match=overflow), scheduling("step 'x'"):
        datetime(9999, 1, 1, tzinfo=UTC) + timedelta(days=400)
    never = r"^step 'x' cannot be scheduled: no occurrence$"
    with pytest.raises(ConfigError, match=never), scheduling("step 'x'"):
        raise ValueError("no occurrence")
    gone = r"^step 'x' cannot be scheduled: No time zone found with key Mars/Base$"
    with pytest.raises(ConfigError, match=gone), scheduling("step 'x'"):
        ZoneInfo("Mars/Base")
    with pytest.raises(ConfigError, match=r"^step 'x' cannot be scheduled: it would fall due on 9"):
        check_due(LATEST_DUE, what="step 'x'")
    assert check_due(LATEST_DUE - timedelta(1), what="step 'x'") < LATEST_DUE


async def test_the_api_refuses_a_far_future_now_before_writing(pool: asyncpg.Pool) -> None:
    await apply_text(pool, ENTRY)
    far = datetime(9999, 12, 31, tzinfo=UTC)
    with pytest.raises(ConfigError, match=r"^now: "):
        await api.enroll(pool, tenant=None, sequence_key="welcome", subscriber_id="u", now=far)
    with pytest.raises(ConfigError, match=r"^now: "):
        await api.track_event(pool, tenant=None, subscriber_id="u", key="signed_up", now=far)
    assert await pool.fetchval("SELECT count(*) FROM dripd.events") == 0
    assert await pool.fetchval("SELECT count(*) FROM dripd.enrollments") == 0


@pytest.mark.parametrize("delay", ["3000000 days", "2600000 days"])  # overflow; past 9000
async def test_enrolling_in_a_sequence_stored_before_the_ranges_is_refused_cleanly(
    pool: asyncpg.Pool, delay: str
) -> None:
    await apply_text(pool, ENTRY)
    await stored_before_the_ranges(pool, "hello", delay)
    with pytest.raises(ConfigError) as info:
        await api.enroll(pool, tenant=None, sequence_key="welcome", subscriber_id="u")
    assert info.value.message.startswith(
        "sequence: 'welcome': its first step cannot be scheduled: it would fall due"
    )
    assert await pool.fetchval("SELECT count(*) FROM dripd.enrollments") == 0


async def test_an_entry_event_is_recorded_when_its_enrollment_cannot_be_scheduled(
    pool: asyncpg.Pool,
) -> None:
    await apply_text(pool, ENTRY)
    await stored_before_the_ranges(pool, "hello", "3000000 days")
    event = await api.track_event(
        pool, tenant=None, subscriber_id="u", key="signed_up", data={"email": "u@example.com"}
    )
    assert event.created
    assert event.enrolled == []
    [refused] = event.not_enrolled
    assert refused["sequence"] == "welcome"
    assert "its first step cannot be scheduled" in refused["reason"]
    assert await pool.fetchval("SELECT key FROM dripd.events") == "signed_up"
    assert await pool.fetchval("SELECT count(*) FROM dripd.enrollments") == 0


async def test_the_cli_exits_2_for_an_unschedulable_sequence_and_still_records_the_event(
    capsys: pytest.CaptureFixture[str], dsn: str, pool: asyncpg.Pool
) -> None:
    await apply_text(pool, ENTRY)
    await stored_before_the_ranges(pool, "hello", "3000000 days")
    code, _, err = await run_in_thread(capsys, "enroll", "welcome", "u1", "--dsn", dsn)
    assert code == 2
    assert "dripd: sequence: 'welcome': its first step cannot be scheduled" in err
    assert "Traceback" not in err
    code, out, err = await run_in_thread(capsys, "event", "u1", "signed_up", "--dsn", dsn)
    assert code == 0, err
    assert "recorded" in out
    assert "not enrolled in welcome: sequence: 'welcome': its first step cannot" in out
    assert await pool.fetchval("SELECT count(*) FROM dripd.events") == 1


@pytest.mark.parametrize("value", ["1e300", "inf", "nan", "0", "-1", "soon"])
def test_ctl_timeout_out_of_range_exits_2_naming_the_option(
    capsys: pytest.CaptureFixture[str], value: str
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["ctl", "--timeout", value, "status"])
    assert info.value.code == 2
    assert "argument --timeout: " in capsys.readouterr().err


# --- a step that cannot be scheduled after a send -----------------------------------------


@pytest.mark.parametrize("fault", ["far-future", "planner-bug"])
async def test_a_next_step_that_cannot_be_scheduled_keeps_the_send_and_fails_the_enrollment(
    dsn: str, pool: asyncpg.Pool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    await apply_text(pool, TWO_STEPS)
    if fault == "far-future":
        await stored_before_the_ranges(pool, "later", "3000000 days")
        expected = "step 'later' cannot be scheduled: it would fall due after 9999"
    else:
        # Any unexpected error while planning: the recorder's guard keeps the send too.
        def broken(*_: Any, **__: Any) -> Any:
            raise RuntimeError("a bug with a secret-looking detail")

        monkeypatch.setattr("dripd.engine.recorder.choose_next", broken)
        expected = "internal error planning the next step: RuntimeError"
    outbox = await outbox_adapters(pool, tmp_path / "outbox.jsonl")
    clock = ManualClock()
    async with running_daemon(dsn, tmp_path, clock=clock):
        enrollment = await api.enroll(
            pool,
            tenant=None,
            sequence_key="drip",
            subscriber_id="u",
            data={"email": "u@example.com"},
            now=clock.now(),
        )

        async def ended() -> bool:
            status = await pool.fetchval(
                "SELECT status FROM dripd.enrollments WHERE id = $1", enrollment.id
            )
            return bool(status == "failed")

        await wait_for(ended)
    assert [m["subject"] for m in outbox_messages(outbox)] == ["Hello"]
    [row] = await executions(pool)
    assert row["status"] == "sent"  # what happened stays true
    events = await pool.fetch("SELECT type FROM dripd.message_events")
    assert [e["type"] for e in events] == ["sent"]
    reason = await pool.fetchval(
        "SELECT status_reason FROM dripd.enrollments WHERE id = $1", enrollment.id
    )
    assert reason == expected
