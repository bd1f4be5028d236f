"""The TOML configuration: msgspec Structs, defaults built in, unknown keys refused."""

from __future__ import annotations

import math
import os
import re
import tomllib
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from pathlib import Path
from typing import Any, ClassVar, Final, Literal

import msgspec
import phonenumbers
import re2

from dripd.addresses import normalize, normalize_domain
from dripd.errors import ConfigError
from dripd.model import CHANNELS, MAX_ATTEMPTS, MAX_COUNT, Span, parse_duration, parse_rate
from dripd.redaction import Redactor, dsn_secrets
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
    "leads.confirm_ttl": Span(timedelta(minutes=1), timedelta(days=30)),
    # Providers retry a failed delivery for up to three days (SendGrid 72 h).
    "webhooks.replay_window": Span(timedelta(seconds=30), timedelta(hours=1)),
    "webhooks.retention": Span(timedelta(days=4), timedelta(days=365)),
    "short_links.webhook_timeout": Span(_MS, timedelta(minutes=1)),
    "circuit.open_for": Span(_MS, _DAY),
    "circuit.max_open_for": Span(_MS, _DAY),
    "circuit.probe_timeout": Span(_SECOND, _HOUR),
    "control.read_timeout": Span(_MS, _HOUR),
    "control.idle_timeout": Span(_MS, _DAY),
    "http.header_timeout": Span(_MS, _HOUR),
    "http.body_timeout": Span(_MS, _HOUR),
    "http.idle_timeout": Span(_MS, _HOUR),
}


@dataclass(frozen=True, slots=True)
class Bounds:
    """The integers a key accepts: `minimum` to `maximum`, both included."""

    minimum: int
    maximum: int

    def __str__(self) -> str:
        return f"from {self.minimum} to {self.maximum}"

    def check(self, value: int, where: str) -> int:
        """`value`, or ConfigError naming `where` unless it is within the bounds."""
        if not self.minimum <= value <= self.maximum:
            shown = str(value) if abs(value) < 10**18 else "an integer of 19 or more digits"
            raise ConfigError(f"{where}: {shown} is out of range; use an integer {self}")
        return value


# The range of every integer key, checked when the config loads (README, Configuration):
# a value that passes can neither overflow a 32-bit column nor exhaust memory, file
# descriptors or Postgres connections. `quotas[].limit` is the `limit` of each [[quotas]].
INTEGERS: Final[dict[str, Bounds]] = {
    # A connection each: a descriptor here and a backend process in Postgres, whose own
    # max_connections is 100 by default.
    "database.pool_min": Bounds(1, 1000),
    "database.pool_max": Bounds(1, 1000),
    # The claim's LIMIT (an int4 parameter); every row claimed is held in memory.
    "worker.batch_size": Bounds(1, 10_000),
    # One sender task each, all started at once, and each send may hold a socket:
    # 10 000 fit in memory and in a raised LimitNOFILE (10 000 000 starved the event loop).
    "worker.concurrency": Bounds(1, 10_000),
    # The retry backoff base·2^(n-1) stays a finite float.
    "worker.max_attempts": Bounds(1, MAX_ATTEMPTS),
    # Every body is read into memory whole before it is parsed.
    "http.max_body_bytes": Bounds(1, 16 * 2**20),
    "webhooks.max_body_bytes": Bounds(1024, 16 * 2**20),
    # Compared with the sends counted in the window (32-bit counts).
    "thresholds.min_volume": Bounds(1, MAX_COUNT),
    # The ledgers count in 32-bit integers.
    "quotas[].limit": Bounds(1, MAX_COUNT),
    # Provider-wide failures in a row; a breaker that waits for more never opens.
    "circuit.failures": Bounds(1, 1000),
    # New leads of one mailbox (sub-addresses included) in any 24 hours.
    "leads.max_per_mailbox_per_day": Bounds(1, 1000),
    # Connections held at once, each a descriptor: the daemon checks at start that they fit
    # RLIMIT_NOFILE with its others (dripd/engine/descriptors.py).
    "http.max_connections": Bounds(1, 1_000_000),
    "control.max_connections": Bounds(1, 10_000),
}

#: The largest config file dripd reads; the default one is 8 KiB.
MAX_FILE_BYTES: Final = 2**20
#: The longest control socket path, in bytes: `sun_path` holds 108 with the closing NUL.
MAX_SOCKET_PATH: Final = 107
#: The longest name (a tenant, an adapter, a provider or a sequence key) the config takes,
#: as the HTTP API's (a btree index entry holds 2704 bytes).
MAX_NAME: Final = 128
#: The longest `unsubscribe.base_url`: it goes into a header of every mail, with a token.
MAX_URL: Final = 1024


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # The section's name in the file, when it is not the class name in lower case.
    _NAME: ClassVar[str | None] = None

    def _duration(self, name: str) -> timedelta:
        key = f"{self._NAME or type(self).__name__.lower()}.{name}"
        return parse_duration(getattr(self, name), where=key, within=DURATIONS[key])

    def seconds(self, name: str) -> float:
        """The duration key `name` of this section, in seconds (its range checked at load)."""
        return self._duration(name).total_seconds()


