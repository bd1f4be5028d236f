"""When a step falls due: delays, local times of day and cron, across DST changes."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dripd.errors import ConfigError
from dripd.timing import Timing, check_cron, local_instant, next_due, parse_at, zone

NEW_YORK = ZoneInfo("America/New_York")  # EST UTC-5, EDT UTC-4
BERLIN = ZoneInfo("Europe/Berlin")  # CET UTC+1, CEST UTC+2
ZONES = {"America/New_York": NEW_YORK, "Europe/Berlin": BERLIN}


def utc(text: str) -> datetime:
    """An aware UTC instant from "YYYY-MM-DDTHH:MM[:SS[.ffffff]]"."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def due(timing: Timing, base: datetime, tz: ZoneInfo = NEW_YORK) -> datetime:
    result = next_due(timing, base=base, tz=tz)
    assert result.tzinfo is UTC
    return result


# -- delay -------------------------------------------------------------------------------------


def test_no_timing_is_due_at_once() -> None:
    assert due(Timing(), utc("2026-05-01T12:00")) == utc("2026-05-01T12:00")


def test_delay_is_added_to_the_base() -> None:
    timing = Timing(delay=timedelta(days=3, minutes=90))
    assert due(timing, utc("2026-05-01T12:00")) == utc("2026-05-04T13:30")


def test_delay_is_elapsed_time_even_across_a_dst_change() -> None:
    # Noon EST on the eve of spring-forward: one day later is 17:00 UTC, not wall-clock noon
    # (16:00 UTC), which is what adding a timedelta to a New York datetime would give.
    base = datetime(2026, 3, 7, 12, 0, tzinfo=NEW_YORK)
    assert due(Timing(delay=timedelta(days=1)), base) == utc("2026-03-08T17:00")


def test_a_base_in_another_zone_comes_back_in_utc() -> None:
    base = datetime(2026, 5, 1, 14, 0, tzinfo=BERLIN)
    assert due(Timing(delay=timedelta(hours=1)), base) == utc("2026-05-01T13:00")


# -- at ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("zone_name", "at", "base", "delay", "expected"),
    [
        # Later the same day, and the next day once today's has passed.
        ("America/New_York", "09:00", "2026-06-01T12:00", timedelta(0), "2026-06-01T13:00"),
        ("America/New_York", "09:00", "2026-06-01T14:00", timedelta(0), "2026-06-02T13:00"),
        ("Europe/Berlin", "09:00", "2026-06-01T06:00", timedelta(0), "2026-06-01T07:00"),
        # New York springs forward on 2026-03-08: 09:00 is 14:00 UTC before, 13:00 after.
        ("America/New_York", "09:00", "2026-03-07T12:00", timedelta(0), "2026-03-07T14:00"),
        ("America/New_York", "09:00", "2026-03-07T15:00", timedelta(0), "2026-03-08T13:00"),
        # ...and falls back on 2026-11-01: 13:00 UTC before, 14:00 after.
        ("America/New_York", "09:00", "2026-10-31T12:00", timedelta(0), "2026-10-31T13:00"),
        ("America/New_York", "09:00", "2026-10-31T14:00", timedelta(0), "2026-11-01T14:00"),
        # Berlin springs forward on 2026-03-29: 09:00 is 08:00 UTC before, 07:00 after.
        ("Europe/Berlin", "09:00", "2026-03-28T07:00", timedelta(0), "2026-03-28T08:00"),
        ("Europe/Berlin", "09:00", "2026-03-28T09:00", timedelta(0), "2026-03-29T07:00"),
        # ...and falls back on 2026-10-25: 07:00 UTC before, 08:00 after.
        ("Europe/Berlin", "09:00", "2026-10-24T06:00", timedelta(0), "2026-10-24T07:00"),
        ("Europe/Berlin", "09:00", "2026-10-24T08:00", timedelta(0), "2026-10-25T08:00"),
        # The delay runs first, then the next 09:00 local.
        ("America/New_York", "09:00", "2026-03-05T15:00", timedelta(days=3), "2026-03-09T13:00"),
        ("America/New_York", "09:00", "2026-03-05T12:00", timedelta(days=3), "2026-03-08T13:00"),
        (
            "Europe/Berlin",
            "18:30:15",
            "2026-10-20T12:00",
            timedelta(weeks=1),
            "2026-10-27T17:30:15",
        ),
    ],
)
def test_at_is_the_next_local_time_of_day(
    zone_name: str, at: str, base: str, delay: timedelta, expected: str
) -> None:
    timing = Timing(delay=delay, at=parse_at(at, where="at"))
    assert due(timing, utc(base), ZONES[zone_name]) == utc(expected)


