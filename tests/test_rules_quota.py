"""Quotas: local days and hours as UTC periods, the buckets a send counts in, the drain order."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dripd.config import Quota
from dripd.rules.quota import QuotaBucket, drain_offset, period_bounds, quota_buckets

NEW_YORK = ZoneInfo("America/New_York")
BERLIN = ZoneInfo("Europe/Berlin")
KOLKATA = ZoneInfo("Asia/Kolkata")
LORD_HOWE = ZoneInfo("Australia/Lord_Howe")


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# -- periods -----------------------------------------------------------------------------------


def test_an_ordinary_day_is_local_midnight_to_midnight() -> None:
    start, end = period_bounds("day", utc("2026-01-05T12:00"), NEW_YORK)
    assert (start, end) == (utc("2026-01-05T05:00"), utc("2026-01-06T05:00"))
    assert start.tzinfo is UTC
    assert end.tzinfo is UTC


def test_the_day_starts_inclusive_and_ends_exclusive() -> None:
    assert period_bounds("day", utc("2026-01-05T05:00"), NEW_YORK)[0] == utc("2026-01-05T05:00")
    before = period_bounds("day", utc("2026-01-05T04:59:59.999999"), NEW_YORK)
    assert before == (utc("2026-01-04T05:00"), utc("2026-01-05T05:00"))


@pytest.mark.parametrize(
    ("now", "tz", "start", "hours"),
    [
        ("2026-03-08T12:00", NEW_YORK, "2026-03-08T05:00", 23),
        ("2026-11-01T12:00", NEW_YORK, "2026-11-01T04:00", 25),
        ("2026-11-01T04:00", NEW_YORK, "2026-11-01T04:00", 25),
        ("2026-11-02T04:59", NEW_YORK, "2026-11-01T04:00", 25),
        ("2026-03-29T12:00", BERLIN, "2026-03-28T23:00", 23),
        ("2026-10-25T12:00", BERLIN, "2026-10-24T22:00", 25),
        ("2026-10-25T01:30", BERLIN, "2026-10-24T22:00", 25),
    ],
)
def test_days_when_the_clocks_change_last_23_or_25_hours(
    now: str, tz: ZoneInfo, start: str, hours: int
) -> None:
    assert period_bounds("day", utc(now), tz) == (
        utc(start),
        utc(start) + timedelta(hours=hours),
    )


def test_an_hour_is_the_local_clock_hour() -> None:
    assert period_bounds("hour", utc("2026-01-05T12:34:56"), NEW_YORK) == (
        utc("2026-01-05T12:00"),
        utc("2026-01-05T13:00"),
    )
    # Half-hour zones start their hours at half past in UTC.
    assert period_bounds("hour", utc("2026-01-05T12:10"), KOLKATA) == (
        utc("2026-01-05T11:30"),
        utc("2026-01-05T12:30"),
    )


def test_hours_around_new_york_spring_forward() -> None:
    # 01:00 EST (06:00Z) is followed by 03:00 EDT (07:00Z).
    assert period_bounds("hour", utc("2026-03-08T06:30"), NEW_YORK) == (
        utc("2026-03-08T06:00"),
        utc("2026-03-08T07:00"),
    )
    assert period_bounds("hour", utc("2026-03-08T07:00"), NEW_YORK) == (
        utc("2026-03-08T07:00"),
        utc("2026-03-08T08:00"),
    )


def test_the_repeated_hour_of_fall_back_is_one_period_of_two_hours() -> None:
    # 01:00-02:00 is shown twice (EDT, then EST): one period from 05:00Z to 07:00Z.
    expected = (utc("2026-11-01T05:00"), utc("2026-11-01T07:00"))
    assert period_bounds("hour", utc("2026-11-01T05:10"), NEW_YORK) == expected
    assert period_bounds("hour", utc("2026-11-01T06:10"), NEW_YORK) == expected
    assert period_bounds("hour", utc("2026-11-01T07:00"), NEW_YORK) == (
        utc("2026-11-01T07:00"),
        utc("2026-11-01T08:00"),
    )


def test_misuse_is_refused() -> None:
    with pytest.raises(ValueError, match="'week'"):
        period_bounds("week", utc("2026-01-05T12:00"), NEW_YORK)
    with pytest.raises(ValueError, match="aware"):
        period_bounds("day", datetime(2026, 1, 5), NEW_YORK)


TRANSITIONS = [
    utc("2026-03-08T07:00"),
    utc("2026-11-01T06:00"),
    utc("2026-03-29T01:00"),
    utc("2026-10-25T01:00"),
    utc("2026-04-04T15:00"),  # Lord Howe Island: back half an hour
    utc("2026-10-03T15:30"),  # Lord Howe Island: forward half an hour
]


@settings(max_examples=400, deadline=None)
@given(
    transition=st.sampled_from(TRANSITIONS),
    offset=st.integers(min_value=-2 * 86400, max_value=2 * 86400),
    microsecond=st.sampled_from([0, 1, 999_999]),
    period=st.sampled_from(["day", "hour"]),
    tz=st.sampled_from([NEW_YORK, BERLIN, KOLKATA, LORD_HOWE]),
)
def test_periods_hold_now_and_tile_time(
    transition: datetime, offset: int, microsecond: int, period: str, tz: ZoneInfo
) -> None:
    now = transition + timedelta(seconds=offset, microseconds=microsecond)
    start, end = period_bounds(period, now, tz)
    assert start <= now < end
    # The next period starts where this one ends, and the one before ends where it starts.
    assert period_bounds(period, end, tz)[0] == end
    assert period_bounds(period, start - timedelta(microseconds=1), tz)[1] == start
    length = end - start
    if period == "day":
        assert timedelta(hours=23) <= length <= timedelta(hours=25)
        assert start.astimezone(tz).time().isoformat() == "00:00:00"
    else:
        assert timedelta(minutes=30) <= length <= timedelta(hours=2)
        assert start.astimezone(tz).minute in (0, 30)


# -- buckets -----------------------------------------------------------------------------------

NOW = utc("2026-01-05T15:00")  # Monday 10:00 in New York


def quota(**fields: Any) -> Quota:
    return Quota(**fields)


def buckets(quotas: list[Quota], **scopes: Any) -> list[QuotaBucket]:
    values: dict[str, Any] = {
        "adapter": "smtp",
        "mailbox": "sales@example.com",
        "tenant": None,
        "sequence": "lead-drip",
        **scopes,
    }
    return quota_buckets(quotas, now=NOW, **values)


def test_a_specific_sequence_quota_in_a_zone() -> None:
    q = quota(scope="sequence", key="lead-drip", limit=50, timezone="America/New_York")
    assert buckets([q]) == [
        QuotaBucket(
            key="quota:sequence:lead-drip:day:America/New_York",
            limit=50,
            period_start=utc("2026-01-05T05:00"),
            period_end=utc("2026-01-06T05:00"),
        )
    ]


def test_a_specific_key_applies_only_to_its_value() -> None:
    q = quota(scope="sequence", key="lead-drip", limit=50)
    assert buckets([q], sequence="welcome") == []
    assert [b.key for b in buckets([q], sequence="lead-drip")] == [
        "quota:sequence:lead-drip:day:UTC"
    ]


def test_a_wildcard_counts_each_value_apart() -> None:
    q = quota(scope="adapter", limit=300, period="hour")
    first = buckets([q], adapter="smtp-1")
    second = buckets([q], adapter="smtp-2")
    assert [b.key for b in first] == ["quota:adapter:smtp-1:hour:UTC"]
    assert [b.key for b in second] == ["quota:adapter:smtp-2:hour:UTC"]
    assert first[0].period_start == utc("2026-01-05T15:00")
    assert first[0].period_end == utc("2026-01-05T16:00")


def test_a_global_quota_always_applies() -> None:
    q = quota(scope="global", limit=1000)
    assert [b.key for b in buckets([q], adapter=None, mailbox=None, sequence=None)] == [
        "quota:global:day:UTC"
    ]


@pytest.mark.parametrize("scope", ["adapter", "mailbox", "tenant", "sequence"])
def test_a_scope_without_a_value_does_not_apply(scope: str) -> None:
    everything = {"adapter": None, "mailbox": None, "tenant": None, "sequence": None}
    assert buckets([quota(scope=scope, limit=10)], **everything) == []
    assert buckets([quota(scope=scope, key="x", limit=10)], **everything) == []


def test_tenant_and_mailbox_quotas() -> None:
    per_tenant = quota(scope="tenant", limit=500)
    per_mailbox = quota(scope="mailbox", key="sales@example.com", limit=40)
    got = buckets([per_tenant, per_mailbox], tenant="acme")
    assert [b.key for b in got] == [
        "quota:mailbox:sales%40example.com:day:UTC",
        "quota:tenant:acme:day:UTC",
    ]


def test_each_tenant_counts_a_sequence_apart_but_a_global_adapter_is_shared() -> None:
    per_sequence = quota(scope="sequence", limit=20)
    per_adapter = quota(scope="adapter", key="smtp", limit=100)
    acme = [b.key for b in buckets([per_sequence, per_adapter], tenant="acme")]
    globex = [b.key for b in buckets([per_sequence, per_adapter], tenant="globex")]
    assert acme == ["quota:adapter:smtp:day:UTC", "quota:sequence:acme/lead-drip:day:UTC"]
    assert set(acme) & set(globex) == {"quota:adapter:smtp:day:UTC"}  # one mailbox
    # A tenant's own adapter is named with its tenant, as the pipeline passes it.
    own = quota(scope="adapter", key="acme/smtp", limit=100)
    assert [b.key for b in buckets([own], adapter="acme/smtp", tenant="acme")] == [
        "quota:adapter:acme%2Fsmtp:day:UTC"
    ]


def test_values_cannot_forge_another_key() -> None:
    q = quota(scope="sequence", limit=5)
    odd = buckets([q], sequence="a:day:UTC", tenant="t/x")
    assert [b.key for b in odd] == ["quota:sequence:t%2Fx/a%3Aday%3AUTC:day:UTC"]


def test_periods_and_zones_are_separate_buckets() -> None:
    quotas = [
        quota(scope="sequence", limit=100),
        quota(scope="sequence", limit=20, period="hour"),
        quota(scope="sequence", limit=90, timezone="Europe/Berlin"),
    ]
    got = buckets(quotas)
    assert [(b.key, b.limit) for b in got] == [
        ("quota:sequence:lead-drip:day:Europe/Berlin", 90),
        ("quota:sequence:lead-drip:day:UTC", 100),
        ("quota:sequence:lead-drip:hour:UTC", 20),
    ]
    berlin = got[0]
    assert (berlin.period_start, berlin.period_end) == (
        utc("2026-01-04T23:00"),
        utc("2026-01-05T23:00"),
    )


def test_quotas_on_the_same_key_share_one_bucket_with_the_smaller_limit() -> None:
    quotas = [
        quota(scope="sequence", limit=100),
        quota(scope="sequence", key="lead-drip", limit=30),
        quota(scope="sequence", key="lead-drip", limit=60),
    ]
    assert [(b.key, b.limit) for b in buckets(quotas)] == [("quota:sequence:lead-drip:day:UTC", 30)]


def test_no_quotas_no_buckets() -> None:
    assert buckets([]) == []


# -- drain order -------------------------------------------------------------------------------

OPENING = utc("2026-01-06T05:00")


def test_older_rows_fall_due_first_within_the_minute() -> None:
    older = drain_offset(utc("2026-01-05T09:00"), OPENING)
    newer = drain_offset(utc("2026-01-05T09:00:01"), OPENING)
    newest = drain_offset(utc("2026-01-05T20:00"), OPENING)
    assert timedelta(0) <= older < newer < newest < timedelta(seconds=60)


def test_a_row_not_older_than_the_opening_gets_the_largest_offset() -> None:
    largest = timedelta(seconds=60) - timedelta(microseconds=1)
    assert drain_offset(OPENING, OPENING) == largest
    assert drain_offset(OPENING + timedelta(hours=1), OPENING) == largest


def test_drain_offset_halves_at_an_age_of_one_day() -> None:
    # (over - 1µs) · 1d / (1d + 1d), to the microsecond.
    day_old = OPENING - timedelta(days=1)
    assert drain_offset(day_old, OPENING, over=timedelta(seconds=10)) == timedelta(
        microseconds=4_999_999
    )
    assert drain_offset(day_old, OPENING, over=timedelta(0)) == timedelta(0)


def test_drain_offset_needs_aware_times() -> None:
    with pytest.raises(ValueError, match="aware"):
        drain_offset(datetime(2026, 1, 5), OPENING)


@settings(max_examples=500, deadline=None)
@given(
    first=st.integers(min_value=0, max_value=400 * 86400 * 10**6),
    gap=st.integers(min_value=0, max_value=30 * 86400 * 10**6),
    over_us=st.integers(min_value=1, max_value=3600 * 10**6),
)
def test_drain_offset_is_monotone_and_in_range(first: int, gap: int, over_us: int) -> None:
    over = timedelta(microseconds=over_us)
    older = OPENING - timedelta(microseconds=first)
    younger = older + timedelta(microseconds=gap)
    a, b = drain_offset(older, OPENING, over=over), drain_offset(younger, OPENING, over=over)
    assert timedelta(0) <= a <= b < over
