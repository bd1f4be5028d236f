"""The file descriptors `dripd run` may hold at once, checked against RLIMIT_NOFILE at start."""

from __future__ import annotations

import resource
from collections.abc import Callable
from dataclasses import dataclass

from dripd.config import Config
from dripd.errors import ConfigError
from dripd.http.app import ADMIN_MAX_CONNECTIONS, BACKLOG

# stdin, stdout and stderr, the event loop's selector and self-pipe, the listening sockets
# (control, HTTP, admin), the LISTEN connection and a few files.
BASE = 16
# Outbound connections (SMTP pools, HTTP providers and hooks) and files: not capped by
# dripd itself, so they get room of their own.
OUTBOUND = 256
# Under a flood, connections past the cap are accepted a burst at a time (up to the
# backlog per turn of the loop) and hold a descriptor until they are refused and closed.
BURST = BACKLOG

Limits = tuple[int, int]


@dataclass(frozen=True, slots=True, kw_only=True)
class Budget:
    """How many descriptors each part of the daemon may hold."""

    http: int  # http.max_connections, 0 without HTTP
    admin: int  # the admin listener's cap, 0 without one of its own
    control: int  # control.max_connections
    database: int  # database.pool_max
    other: int = BASE + OUTBOUND + BURST

    @classmethod
    def of(cls, cfg: Config) -> Budget:
        http = cfg.http.enabled
        own_admin = http and cfg.http.admin_listen not in ("", cfg.http.listen)
        return cls(
            http=cfg.http.max_connections if http else 0,
            admin=ADMIN_MAX_CONNECTIONS if own_admin else 0,
            control=cfg.control.max_connections,
            database=cfg.database.pool_max,
        )

    @property
    def total(self) -> int:
        return self.http + self.admin + self.control + self.database + self.other

    def describe(self) -> str:
        parts = [
            f"{self.http} HTTP connections (http.max_connections)" if self.http else "",
            f"{self.admin} on the admin listener" if self.admin else "",
            f"{self.control} control connections (control.max_connections)",
            f"{self.database} database connections (database.pool_max)",
            f"{self.other} others (files, outbound connections, refusals)",
        ]
        return ", ".join(p for p in parts if p)


def fit(
    cfg: Config,
    *,
    get: Callable[[int], Limits] = resource.getrlimit,
    set_: Callable[[int, Limits], None] = resource.setrlimit,
) -> tuple[int, int] | None:
    """Make sure the descriptors the configuration allows fit RLIMIT_NOFILE: when they do
    not fit the soft limit, raise it to the hard one. Returns (old, new) soft limits when
    it was raised, else None.

    ConfigError naming `http.max_connections` (or `control.max_connections` without HTTP)
    when even the hard limit is too low: the daemon would otherwise fail to accept (EMFILE)
    under load, and stall its control socket and health checks with it.
    """
    budget = Budget.of(cfg)
    soft, hard = get(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= budget.total:
        return None
    key = "http.max_connections" if budget.http else "control.max_connections"
    if hard != resource.RLIM_INFINITY and hard < budget.total:
        raise ConfigError(
            f"{key}: {budget.describe()} need {budget.total} file descriptors, but "
            f"RLIMIT_NOFILE allows {hard} (its hard limit); lower {key}, or raise the limit "
            "(LimitNOFILE= in the systemd unit, --ulimit nofile= for a container)"
        )
    target = budget.total if hard == resource.RLIM_INFINITY else hard
    try:
        set_(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{key}: {budget.describe()} need {budget.total} file descriptors, but the soft "
            f"RLIMIT_NOFILE is {soft} and could not be raised to {target}: {exc}"
        ) from exc
    return soft, target
