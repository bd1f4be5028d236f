"""Send windows: the local days and hours a step may send in, and when a closed one opens."""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo

from dripd.errors import ConfigError
from dripd.timing import local_instant

DAY_NAMES: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
EVERY_DAY: Final = frozenset(range(7))
_KEYS: Final = ("days", "hours")
_HOURS = re.compile(r"([0-9]{2}):([0-9]{2})\s*-\s*([0-9]{2}):([0-9]{2})", re.ASCII)
# A window opens on at least one weekday, so it opens within a week; three weeks also cover
# the odd week whose only opening a zone skips (a time in a DST gap, a skipped day).
_LOOKAHEAD_DAYS: Final = 21


@dataclass(frozen=True, slots=True, kw_only=True)
class Window:
    """When a step may send, in the recipient's local time.

    The window opens at `start` on each of `days` (Monday = 0) and closes at `end`: the same
    day, or the next day when `end` is not after `start` (`22:00-06:00`, or `00:00` for
    midnight). The default, every day from midnight to midnight, is always open.
    """

    days: frozenset[int] = EVERY_DAY
    start: time = time(0)  # inclusive
    end: time = time(0)  # exclusive

    def __post_init__(self) -> None:
        if not self.days or not self.days <= EVERY_DAY:
            raise ValueError(f"a window opens on some of the weekdays 0-6, got {self.days!r}")
        if self.start.tzinfo is not None or self.end.tzinfo is not None:
            raise ValueError("a window's hours are local wall-clock times, without a zone")


def parse_window(raw: Mapping[str, Any], *, where: str) -> Window:
    """A window from its TOML table, e.g. `{ days = "mon-fri", hours = "09:00-18:00" }`.

    `days`: "daily", day names ("mon" … "sun"), ranges ("mon-fri", or "fri-mon" across the
    weekend) and mixes of them separated by commas ("mon-wed,sat"); a list of such strings
    also works. `hours`: "HH:MM-HH:MM", the start inclusive and the end exclusive; the end
    may be "24:00"; a start after the end runs past midnight ("22:00-06:00" opens on each
    of `days` at 22:00). Either key may be left out (every day; all day), not both.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f'{where}: must be a table like {{ days = "mon-fri", hours = "09:00-18:00" }}'
        )
    unknown = sorted(str(key) for key in raw if key not in _KEYS)
    if unknown:
        raise ConfigError(f"{_child(where, unknown[0])}: unknown key; a window has days and hours")
    if not raw:
        raise ConfigError(
            f"{where}: an empty window; give days, hours or both, "
            'e.g. { days = "mon-fri", hours = "09:00-18:00" }'
        )
    days = _parse_days(raw["days"], where=_child(where, "days")) if "days" in raw else EVERY_DAY
    start, end = (
        _parse_hours(raw["hours"], where=_child(where, "hours"))
        if "hours" in raw
        else (time(0), time(0))
    )
    return Window(days=days, start=start, end=end)


def _child(where: str, key: str) -> str:
    """The path of `key` under `where`: "steps[0].window.days", or "key 'window.days'" for
    a sequence file's "key 'window'"."""
    if where.startswith("key '") and where.endswith("'"):
        return f"{where[:-1]}.{key}'"
    return f"{where}.{key}"


def _parse_days(value: Any, *, where: str) -> frozenset[int]:
    if isinstance(value, str):
        terms = value.split(",")
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        terms = [term for v in value for term in v.split(",")]
    else:
        raise ConfigError(f'{where}: must be a string of days like "mon-fri" or "mon,wed,fri"')
    days: set[int] = set()
    for term in (t.strip().lower() for t in terms):
        if term == "daily":
            days |= EVERY_DAY
            continue
        first, dash, last = (part.strip() for part in term.partition("-"))
        begin = _day(first, term, where)
        finish = _day(last, term, where) if dash else begin
        # A range runs forward through the week, wrapping after Sunday ("fri-mon").
        days.update((begin + n) % 7 for n in range((finish - begin) % 7 + 1))
    return frozenset(days)


def _day(name: str, term: str, where: str) -> int:
    if name not in DAY_NAMES:
        shown = repr(term) if term else "an empty entry"
        raise ConfigError(
            f"{where}: {shown} is not a day or a range of days; use "
            f'{", ".join(DAY_NAMES)} or "daily", e.g. "mon-fri" or "mon,wed,fri"'
        )
    return DAY_NAMES.index(name)


