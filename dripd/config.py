"""The TOML configuration: msgspec Structs, defaults built in, unknown keys refused."""

from __future__ import annotations

import os
import re
import tomllib
from datetime import timedelta
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Any, Final, Literal

import msgspec
import phonenumbers

from dripd.addresses import normalize, normalize_domain
from dripd.errors import ConfigError
from dripd.model import MAX_ATTEMPTS, MAX_COUNT, Span, parse_duration, parse_rate
from dripd.timing import zone

DEFAULT_PATH = Path("/etc/dripd/dripd.toml")

_MS: Final = timedelta(milliseconds=1)
_SECOND: Final = timedelta(seconds=1)
_HOUR: Final = timedelta(hours=1)
_DAY: Final = timedelta(days=1)
# The range of every duration key, checked when the config loads: a value that passes
# cannot overflow where it is used (README, Configuration). A minimum of 1ms means "longer
# than 0s": the key is a sleep, a timeout or a divisor that 0 would break.
DURATIONS: Final[dict[str, Span]] = {
    "database.connect_timeout": Span(_MS, _HOUR),
    "worker.lease": Span(_SECOND, _DAY),
    "worker.poll_interval": Span(_MS, _DAY),
    "worker.retry_base": Span(timedelta(0), _DAY),
    "worker.retry_max": Span(timedelta(0), timedelta(days=30)),
    "worker.record_linger": Span(timedelta(0), timedelta(minutes=1)),
    "worker.shutdown_timeout": Span(timedelta(0), _DAY),
    "worker.stats_interval": Span(_MS, _DAY),
    "worker.analyze_interval": Span(timedelta(0), timedelta(days=30)),  # 0s: never
    "windows.spread": Span(timedelta(0), _DAY),
    "thresholds.window": Span(_MS, timedelta(days=365)),
    "thresholds.interval": Span(_MS, _DAY),
    "unsubscribe.token_ttl": Span(_MS),
    "circuit.open_for": Span(_MS, _DAY),
    "circuit.max_open_for": Span(_MS, _DAY),
    "circuit.probe_timeout": Span(_SECOND, _HOUR),
}


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    def _duration(self, name: str) -> timedelta:
        key = f"{type(self).__name__.lower()}.{name}"
        return parse_duration(getattr(self, name), where=key, within=DURATIONS[key])


class Database(_Section):
    dsn: str = ""
    pool_min: int = 2
    pool_max: int = 10
    connect_timeout: str = "10s"


class Worker(_Section):
    batch_size: int = 500
    concurrency: int = 1000
    lease: str = "30s"
    poll_interval: str = "30s"
    max_attempts: int = 5
    retry_base: str = "30s"
    retry_max: str = "1h"
    record_linger: str = "5ms"
    shutdown_timeout: str = "30s"
    stats_interval: str = "10s"
    analyze_interval: str = "1m"


class Control(_Section):
    socket: str = "/run/dripd/control.sock"
    mode: str = "0660"


class Http(_Section):
    listen: str = "127.0.0.1:8025"
    enabled: bool = True
    max_body_bytes: int = 65536


