"""`dripd preview --timeline`: the dated path of an enrollment, as the daemon would run it."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from support import apply_text

from dripd import logs
from dripd.cli import main
from dripd.db import store
from dripd.engine import timeline as timeline_mod
from dripd.engine.advance import CompiledStep
from dripd.engine.preview import active_steps
from dripd.engine.timeline import timeline
from dripd.errors import ConfigError

BERLIN = ZoneInfo("Europe/Berlin")

# Each step at 09:00 local, a day after the one before: the days around the change to
# summer time in Berlin (Sunday 2027-03-28, 02:00 → 03:00).
DST = """
[sequence]
key = "dst"
timezone = "Europe/Berlin"

[[steps]]
key = "d1"
channel = "sms"
at = "09:00"
body = "Day one, {{ name }}"

[[steps]]
key = "d2"
channel = "sms"
after = "1d"
at = "09:00"
body = "Day two"

[[steps]]
key = "d3"
channel = "sms"
after = "1d"
at = "09:00"
body = "Day three"
"""

WINDOWED = """
[sequence]
key = "windowed"
timezone = "Europe/Berlin"
window = { days = "mon-fri", hours = "09:00-17:00" }

[[steps]]
key = "hello"
channel = "email"
subject = "Hi"
text = "Hello"

[[steps]]
key = "ping"            # webhooks are not among the channels the sequence window covers
channel = "webhook"
after = "1h"
body = "{}"

[[steps]]
key = "evening"
channel = "sms"
after = "1h"
window = { hours = "20:00-21:00" }
body = "Good evening"
"""

CRON = """
[sequence]
key = "weekly"
timezone = "Europe/Berlin"

[[steps]]
key = "monday"
channel = "sms"
cron = "30 10 * * 1"
body = "New week"
"""

TRIAL = """
[sequence]
key = "trial"

[[steps]]
key = "hello"
channel = "sms"
body = "Welcome"

[[steps]]
key = "wait_paid"
wait_for = { event = "paid", timeout = "3d" }

[[steps]]
key = "thanks"
channel = "sms"
when = "events.paid.count == 1"
body = "Thanks"

[[steps]]
key = "reminder"
channel = "sms"
body = "Still thinking?"

[[transitions]]
from = "wait_paid"
to = "thanks"
when = "event.key == 'paid'"

[[transitions]]
from = "wait_paid"
to = "reminder"

[[transitions]]
from = "thanks"
"""

LOOP = """
[sequence]
key = "nag"

[[steps]]
key = "nag"
channel = "sms"
after = "1d"
body = "Please pay"

[[steps]]
key = "check"           # no channel: a branch point

[[transitions]]
from = "check"
to = "nag"
when = "data.paid != true"

