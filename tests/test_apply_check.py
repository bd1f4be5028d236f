"""`dripd apply --check`: every file validated, nothing written, no database needed."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import asyncpg
import pytest

from dripd import logs
from dripd.cli import main

GOOD = """
[sequence]
key = "{key}"

[[steps]]
key = "hello"
channel = "email"
subject = "Hi"
text = "Hello"

[[steps]]
key = "nudge"
channel = "sms"
after = "2d"
body = "Still there?"
"""

BAD_AFTER = GOOD.replace('after = "2d"', 'after = "soon"')

# Relies on the old timeout path: applies, with a warning.
LEGACY = """
[sequence]
key = "legacy"
tenant = "acme"

[[steps]]
key = "wait"
wait_for = { event = "activated", timeout = "1d" }

[[steps]]
key = "reminder"
channel = "sms"
body = "Hi"

[[steps]]
key = "congrats"
channel = "sms"
body = "Well done"

[[transitions]]
from = "wait"
to = "congrats"
when = "event.key == 'activated'"
"""


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def _config_without_database(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Not configuring structlog here: loggers it caches would escape later tests'
    # `capture_logs`.
    monkeypatch.setattr(logs, "configure", lambda *args, **kwargs: None)
    monkeypatch.delenv("DRIPD_DSN", raising=False)
    monkeypatch.setenv("DRIPD_CONFIG", str(tmp_path / "dripd.toml"))
    (tmp_path / "dripd.toml").write_text('[log]\nlevel = "error"\n')  # no [database]


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_check_reports_every_good_file_and_writes_nothing(
    capsys: pytest.CaptureFixture[str], dsn: str, tmp_path: Path
) -> None:
    one = write(tmp_path, "one.toml", GOOD.format(key="welcome"))
    legacy = write(tmp_path, "legacy.toml", LEGACY)
    # A database is given, and must not be touched.
    code, out, err = run(capsys, "apply", "--check", "--dsn", dsn, one, legacy)
    assert code == 0
    assert out.splitlines() == [
        f"ok  {one}  (sequence 'welcome', 2 steps)",
        f"ok  {legacy}  (sequence 'legacy' of tenant 'acme', 3 steps)",
    ]
    [warning] = err.splitlines()
    assert warning.startswith(f"dripd: warning: {legacy}: step 'reminder': unreachable")
    assert asyncio.run(_sequences(dsn)) == 0
    # The same files apply for real.
    assert run(capsys, "apply", "--dsn", dsn, one, legacy)[0] == 0
    assert asyncio.run(_sequences(dsn)) == 2


def test_check_reports_every_bad_file_and_still_the_good_ones(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    first = write(tmp_path, "first.toml", GOOD.format(key="first"))
    bad = write(tmp_path, "bad.toml", BAD_AFTER.format(key="bad"))
    broken = write(tmp_path, "broken.toml", "[sequence\n")
    last = write(tmp_path, "last.toml", GOOD.format(key="last"))
    code, out, err = run(capsys, "apply", "--check", first, bad, broken, last)
    assert code == 2
    assert out.splitlines() == [
        f"ok  {first}  (sequence 'first', 2 steps)",
        f"ok  {last}  (sequence 'last', 2 steps)",
    ]
    lines = err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"dripd: {bad}: step 'nudge': key 'after': 'soon' is not")
    assert lines[1].startswith(f"dripd: {broken}: not valid TOML")
    missing = str(tmp_path / "missing.toml")
    code, out, err = run(capsys, "apply", "--check", "--json", first, missing)
    assert code == 2
    assert json.loads(out) == [
        {
            "file": first,
            "valid": True,
            "key": "first",
            "tenant": None,
            "steps": 2,
            "warnings": [],
        },
        {"file": missing, "valid": False},
    ]
    assert err.startswith(f"dripd: {missing}: cannot read")
    # Only bad files: nothing on stdout.
    assert run(capsys, "apply", "--check", bad) == (2, "", lines[0] + "\n")


def test_check_needs_no_database(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    one = write(tmp_path, "one.toml", GOOD.format(key="welcome"))
    # No DSN anywhere: apply itself says so, --check does not need one.
    code, _, err = run(capsys, "apply", one)
    assert (code, "no database" in err) == (2, True)
    assert run(capsys, "apply", "--check", one)[0] == 0
    # Nothing answers at this address: --check never connects.
    code, out, err = run(capsys, "apply", "--check", "--dsn", "postgresql://nowhere.invalid/x", one)
    assert (code, out, err) == (0, f"ok  {one}  (sequence 'welcome', 2 steps)\n", "")


def test_check_ignores_a_malformed_dsn(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one = write(tmp_path, "one.toml", GOOD.format(key="welcome"))
    assert run(capsys, "apply", "--check", "--dsn", "garbage", one)[0] == 0
    monkeypatch.setenv("DRIPD_DSN", "garbage")
    code, out, _ = run(capsys, "apply", "--check", one)
    assert (code, out) == (0, f"ok  {one}  (sequence 'welcome', 2 steps)\n")
    assert run(capsys, "apply", one)[0] == 2  # without --check, it is an error


def test_apply_reports_every_bad_file_and_writes_nothing(
    capsys: pytest.CaptureFixture[str], dsn: str, tmp_path: Path
) -> None:
    good = write(tmp_path, "good.toml", GOOD.format(key="good"))
    bad = write(tmp_path, "bad.toml", BAD_AFTER.format(key="bad"))
    broken = write(tmp_path, "broken.toml", "[sequence\n")
    code, out, err = run(capsys, "apply", "--dsn", dsn, good, bad, broken)
    assert (code, out) == (2, "")
    assert [line.split(":")[1].strip() for line in err.splitlines()] == [bad, broken]
    assert asyncio.run(_sequences(dsn)) == 0


async def _sequences(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM dripd.sequences"))
    finally:
        await conn.close()


def test_one_sequence_in_two_files_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    one = write(tmp_path, "one.toml", GOOD.format(key="welcome"))
    two = write(tmp_path, "two.toml", GOOD.format(key="welcome"))
    code, out, err = run(capsys, "apply", "--check", one, two)
    assert code == 2
    assert out == f"ok  {one}  (sequence 'welcome', 2 steps)\n"
    assert err == f"dripd: {two}: sequence 'welcome' is in {one} too; give each sequence one file\n"
