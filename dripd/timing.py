"""When a step falls due: a delay, a local time of day or a cron expression, DST-correct."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from dripd.errors import ConfigError

_AT = re.compile(r"([0-9]{2}):([0-9]{2})(?::([0-9]{2}))?", re.ASCII)
_CRON_FIELDS: Final = "minute hour day-of-month month day-of-week"
# Any aware instant works: check_cron and _next_cron only need cronsim to parse the fields.
_CRON_PROBE: Final = datetime(2000, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True, kw_only=True)
class Timing:
    """When a step falls due, counted from the previous step (or the enrollment)."""

    delay: timedelta = timedelta(0)
    at: time | None = None  # a local time of day, the first one after the delay
    cron: str | None = None  # a 5-field cron expression, checked by check_cron
    timezone: str | None = None  # fixes the zone for this step; else the recipient's zone


def parse_at(text: str, *, where: str) -> time:
    """A 24-hour local time of day, "HH:MM" or "HH:MM:SS"."""
    match = _AT.fullmatch(text)
    if match is None:
        raise ConfigError(
            f'{where}: {text!r} is not a time of day; use 24-hour "HH:MM" or "HH:MM:SS", '
            'e.g. "09:30"'
        )
    hour, minute, second = (int(part or 0) for part in match.groups())
    if hour > 23 or minute > 59 or second > 59:
        raise ConfigError(
            f"{where}: {text!r} is not a time of day; hours run 00-23, minutes and seconds 00-59"
        )
    return time(hour, minute, second)


def check_cron(text: str, *, where: str) -> str:
    """`text` stripped, once cronsim accepts it as a 5-field cron expression."""
    fields = text.split()
    if len(fields) != 5:
        raise ConfigError(
            f"{where}: {text!r} is not a cron expression: wrong number of fields: "
            f"expected 5 ({_CRON_FIELDS}), found {len(fields)}"
        )
    try:
        CronSim(text, _CRON_PROBE)
    except CronSimError as exc:
        raise ConfigError(f"{where}: {text!r} is not a cron expression: {exc}") from None
    return text.strip()


def zone(name: str, *, where: str) -> ZoneInfo:
    """The IANA timezone `name`, e.g. "Europe/Berlin"."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        # ValueError: not a relative key or not a TZif file; OSError: a directory such as
        # "America". The message says all there is to say.
        raise ConfigError(f"{where}: {name!r} is not a known IANA timezone") from None


def next_due(timing: Timing, *, base: datetime, tz: ZoneInfo) -> datetime:
    """The aware UTC instant a step with `timing` falls due, counting from `base`.

    `base` (aware) is when the previous step finished or the enrollment started. The delay is
    elapsed time: `base + delay`, whatever the zone's clocks do meanwhile. `timing.timezone`,
    when set, wins over `tz` (the recipient's zone) for `at` and `cron`.

    - `at`: the first local day's `at` that is not before `base + delay`. `at` stands for
      exactly one instant each day: a time the clocks skip (spring forward, e.g. 02:30 in
      New York on 2026-03-08) means the instant the gap ends (03:00 local that day); a time
      they show twice (fall back) means the first of the two (fold=0), so a start between
      the two waits for the next day.
    - `cron`: the first occurrence in the zone not before `base + delay`; an occurrence
      exactly at that instant counts. Occurrences are on whole minutes. Across DST what
      counts is which hours the expression names, never its spelling (`*/30 2`, `0,30 2`
      and `0-59/30 2-2` are one expression): naming specific hours, it reads local times as
      `at` does (a time in a spring-forward gap fires once, when the gap ends; a repeated
      time fires once, at its first occurrence); covering all 24 hours (`15 * * * *`,
      `*/10 0-23 * * *`), it counts elapsed time, so the cadence holds through a change: a
      time in the gap does not happen and a repeated one happens twice.

    Raises ValueError for a naive `base`, for `at` and `cron` together (callers validate
    timings first), and for a cron expression with no occurrence in the next 50 years.
    """
    if base.utcoffset() is None:
        raise ValueError(f"next_due needs an aware base, got {base!r}")
    if timing.at is not None and timing.cron is not None:
        raise ValueError("a timing has either 'at' or 'cron', not both")
    start = base.astimezone(UTC) + timing.delay
    if timing.at is None and timing.cron is None:
        return start
    local = tz if timing.timezone is None else zone(timing.timezone, where="key 'timezone'")
    if timing.cron is not None:
        return _next_cron(timing.cron, start, local)
    assert timing.at is not None
    day = start.astimezone(local).date()
    while (due := _daily(day, timing.at, local)) < start:
        day += timedelta(days=1)
    return due