def test_at_exactly_at_the_start_counts() -> None:
    timing = Timing(at=time(9, 0))
    assert due(timing, utc("2026-06-01T13:00")) == utc("2026-06-01T13:00")
    assert due(timing, utc("2026-06-01T13:00:00.000001")) == utc("2026-06-02T13:00")


def test_at_uses_the_timings_zone_over_the_recipients() -> None:
    base = utc("2026-06-01T00:00")
    assert due(Timing(at=time(9, 0)), base, NEW_YORK) == utc("2026-06-01T13:00")
    fixed = Timing(at=time(9, 0), timezone="Europe/Berlin")
    assert due(fixed, base, NEW_YORK) == utc("2026-06-01T07:00")


@pytest.mark.parametrize(
    ("zone_name", "at", "base", "expected"),
    [
        # 02:00-02:59 do not exist in New York on 2026-03-08: the clock jumps to 03:00 EDT.
        ("America/New_York", "02:30", "2026-03-08T00:00", "2026-03-08T07:00"),
        ("America/New_York", "02:00", "2026-03-08T00:00", "2026-03-08T07:00"),
        ("America/New_York", "02:59:59", "2026-03-08T00:00", "2026-03-08T07:00"),
        # The gap's end is exactly the start: it counts. One second later waits a day.
        ("America/New_York", "02:30", "2026-03-08T07:00", "2026-03-08T07:00"),
        ("America/New_York", "02:30", "2026-03-08T07:00:01", "2026-03-09T06:30"),
        # Next to the gap, times exist as usual.
        ("America/New_York", "01:59", "2026-03-08T00:00", "2026-03-08T06:59"),
        ("America/New_York", "03:00", "2026-03-08T00:00", "2026-03-08T07:00"),
        # Berlin skips 02:00-02:59 on 2026-03-29 and lands on 03:00 CEST.
        ("Europe/Berlin", "02:30", "2026-03-28T12:00", "2026-03-29T01:00"),
    ],
)
def test_at_in_a_spring_forward_gap_is_when_the_gap_ends(
    zone_name: str, at: str, base: str, expected: str
) -> None:
    timing = Timing(at=parse_at(at, where="at"))
    assert due(timing, utc(base), ZONES[zone_name]) == utc(expected)


@pytest.mark.parametrize(
    ("zone_name", "at", "base", "expected"),
    [
        # 01:00-01:59 happen twice in New York on 2026-11-01: first EDT, then EST.
        ("America/New_York", "01:30", "2026-11-01T00:00", "2026-11-01T05:30"),
        # A start between the two waits for the next day's 01:30 (EST).
        ("America/New_York", "01:30", "2026-11-01T05:45", "2026-11-02T06:30"),
        ("America/New_York", "01:30", "2026-11-01T06:15", "2026-11-02T06:30"),
        # Berlin repeats 02:00-02:59 on 2026-10-25: first CEST, then CET.
        ("Europe/Berlin", "02:30", "2026-10-24T12:00", "2026-10-25T00:30"),
        ("Europe/Berlin", "02:30", "2026-10-25T00:31", "2026-10-26T01:30"),
    ],
)
def test_at_in_a_fall_back_repeat_is_the_first_occurrence(
    zone_name: str, at: str, base: str, expected: str
) -> None:
    timing = Timing(at=parse_at(at, where="at"))
    assert due(timing, utc(base), ZONES[zone_name]) == utc(expected)


