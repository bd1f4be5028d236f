"""Send windows: parsing, the next opening across weekends, midnight and both DST changes."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dripd.errors import ConfigError
from dripd.rules.window import (
    EVERY_DAY,
    Window,
    defer_to_opening,
    next_opening,
    next_span,
    parse_window,
    spread,
)
from dripd.timing import Timing, local_instant, next_due

NEW_YORK = ZoneInfo("America/New_York")
BERLIN = ZoneInfo("Europe/Berlin")
MON, TUE, WED, THU, FRI, SAT, SUN = range(7)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def window(days: str | None = None, hours: str | None = None) -> Window:
    raw: dict[str, Any] = {}
    if days is not None:
        raw["days"] = days
    if hours is not None:
        raw["hours"] = hours
    return parse_window(raw, where="steps[0].window")


# -- parsing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("days", "expected"),
    [
        ("mon-fri", {MON, TUE, WED, THU, FRI}),
        ("mon,wed,fri", {MON, WED, FRI}),
        ("mon-wed,sat", {MON, TUE, WED, SAT}),
        ("daily", set(range(7))),
        ("fri-mon", {FRI, SAT, SUN, MON}),
        ("sun-sun", {SUN}),
        (" Sat , SUN ", {SAT, SUN}),
        ("tue-mon", set(range(7))),
    ],
)
def test_days_parse_ranges_lists_and_mixes(days: str, expected: set[int]) -> None:
    assert window(days=days).days == frozenset(expected)


def test_days_may_be_a_list_of_terms() -> None:
    assert parse_window({"days": ["mon-tue", "fri"]}, where="w").days == {MON, TUE, FRI}


def test_hours_parse_with_an_inclusive_start_and_exclusive_end() -> None:
    parsed = window(hours="09:00-18:30")
    assert (parsed.start, parsed.end, parsed.days) == (time(9), time(18, 30), EVERY_DAY)


@pytest.mark.parametrize(
    ("hours", "start", "end"),
    [
        ("22:00-06:00", time(22), time(6)),
        ("18:00-24:00", time(18), time(0)),
        ("00:00-24:00", time(0), time(0)),
        ("09:05 - 17:55", time(9, 5), time(17, 55)),
    ],
)
def test_hours_across_midnight_and_up_to_24(hours: str, start: time, end: time) -> None:
    parsed = window(hours=hours)
    assert (parsed.start, parsed.end) == (start, end)


def test_leaving_out_a_key_means_every_day_or_all_day() -> None:
    assert window(hours="09:00-17:00").days == EVERY_DAY
    only_days = window(days="sat")
    assert (only_days.start, only_days.end) == (time(0), time(0))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({}, "steps[0].window: an empty window"),
        ({"day": "mon"}, "steps[0].window.day: unknown key"),
        ({"days": "mon-fri", "zone": "UTC"}, "steps[0].window.zone: unknown key"),
        ({"days": "monday"}, "steps[0].window.days: 'monday' is not a day"),
        ({"days": "mon-"}, "steps[0].window.days: 'mon-' is not a day"),
        ({"days": "mon,,fri"}, "steps[0].window.days: an empty entry is not a day"),
        ({"days": ""}, "steps[0].window.days: an empty entry is not a day"),
        ({"days": []}, "steps[0].window.days: must be a string of days"),
        ({"days": 5}, "steps[0].window.days: must be a string of days"),
        ({"hours": "9-17"}, "steps[0].window.hours: '9-17' is not a span of hours"),
        ({"hours": "09:00"}, "steps[0].window.hours: '09:00' is not a span of hours"),
        ({"hours": 9}, "steps[0].window.hours: 9 is not a span of hours"),
        ({"hours": "25:00-26:00"}, "hours run 00-23"),
        ({"hours": "24:00-06:00"}, "hours run 00-23"),
        ({"hours": "09:00-24:30"}, "hours run 00-23"),
        ({"hours": "09:60-10:00"}, "minutes 00-59"),
        ({"hours": "09:00-09:00"}, "steps[0].window.hours: '09:00-09:00' starts and ends"),
    ],
)
def test_parse_errors_name_the_key(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_window(raw, where="steps[0].window")
    assert message in caught.value.message


def test_a_sequence_files_key_path_reads_as_one_key() -> None:
    with pytest.raises(ConfigError, match=r"^key 'sequence\.window\.hours': '9' is not a span"):
        parse_window({"hours": "9"}, where="key 'sequence.window'")
    with pytest.raises(ConfigError, match=r"^key 'window\.zone': unknown key"):
        parse_window({"zone": "UTC"}, where="key 'window'")


def test_a_window_that_is_not_a_table_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^w: must be a table"):
        parse_window("mon-fri", where="w")  # type: ignore[arg-type]


def test_a_window_on_no_day_cannot_be_made() -> None:
    with pytest.raises(ValueError, match="weekdays"):
        Window(days=frozenset())
    with pytest.raises(ValueError, match="weekdays"):
        Window(days=frozenset({7}))


# -- next opening ------------------------------------------------------------------------------

OFFICE = window(days="mon-fri", hours="09:00-17:00")


def test_inside_the_window_is_none() -> None:
    # Monday 2026-01-05, 12:00 in New York.
    assert next_opening(OFFICE, utc("2026-01-05T17:00"), NEW_YORK) is None


def test_before_the_opening_waits_for_it() -> None:
    # Monday 07:00 New York -> 09:00 the same day.
    assert next_opening(OFFICE, utc("2026-01-05T12:00"), NEW_YORK) == utc("2026-01-05T14:00")


def test_after_the_closing_waits_for_the_next_day() -> None:
    # Monday 18:00 New York -> Tuesday 09:00.
    assert next_opening(OFFICE, utc("2026-01-05T23:00"), NEW_YORK) == utc("2026-01-06T14:00")


@pytest.mark.parametrize(
    "now",
    [
        utc("2026-01-09T22:00"),  # Friday 17:00 (the closing instant)
        utc("2026-01-10T15:00"),  # Saturday 10:00
        utc("2026-01-11T23:59"),  # Sunday 18:59
        utc("2026-01-12T13:59:59.999999"),  # Monday, a microsecond before 09:00
    ],
)
def test_a_weekend_waits_for_monday(now: datetime) -> None:
    assert next_opening(OFFICE, now, NEW_YORK) == utc("2026-01-12T14:00")


def test_the_opening_instant_is_open_and_the_closing_instant_is_closed() -> None:
    assert next_opening(OFFICE, utc("2026-01-05T14:00"), NEW_YORK) is None
    assert next_opening(OFFICE, utc("2026-01-05T21:59:59.999999"), NEW_YORK) is None
    assert next_opening(OFFICE, utc("2026-01-05T22:00"), NEW_YORK) == utc("2026-01-06T14:00")


def test_the_answer_is_in_utc_whatever_zone_now_is_in() -> None:
    now = utc("2026-01-05T12:00").astimezone(BERLIN)
    opening = next_opening(OFFICE, now, NEW_YORK)
    assert opening == utc("2026-01-05T14:00")
    assert opening is not None
    assert opening.tzinfo is UTC


def test_the_recipients_zone_decides() -> None:
    now = utc("2026-01-05T12:00")  # 13:00 in Berlin, 07:00 in New York
    assert next_opening(OFFICE, now, BERLIN) is None
    assert next_opening(OFFICE, now, NEW_YORK) == utc("2026-01-05T14:00")


NIGHT_FRIDAY = window(days="fri", hours="22:00-06:00")


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (utc("2026-01-09T20:59"), utc("2026-01-09T21:00")),  # Friday 21:59 in Berlin
        (utc("2026-01-09T21:00"), None),  # Friday 22:00 in Berlin: open
        (utc("2026-01-09T23:30"), None),  # Saturday 00:30: still Friday's window
        (utc("2026-01-10T04:59:59"), None),  # Saturday 05:59:59
        (utc("2026-01-10T05:00"), utc("2026-01-16T21:00")),  # Saturday 06:00: closed
        (utc("2026-01-08T21:30"), utc("2026-01-09T21:00")),  # Thursday 22:30: not a day of it
        (utc("2026-01-10T21:30"), utc("2026-01-16T21:00")),  # Saturday 22:30: not a day of it
    ],
)
def test_a_window_across_midnight_belongs_to_the_day_it_opens(
    now: datetime, expected: datetime | None
) -> None:
    assert next_opening(NIGHT_FRIDAY, now, BERLIN) == expected


def test_a_wrapping_range_of_days_covers_the_weekend() -> None:
    long_weekend = window(days="fri-mon", hours="10:00-12:00")
    # Tuesday 13:00 Berlin -> Friday 10:00.
    assert next_opening(long_weekend, utc("2026-01-06T12:00"), BERLIN) == utc("2026-01-09T09:00")
    # Saturday, Sunday and Monday 10:30 are open.
    for now in ("2026-01-10T09:30", "2026-01-11T09:30", "2026-01-12T09:30"):
        assert next_opening(long_weekend, utc(now), BERLIN) is None


def test_the_default_window_is_always_open() -> None:
    everything = Window()
    for now in ("2026-03-08T07:00", "2026-11-01T05:30", "2026-11-01T06:30", "2026-01-01T00:00"):
        assert next_opening(everything, utc(now), NEW_YORK) is None


def test_a_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        next_opening(OFFICE, datetime(2026, 1, 5, 12), NEW_YORK)


# -- DST ---------------------------------------------------------------------------------------


def test_new_york_spring_forward_opening_in_the_gap_opens_when_the_gap_ends() -> None:
    # 2026-03-08: 02:00 EST becomes 03:00 EDT at 07:00Z; 02:30 does not happen.
    early = window(hours="02:30-04:00")
    assert next_opening(early, utc("2026-03-08T06:00"), NEW_YORK) == utc("2026-03-08T07:00")
    assert next_opening(early, utc("2026-03-08T07:00"), NEW_YORK) is None
    # 04:00 EDT closes it; the next day it opens at 02:30 EDT again.
    assert next_opening(early, utc("2026-03-08T08:00"), NEW_YORK) == utc("2026-03-09T06:30")


def test_new_york_spring_forward_office_hours_move_an_hour_earlier_in_utc() -> None:
    # Saturday 2026-03-07 evening -> Monday 09:00 EDT (13:00Z), not 14:00Z as the week before.
    assert next_opening(OFFICE, utc("2026-03-07T23:00"), NEW_YORK) == utc("2026-03-09T13:00")
    sundays = window(days="sun", hours="09:00-17:00")
    assert next_opening(sundays, utc("2026-03-08T06:59"), NEW_YORK) == utc("2026-03-08T13:00")
    # The DST Sunday's window is 8 hours long: 13:00Z to 21:00Z.
    assert next_opening(sundays, utc("2026-03-08T20:59:59"), NEW_YORK) is None
    assert next_opening(sundays, utc("2026-03-08T21:00"), NEW_YORK) == utc("2026-03-15T13:00")


def test_new_york_fall_back_opening_at_a_repeated_time_opens_at_the_first() -> None:
    # 2026-11-01: 02:00 EDT becomes 01:00 EST at 06:00Z; 01:30 happens at 05:30Z and 06:30Z.
    repeated = window(hours="01:30-03:00")
    assert next_opening(repeated, utc("2026-11-01T04:00"), NEW_YORK) == utc("2026-11-01T05:30")
    assert next_opening(repeated, utc("2026-11-01T05:30"), NEW_YORK) is None
    assert next_opening(repeated, utc("2026-11-01T06:30"), NEW_YORK) is None  # 01:30 EST
    # 03:00 EST closes it, two and a half hours of real time after it opened.
    assert next_opening(repeated, utc("2026-11-01T07:59:59"), NEW_YORK) is None
    assert next_opening(repeated, utc("2026-11-01T08:00"), NEW_YORK) == utc("2026-11-02T06:30")


def test_new_york_fall_back_office_hours_move_an_hour_later_in_utc() -> None:
    sundays = window(days="sun", hours="09:00-17:00")
    assert next_opening(sundays, utc("2026-11-01T05:00"), NEW_YORK) == utc("2026-11-01T14:00")
    assert next_opening(sundays, utc("2026-10-25T05:00"), NEW_YORK) == utc("2026-10-25T13:00")


def test_berlin_spring_forward() -> None:
    # 2026-03-29: 02:00 CET becomes 03:00 CEST at 01:00Z.
    in_gap = window(hours="02:15-05:00")
    assert next_opening(in_gap, utc("2026-03-29T00:30"), BERLIN) == utc("2026-03-29T01:00")
    # A window closing in the gap closes when the gap ends.
    night = window(hours="00:00-02:30")
    assert next_opening(night, utc("2026-03-29T00:59:59"), BERLIN) is None
    assert next_opening(night, utc("2026-03-29T01:00"), BERLIN) == utc("2026-03-29T22:00")
    # A window wholly inside the gap does not open that day.
    skipped = window(hours="02:10-02:40")
    assert next_opening(skipped, utc("2026-03-28T23:00"), BERLIN) == utc("2026-03-30T00:10")
    assert next_opening(skipped, utc("2026-03-28T00:00"), BERLIN) == utc("2026-03-28T01:10")


def test_berlin_fall_back() -> None:
    # 2026-10-25: 03:00 CEST becomes 02:00 CET at 01:00Z; 02:30 happens at 00:30Z and 01:30Z.
    repeated = window(hours="02:30-04:00")
    assert next_opening(repeated, utc("2026-10-25T00:00"), BERLIN) == utc("2026-10-25T00:30")
    assert next_opening(repeated, utc("2026-10-25T01:45"), BERLIN) is None  # 02:45 CET
    assert next_opening(repeated, utc("2026-10-25T02:59:59"), BERLIN) is None
    assert next_opening(repeated, utc("2026-10-25T03:00"), BERLIN) == utc("2026-10-26T01:30")
    # A wrapping window over the night of the change lasts an hour longer in real time.
    nights = window(days="sat", hours="22:00-06:00")
    assert next_opening(nights, utc("2026-10-24T19:59"), BERLIN) == utc("2026-10-24T20:00")
    assert next_opening(nights, utc("2026-10-25T04:59:59"), BERLIN) is None
    assert next_opening(nights, utc("2026-10-25T05:00"), BERLIN) == utc("2026-10-31T21:00")


def test_local_instant_resolves_gaps_and_repeats() -> None:
    assert local_instant(datetime(2026, 3, 8, 2, 30), NEW_YORK) == utc("2026-03-08T07:00")
    assert local_instant(datetime(2026, 11, 1, 1, 30), NEW_YORK) == utc("2026-11-01T05:30")
    assert local_instant(datetime(2026, 11, 1, 1, 30, fold=1), NEW_YORK) == utc("2026-11-01T05:30")
    assert local_instant(datetime(2026, 1, 5, 9), BERLIN) == utc("2026-01-05T08:00")


TRANSITIONS = [
    utc("2026-03-08T07:00"),
    utc("2026-11-01T06:00"),
    utc("2026-03-29T01:00"),
    utc("2026-10-25T01:00"),
]


@settings(max_examples=300, deadline=None)
@given(
    transition=st.sampled_from(TRANSITIONS),
    offset=st.integers(min_value=-3 * 86400, max_value=3 * 86400),
    days=st.frozensets(st.integers(0, 6), min_size=1),
    start=st.integers(0, 47),
    end=st.integers(0, 47),
    tz=st.sampled_from([NEW_YORK, BERLIN]),
)
def test_the_next_opening_is_open_and_closed_just_before(
    transition: datetime, offset: int, days: frozenset[int], start: int, end: int, tz: ZoneInfo
) -> None:
    shape = Window(
        days=days, start=time(start // 2, start % 2 * 30), end=time(end // 2, end % 2 * 30)
    )
    now = transition + timedelta(seconds=offset)
    opening = next_opening(shape, now, tz)
    if opening is None:
        return
    assert now < opening < now + timedelta(days=8)
    assert next_opening(shape, opening, tz) is None
    assert next_opening(shape, opening - timedelta(microseconds=1), tz) == opening
    assert next_opening(shape, now + (opening - now) / 2, tz) == opening
    if days == EVERY_DAY:
        # A daily window opens where a daily `at` of its start falls due.
        assert opening == next_due(Timing(at=shape.start), base=now, tz=tz)


# -- spread ------------------------------------------------------------------------------------


def test_spread_is_stable_per_key_and_within_range() -> None:
    key = uuid.UUID("7d0c4c3e-5a0b-4d1e-9a55-0c9d1f6d2a11")
    over = timedelta(minutes=10)
    first = spread(key, over)
    assert first == spread(key, over) == spread(uuid.UUID(str(key)), over)
    assert timedelta(0) <= first < over
    offsets = {spread(uuid.UUID(int=n), over) for n in range(200)}
    assert len(offsets) > 190  # spread out, not a herd
    assert min(offsets) < timedelta(minutes=1)
    assert max(offsets) > timedelta(minutes=9)


def test_spread_of_strings_and_uuids() -> None:
    over = timedelta(seconds=30)
    assert spread("row-1", over) == spread("row-1", over)
    assert spread("row-1", over) != spread("row-2", over)


def test_spread_over_nothing_is_zero() -> None:
    assert spread("x", timedelta(0)) == timedelta(0)
    assert spread("x", timedelta(seconds=-5)) == timedelta(0)


@settings(max_examples=200, deadline=None)
@given(key=st.uuids(), over_us=st.integers(min_value=1, max_value=10**12))
def test_spread_stays_below_over(key: uuid.UUID, over_us: int) -> None:
    over = timedelta(microseconds=over_us)
    assert timedelta(0) <= spread(key, over) < over


# -- spread within the window ------------------------------------------------------------------

TEN_MINUTES = timedelta(minutes=10)  # windows.spread's default
KEYS = [uuid.UUID(int=n) for n in range(300)]


def test_a_window_shorter_than_the_spread_gets_every_row_while_it_is_open() -> None:
    # The reported case: "09:00-09:05" with the 10-minute spread sent 0 of 6 in 3 days, as
    # every row whose offset passed 09:05 came back to a closed window, day after day.
    short = window(hours="09:00-09:05")
    now = utc("2026-01-05T15:00")  # Monday 10:00 in New York, just closed
    opening, closing = utc("2026-01-06T14:00"), utc("2026-01-06T14:05")
    assert next_span(short, now, NEW_YORK) == (opening, closing)
    retries = [defer_to_opening(short, now, NEW_YORK, key=k, over=TEN_MINUTES) for k in KEYS]
    assert all(r is not None and opening <= r < closing for r in retries)
    assert all(next_opening(short, r, NEW_YORK) is None for r in retries if r is not None)
    # Still spread over the whole span, not bunched at its start.
    offsets = [r - opening for r in retries if r is not None]
    assert max(offsets) > timedelta(minutes=4, seconds=30)
    assert min(offsets) < timedelta(seconds=30)


def test_a_window_longer_than_the_spread_spreads_by_the_spread() -> None:
    now = utc("2026-01-05T12:00")  # Monday 07:00 in New York
    opening = utc("2026-01-05T14:00")
    for key in KEYS[:50]:
        retry = defer_to_opening(OFFICE, now, NEW_YORK, key=key, over=TEN_MINUTES)
        assert retry == opening + spread(key, TEN_MINUTES)


def test_deferring_inside_the_window_is_none_and_a_zero_spread_is_the_opening() -> None:
    key = KEYS[0]
    assert (
        defer_to_opening(OFFICE, utc("2026-01-05T17:00"), NEW_YORK, key=key, over=TEN_MINUTES)
        is None
    )
    at_opening = defer_to_opening(
        OFFICE, utc("2026-01-05T12:00"), NEW_YORK, key=key, over=timedelta(0)
    )
    assert at_opening == utc("2026-01-05T14:00")
    with pytest.raises(ValueError, match="aware"):
        defer_to_opening(OFFICE, datetime(2026, 1, 5, 12), NEW_YORK, key=key, over=TEN_MINUTES)


# Windows whose real length on a DST day differs from what the wall clock says: the spread is
# capped to the real span (UTC closing minus UTC opening).
@pytest.mark.parametrize(
    ("zone_name", "hours", "opens", "closes"),
    [
        # New York springs forward 02:00 EST -> 03:00 EDT at 07:00Z: 70 wall minutes, 10 real.
        ("America/New_York", "01:55-03:05", "2026-03-08T06:55", "2026-03-08T07:05"),
        # ...and falls back 02:00 EDT -> 01:00 EST at 06:00Z: 90 wall minutes, 150 real.
        ("America/New_York", "00:30-02:00", "2026-11-01T04:30", "2026-11-01T07:00"),
        # London springs forward 01:00 GMT -> 02:00 BST at 01:00Z: 80 wall minutes, 20 real.
        ("Europe/London", "00:50-02:10", "2026-03-29T00:50", "2026-03-29T01:10"),
        # ...and falls back 02:00 BST -> 01:00 GMT at 01:00Z: 5 wall minutes, 65 real.
        ("Europe/London", "01:58-02:03", "2026-10-25T00:58", "2026-10-25T02:03"),
        # Berlin springs forward 02:00 CET -> 03:00 CEST at 01:00Z: 64 wall minutes, 4 real.
        ("Europe/Berlin", "01:58-03:02", "2026-03-29T00:58", "2026-03-29T01:02"),
        # Sydney (southern hemisphere) springs forward in October, 02:00 AEST -> 03:00 AEDT.
        ("Australia/Sydney", "01:57-03:03", "2026-10-03T15:57", "2026-10-03T16:03"),
        # ...and falls back in April, 03:00 AEDT -> 02:00 AEST at 16:00Z: 30 minutes, 90 real.
        ("Australia/Sydney", "02:30-03:00", "2026-04-04T15:30", "2026-04-04T17:00"),
        # Santiago springs forward at midnight, 00:00 -04 -> 01:00 -03 at 04:00Z.
        ("America/Santiago", "23:55-01:05", "2026-09-06T03:55", "2026-09-06T04:05"),
        # Lord Howe Island moves by half an hour, 02:00 +10:30 -> 02:30 +11 at 15:30Z.
        ("Australia/Lord_Howe", "01:50-02:40", "2026-10-03T15:20", "2026-10-03T15:40"),
        # ...and back, 02:00 +11 -> 01:30 +10:30 at 15:00Z: 20 wall minutes, 50 real.
        ("Australia/Lord_Howe", "01:40-02:00", "2026-04-04T14:40", "2026-04-04T15:30"),
    ],
)
def test_on_a_dst_day_the_spread_is_capped_to_the_real_span(
    zone_name: str, hours: str, opens: str, closes: str
) -> None:
    tz = ZoneInfo(zone_name)
    shape = window(hours=hours)
    opening, closing = utc(opens), utc(closes)
    now = opening - timedelta(hours=6)  # after the day before's window closed
    assert next_span(shape, now, tz) == (opening, closing)
    over = timedelta(hours=1)
    retries = [defer_to_opening(shape, now, tz, key=k, over=over) for k in KEYS]
    assert all(r is not None and opening <= r < min(closing, opening + over) for r in retries)
    assert all(next_opening(shape, r, tz) is None for r in retries if r is not None)
    offsets = [r - opening for r in retries if r is not None]
    assert max(offsets) > 0.9 * min(closing - opening, over)


# Each zone with the UTC instants its clocks change at in 2026 (spring, then fall).
ZONE_CHANGES = [
    (ZoneInfo(name), utc(instant))
    for name, instants in {
        "America/New_York": ("2026-03-08T07:00", "2026-11-01T06:00"),
        "Europe/London": ("2026-03-29T01:00", "2026-10-25T01:00"),
        "Europe/Berlin": ("2026-03-29T01:00", "2026-10-25T01:00"),
        "Australia/Sydney": ("2026-10-03T16:00", "2026-04-04T16:00"),
        "America/Santiago": ("2026-09-06T04:00", "2026-04-05T03:00"),  # at midnight
        "Australia/Lord_Howe": ("2026-10-03T15:30", "2026-04-04T15:00"),  # half an hour
    }.items()
    for instant in instants
]


@settings(max_examples=400, deadline=None)
@given(
    change=st.sampled_from(ZONE_CHANGES),
    offset=st.integers(min_value=-2 * 86400, max_value=2 * 86400),
    days=st.frozensets(st.integers(0, 6), min_size=1),
    start=st.integers(0, 24 * 12 - 1),
    length=st.integers(1, 24 * 12 - 1),
    key=st.uuids(),
    over=st.sampled_from([TEN_MINUTES, timedelta(minutes=1), timedelta(hours=3)]),
)
def test_the_spread_never_pushes_a_row_out_of_its_window(
    change: tuple[ZoneInfo, datetime],
    offset: int,
    days: frozenset[int],
    start: int,
    length: int,
    key: uuid.UUID,
    over: timedelta,
) -> None:
    # Windows on a 5-minute grid, from 5 minutes to 23:55 long.
    begin = datetime(2000, 1, 1) + timedelta(minutes=5 * start)
    finish = begin + timedelta(minutes=5 * length)
    shape = Window(days=days, start=begin.time(), end=finish.time())
    tz, transition = change
    now = transition + timedelta(seconds=offset)
    retry = defer_to_opening(shape, now, tz, key=key, over=over)
    span = next_span(shape, now, tz)
    if retry is None:
        assert span is None
        assert next_opening(shape, now, tz) is None
        return
    assert span is not None
    opening, closing = span
    assert opening == next_opening(shape, now, tz)
    assert opening <= retry < closing
    assert retry - opening < over
    assert next_opening(shape, retry, tz) is None