class Database(_Section):
    dsn: str = ""
    pool_min: int = 2
    pool_max: int = 10
    connect_timeout: str = "10s"

    def __repr__(self) -> str:
        # The DSN may hold a password: a repr (a traceback's locals, a debugger) hides it.
        shown = {name: getattr(self, name) for name in self.__struct_fields__}
        shown["dsn"] = Redactor(dsn_secrets(self.dsn))(self.dsn)
        return f"Database({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


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
    read_timeout: str = "10s"
    idle_timeout: str = "60s"
    max_connections: int = 32


class Http(_Section):
    listen: str = "127.0.0.1:8025"
    admin_listen: str = "127.0.0.1:8026"  # "": none; the same as `listen`: one listener
    enabled: bool = True
    max_body_bytes: int = 65536
    header_timeout: str = "10s"
    body_timeout: str = "30s"
    idle_timeout: str = "5s"
    max_connections: int = 512


class Log(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"


class Email(_Section):
    message_id_domain: str = "dripd.local"


class Recipients(_Section):
    default_timezone: str = "UTC"
    default_region: str = "US"


class ShortLinkRules(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """Short-link settings a tenant (`[tenants.<key>.short_links]`), a sequence or a step
    (`short_links = "dripd"` or a table) may set; None inherits (README, Short links).

    `utm`: true adds utm_source "dripd", utm_medium the channel, utm_campaign the sequence
    key and utm_content the step key; a table overrides those values ("" leaves one out);
    false adds none. `exclude`: regular expressions (case-insensitive, searched in the URL)
    of links never shortened, added to the defaults."""

    provider: Literal["none", "dripd", "webhook"] | None = None
    utm: bool | dict[str, str] | None = None
    exclude: list[str] | None = None
    on_error: Literal["fail", "send_originals"] | None = None


#: The UTM parameters a `utm` table may set (RFC-less, Google Analytics' names).
UTM_KEYS: Final = ("source", "medium", "campaign", "content")


class ShortLinks(_Section):
    """`[short_links]`: the global defaults, where dripd's redirects are reachable, and the
    `webhook` shortener (README, Short links)."""

    _NAME: ClassVar[str | None] = "short_links"
    provider: Literal["none", "dripd", "webhook"] = "none"
    utm: bool | dict[str, str] = False
    exclude: list[str] = msgspec.field(default_factory=list)
    on_error: Literal["fail", "send_originals"] = "fail"
    # The public address of `GET /l/{code}`, e.g. "https://go.example.com"; "": the HTTP
    # listener's own address (http://127.0.0.1:8025), right only for local trials.
    base_url: str = ""
    # Hosts whose links are short already (a shortener's own domain): never shortened again.
    short_domains: list[str] = msgspec.field(default_factory=list)
    # The `webhook` provider: dripd POSTs `{"url": destination, …}` to `webhook_url` (with
    # `Authorization: Bearer <webhook_token>` when set) and reads the short URL from the
    # JSON answer's `webhook_field`, all within `webhook_timeout`.
    webhook_url: str = ""
    webhook_token: str = ""
    webhook_field: str = "shortUrl"
    webhook_timeout: str = "5s"

    def __repr__(self) -> str:
        # The shortener's token is a credential: a repr (a traceback's locals) hides it.
        shown = {name: getattr(self, name) for name in self.__struct_fields__}
        shown["webhook_token"] = "***" if self.webhook_token else ""
        return f"ShortLinks({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    def rules(self) -> ShortLinkRules:
        return ShortLinkRules(
            provider=self.provider,
            utm=self.utm,
            exclude=list(self.exclude),
            on_error=self.on_error,
        )


def merge_link_rules(*layers: ShortLinkRules | None) -> ShortLinkRules:
    """The layers' settings, a later layer's keys winning (global < tenant < sequence <
    step); two `utm` tables merge key by key."""
    merged: dict[str, Any] = {}
    for layer in layers:
        if layer is None:
            continue
        for name in ShortLinkRules.__struct_fields__:
            value = getattr(layer, name)
            if value is None:
                continue
            if name == "utm" and isinstance(value, dict) and isinstance(merged.get("utm"), dict):
                value = merged["utm"] | value
            merged[name] = value
    return ShortLinkRules(**merged)


def exclude_patterns(patterns: Iterable[str]) -> Any:
    """`patterns` as one case-insensitive RE2 expression (any of them matches), compiled by
    google-re2: linear in the URL's length whatever the pattern, so that `(a+)+$` cannot
    stall the daemon on a long link (Python's `re` backtracks exponentially there). RE2's
    syntax is Perl's without lookaround and backreferences. Raises ValueError naming the
    first pattern it refuses."""
    options = re2.Options()
    options.log_errors = False  # the error is raised, not written to stderr
    options.case_sensitive = False
    for pattern in patterns:
        try:
            re2.compile(pattern, options)
        except re2.error as exc:
            reason = exc.args[0].decode() if isinstance(exc.args[0], bytes) else str(exc)
            raise ValueError(
                f"{_shown(pattern)} is not a regular expression RE2 reads: {reason}"
            ) from None
    either = "|".join(f"(?:{p})" for p in patterns) or "$^."  # nothing
    return re2.compile(either, options)


def check_link_rules(rules: ShortLinkRules, where: str) -> None:
    """ConfigError naming `where.<key>` for a `utm` key that is not a UTM parameter, a
    value too long or not printable, or an `exclude` pattern that is not a regular
    expression."""
    if isinstance(rules.utm, dict):
        for key, value in rules.utm.items():
            if key not in UTM_KEYS:
                raise ConfigError(f"{where}.utm: {_shown(key)} is not one of {', '.join(UTM_KEYS)}")
            if len(value) > 200 or not value.isprintable():
                raise ConfigError(
                    f"{where}.utm.{key}: must be printable text of at most 200 characters"
                )
    for n, pattern in enumerate(rules.exclude or ()):
        if len(pattern) > 1000:
            raise ConfigError(f"{where}.exclude[{n}]: at most 1000 characters")
        try:
            exclude_patterns([pattern])
        except ValueError as exc:
            raise ConfigError(f"{where}.exclude[{n}]: {exc}") from None
    if len(rules.exclude or ()) > 100:
        raise ConfigError(f"{where}.exclude: at most 100 patterns")


class Tenant(_Section):
    timezone: str | None = None
    short_links: ShortLinkRules | None = None


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
    """The lead form and `POST /v1/leads`, and their defences (README, Lead intake)."""

    enabled: bool = False
    sequence: str = ""
    tenant: str = ""
    rate_limit: str = "10/1h"  # form posts per client address
    api_rate_limit: str = "600/1h"  # `POST /v1/leads` per API token
    trusted_proxies: list[str] = msgspec.field(default_factory=list)
    honeypot_field: str = "website"  # "": no honeypot
    max_per_mailbox_per_day: int = 3
    double_opt_in: bool = False
    confirm_sequence: str = ""
    confirm_ttl: str = "2d"
    base_url: str = ""  # where /leads/confirm/TOKEN is reachable, for confirmation links

    @property
    def form_rate(self) -> tuple[int, timedelta]:
        """`rate_limit` as (count, window)."""
        return parse_rate(self.rate_limit, where="leads.rate_limit")

    @property
    def api_rate(self) -> tuple[int, timedelta]:
        """`api_rate_limit` as (count, window)."""
        return parse_rate(self.api_rate_limit, where="leads.api_rate_limit")

    @property
    def proxies(self) -> tuple[IPv4Network | IPv6Network, ...]:
        """`trusted_proxies` as networks."""
        return tuple(ip_network(n, strict=False) for n in self.trusted_proxies)

    @property
    def confirm_for(self) -> timedelta:
        """`confirm_ttl`: how long a pending lead's confirmation link works."""
        return self._duration("confirm_ttl")


class Hooks(_Section):
    allow_http: bool = False
    allowed_networks: list[str] = msgspec.field(default_factory=list)


class Webhooks(_Section):
    """Provider feedback at `POST /webhooks/{provider}/{adapter}` (README, Channels)."""

    # Where providers reach the HTTP listener, e.g. "https://dripd.example.com": the base of
    # the URL Twilio signs and of the status-callback URL dripd hands it. "": the URL as
    # each request names it (no proxy in front).
    public_url: str = ""
    replay_window: str = "5m"  # a signed timestamp further off than this is refused
    max_body_bytes: int = 1_048_576
    retention: str = "30d"  # how long a provider event id is kept against redeliveries


class Circuit(_Section):
    """The circuit breaker of every adapter: provider-wide failures open it (see rules/breaker)."""

    failures: int = 3
    open_for: str = "5s"
    max_open_for: str = "5m"
    probe_timeout: str = "30s"

    def __post_init__(self) -> None:
        INTEGERS["circuit.failures"].check(self.failures, "circuit.failures")
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
    webhooks: Webhooks = msgspec.field(default_factory=Webhooks)
    tenants: dict[str, Tenant] = msgspec.field(default_factory=dict)
    windows: Windows = msgspec.field(default_factory=Windows)
    rate_limits: RateLimits = msgspec.field(default_factory=RateLimits)
    quotas: list[Quota] = msgspec.field(default_factory=list)
    thresholds: Thresholds = msgspec.field(default_factory=Thresholds)
    unsubscribe: Unsubscribe = msgspec.field(default_factory=Unsubscribe)
    leads: Leads = msgspec.field(default_factory=Leads)
    circuit: Circuit = msgspec.field(default_factory=Circuit)
    short_links: ShortLinks = msgspec.field(default_factory=ShortLinks)

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

    @property
    def admin_host_port(self) -> tuple[str, int] | None:
        """Where the admin listener binds; None without one (`http.admin_listen = ""`)."""
        if not self.http.admin_listen:
            return None
        return parse_listen(self.http.admin_listen, where="http.admin_listen")


def _validate(cfg: Config) -> None:
    """Every key in its range and of its syntax (README, Configuration); ConfigError naming
    the key path of the first that is not."""
    _plain_text(msgspec.to_builtins(cfg), "")
    for key, bounds in INTEGERS.items():
        section, _, name = key.partition(".")
        if not section.endswith("[]"):
            bounds.check(getattr(getattr(cfg, section), name), key)
    for key in DURATIONS:
        section, _, name = key.partition(".")
        getattr(cfg, section)._duration(name)
    if cfg.database.pool_min > cfg.database.pool_max:
        raise ConfigError("database.pool_min: must not exceed database.pool_max")
    if cfg.database.dsn:
        check_dsn(cfg.database.dsn, where="database.dsn")
    _socket_path(cfg.control.socket, "control.socket")
    if not re.fullmatch(r"0?[0-7]{3}", cfg.control.mode):
        raise ConfigError(
            f'control.mode: {_shown(cfg.control.mode)} is not an octal file mode like "0660"'
        )
    if int(cfg.control.mode, 8) & 0o002:
        # Whoever may write to the socket may drain, pause or replay: never every local user.
        raise ConfigError(
            f"control.mode: {cfg.control.mode} lets every local user control the daemon; "
            'give the socket a group instead, e.g. "0660"'
        )
    parse_listen(cfg.http.listen, where="http.listen")
    if cfg.http.admin_listen:
        parse_listen(cfg.http.admin_listen, where="http.admin_listen")
    if not _host_name(cfg.email.message_id_domain):
        raise ConfigError(
            f"email.message_id_domain: {_shown(cfg.email.message_id_domain)} is not a host "
            "name (labels of 1 to 63 letters, digits and inner hyphens, joined by dots)"
        )
    zone(cfg.recipients.default_timezone, where="recipients.default_timezone")
    if cfg.recipients.default_region not in phonenumbers.SUPPORTED_REGIONS:
        raise ConfigError(
            f"recipients.default_region: {_shown(cfg.recipients.default_region)} is not a "
            'region code such as "US" or "DE"'
        )
    for key, tenant in cfg.tenants.items():
        _name(key, _path("tenants", key))
        if tenant.timezone is not None:
            zone(tenant.timezone, where=f"{_path('tenants', key)}.timezone")
        if tenant.short_links is not None:
            check_link_rules(tenant.short_links, f"{_path('tenants', key)}.short_links")
    for n, channel in enumerate(cfg.windows.channels):
        if channel not in CHANNELS:
            raise ConfigError(
                f"windows.channels[{n}]: {_shown(channel)} is not a channel; use "
                + ", ".join(sorted(CHANNELS))
            )
    for scope in RateLimits.__struct_fields__:
        for key, rate in getattr(cfg.rate_limits, scope).items():
            where = _path(f"rate_limits.{scope}", key)
            parse_rate(rate, where=where)
            if key == "*":
                continue
            if scope.endswith("_domain"):
                normalize_domain(key, field=where)
            else:
                _name(key, where)
    for n, quota in enumerate(cfg.quotas):
        _quota(quota, f"quotas[{n}]")
    for name in ("bounce_rate", "complaint_rate"):
        rate = getattr(cfg.thresholds, name)
        if not (math.isfinite(rate) and 0 < rate <= 1):
            raise ConfigError(
                f"thresholds.{name}: must be a fraction in (0, 1], e.g. 0.02; got {rate}"
            )
    _base_url(cfg.unsubscribe.base_url, "unsubscribe.base_url")
    _base_url(cfg.webhooks.public_url, "webhooks.public_url", allow_http=True)
    _short_links(cfg)
    if cfg.unsubscribe.mailto:
        _mailto(cfg.unsubscribe.mailto, "unsubscribe.mailto")
    if cfg.leads.sequence and not _SEQUENCE_KEY.fullmatch(cfg.leads.sequence):
        raise ConfigError(
            f"leads.sequence: {_shown(cfg.leads.sequence)} is not a sequence key (a letter or "
            f"digit, then letters, digits, '_', '.' or '-'; at most {MAX_NAME} characters)"
        )
    if cfg.leads.enabled and not cfg.leads.sequence:
        raise ConfigError("leads.sequence: required when leads.enabled (the sequence leads enter)")
    if cfg.leads.tenant:
        _name(cfg.leads.tenant, "leads.tenant")
    _leads(cfg.leads)
    for n, network in enumerate(cfg.hooks.allowed_networks):
        try:
            ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(
                f"hooks.allowed_networks[{n}]: {_shown(network)} is not a network like "
                '"10.0.0.0/8" or "fd00::/8"'
            ) from None


# Control characters (NUL, line breaks, …) and unpaired surrogates: no key has a use for
# one, Postgres text cannot hold NUL, and a line break in a header would start another.
_UNPRINTABLE: Final = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")
# The deepest a key nests (quotas → a quota → its key is 3); a deeper value is no config.
_MAX_DEPTH: Final = 8
# A sequence key as sequence files spell it, no longer than the HTTP API accepts.
_SEQUENCE_KEY: Final = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{MAX_NAME - 1}}}")
# A host name label (RFC 1123): letters, digits and inner hyphens.
_LABEL: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# What a URI in a List-Unsubscribe header cannot hold (RFC 2369: `<uri>, <uri>`).
_UNSAFE_IN_HEADER: Final = re.compile(r"[^!-~]|[<>,\"]")