def test_at_a_whole_skipped_day_is_the_next_midnight() -> None:
    # Samoa skipped 2011-12-30 entirely, jumping from UTC-10 to UTC+14.
    apia = ZoneInfo("Pacific/Apia")
    timing = Timing(at=time(9, 0))
    assert due(timing, utc("2011-12-29T20:00"), apia) == utc("2011-12-30T10:00")


# -- cron --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("zone_name", "base", "expected"),
    [
        # Mondays 09:00 in New York around spring-forward (Sunday 2026-03-08).
        ("America/New_York", "2026-02-27T00:00", "2026-03-02T14:00"),
        ("America/New_York", "2026-03-02T14:00:01", "2026-03-09T13:00"),
        # ...and around fall-back (Sunday 2026-11-01).
        ("America/New_York", "2026-10-23T00:00", "2026-10-26T13:00"),
        ("America/New_York", "2026-10-26T13:00:01", "2026-11-02T14:00"),
        # Berlin around spring-forward (Sunday 2026-03-29).
        ("Europe/Berlin", "2026-03-20T00:00", "2026-03-23T08:00"),
        ("Europe/Berlin", "2026-03-23T08:00:01", "2026-03-30T07:00"),
        # ...and around fall-back (Sunday 2026-10-25).
        ("Europe/Berlin", "2026-10-16T00:00", "2026-10-19T07:00"),
        ("Europe/Berlin", "2026-10-19T07:00:01", "2026-10-26T08:00"),
    ],
)
def test_cron_follows_local_time_across_dst_changes(
    zone_name: str, base: str, expected: str
) -> None:
    timing = Timing(cron="0 9 * * MON")
    assert due(timing, utc(base), ZONES[zone_name]) == utc(expected)


def test_cron_occurrence_exactly_at_the_start_counts() -> None:
    timing = Timing(cron="0 9 * * MON")
    assert due(timing, utc("2026-03-09T13:00")) == utc("2026-03-09T13:00")
    assert due(timing, utc("2026-03-09T12:59:59")) == utc("2026-03-09T13:00")
    assert due(timing, utc("2026-03-09T13:00:00.000001")) == utc("2026-03-16T13:00")
    # Occurrences are whole minutes: 09:00:30 is past the 09:00 one.
    assert due(timing, utc("2026-03-09T13:00:30")) == utc("2026-03-16T13:00")


def test_cron_counts_from_after_the_delay() -> None:
    base = utc("2026-03-02T10:00")  # Monday 05:00 EST
    assert due(Timing(cron="0 9 * * MON"), base) == utc("2026-03-02T14:00")
    delayed = Timing(delay=timedelta(weeks=1), cron="0 9 * * MON")
    assert due(delayed, base) == utc("2026-03-09T13:00")
    later = Timing(delay=timedelta(weeks=1, hours=4), cron="0 9 * * MON")
    assert due(later, base) == utc("2026-03-16T13:00")


def test_cron_uses_the_timings_zone_over_the_recipients() -> None:
    timing = Timing(cron="0 9 * * *", timezone="Europe/Berlin")
    assert due(timing, utc("2026-06-01T00:00"), NEW_YORK) == utc("2026-06-01T07:00")
    assert due(Timing(cron="0 9 * * *"), utc("2026-06-01T00:00"), NEW_YORK) == utc(
        "2026-06-01T13:00"
    )


def test_cron_names_and_lists() -> None:
    timing = Timing(cron="15 8,17 * JAN,jul mon-fri")
    # Wednesday 2026-07-01 08:15 EDT is 12:15 UTC; 17:15 EDT is 21:15 UTC.
    assert due(timing, utc("2026-06-30T22:00")) == utc("2026-07-01T12:15")
    assert due(timing, utc("2026-07-01T12:16")) == utc("2026-07-01T21:15")


def test_cron_at_a_skipped_or_repeated_time_behaves_like_at() -> None:
    # 02:30 does not exist on 2026-03-08 in New York; cron, like `at`, runs at 03:00 EDT.
    assert due(Timing(cron="30 2 * * *"), utc("2026-03-08T00:00")) == utc("2026-03-08T07:00")
    # 01:30 happens twice on 2026-11-01: the first one, once.
    assert due(Timing(cron="30 1 * * *"), utc("2026-11-01T00:00")) == utc("2026-11-01T05:30")
    assert due(Timing(cron="30 1 * * *"), utc("2026-11-01T06:15")) == utc("2026-11-02T06:30")


