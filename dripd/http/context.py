"""What the HTTP routes of the daemon share: its pool, configuration, clock, metrics and vault."""

from __future__ import annotations

from dataclasses import dataclass

from dripd.channels.credentials import Vault
from dripd.clock import Clock
from dripd.config import Config
from dripd.db import store
from dripd.metrics import Metrics


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpContext:
    pool: store.Pool
    config: Config
    clock: Clock
    metrics: Metrics
    vault: Vault | None  # None when DRIPD_ENCRYPTION_KEY is not set