def _shown(text: str) -> str:
    """`text` quoted for a message, at most about 60 characters of it."""
    return repr(text) if len(text) <= 60 else repr(text[:57]) + "…"


def _path(where: str, key: str) -> str:
    """The path of `key` in the table at `where`; an odd key is quoted."""
    plain = re.fullmatch(r"[A-Za-z0-9_*.@+-]{1,60}", key) is not None
    return f"{where}.{key if plain else _shown(key)}"


def _plain_text(value: object, where: str, depth: int = 0) -> None:
    """ConfigError naming the key unless every string in `value` (keys included) is free
    of control characters and unpaired surrogates, and no value nests deeper than any
    key of the config does."""
    if depth > _MAX_DEPTH:
        raise ConfigError(f"{where}: nested too deeply")
    if isinstance(value, str):
        found = _UNPRINTABLE.search(value)
        if found is not None:
            raise ConfigError(
                f"{where}: must not hold a control character or an unpaired surrogate "
                f"(found {found.group()!r} at index {found.start()})"
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):  # not from TOML; msgspec names it
                continue
            path = _path(where, key) if where else key
            _plain_text(key, path)
            _plain_text(item, path, depth + 1)
    elif isinstance(value, list):
        for n, item in enumerate(value):
            _plain_text(item, f"{where}[{n}]", depth + 1)