def test_cron_steps_run_in_elapsed_time_through_a_repeated_hour() -> None:
    # Every 30 minutes: 01:30 EDT, then 01:00 EST an elapsed half hour later.
    timing = Timing(cron="*/30 * * * *")
    assert due(timing, utc("2026-11-01T05:30:01")) == utc("2026-11-01T06:00")


# Instants the clocks change at, to aim random bases near them.
TRANSITIONS = [
    utc("2026-03-08T07:00"),
    utc("2026-11-01T06:00"),
    utc("2026-03-29T01:00"),
    utc("2026-10-25T01:00"),
    utc("2026-04-04T15:00"),  # Lord Howe Island: back half an hour
    utc("2026-10-03T15:30"),  # Lord Howe Island: forward half an hour
]
PROPERTY_ZONES = [NEW_YORK, BERLIN, ZoneInfo("Australia/Lord_Howe")]


@settings(max_examples=400, deadline=None)
@given(
    transition=st.sampled_from(TRANSITIONS),
    offset=st.integers(min_value=-2 * 86400, max_value=2 * 86400),
    microsecond=st.sampled_from([0, 1, 999_999]),
    hour=st.integers(0, 23),
    minute=st.sampled_from([0, 1, 15, 29, 30, 31, 45, 59]),
    tz=st.sampled_from(PROPERTY_ZONES),
)
def test_at_agrees_with_the_equivalent_daily_cron(
    transition: datetime, offset: int, microsecond: int, hour: int, minute: int, tz: ZoneInfo
) -> None:
    base = transition + timedelta(seconds=offset, microseconds=microsecond)
    by_at = due(Timing(at=time(hour, minute)), base, tz)
    by_cron = due(Timing(cron=f"{minute} {hour} * * *"), base, tz)
    assert by_at == by_cron
    assert base <= by_at < base + timedelta(days=2)
    local = by_at.astimezone(tz)
    if local.time() != time(hour, minute):
        # The clocks skipped `at`, and this is the instant they jumped over it.
        just_before = (by_at - timedelta(seconds=1)).astimezone(tz)
        assert just_before.utcoffset() != local.utcoffset()
        assert just_before.time() < time(hour, minute) < local.time()


# -- cron across DST, however it is spelled ----------------------------------------------------

# The UTC instants each zone springs forward and falls back at in 2026 (the tables below say
# how its clocks move): both hemispheres, a gap at midnight, half-hour changes.
DST_ZONES = {
    "America/New_York": ("2026-03-08T07:00", "2026-11-01T06:00"),
    "Europe/London": ("2026-03-29T01:00", "2026-10-25T01:00"),
    "Europe/Berlin": ("2026-03-29T01:00", "2026-10-25T01:00"),
    "Australia/Sydney": ("2026-10-03T16:00", "2026-04-04T16:00"),
    "America/Santiago": ("2026-09-06T04:00", "2026-04-05T03:00"),
    "Australia/Lord_Howe": ("2026-10-03T15:30", "2026-04-04T15:00"),
}


def test_a_stepped_minute_in_the_gap_fires_when_the_gap_ends() -> None:
    # The report: enrolled Saturday 2026-03-07 17:00Z, `*/30 2` was due Monday 02:00 EDT while
    # `0,30 2` was due Sunday 03:00 EDT, the end of the gap.
    base = utc("2026-03-07T17:00")
    for expression in ("*/30 2 * * *", "0,30 2 * * *", "0-59/30 2-2 * * *", "30,0 2 * * *"):
        assert due(Timing(cron=expression), base) == utc("2026-03-08T07:00"), expression