def _daily(day: date, at: time, tz: ZoneInfo) -> datetime:
    """The one UTC instant that wall-clock time `at` on `day` in `tz` stands for."""
    return local_instant(datetime.combine(day, at.replace(tzinfo=None)), tz)


def local_instant(wall: datetime, tz: ZoneInfo) -> datetime:
    """The aware UTC instant that naive local wall-clock time `wall` in `tz` stands for.

    A time the clocks skip (spring forward) stands for the instant the gap ends; a time they
    show twice (fall back) stands for the first of the two.
    """
    wall = wall.replace(tzinfo=None, fold=0)
    first = wall.replace(tzinfo=tz).astimezone(UTC)
    if first.astimezone(tz).replace(tzinfo=None) == wall:
        return first
    # `wall` is in a gap: fold=0 and fold=1 map it to instants one gap-length after and
    # before the transition. Search between them, to the second (transitions are on whole
    # seconds), for the first instant whose wall clock has reached `wall`.
    second = wall.replace(tzinfo=tz, fold=1).astimezone(UTC)
    before, after = sorted((first, second))
    low, high = math.floor(before.timestamp()), math.ceil(after.timestamp())
    while high - low > 1:
        middle = (low + high) // 2
        reached = datetime.fromtimestamp(middle, tz).replace(tzinfo=None) >= wall
        low, high = (low, middle) if reached else (middle, high)
    return datetime.fromtimestamp(high, UTC)


# How far a zone's offset moves at one change, at most (DST moves it by 30 minutes to 2
# hours): the candidates _next_cron walks start this much before `start` and stop this much
# after the best one found.
_MAX_SHIFT: Final = timedelta(hours=3)
_ZERO: Final = timedelta(0)


def _next_cron(expression: str, start: datetime, tz: ZoneInfo) -> datetime:
    """The first occurrence of `expression` in `tz` not before `start` (see next_due).

    cronsim's own DST handling depends on spelling (it walks wall-clock time unless the
    minute or hour field starts with "*", so `*/30 2` and `0,30 2` differed) and skips an
    occurrence at a half-hour change (Lord Howe). So it is used only for calendar arithmetic:
    it walks naive local wall-clock times, and each is mapped to the instants it stands for
    here. Specific hours (fewer than 24, read from cronsim's parse, so `2` and `2-2/1` are
    one) map like `at` through local_instant; every hour maps to each real instant showing
    that wall time (none in a gap, two in a repeated hour).
    """
    every_hour = len(CronSim(expression, _CRON_PROBE).hours) == 24
    wall_start = start.astimezone(tz).replace(tzinfo=None)
    # cronsim yields times strictly after the whole second it is given.
    seed = (wall_start - _shift(start, tz)).replace(microsecond=0) - timedelta(seconds=1)
    best: datetime | None = None
    best_wall = wall_start
    for wall in CronSim(expression, seed):
        if best is not None and wall > best_wall + _shift(best, tz):
            return best
        for due in _real_instants(wall, tz) if every_hour else (local_instant(wall, tz),):
            if start <= due and (best is None or due < best):
                best, best_wall = due, wall
    raise ValueError(f"the cron expression {expression!r} has no occurrence in the next 50 years")


def _shift(instant: datetime, tz: ZoneInfo) -> timedelta:
    """_MAX_SHIFT when `tz` changes its offset within _MAX_SHIFT of `instant`, else zero:
    away from a change, wall-clock order is time order and no margin is needed."""
    offset = instant.astimezone(tz).utcoffset()
    near = (instant + delta for delta in (-_MAX_SHIFT, _MAX_SHIFT))
    return _MAX_SHIFT if any(t.astimezone(tz).utcoffset() != offset for t in near) else _ZERO


def _real_instants(wall: datetime, tz: ZoneInfo) -> list[datetime]:
    """The UTC instants at which the clocks in `tz` show naive `wall`: none in a gap, two
    in a repeated hour."""
    found = set()
    for fold in (0, 1):
        due = wall.replace(tzinfo=tz, fold=fold).astimezone(UTC)
        if due.astimezone(tz).replace(tzinfo=None) == wall:
            found.add(due)
    return sorted(found)