def _name(text: str, where: str) -> None:
    """A tenant, adapter, provider or sequence name: 1 to MAX_NAME characters, not blank."""
    if not text.strip() or len(text) > MAX_NAME:
        raise ConfigError(f"{where}: a name must be 1 to {MAX_NAME} characters, not blank")


def _quota(quota: Quota, where: str) -> None:
    INTEGERS["quotas[].limit"].check(quota.limit, f"{where}.limit")
    zone(quota.timezone, where=f"{where}.timezone")
    if quota.key == "*":
        return
    if quota.scope == "global":
        raise ConfigError(f"{where}.key: a global quota has no key")
    if quota.scope == "mailbox":
        normalize("email", quota.key, field=f"{where}.key")
    else:
        _name(quota.key, f"{where}.key")


def _host_name(text: str) -> bool:
    """Whether `text` is a host name: labels of 1 to 63 letters, digits and inner hyphens
    joined by dots, at most 253 characters, the last label not all digits (RFC 1123, 3696)."""
    labels = text.split(".")
    return (
        len(text) <= 253
        and all(_LABEL.fullmatch(label) for label in labels)
        and not labels[-1].isdigit()
    )


def _host(text: str) -> bool:
    """Whether `text` is an IPv4 address or a host name."""
    try:
        IPv4Address(text)
    except ValueError:
        return _host_name(text)
    return True