[[transitions]]
from = "check"
"""

START = datetime(2027, 3, 26, 10, 0, tzinfo=UTC)  # a Friday


async def compiled(dsn: str, text: str) -> tuple[dict[uuid.UUID, CompiledStep], uuid.UUID]:
    """The active version of the sequence `text`, once applied, as the CLI loads it."""
    conn = await store.connect(dsn)
    try:
        applied = await apply_text(conn, text)
        return await active_steps(conn, tenant=None, sequence_key=applied.key)
    finally:
        await conn.close()


async def walk(dsn: str, text: str, *, start: datetime = START, **kw: Any) -> dict[str, Any]:
    steps, first = await compiled(dsn, text)
    settings: dict[str, Any] = {
        "data": {},
        "default_zone": ZoneInfo("UTC"),
        "window_channels": frozenset({"email", "sms", "whatsapp", "chat"}),
        "spread": timedelta(minutes=10),
    }
    return await timeline(steps, first, start=start, **(settings | kw))


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def times(entries: list[dict[str, Any]]) -> list[tuple[str, datetime, str]]:
    """(step, UTC time, local wall clock with its offset) of each entry."""
    return [(e["step"], e["due_at"], e["local"].isoformat()) for e in entries]


# --- the timeline itself ----------------------------------------------------------------------


async def test_at_keeps_the_local_time_across_a_dst_change(dsn: str) -> None:
    result = await walk(dsn, DST, data={"name": "Ada", "phone": "+15550100001"})
    assert result["timezone"] == "Europe/Berlin"
    assert result["start"] == START
    # 09:00 local each time; UTC moves from 08:00Z to 07:00Z. The day's delay is elapsed
    # time: from Saturday 09:00 it ends on Sunday at 10:00 summer time, after that day's
    # 09:00, so the second step goes on Monday (dripd.timing.next_due).
    assert times(result["entries"]) == [
        ("d1", at("2027-03-27T08:00Z"), "2027-03-27T09:00:00+01:00"),
        ("d2", at("2027-03-29T07:00Z"), "2027-03-29T09:00:00+02:00"),
        ("d3", at("2027-03-30T07:00Z"), "2027-03-30T09:00:00+02:00"),
    ]
    assert [e["moved_by"] for e in result["entries"]] == [["at"], ["at"], []]
    first = result["entries"][0]
    assert (first["channel"], first["to"], first["body"]) == ("sms", "+15550100001", "Day one, Ada")
    assert result["end"] == {"status": "completed", "reason": "completed"}


async def test_a_send_window_defers_to_its_opening(dsn: str) -> None:
    saturday = at("2027-03-06T12:00+01:00")
    result = await walk(dsn, WINDOWED, start=saturday, data={"email": "a@example.com"})
    hello, ping, evening = result["entries"]
    # The sequence's window holds the email until Monday 09:00, at the opening itself
    # (the daemon's per-execution spread is not shown, and the assumptions say so).
    assert (hello["due_at"], hello["moved_by"]) == (at("2027-03-08T08:00Z"), ["window"])
    assert hello["deferred_from"] == saturday
    assert any("up to 10m after it" in a for a in result["assumptions"])
    # The next step counts from the deferred send; webhooks are outside the sequence window.
    assert (ping["due_at"], ping["moved_by"]) == (at("2027-03-08T09:00Z"), [])
    assert "deferred_from" not in ping
    # A step's own window applies to it whatever its channel.
    assert evening["local"].isoformat() == "2027-03-08T20:00:00+01:00"
    assert evening["deferred_from"] == at("2027-03-08T10:00Z")
    # Without email among `windows.channels`, the email goes out on Saturday.
    result = await walk(dsn, WINDOWED, start=saturday, data={}, window_channels=frozenset({"sms"}))
    assert result["entries"][0]["due_at"] == saturday
    assert result["entries"][0]["skipped"] == "no_recipient"


async def test_cron_in_the_recipients_own_zone(dsn: str) -> None:
    result = await walk(dsn, CRON, data={"timezone": "America/New_York"})
    assert result["timezone"] == "America/New_York"
    [monday] = result["entries"]
    assert times([monday]) == [("monday", at("2027-03-29T14:30Z"), "2027-03-29T10:30:00-04:00")]
    assert (monday["moved_by"], monday["cron"]) == (["cron"], "30 10 * * 1")
    # Without a zone in the data, the sequence's.
    result = await walk(dsn, CRON)
    assert result["entries"][0]["local"].isoformat() == "2027-03-29T10:30:00+02:00"


async def test_a_wait_shows_the_event_and_the_timeout_branches(dsn: str) -> None:
    result = await walk(dsn, TRIAL, data={"phone": "+15550100001"})
    hello, wait = result["entries"]
    assert hello["due_at"] == START
    assert (wait["step"], wait["due_at"], wait["wait_for"]) == (
        "wait_paid",
        START,
        {"event": "paid", "timeout": "3d"},
    )
    assert result["end"] is None  # the branches end
    on_event, on_timeout = wait["branches"]["event"], wait["branches"]["timeout"]
    # The event arrives as the wait starts: `thanks` follows at once, and its condition
    # sees the event counted.
    assert (on_event["event"], on_event["at"]) == ("paid", START)
    [thanks] = on_event["entries"]
    assert (thanks["step"], thanks["due_at"], thanks["body"]) == ("thanks", START, "Thanks")
    assert "skipped" not in thanks
    assert on_event["end"] == {"status": "completed", "reason": "completed"}
    # The timeout takes the transitions with `event` null.
    assert on_timeout["at"] == START + timedelta(days=3)
    assert times(on_timeout["entries"]) == [
        ("reminder", START + timedelta(days=3), "2027-03-29T10:00:00+00:00")
    ]
    assert on_timeout["end"] == {"status": "completed", "reason": "completed"}


async def test_on_timeout_names_the_step_of_the_timeout_branch(dsn: str) -> None:
    text = TRIAL.replace('timeout = "3d" }', 'timeout = "3d", on_timeout = "thanks" }')
    result = await walk(dsn, text)
    on_timeout = result["entries"][1]["branches"]["timeout"]
    # No event has happened on this branch: `thanks` is skipped by its condition.
    [thanks] = on_timeout["entries"]
    assert (thanks["step"], thanks["skipped"]) == ("thanks", "condition_false")


async def test_a_transition_is_chosen_by_the_data_and_a_loop_is_cut(dsn: str) -> None:
    paid = await walk(dsn, LOOP, data={"paid": True})
    assert [e["step"] for e in paid["entries"]] == ["nag", "check"]
    assert paid["end"] == {"status": "completed", "reason": "completed"}
    unpaid = await walk(dsn, LOOP, data={"paid": False})
    assert [e["step"] for e in unpaid["entries"]] == ["nag", "check", "nag", "check"]
    assert [e["due_at"] for e in unpaid["entries"]] == [
        START + timedelta(days=1),
        START + timedelta(days=1),
        START + timedelta(days=2),
        START + timedelta(days=2),
    ]
    assert unpaid["end"] == {
        "status": "cut",
        "reason": "step 'nag' would run more than 2 times on this path (a loop)",
    }


async def test_a_long_path_is_cut(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timeline_mod, "MAX_PATH", 3)
    result = await walk(dsn, LOOP, data={"paid": False})
    assert len(result["entries"]) == 3
    assert result["end"] == {"status": "cut", "reason": "3 entries on this path"}
    monkeypatch.setattr(timeline_mod, "MAX_ENTRIES", 2)
    result = await walk(dsn, TRIAL)
    wait = result["entries"][1]
    assert wait["branches"]["event"]["entries"] == []
    assert wait["branches"]["event"]["end"]["reason"] == "the timeline has 2 entries"


async def test_a_step_that_cannot_render_ends_the_path(dsn: str) -> None:
    result = await walk(dsn, DST, data={"phone": "+15550100001"})
    [d1] = result["entries"]
    assert "'name' is undefined" in d1["error"]
    assert result["end"] == {"status": "failed", "reason": "step 'd1' failed"}
    # With on_failure = "continue" the path goes on.
    text = DST.replace('body = "Day one', 'on_failure = "continue"\nbody = "Day one')
    result = await walk(dsn, text, data={"phone": "+15550100001"})
    assert [e["step"] for e in result["entries"]] == ["d1", "d2", "d3"]


async def test_bad_input_is_a_config_error(dsn: str) -> None:
    with pytest.raises(ConfigError, match=r"data\.timezone: 'Mars/Base' is not a known IANA"):
        await walk(dsn, CRON, data={"timezone": "Mars/Base"})
    with pytest.raises(ConfigError, match="start: needs a UTC offset"):
        await walk(dsn, CRON, start=datetime(2027, 3, 26, 10, 0))


# --- through the CLI -------------------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse refused the arguments
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Not configuring structlog here: loggers it caches would escape later tests'
    # `capture_logs`.
    monkeypatch.setattr(logs, "configure", lambda *args, **kwargs: None)
    monkeypatch.delenv("DRIPD_DSN", raising=False)
    monkeypatch.setenv("DRIPD_CONFIG", str(tmp_path / "none.toml"))
    (tmp_path / "none.toml").write_text("")


def test_dripd_preview_timeline_prints_json_and_text_and_writes_nothing(
    capsys: pytest.CaptureFixture[str], dsn: str, tmp_path: Path
) -> None:
    (tmp_path / "dst.toml").write_text(DST)
    assert run(capsys, "apply", "--dsn", dsn, str(tmp_path / "dst.toml"))[0] == 0
    data = '{"name": "Ada", "phone": "+15550100001"}'
    argv = ["preview", "dst", "--timeline", "--start", "2027-03-26T11:00+01:00", "--dsn", dsn]
    code, out, err = run(capsys, *argv, "--data", data, "--json")
    assert (code, err) == (0, "")
    result = json.loads(out)
    assert (result["start"], result["timezone"]) == ("2027-03-26T10:00:00Z", "Europe/Berlin")
    assert [(e["step"], e["due_at"], e["local"]) for e in result["entries"]] == [
        ("d1", "2027-03-27T08:00:00Z", "2027-03-27T09:00:00+01:00"),
        ("d2", "2027-03-29T07:00:00Z", "2027-03-29T09:00:00+02:00"),
        ("d3", "2027-03-30T07:00:00Z", "2027-03-30T09:00:00+02:00"),
    ]
    assert result["entries"][0]["body"] == "Day one, Ada"
    assert result["end"] == {"status": "completed", "reason": "completed"}

    code, out, _ = run(capsys, *argv, "--data", data)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "start 2027-03-26 10:00:00Z, recipient's timezone Europe/Berlin"
    assert lines[1] == (
        "2027-03-27 08:00:00Z  (2027-03-27 09:00:00+01:00)  d1 (sms) to +15550100001  [moved by at]"
    )
    assert lines[2] == "    body: Day one, Ada"
    assert "end: completed (completed)" in lines
    assert any(line.startswith("assumes: hooks are not called") for line in lines)

    # A step that cannot render: exit 1, the error in the output, the path ends.
    code, out, _ = run(capsys, *argv, "--json")
    assert code == 1
    assert json.loads(out)["end"] == {"status": "failed", "reason": "step 'd1' failed"}
    assert asyncio.run(_count(dsn, "dripd.enrollments")) == 0
    assert asyncio.run(_count(dsn, "dripd.step_executions")) == 0


def test_dripd_preview_timeline_shows_branches_as_text(
    capsys: pytest.CaptureFixture[str], dsn: str, tmp_path: Path
) -> None:
    (tmp_path / "trial.toml").write_text(TRIAL)
    assert run(capsys, "apply", "--dsn", dsn, str(tmp_path / "trial.toml"))[0] == 0
    code, out, _ = run(
        capsys, "preview", "trial", "--timeline", "--start", "2027-03-26T10:00Z", "--dsn", dsn
    )
    assert code == 0
    start, timeout = "2027-03-26 10:00:00", "2027-03-29 10:00:00"
    then, later = f"{start}Z  ({start}+00:00)", f"{timeout}Z  ({timeout}+00:00)"
    assert out.splitlines()[3:10] == [
        f"{then}  wait_paid: waits for 'paid' up to 3d",
        f"  on event 'paid', arriving at {start}Z ({start}+00:00):",
        f"    {then}  thanks (sms)  [skipped: no_recipient]",
        "        body: Thanks",
        "    end: completed (completed)",
        f"  on timeout at {timeout}Z ({timeout}+00:00):",
        f"    {later}  reminder (sms)  [skipped: no_recipient]",
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--timeline", "--start", "2027-03-26T10:00"],
            "argument --start: '2027-03-26T10:00' is not",
        ),
        (["--timeline", "--start", "soon"], "argument --start: 'soon' is not an ISO 8601 time"),
        (["--start", "2027-03-26T10:00Z"], "--start: only with --timeline"),
        (["--timeline", "--step", "d1"], "--step: not with --timeline"),
        (
            ["--timeline", "--data", '{"timezone": "Mars/Base"}'],
            "data.timezone: 'Mars/Base' is not a known IANA timezone",
        ),
    ],
)
def test_dripd_preview_timeline_refuses_bad_arguments(
    capsys: pytest.CaptureFixture[str], dsn: str, tmp_path: Path, argv: list[str], message: str
) -> None:
    (tmp_path / "dst.toml").write_text(DST)
    assert run(capsys, "apply", "--dsn", dsn, str(tmp_path / "dst.toml"))[0] == 0
    code, out, err = run(capsys, "preview", "dst", "--dsn", dsn, *argv)
    assert (code, out) == (2, "")
    assert message in err
    assert "Traceback" not in err


async def _count(dsn: str, table: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
    finally:
        await conn.close()
