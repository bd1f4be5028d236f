"""What the HTTP routes of the daemon share: its pool, configuration, clock, metrics and vault."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dripd.channels.credentials import Vault
from dripd.clock import Clock
from dripd.config import Config
from dripd.db import store
from dripd.metrics import Metrics

if TYPE_CHECKING:
    from dripd.http.webhooks import WebhookTargets


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpContext:
    pool: store.Pool
    config: Config
    clock: Clock
    metrics: Metrics
    vault: Vault | None  # None when DRIPD_ENCRYPTION_KEY is not set
    webhooks: WebhookTargets | None = None  # the daemon's adapters, for provider webhooks