def _ipv6(text: str) -> bool:
    try:
        IPv6Address(text)
    except ValueError:
        return False
    return True


def _socket_path(path: str, where: str) -> None:
    """A Unix socket path: absolute, naming a file, and no longer than `sun_path` holds."""
    if not path.startswith("/") or path.endswith("/"):
        raise ConfigError(
            f'{where}: {_shown(path)} is not an absolute file path like "/run/dripd/control.sock"'
        )
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        raise ConfigError(
            f"{where}: the path is {size} bytes long; a Unix socket's path holds at most "
            f"{MAX_SOCKET_PATH}"
        )


def _base_url(
    url: str, where: str, *, allow_http: bool = False, why: str = "RFC 8058 requires https; "
) -> None:
    """Empty, or an https URL without query or fragment that can go in a header (RFC 8058);
    `allow_http`: http too (where providers call us, which RFC 8058 does not govern).
    `why`: the reason the error gives first."""
    if not url:
        return
    if "@" in url.partition("//")[2].partition("/")[0]:  # its password is not echoed
        raise ConfigError(f"{where}: must not hold user information (user:password@)")
    match = re.fullmatch(
        r"https?://([^/?#@]+)(/[^?#]*)?" if allow_http else r"https://([^/?#@]+)(/[^?#]*)?", url
    )
    authority = match and re.fullmatch(r"(?:\[([^\]]*)\]|([^:\[\]]+))(?::([0-9]{1,5}))?", match[1])
    if (
        len(url) > MAX_URL
        or _UNSAFE_IN_HEADER.search(url)
        or not authority
        or not (_ipv6(authority[1]) if authority[1] is not None else _host(authority[2]))
        or not 1 <= int(authority[3] or 443) <= 65535
    ):
        # RFC 8058: one-click unsubscribe URIs must be https.
        raise ConfigError(
            f"{where}: {_shown(url)} is not an {'http(s)' if allow_http else 'https'} URL like "
            f'"https://mail.example.com" ({why}at most {MAX_URL} characters, no query or '
            "fragment)"
        )


