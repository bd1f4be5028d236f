"""The pipeline's rules, built from the configuration: zones, rate limits, quotas, unsubscribe."""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from datetime import datetime
from functools import lru_cache, partial
from zoneinfo import ZoneInfo

import structlog

from dripd.channels.credentials import Vault
from dripd.config import Config, ShortLinkRules, merge_link_rules
from dripd.db import limits, store
from dripd.engine.ledger import DbLedger
from dripd.engine.pipeline import LinkMaker, Rules, ShortLinking, Unsubscribe
from dripd.model import Adapter
from dripd.rules.leadconfirm import ConfirmLinks
from dripd.rules.limiter import Limiter, RateTable

log = structlog.get_logger("dripd.rules")


def zones(cfg: Config) -> Callable[[str | None], ZoneInfo]:
    """A tenant's recipients' default zone, resolved once per tenant."""

    @lru_cache(maxsize=4096)
    def zone_of(tenant: str | None) -> ZoneInfo:
        return ZoneInfo(cfg.timezone_of(tenant))

    return zone_of


def _confirm_links(cfg: Config, vault: Vault | None) -> ConfirmLinks | None:
    """The `confirm_url` of double opt-in (`leads.double_opt_in`); the daemon refuses to
    start with it but without a vault (`check_leads`)."""
    leads = cfg.leads
    if not leads.double_opt_in or vault is None:
        return None
    return ConfirmLinks(
        vault=vault,
        base_url=leads.base_url,
        tenant=leads.tenant or None,
        sequence_key=leads.confirm_sequence,
        ttl=leads.confirm_for,
    )


async def pause_adapter(pool: store.Executor, adapter: Adapter, reason: str, now: datetime) -> None:
    """Pause `adapter` because its provider refused it as a whole (AdapterError): every
    daemon stops claiming its rows (NOTIFY dripd_adapters) until an operator resumes it."""
    text = f"provider refused the adapter: {reason}"
    async with store.transaction(pool) as conn:
        if not await store.pause_adapter(conn, adapter.id, text, now):
            return  # already paused (another send, another daemon)
        await store.notify_adapters(conn)
    log.error(
        "adapter paused: its provider refused it; executions defer until "
        "`dripd ctl resume-adapter` lifts it",
        adapter=f"{adapter.tenant_key}/{adapter.name}" if adapter.tenant_key else adapter.name,
        reason=text,
    )


def short_base_url(cfg: Config) -> str:
    """Where dripd's short links point: `short_links.base_url`, else the HTTP listener."""
    if cfg.short_links.base_url:
        return cfg.short_links.base_url.rstrip("/")
    host, port = cfg.http_host_port
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def short_linking(cfg: Config, maker: LinkMaker) -> ShortLinking:
    """Short links from `[short_links]` and `[tenants.<key>.short_links]`."""
    base = cfg.short_links.rules()
    if not cfg.short_links.base_url:
        log.warning(
            "short_links.base_url is not set: dripd's own short links point at the HTTP "
            "listener's address, %s, right only for local trials",
            short_base_url(cfg),
        )

    @lru_cache(maxsize=4096)
    def defaults(tenant: str | None) -> ShortLinkRules:
        own = cfg.tenants.get(tenant) if tenant is not None else None
        return merge_link_rules(base, own.short_links if own else None)

    host = urllib.parse.urlsplit(short_base_url(cfg)).hostname or ""
    return ShortLinking(
        maker=maker,
        defaults=defaults,
        short_hosts=frozenset({host.lower(), *(h.lower() for h in cfg.short_links.short_domains)}),
    )


def build_rules(cfg: Config, *, pool: store.Executor, vault: Vault | None) -> Rules:
    """The pipeline's rules from the configuration."""
    unsubscribe = None
    if cfg.unsubscribe.base_url:
        if vault is None:
            log.warning(
                "unsubscribe.base_url is set but DRIPD_ENCRYPTION_KEY is not: lifecycle "
                "email goes out without List-Unsubscribe (the tokens are encrypted)"
            )
        else:
            unsubscribe = Unsubscribe(
                vault=vault,
                base_url=cfg.unsubscribe.base_url,
                mailto=cfg.unsubscribe.mailto or None,
                ttl=cfg.unsubscribe._duration("token_ttl"),
            )
    else:
        log.warning(
            "unsubscribe.base_url is not set: lifecycle email goes out without "
            "List-Unsubscribe headers (RFC 8058)"
        )
    rates = RateTable(cfg.rate_limits)
    limiter = None
    if rates:
        limiter = Limiter(
            acquire=partial(limits.acquire, pool), release=partial(limits.release, pool)
        )
    return Rules(
        zone_of=zones(cfg),
        default_region=cfg.recipients.default_region,
        rates=rates if rates else None,
        limiter=limiter,
        window_channels=frozenset(cfg.windows.channels),
        window_spread=cfg.windows._duration("spread"),
        paused_adapter_retry=cfg.thresholds._duration("interval") * 5,
        unsubscribe=unsubscribe,
        lead_confirm=_confirm_links(cfg, vault),
        quotas=tuple(cfg.quotas),
        ledger=DbLedger(pool) if cfg.quotas else None,
        pause_adapter=partial(pause_adapter, pool),
    )