@pytest.mark.parametrize(
    ("zone_name", "fields", "base", "expected", "then"),
    [
        # New York skips 02:00-02:59 on 2026-03-08, to 03:00 EDT (07:00Z).
        ("America/New_York", "30 2", "03-07T17:00", "03-08T07:00", "03-09T06:30"),
        ("America/New_York", "*/30 2", "03-07T17:00", "03-08T07:00", "03-09T06:00"),
        ("America/New_York", "* 2", "03-07T17:00", "03-08T07:00", "03-09T06:00"),
        ("America/New_York", "0-59 2", "03-07T17:00", "03-08T07:00", "03-09T06:00"),
        # London skips 01:00-01:59 on 2026-03-29, to 02:00 BST (01:00Z).
        ("Europe/London", "30 1", "03-28T12:00", "03-29T01:00", "03-30T00:30"),
        ("Europe/London", "*/20 1", "03-28T12:00", "03-29T01:00", "03-30T00:00"),
        ("Europe/London", "5-55/25 1/24", "03-28T12:00", "03-29T01:00", "03-30T00:05"),
        # Berlin skips 02:00-02:59 on 2026-03-29, to 03:00 CEST (01:00Z).
        ("Europe/Berlin", "15 2", "03-28T12:00", "03-29T01:00", "03-30T00:15"),
        ("Europe/Berlin", "15/60 2", "03-28T12:00", "03-29T01:00", "03-30T00:15"),
        ("Europe/Berlin", "*/15 2-2", "03-28T12:00", "03-29T01:00", "03-30T00:00"),
        # Sydney skips 02:00-02:59 on 2026-10-04, to 03:00 AEDT (16:00Z the day before).
        ("Australia/Sydney", "30 2", "10-03T00:00", "10-03T16:00", "10-04T15:30"),
        ("Australia/Sydney", "*/30 2", "10-03T00:00", "10-03T16:00", "10-04T15:00"),
        ("Australia/Sydney", "0,30 2,2", "10-03T00:00", "10-03T16:00", "10-04T15:00"),
        # Santiago skips midnight, 00:00-00:59 on 2026-09-06, to 01:00 -03 (04:00Z).
        ("America/Santiago", "0 0", "09-05T12:00", "09-06T04:00", "09-07T03:00"),
        ("America/Santiago", "*/20 0", "09-05T12:00", "09-06T04:00", "09-07T03:00"),
        ("America/Santiago", "* */24", "09-05T12:00", "09-06T04:00", "09-07T03:00"),
        # Lord Howe skips half an hour, 02:00-02:29 on 2026-10-04, to 02:30 +11 (15:30Z).
        ("Australia/Lord_Howe", "15 2", "10-03T12:00", "10-03T15:30", "10-04T15:15"),
        ("Australia/Lord_Howe", "*/15 2", "10-03T12:00", "10-03T15:30", "10-03T15:45"),
        ("Australia/Lord_Howe", "15-59/15 2", "10-03T12:00", "10-03T15:30", "10-03T15:45"),
    ],
)
def test_specific_hours_in_a_gap_fire_when_it_ends_however_they_are_spelled(
    zone_name: str, fields: str, base: str, expected: str, then: str
) -> None:
    tz = ZoneInfo(zone_name)
    timing = Timing(cron=f"{fields} * * *")
    assert due(timing, utc(f"2026-{base}"), tz) == utc(f"2026-{expected}")
    # Once, not once per skipped time: the next is the next real time named, after the gap.
    assert due(timing, utc(f"2026-{expected}:01"), tz) == utc(f"2026-{then}")