def _mailto(text: str, where: str) -> None:
    """An email address for List-Unsubscribe, `mailto:` and `?subject=…` optional (RFC 6068):
    printable ASCII without space, comma, quote or angle bracket."""
    rest = text[len("mailto:") :] if text[:7].lower() == "mailto:" else text
    address = rest.partition("?")[0]
    normalize("email", address, field=where)
    if _UNSAFE_IN_HEADER.search(text):
        raise ConfigError(
            f"{where}: {_shown(text)} cannot go in a List-Unsubscribe header (use a bare "
            "ASCII address without spaces, commas, quotes or angle brackets)"
        )


#: The most posts a lead budget counts (it keeps the time of each one in its window).
MAX_LEAD_POSTS: Final = 1000
#: The fields of the lead form, which the honeypot must not take the name of.
LEAD_FIELDS: Final = frozenset({"name", "email", "phone", "notes"})
_FIELD_NAME: Final = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


def _leads(leads: Leads) -> None:
    """The `leads.*` keys, each in its range, and together: double opt-in needs a
    confirmation sequence other than the lead sequence and a public base URL."""
    for name in ("rate_limit", "api_rate_limit"):
        count, _ = parse_rate(getattr(leads, name), where=f"leads.{name}")
        if count > MAX_LEAD_POSTS:
            raise ConfigError(
                f"leads.{name}: {_shown(getattr(leads, name))}: the count must be at most "
                f"{MAX_LEAD_POSTS}"
            )
    for n, network in enumerate(leads.trusted_proxies):
        try:
            ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(
                f"leads.trusted_proxies[{n}]: {_shown(network)} is not an address or a network "
                'like "127.0.0.1", "10.0.0.0/8" or "fd00::/8"'
            ) from None
    field = leads.honeypot_field
    if field and (not _FIELD_NAME.fullmatch(field) or field in LEAD_FIELDS):
        raise ConfigError(
            f"leads.honeypot_field: {_shown(field)} is not a field name the form can use (a "
            "letter, then up to 63 letters, digits, '_' or '-'; not name, email, phone or "
            'notes); "" turns the honeypot off'
        )
    if leads.confirm_sequence and not _SEQUENCE_KEY.fullmatch(leads.confirm_sequence):
        raise ConfigError(
            f"leads.confirm_sequence: {_shown(leads.confirm_sequence)} is not a sequence key "
            f"(a letter or digit, then letters, digits, '_', '.' or '-'; at most {MAX_NAME} "
            "characters)"
        )
    _leads_base_url(leads.base_url)
    if not leads.double_opt_in:
        return
    if not leads.confirm_sequence:
        raise ConfigError(
            "leads.confirm_sequence: required when leads.double_opt_in (the sequence whose "
            "message carries the confirmation link, {{ confirm_url }})"
        )
    if leads.confirm_sequence == leads.sequence:
        raise ConfigError(
            "leads.confirm_sequence: must not be leads.sequence (a lead enters that one only "
            "once confirmed)"
        )
    if not leads.base_url:
        raise ConfigError(
            "leads.base_url: required when leads.double_opt_in (where /leads/confirm/TOKEN is "
            'reachable, e.g. "https://mail.example.com")'
        )


