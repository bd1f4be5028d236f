"""Quotas: which ledger buckets a send counts against, their periods, and the overflow order."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Final
from urllib.parse import quote
from zoneinfo import ZoneInfo

from dripd import config
from dripd.addresses import normalize
from dripd.timing import local_instant

_STEP: Final = {"day": timedelta(days=1), "hour": timedelta(hours=1)}
_MICROSECOND: Final = timedelta(microseconds=1)
# drain_offset compresses a row's age at the opening hyperbolically with this scale.
_DRAIN_SCALE_US: Final = 86_400 * 1_000_000


@dataclass(frozen=True, slots=True, kw_only=True)
class QuotaBucket:
    """One ledger row a send reserves in: at most `limit` sends per period in `key`."""

    key: str
    limit: int
    period_start: datetime
    period_end: datetime


def period_bounds(period: str, now: datetime, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """The UTC instants the local calendar day ("day") or clock hour ("hour") holding `now`
    starts and ends in `tz`.

    A day runs from local midnight to the next local midnight, so it lasts 23 or 25 hours
    when the clocks change. Boundaries are read by `timing.local_instant`: a midnight the
    clocks skip starts the day when the gap ends, and an hour the clocks show twice belongs
    to its first occurrence (in New York the fall-back hour 01:00 lasts two hours).

    Raises ValueError for a naive `now` or another period.
    """
    if now.utcoffset() is None:
        raise ValueError(f"period_bounds needs an aware now, got {now!r}")
    step = _STEP.get(period)
    if step is None:
        raise ValueError(f"a quota period is 'day' or 'hour', got {period!r}")
    now = now.astimezone(UTC)
    wall = now.astimezone(tz).replace(tzinfo=None)
    if period == "day":
        floor = datetime.combine(wall.date(), time(0))
    else:
        floor = wall.replace(minute=0, second=0, microsecond=0)
    # The loops only turn in zones whose clocks jump by more than the period.
    start = floor
    while (start_at := local_instant(start, tz)) > now:
        start -= step
    end = floor + step
    while (end_at := local_instant(end, tz)) <= now:
        end += step
    return start_at, end_at


def _scope_value(
    scope: str,
    *,
    adapter: str | None,
    mailbox: str | None,
    tenant: str | None,
    sequence: str | None,
) -> str | None:
    values = {"adapter": adapter, "mailbox": mailbox, "tenant": tenant, "sequence": sequence}
    return values.get(scope)


def _key(quota: config.Quota) -> str:
    """The quota's key as the send's value is spelled: a mailbox in the one spelling of
    addresses (`Sales@Example.com` counts the sends of `sales@example.com`)."""
    if quota.scope == "mailbox" and quota.key != "*":
        return normalize("email", quota.key, field="quotas.key")
    return quota.key


def _bucket_key(quota: config.Quota, value: str | None, tenant: str | None) -> str:
    if quota.scope == "global":
        subject = ""
    else:
        assert value is not None
        subject = _part(value)
        # A sequence key is unique per tenant only, and a global sequence serves every
        # tenant: each tenant's sends are counted apart. (An adapter arrives named with its
        # own tenant, "acme/smtp", by the caller: a global adapter is one mailbox whoever
        # sends through it, so its count is shared.)
        if quota.scope == "sequence" and tenant is not None:
            subject = f"{_part(tenant)}/{subject}"
        subject += ":"
    return f"quota:{quota.scope}:{subject}{quota.period}:{quota.timezone}"


def _part(text: str) -> str:
    # Percent-encoded, a value holds no ':' or '/', so no two scopes spell the same key.
    return quote(text, safe="")


def quota_buckets(
    quotas: Sequence[config.Quota],
    *,
    adapter: str | None,
    mailbox: str | None,
    tenant: str | None,
    sequence: str | None,
    now: datetime,
) -> list[QuotaBucket]:
    """The buckets one send at `now` reserves in, one per ledger row, in key order.

    A quota applies when its scope's value for this send equals its `key`, or for any value
    when the key is "*" (each value then has its own bucket); a scope whose value is None
    (no tenant, no mailbox) does not apply; a global quota always applies. Keys read
    `quota:<scope>:<value>:<period>:<zone>`, e.g. `quota:sequence:lead-drip:day:UTC` (values
    percent-encoded; sequence values prefixed with `<tenant>/` for a tenant's sends, so each
    tenant is counted apart; `quota:global:day:UTC` for a global quota). Pass a tenant's
    adapter as `<tenant>/<name>`: a global adapter's count is shared by every tenant, and
    a mailbox normalized (`dripd.addresses.normalize`). Quotas that land on the same key
    count the same sends, so they share one bucket with the smallest limit.
    """
    buckets: dict[str, QuotaBucket] = {}
    for quota in quotas:
        value = _scope_value(
            quota.scope, adapter=adapter, mailbox=mailbox, tenant=tenant, sequence=sequence
        )
        if quota.scope != "global" and (value is None or _key(quota) not in ("*", value)):
            continue
        key = _bucket_key(quota, value, tenant)
        known = buckets.get(key)
        if known is not None and known.limit <= quota.limit:
            continue
        start, end = period_bounds(quota.period, now, ZoneInfo(quota.timezone))
        buckets[key] = QuotaBucket(key=key, limit=quota.limit, period_start=start, period_end=end)
    return [buckets[key] for key in sorted(buckets)]


def drain_offset(
    created_at: datetime, opening: datetime, *, over: timedelta = timedelta(seconds=60)
) -> timedelta:
    """An offset in [0, `over`) after `opening` for a row created at `created_at`, never
    smaller for a younger row, so that rows deferred to one opening fall due oldest first.

    Pass a time that stays fixed while a row is deferred again and again (its creation, not
    its due time), so the order holds across periods. The offset shrinks hyperbolically
    with the row's age at the opening, `(over - 1µs) · 1d / (1d + age)`, in whole
    microseconds. With the default `over` of 60 s, one microsecond of offset stands for
    about 1.4 ms of creation time for a row a moment old, 6 ms for a row a day old, 0.1 s at
    a week, 1.4 s at a month and 3 min at a year: rows created closer together than that
    tie, and tied rows are claimed in any order. A row not older than the opening gets the
    largest offset. `over` of zero or less gives zero.
    """
    if created_at.utcoffset() is None or opening.utcoffset() is None:
        raise ValueError("drain_offset needs aware datetimes")
    span = over // _MICROSECOND
    if span <= 0:
        return timedelta(0)
    age = max(0, (opening - created_at) // _MICROSECOND)
    # Integer arithmetic: a fixed numerator over a growing denominator never grows.
    return timedelta(microseconds=(span - 1) * _DRAIN_SCALE_US // (_DRAIN_SCALE_US + age))