class Log(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"


class Email(_Section):
    message_id_domain: str = "dripd.local"


class Recipients(_Section):
    default_timezone: str = "UTC"
    default_region: str = "US"


class Tenant(_Section):
    timezone: str | None = None


class Windows(_Section):
    spread: str = "10m"
    channels: list[str] = msgspec.field(
        default_factory=lambda: ["email", "sms", "whatsapp", "chat"]
    )


class RateLimits(_Section):
    adapter: dict[str, str] = msgspec.field(default_factory=dict)
    provider: dict[str, str] = msgspec.field(default_factory=dict)
    sending_domain: dict[str, str] = msgspec.field(default_factory=dict)
    recipient_domain: dict[str, str] = msgspec.field(default_factory=dict)
    tenant: dict[str, str] = msgspec.field(default_factory=dict)
    sequence: dict[str, str] = msgspec.field(default_factory=dict)


class Quota(_Section):
    scope: Literal["adapter", "mailbox", "tenant", "sequence", "global"]
    limit: int
    key: str = "*"
    period: Literal["day", "hour"] = "day"
    timezone: str = "UTC"


class Thresholds(_Section):
    enabled: bool = True
    window: str = "7d"
    bounce_rate: float = 0.02
    complaint_rate: float = 0.003
    min_volume: int = 100
    interval: str = "1m"


class Unsubscribe(_Section):
    base_url: str = ""
    mailto: str = ""
    token_ttl: str = "60d"  # noqa: S105 - a duration, not a password


class Leads(_Section):
    enabled: bool = False
    sequence: str = ""
    tenant: str = ""


class Hooks(_Section):
    allow_http: bool = False
    allowed_networks: list[str] = msgspec.field(default_factory=list)


class Circuit(_Section):
    """The circuit breaker of every adapter: provider-wide failures open it (see rules/breaker)."""

    failures: int = 3
    open_for: str = "5s"
    max_open_for: str = "5m"
    probe_timeout: str = "30s"

    def __post_init__(self) -> None:
        if self.failures <= 0:
            raise ConfigError(f"circuit.failures: must be a positive integer, got {self.failures}")
        if self._duration("max_open_for") < self._duration("open_for"):
            raise ConfigError("circuit.max_open_for: must not be shorter than circuit.open_for")
        self._duration("probe_timeout")


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    database: Database = msgspec.field(default_factory=Database)
    worker: Worker = msgspec.field(default_factory=Worker)
    control: Control = msgspec.field(default_factory=Control)
    http: Http = msgspec.field(default_factory=Http)
    log: Log = msgspec.field(default_factory=Log)
    email: Email = msgspec.field(default_factory=Email)
    recipients: Recipients = msgspec.field(default_factory=Recipients)
    hooks: Hooks = msgspec.field(default_factory=Hooks)
    tenants: dict[str, Tenant] = msgspec.field(default_factory=dict)
    windows: Windows = msgspec.field(default_factory=Windows)
    rate_limits: RateLimits = msgspec.field(default_factory=RateLimits)
    quotas: list[Quota] = msgspec.field(default_factory=list)
    thresholds: Thresholds = msgspec.field(default_factory=Thresholds)
    unsubscribe: Unsubscribe = msgspec.field(default_factory=Unsubscribe)
    leads: Leads = msgspec.field(default_factory=Leads)
    circuit: Circuit = msgspec.field(default_factory=Circuit)

    def __post_init__(self) -> None:
        _validate(self)

    # Durations, parsed once.
    @property
    def lease(self) -> timedelta:
        return self.worker._duration("lease")

    @property
    def poll_interval(self) -> timedelta:
        return self.worker._duration("poll_interval")

    @property
    def retry_base(self) -> timedelta:
        return self.worker._duration("retry_base")

    @property
    def retry_max(self) -> timedelta:
        return self.worker._duration("retry_max")

    @property
    def record_linger(self) -> timedelta:
        return self.worker._duration("record_linger")

    @property
    def shutdown_timeout(self) -> timedelta:
        return self.worker._duration("shutdown_timeout")

    @property
    def stats_interval(self) -> timedelta:
        return self.worker._duration("stats_interval")

    @property
    def analyze_interval(self) -> timedelta:
        return self.worker._duration("analyze_interval")

    @property
    def connect_timeout(self) -> timedelta:
        return self.database._duration("connect_timeout")

    def timezone_of(self, tenant: str | None) -> str:
        """The zone of a tenant's recipients who name none: `tenants.<key>.timezone`, else
        `recipients.default_timezone`."""
        own = self.tenants.get(tenant) if tenant is not None else None
        return (own.timezone if own else None) or self.recipients.default_timezone

    @property
    def allowed_networks(self) -> tuple[IPv4Network | IPv6Network, ...]:
        return tuple(ip_network(n, strict=False) for n in self.hooks.allowed_networks)

    @property
    def http_host_port(self) -> tuple[str, int]:
        return parse_listen(self.http.listen, where="http.listen")


def _positive(value: int, where: str) -> None:
    if value <= 0:
        raise ConfigError(f"{where}: must be a positive integer, got {value}")


def _validate(cfg: Config) -> None:
    _positive(cfg.database.pool_min, "database.pool_min")
    _positive(cfg.database.pool_max, "database.pool_max")
    if cfg.database.pool_min > cfg.database.pool_max:
        raise ConfigError("database.pool_min: must not exceed database.pool_max")
    _positive(cfg.worker.batch_size, "worker.batch_size")
    _positive(cfg.worker.concurrency, "worker.concurrency")
    _positive(cfg.worker.max_attempts, "worker.max_attempts")
    if cfg.worker.max_attempts > MAX_ATTEMPTS:
        raise ConfigError(f"worker.max_attempts: must be at most {MAX_ATTEMPTS}")
    for name in (
        "lease",
        "poll_interval",
        "retry_base",
        "retry_max",
        "record_linger",
        "shutdown_timeout",
        "stats_interval",
        "analyze_interval",
    ):
        cfg.worker._duration(name)
    cfg.database._duration("connect_timeout")
    if not re.fullmatch(r"0?[0-7]{3}", cfg.control.mode):
        raise ConfigError(
            f'control.mode: {cfg.control.mode!r} is not an octal file mode like "0660"'
        )
    if cfg.http.enabled:
        parse_listen(cfg.http.listen, where="http.listen")
    if not re.fullmatch(r"[A-Za-z0-9.-]+", cfg.email.message_id_domain):
        raise ConfigError("email.message_id_domain: must be a host name")
    zone(cfg.recipients.default_timezone, where="recipients.default_timezone")
    if cfg.recipients.default_region not in phonenumbers.SUPPORTED_REGIONS:
        raise ConfigError(
            f"recipients.default_region: {cfg.recipients.default_region!r} is not a region "
            'code such as "US" or "DE"'
        )
    _positive(cfg.http.max_body_bytes, "http.max_body_bytes")
    for key, tenant in cfg.tenants.items():
        if tenant.timezone is not None:
            zone(tenant.timezone, where=f"tenants.{key}.timezone")
    cfg.windows._duration("spread")
    for scope in (
        "adapter",
        "provider",
        "sending_domain",
        "recipient_domain",
        "tenant",
        "sequence",
    ):
        for key, rate in getattr(cfg.rate_limits, scope).items():
            parse_rate(rate, where=f"rate_limits.{scope}.{key}")
            if scope.endswith("_domain") and key != "*":
                normalize_domain(key, field=f"rate_limits.{scope}.{key}")
    for n, quota in enumerate(cfg.quotas):
        _positive(quota.limit, f"quotas[{n}].limit")
        if quota.limit > MAX_COUNT:
            raise ConfigError(f"quotas[{n}].limit: must be at most {MAX_COUNT}")
        zone(quota.timezone, where=f"quotas[{n}].timezone")
        if quota.scope == "global" and quota.key != "*":
            raise ConfigError(f"quotas[{n}].key: a global quota has no key")
        if quota.scope == "mailbox" and quota.key != "*":
            normalize("email", quota.key, field=f"quotas[{n}].key")
    t = cfg.thresholds
    for name in ("window", "interval"):
        t._duration(name)
    for name in ("bounce_rate", "complaint_rate"):
        if not 0 < getattr(t, name) <= 1:
            raise ConfigError(f"thresholds.{name}: must be a fraction in (0, 1], e.g. 0.02")
    _positive(t.min_volume, "thresholds.min_volume")
    cfg.unsubscribe._duration("token_ttl")
    base_url = cfg.unsubscribe.base_url
    if base_url and not re.fullmatch(r"https://[^\s/,<>\"]+(/[^\s,<>\"]*)?", base_url):
        # RFC 8058: one-click unsubscribe URIs must be https.
        raise ConfigError(
            f"unsubscribe.base_url: {base_url!r} is not an https URL like "
            '"https://mail.example.com" (RFC 8058 requires https)'
        )
    if cfg.leads.enabled and not cfg.leads.sequence:
        raise ConfigError("leads.sequence: required when leads.enabled (the sequence leads enter)")
    for n, network in enumerate(cfg.hooks.allowed_networks):
        try:
            ip_network(network, strict=False)
        except ValueError as exc:
            raise ConfigError(
                f"hooks.allowed_networks[{n}]: {network!r} is not a network like "
                '"10.0.0.0/8" or "fd00::/8"'
            ) from exc


def parse_listen(text: str, *, where: str) -> tuple[str, int]:
    """Split `"127.0.0.1:8025"` (or `"[::1]:8025"`) into host and port."""
    match = re.fullmatch(r"\[?([^\]]*?)\]?:(\d{1,5})", text)
    if match is None or not 0 <= int(match.group(2)) <= 65535:
        raise ConfigError(f'{where}: {text!r} is not a "host:port" address')
    return match.group(1), int(match.group(2))


def _path_of(error: msgspec.ValidationError) -> str:
    message = str(error)
    match = re.search(r"at `\$\.?(.*)`$", message)
    return match.group(1) if match else ""


def load(path: Path | None = None, *, env: dict[str, str] | None = None) -> Config:
    """Load the configuration: `path`, else `$DRIPD_CONFIG`, else /etc/dripd/dripd.toml,
    else the built-in defaults.

    `DRIPD_DSN` from the environment overrides `database.dsn`.
    """
    env = dict(os.environ) if env is None else env
    explicit = path is not None or bool(env.get("DRIPD_CONFIG"))
    source = path or (Path(env["DRIPD_CONFIG"]) if env.get("DRIPD_CONFIG") else DEFAULT_PATH)
    raw: dict[str, Any] = {}
    if source.exists():
        try:
            raw = tomllib.loads(source.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read: {exc.strerror}") from exc
    elif explicit:
        raise ConfigError(f"{source}: config file does not exist")
    cfg = from_dict(raw, source=str(source))
    if env.get("DRIPD_DSN"):
        cfg.database.dsn = env["DRIPD_DSN"]
    return cfg


def from_dict(raw: dict[str, Any], *, source: str = "config") -> Config:
    """Build a Config from parsed TOML, naming the key path of any error."""
    try:
        return msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        key = _path_of(exc)
        text = re.sub(r" - at `\$.*`$", "", str(exc))
        unknown = re.fullmatch(r"Object contains unknown field `(.*)`", text)
        if unknown:
            key = f"{key}.{unknown.group(1)}" if key else unknown.group(1)
            text = "unknown key"
        raise ConfigError(f"{source}: {key or 'top level'}: {text}") from exc
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc.message}") from exc