@pytest.mark.parametrize(
    ("zone_name", "specific", "hourly", "once", "twice"),
    [
        # New York repeats 01:00-01:59 on 2026-11-01 (EDT, then EST from 06:00Z).
        ("America/New_York", "30 1", "30 *", "11-01T05:30", "11-01T06:30"),
        ("America/New_York", "*/30 1", "*/30 0-23", "11-01T05:30", "11-01T06:00"),
        # London repeats 01:00-01:59 on 2026-10-25 (BST, then GMT from 01:00Z).
        ("Europe/London", "45 1", "45 */1", "10-25T00:45", "10-25T01:45"),
        # Berlin repeats 02:00-02:59 on 2026-10-25 (CEST, then CET from 01:00Z).
        ("Europe/Berlin", "10 2", "10 0-11,12-23", "10-25T00:10", "10-25T01:10"),
        # Sydney repeats 02:00-02:59 on 2026-04-05 (AEDT, then AEST from 16:00Z).
        ("Australia/Sydney", "0 2", "0 *", "04-04T15:00", "04-04T16:00"),
        # Santiago repeats 23:00-23:59 on 2026-04-04 (-03, then -04 from 03:00Z).
        ("America/Santiago", "30 23", "30 *", "04-05T02:30", "04-05T03:30"),
        # Lord Howe repeats 01:30-01:59 on 2026-04-05 (+11, then +10:30 from 15:00Z).
        ("Australia/Lord_Howe", "*/20 1", "*/20 *", "04-04T14:40", "04-04T15:10"),
        # cronsim's own elapsed-time walk skips the second 01:40 here (it assumes whole-hour
        # changes); dripd maps wall times itself.
        ("Australia/Lord_Howe", "40 1", "40 *", "04-04T14:40", "04-04T15:10"),
    ],
)
def test_a_repeated_time_fires_once_for_specific_hours_and_twice_every_hour(
    zone_name: str, specific: str, hourly: str, once: str, twice: str
) -> None:
    tz = ZoneInfo(zone_name)
    first, second = utc(f"2026-{once}"), utc(f"2026-{twice}")
    # Every hour keeps its elapsed-time cadence: both occurrences of the repeated time.
    every_hour = Timing(cron=f"{hourly} * * *")
    assert due(every_hour, first - timedelta(seconds=1), tz) == first
    assert due(every_hour, first + timedelta(seconds=1), tz) == second
    # Specific hours read the wall clock: the first occurrence only, as `at` does.
    named = Timing(cron=f"{specific} * * *")
    assert due(named, first - timedelta(seconds=1), tz) == first
    assert due(named, first + timedelta(seconds=1), tz) > second + timedelta(hours=12)


def test_every_hour_at_a_minute_stays_hourly_through_the_gap() -> None:
    # 01:15 EST, then 03:15 EDT an elapsed hour later: 02:15 does not happen.
    for hours in ("*", "*/1", "0-23", "0-11,12-23"):
        timing = Timing(cron=f"15 {hours} * * *")
        assert due(timing, utc("2026-03-08T06:15:01")) == utc("2026-03-08T07:15"), hours


def test_day_fields_keep_their_and_or_meaning() -> None:
    # Day-of-month and day-of-week both restricted: the 1st OR a Monday. A day-of-month
    # starting with "*" (`*/1`) makes it AND: Mondays only. Rewriting must not touch them.
    base = utc("2026-06-02T00:00")  # Monday 2026-06-01 20:00 in New York
    either = Timing(cron="0 9 1 * MON")
    assert due(either, base) == utc("2026-06-08T13:00")  # the next Monday
    assert due(either, utc("2026-06-09T00:00")) == utc("2026-06-15T13:00")
    assert due(Timing(cron="0 9 1 7 MON"), base) == utc("2026-07-01T13:00")  # a Wednesday
    assert due(Timing(cron="0 9 */1 7 MON"), base) == utc("2026-07-06T13:00")  # a Monday


@st.composite
def cron_field(draw: st.DrawFn, top: int) -> tuple[frozenset[int], list[str]]:
    """A random set of the values 0..`top` and several spellings of it: the random terms it
    was drawn as, a sorted list, a shuffled list, ranges, and the full-set forms."""
    terms: list[tuple[str, range]] = []
    for _ in range(draw(st.integers(1, 4))):
        # a < b: cronsim reads a one-value range with a step ("5-5/10") as "5/10".
        a, b = sorted(draw(st.lists(st.integers(0, top), min_size=2, max_size=2, unique=True)))
        step = draw(st.integers(1, top + 1))
        terms.append(
            draw(
                st.sampled_from(
                    [
                        (str(a), range(a, a + 1)),
                        (f"{a}-{b}", range(a, b + 1)),
                        (f"{a}/{step}", range(a, top + 1, step)),
                        (f"{a}-{b}/{step}", range(a, b + 1, step)),
                        (f"*/{step}", range(0, top + 1, step)),
                        ("*", range(top + 1)),
                    ]
                )
            )
        )
    values = frozenset(v for _, r in terms for v in r)
    ordered = sorted(values)
    runs: list[str] = []
    for v in ordered:
        if runs and v - 1 in values:
            runs[-1] = f"{runs[-1].split('-')[0]}-{v}"
        else:
            runs.append(str(v))
    spellings = [
        ",".join(text for text, _ in terms),
        ",".join(map(str, ordered)),
        ",".join(map(str, draw(st.permutations(ordered)))),
        ",".join(runs),
    ]
    if len(values) == top + 1:
        spellings += ["*", "*/1", f"0-{top}", f"0/1,{top}"]
    return values, spellings