def _short_links(cfg: Config) -> None:
    links = cfg.short_links
    check_link_rules(links.rules(), "short_links")
    _base_url(links.base_url, "short_links.base_url", allow_http=True, why="")
    tenants = {key: t.short_links for key, t in cfg.tenants.items() if t.short_links is not None}
    providers = {links.provider} | {t.provider for t in tenants.values() if t.provider}
    if "dripd" in providers and not links.base_url:
        host, port = parse_listen(cfg.http.listen, where="http.listen")
        if not cfg.http.enabled or port == 0 or host in ("", "0.0.0.0", "::"):  # noqa: S104
            raise ConfigError(
                'short_links.base_url: required with short_links provider "dripd" when '
                "http.listen is not an address a reader can reach (http.enabled false, a "
                'wildcard host or port 0), e.g. "https://go.example.com"'
            )
    for key, rules in tenants.items():
        if rules.provider == "webhook" and not links.webhook_url:
            raise ConfigError(
                f"short_links.webhook_url: required when {_path('tenants', key)}.short_links."
                'provider is "webhook" (the shortener dripd POSTs each destination to)'
            )
    for n, host in enumerate(links.short_domains):
        if not _host_name(host):
            raise ConfigError(f"short_links.short_domains[{n}]: {_shown(host)} is not a host name")
    if links.webhook_url:
        _base_url(
            links.webhook_url.split("?")[0], "short_links.webhook_url", allow_http=True, why=""
        )
    elif links.provider == "webhook":
        raise ConfigError(
            'short_links.webhook_url: required when short_links.provider is "webhook" (the '
            "shortener dripd POSTs each destination to)"
        )
    if not _FIELD_NAME.fullmatch(links.webhook_field):
        raise ConfigError(
            f"short_links.webhook_field: {_shown(links.webhook_field)} is not a JSON key"
        )
    if links.webhook_token and not (
        links.webhook_token.isascii() and links.webhook_token.isprintable()
    ):
        raise ConfigError("short_links.webhook_token: must be printable ASCII")


def _leads_base_url(url: str) -> None:
    """ "" or an https URL without query or fragment (http only for a loopback host)."""
    if not url:
        return
    match = re.fullmatch(r"(https?)://([^/?#@\s<>\"]+)(/[^?#\s<>\"]*)?", url)
    host = None
    if match is not None and len(url) <= MAX_URL:
        try:
            host = urllib.parse.urlsplit(url).hostname
            urllib.parse.urlsplit(url).port  # noqa: B018 - raises ValueError when out of range
        except ValueError:
            host = None
    if host is None or (match is not None and match[1] == "http" and not _loopback(host)):
        raise ConfigError(
            f"leads.base_url: {_shown(url)} is not an https URL like "
            f'"https://mail.example.com" (http only on a loopback host; at most {MAX_URL} '
            "characters, no query or fragment)"
        )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ip_network(host).network_address.is_loopback
    except ValueError:
        return False


_LISTEN: Final = re.compile(r"(?:\[(?P<v6>[^\]]*)\]|(?P<host>[^:\[\]]+)):(?P<port>[0-9]{1,5})")


def parse_listen(text: str, *, where: str) -> tuple[str, int]:
    """Split `"127.0.0.1:8025"`, `"[::1]:8025"` or `"localhost:8025"` into host and port.

    ConfigError naming `where` unless the host is an IPv4 address, a bracketed IPv6 address
    or a host name, and the port is 0 (any free port) to 65535."""
    match = _LISTEN.fullmatch(text)
    if match is None or int(match["port"]) > 65535:
        raise ConfigError(
            f'{where}: {_shown(text)} is not a "host:port" address like "127.0.0.1:8025" or '
            '"[::1]:8025" (port 0 to 65535)'
        )
    if match["v6"] is not None:
        if not _ipv6(match["v6"]):
            raise ConfigError(f"{where}: {_shown(match['v6'])} is not an IPv6 address")
        return match["v6"], int(match["port"])
    if not _host(match["host"]):
        raise ConfigError(
            f"{where}: {_shown(match['host'])} is neither an IPv4 address nor a host name"
        )
    return match["host"], int(match["port"])


def _path_of(error: msgspec.ValidationError) -> str:
    message = str(error)
    match = re.search(r"at `\$\.?(.*)`$", message)
    return match.group(1) if match else ""


_DSN_FORM: Final = "a PostgreSQL URI like postgresql://user:password@host:5432/dbname"
_SSLMODES: Final = frozenset({"disable", "allow", "prefer", "require", "verify-ca", "verify-full"})
_SESSION_ATTRS: Final = frozenset(
    {"any", "primary", "standby", "read-write", "read-only", "prefer-standby"}
)
_IPV6_HOST: Final = re.compile(r"\[[^\]]+\](?::([^:]*))?")


def check_dsn(text: str, *, where: str) -> str:
    """`text`, once it is a DSN the driver (asyncpg) can use: a `postgresql://` or
    `postgres://` URI with hosts, ports and query as libpq spells them. ConfigError naming
    `where` (`--dsn`, `DRIPD_DSN`, `database.dsn`) and the part at fault otherwise; the
    message never quotes the DSN, which may hold a password."""
    fault = _dsn_fault(text)
    if fault is not None:
        # A password with an unencoded '/', '?' or '#' reads as a port: never show it.
        shown = Redactor(dsn_secrets(text))(fault)
        raise ConfigError(f"{where}: not {_DSN_FORM}: {shown}")
    return text