def _parse_hours(value: Any, *, where: str) -> tuple[time, time]:
    match = _HOURS.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(
            f'{where}: {value!r} is not a span of hours; use "HH:MM-HH:MM" (24-hour), '
            'e.g. "09:00-18:00", or "22:00-06:00" across midnight'
        )
    start_h, start_m, end_h, end_m = (int(part) for part in match.groups())
    if start_h > 23 or start_m > 59 or end_m > 59 or end_h > 24 or (end_h == 24 and end_m):
        raise ConfigError(
            f"{where}: {value!r} is not a span of hours; hours run 00-23 and minutes 00-59 "
            '(the end may be "24:00")'
        )
    start, end = time(start_h, start_m), time(end_h % 24, end_m)
    if start == end and end_h != 24:
        raise ConfigError(
            f'{where}: {value!r} starts and ends at the same time; for all day use "00:00-24:00"'
            " or leave hours out"
        )
    return start, end


def _span(window: Window, day: date, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """The UTC instants the window opens and closes when it opens on local `day`."""
    closing_day = day if window.start < window.end else day + timedelta(days=1)
    opens = local_instant(datetime.combine(day, window.start), tz)
    closes = local_instant(datetime.combine(closing_day, window.end), tz)
    return opens, closes


def next_opening(window: Window, now: datetime, tz: ZoneInfo) -> datetime | None:
    """None when `now` is inside the window, else the UTC instant it next opens.

    The window is open from each opening (inclusive) to its closing (exclusive), both read
    in `tz` by `local_instant`: an opening in a spring-forward gap opens when the gap ends,
    and an opening (or closing) the clocks show twice counts at its first occurrence. A
    window whose hours all fall in a gap does not open that day.

    Raises ValueError for a naive `now`, and for a window that does not open in the next
    three weeks (parsing never makes one).
    """
    span = next_span(window, now, tz)
    return None if span is None else span[0]


def next_span(window: Window, now: datetime, tz: ZoneInfo) -> tuple[datetime, datetime] | None:
    """None when `now` is inside the window, else the UTC instants it next opens and closes
    at, as `next_opening` reads them: the closing is after the opening, by the real time
    between them (on a DST day an hour more or less than the wall clocks say).
    """
    if now.utcoffset() is None:
        raise ValueError(f"a window's next opening needs an aware now, got {now!r}")
    now = now.astimezone(UTC)
    today = now.astimezone(tz).date()
    # The window that opened yesterday may still be open (it runs past midnight).
    for n in range(-1, _LOOKAHEAD_DAYS + 1):
        day = today + timedelta(days=n)
        if day.weekday() not in window.days:
            continue
        opens, closes = _span(window, day, tz)
        if opens >= closes:
            continue
        if opens <= now < closes:
            return None
        if opens > now:
            return opens, closes
    raise ValueError(f"{window!r} does not open in the {_LOOKAHEAD_DAYS} days after {now}")


def defer_to_opening(
    window: Window, now: datetime, tz: ZoneInfo, *, key: uuid.UUID | str, over: timedelta
) -> datetime | None:
    """None when `now` is inside the window, else when the row `key` should try again: the
    next opening plus the row's `spread` over `over`, capped to that opening's span so that
    a window shorter than `over` ("09:00-09:05" with the 10-minute default) still gets it
    while it is open.
    """
    span = next_span(window, now, tz)
    if span is None:
        return None
    opens, closes = span
    return opens + spread(key, min(over, closes - opens))


def spread(key: uuid.UUID | str, over: timedelta) -> timedelta:
    """A stable offset in [0, `over`) for `key`, to the microsecond, so that the rows waiting
    for one opening do not all fall due at once, and a row gets the same offset each time.

    `over` of zero or less spreads nothing (zero).
    """
    span = over // timedelta(microseconds=1)
    if span <= 0:
        return timedelta(0)
    seed = key.bytes if isinstance(key, uuid.UUID) else key.encode("utf-8")
    digest = hashlib.blake2b(seed, digest_size=8, person=b"dripd.spread").digest()
    return timedelta(microseconds=int.from_bytes(digest, "big") % span)