ZONE_CHANGES = [
    (ZoneInfo(name), utc(instant)) for name, pair in DST_ZONES.items() for instant in pair
]
DAY_FIELDS = {
    "* * *": frozenset(range(7)),
    "* * MON-FRI": frozenset(range(5)),
    "* * SUN": frozenset({6}),
}


@settings(max_examples=60, deadline=None)
@given(
    minutes=cron_field(59),
    hours=cron_field(23),
    days=st.sampled_from(sorted(DAY_FIELDS)),
    change=st.sampled_from(ZONE_CHANGES),
    offset=st.integers(min_value=-2 * 86400, max_value=2 * 86400),
)
def test_equivalent_cron_spellings_fall_due_at_the_same_instant(
    minutes: tuple[frozenset[int], list[str]],
    hours: tuple[frozenset[int], list[str]],
    days: str,
    change: tuple[ZoneInfo, datetime],
    offset: int,
) -> None:
    tz, transition = change
    base = transition + timedelta(seconds=offset)
    (minute_set, minute_texts), (hour_set, hour_texts) = minutes, hours
    expressions = [f"{m} {h} {days}" for m in minute_texts for h in hour_texts]
    found = {text: due(Timing(cron=text), base, tz) for text in expressions}
    assert len(set(found.values())) == 1, found
    (result,) = set(found.values())
    # And it is the instant the documented rule names: the first not before `base` of the
    # instants the matching wall times stand for, on the local days from `base` to it.
    first_day = base.astimezone(tz).date() - timedelta(days=1)
    local_days = [
        day
        for n in range((result.astimezone(tz).date() - first_day).days + 2)
        for day in [first_day + timedelta(days=n)]
        if day.weekday() in DAY_FIELDS[days]
    ]
    walls = [
        datetime(day.year, day.month, day.day, h, m)
        for day in local_days
        for h in hour_set
        for m in minute_set
    ]
    if len(hour_set) < 24:
        # Specific hours: each wall time once, as `at` reads it (a gap's end, a first repeat).
        candidates = {local_instant(wall, tz) for wall in walls}
    else:
        # Every hour, elapsed time: each real occurrence (both of a repeated time, none of one
        # in a gap).
        candidates = {
            instant
            for wall in walls
            for fold in (0, 1)
            for instant in [wall.replace(tzinfo=tz, fold=fold).astimezone(UTC)]
            if instant.astimezone(tz).replace(tzinfo=None) == wall
        }
    assert result == min(c for c in candidates if c >= base)


# -- misuse ------------------------------------------------------------------------------------


def test_a_naive_base_is_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        next_due(Timing(), base=datetime(2026, 5, 1, 12, 0), tz=NEW_YORK)


def test_at_and_cron_together_are_refused() -> None:
    with pytest.raises(ValueError, match="not both"):
        next_due(Timing(at=time(9, 0), cron="0 9 * * *"), base=utc("2026-05-01T00:00"), tz=BERLIN)


def test_an_unknown_timing_zone_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="'Mars/Olympus' is not a known IANA timezone"):
        next_due(
            Timing(at=time(9, 0), timezone="Mars/Olympus"),
            base=utc("2026-05-01T00:00"),
            tz=BERLIN,
        )