def _dsn_fault(text: str) -> str | None:
    if not isinstance(text, str) or not text.strip():
        return "it is empty"
    if _UNPRINTABLE.search(text) or any(c.isspace() for c in text):
        return (
            "it holds whitespace, a control character or bytes that are not UTF-8 "
            "(percent-encode them, e.g. %20 for a space)"
        )
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError:
        return "a host in brackets is not an IPv6 address like [::1]"
    if parts.scheme not in ("postgresql", "postgres"):
        return "it must start with postgresql:// or postgres://"
    hosts = parts.netloc.partition("@")[2] if "@" in parts.netloc else parts.netloc
    if "@" in hosts:  # the driver splits at the first @
        return "the user or password holds '@': percent-encode it as %40"
    for n, spec in enumerate(hosts.split(",") if hosts else []):
        fault = _host_fault(spec, n + 1)
        if fault is not None:
            return fault
    try:
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        return "its query is not name=value pairs joined by '&'"
    for name, value in query if parts.query else []:
        if name == "port" and not all(_port(p) for p in value.split(",")):
            return f"port {_shown(value)} is not a port number (1 to 65535)"
        if name == "sslmode" and value not in _SSLMODES:
            return f"sslmode must be one of {', '.join(sorted(_SSLMODES))}"
        if name == "target_session_attrs" and value not in _SESSION_ATTRS:
            return f"target_session_attrs must be one of {', '.join(sorted(_SESSION_ATTRS))}"
    return None


def _host_fault(spec: str, n: int) -> str | None:
    """What is wrong with the `n`th `host[:port]` of a DSN (`[v6]:port`, or a socket
    directory), if anything."""
    if spec.startswith(("/", "%2F", "%2f")):
        return None
    if spec.startswith("["):
        match = _IPV6_HOST.fullmatch(spec)
        if match is None:
            return f"host {n} is not an IPv6 address in brackets like [::1]:5432"
        port = match.group(1)
    else:
        host, _, port = spec.partition(":")
        if not host:
            return f"host {n} is empty"
    if port and not _port(urllib.parse.unquote(port)):
        return f"port {_shown(port)} is not a port number (1 to 65535)"
    return None


def _port(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 5 and 1 <= int(text) <= 65535


def load(path: Path | None = None, *, env: dict[str, str] | None = None) -> Config:
    """Load the configuration: `path`, else `$DRIPD_CONFIG`, else /etc/dripd/dripd.toml,
    else the built-in defaults.

    `DRIPD_DSN` from the environment overrides `database.dsn`.
    """
    env = dict(os.environ) if env is None else env
    explicit = path is not None or bool(env.get("DRIPD_CONFIG"))
    source = path or (Path(env["DRIPD_CONFIG"]) if env.get("DRIPD_CONFIG") else DEFAULT_PATH)
    cfg = from_dict(_read(source, explicit=explicit), source=str(source))
    if env.get("DRIPD_DSN"):
        cfg.database.dsn = check_dsn(env["DRIPD_DSN"], where="DRIPD_DSN")
    return cfg


def _read(source: Path, *, explicit: bool) -> dict[str, Any]:
    """The TOML of `source`, at most MAX_FILE_BYTES of UTF-8; {} when the default file is
    absent. ConfigError naming the file if it cannot be read or parsed."""
    try:
        with source.open("rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{source}: config file does not exist") from None
        return {}
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror}") from None
    except ValueError:  # a NUL in the path, from an API caller: the OS takes none
        raise ConfigError(f"{str(source)!r}: not a file name") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{source}: larger than {MAX_FILE_BYTES} bytes; not a config file")
    try:
        return tomllib.loads(data.decode())
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid TOML: nested too deeply") from None
    except ValueError as exc:  # an integer of more than 4300 digits
        raise ConfigError(f"{source}: not valid TOML: {str(exc).split(';')[0]}") from None


def from_dict(raw: dict[str, Any], *, source: str = "config") -> Config:
    """Build a Config from parsed TOML, naming the key path of any error.

    The message is the whole story (the CLI prints it as one line): no cause is chained."""
    try:
        _plain_text(raw, "")  # before msgspec, which cannot encode a lone surrogate
        return msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        key = _path_of(exc)
        text = re.sub(r" - at `\$.*`$", "", str(exc))
        unknown = re.fullmatch(r"Object contains unknown field `(.*)`", text)
        if unknown:
            key = f"{key}.{unknown.group(1)}" if key else unknown.group(1)
            text = "unknown key"
        raise ConfigError(f"{source}: {key or 'top level'}: {text}") from None
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc.message}") from None
    except RecursionError:  # msgspec and the checks walk nested values
        raise ConfigError(f"{source}: top level: nested too deeply") from None