def test_timing_is_a_frozen_value() -> None:
    timing = Timing()
    assert (timing.delay, timing.at, timing.cron, timing.timezone) == (
        timedelta(0),
        None,
        None,
        None,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        timing.delay = timedelta(1)  # type: ignore[misc]
    assert Timing(cron="0 9 * * *") == Timing(cron="0 9 * * *")
    with pytest.raises(TypeError):
        Timing(timedelta(1))  # type: ignore[call-arg]


# -- parsing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("09:30", time(9, 30)),
        ("00:00", time(0, 0)),
        ("23:59", time(23, 59)),
        ("23:59:59", time(23, 59, 59)),
        ("07:05:09", time(7, 5, 9)),
    ],
)
def test_parse_at(text: str, expected: time) -> None:
    assert parse_at(text, where="key 'at'") == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("25:00", "key 'at': '25:00' is not a time of day; hours run 00-23, minutes and seconds"),
        ("24:00", "key 'at': '24:00' is not a time of day; hours run 00-23"),
        ("12:60", "key 'at': '12:60' is not a time of day; hours run 00-23"),
        ("12:00:60", "key 'at': '12:00:60' is not a time of day; hours run 00-23"),
        ("9am", "key 'at': '9am' is not a time of day; use 24-hour \"HH:MM\" or \"HH:MM:SS\""),
        ("9:30", "key 'at': '9:30' is not a time of day; use 24-hour"),
        ("09:30 ", "key 'at': '09:30 ' is not a time of day; use 24-hour"),
        ("09:30:00.5", "key 'at': '09:30:00.5' is not a time of day; use 24-hour"),
        ("", "key 'at': '' is not a time of day; use 24-hour"),
        ("０９:３０", "is not a time of day; use 24-hour"),
    ],
)
def test_parse_at_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_at(text, where="key 'at'")
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0 9 * * MON", "0 9 * * MON"),
        ("  0 9 * * mon\n", "0 9 * * mon"),
        ("*/15 8-18 1,15 JAN-JUN MON-FRI", "*/15 8-18 1,15 JAN-JUN MON-FRI"),
        ("0 0 L * *", "0 0 L * *"),
    ],
)
def test_check_cron_accepts_and_strips(text: str, expected: str) -> None:
    assert check_cron(text, where="key 'cron'") == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("61 * * * *", "key 'cron': '61 * * * *' is not a cron expression: Bad minute"),
        ("0 24 * * *", "key 'cron': '0 24 * * *' is not a cron expression: Bad hour"),
        ("0 9 * * FUNDAY", "is not a cron expression: Bad day-of-week"),
        ("0 0 30 2 *", "is not a cron expression: Bad day-of-month"),
        (
            "0 9 * *",
            "key 'cron': '0 9 * *' is not a cron expression: wrong number of fields: expected 5 "
            "(minute hour day-of-month month day-of-week), found 4",
        ),
        ("0 0 9 * * MON", "wrong number of fields: expected 5"),
        ("0 0 9 * * MON", "found 6"),
        ("", "key 'cron': '' is not a cron expression: wrong number of fields"),
    ],
)
def test_check_cron_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_cron(text, where="key 'cron'")
    assert message in str(info.value)


cron_fields = st.lists(
    st.sampled_from(["*", "0", "7", "61", "1-5", "5-1", "*/2", "*/0", "/", "-", ",", "#", "L"])
    | st.sampled_from(["LW", "MON", "jan", "5L", "MON#2", "MON#9", "1,2", "?", "99999999999"]),
    min_size=1,
    max_size=3,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.lists(cron_fields, min_size=5, max_size=5).map(" ".join), st.text()))
def test_check_cron_accepts_or_raises_a_config_error(text: str) -> None:
    error: ConfigError | None = None
    try:
        checked = check_cron(text, where="key 'cron'")
    except ConfigError as exc:
        error = exc
    if error is None:
        assert checked == text.strip()
    else:
        assert str(error).startswith("key 'cron': ")


def test_zone() -> None:
    assert zone("Europe/Berlin", where="key 'timezone'") == BERLIN


@pytest.mark.parametrize("name", ["Mars/Olympus", "America", "", "../etc/passwd", "/etc/localtime"])
def test_unknown_zones(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        zone(name, where="key 'timezone'")
    assert str(info.value) == f"key 'timezone': {name!r} is not a known IANA timezone"
