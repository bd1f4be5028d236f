"""Which providers exist, which adapter config each accepts, and how to build its channel.

Built-in providers are modules of dripd.channels, each with a `SPEC`. Custom providers are
installed packages that declare an entry point in the group `dripd.providers` (see the
README, "Custom providers"): its object is a `ProviderSpec`, or a callable returning one.
`load_entry_points()` registers them; the daemon and the CLI call it at start.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import Any, TypeVar

import structlog

from dripd import addresses
from dripd.channels.base import BatchChannel, Channel, ChannelContext, RedactedChannel
from dripd.channels.batching import Batcher
from dripd.channels.feedback import Receiver, ReceiverContext
from dripd.channels.spec import ProviderSpec
from dripd.errors import ConfigError
from dripd.model import Adapter
from dripd.redaction import Redactor

__all__ = [
    "ENTRY_POINT_GROUP",
    "ProviderSpec",
    "build",
    "get",
    "load_entry_points",
    "names",
    "receiver",
    "redactor",
    "register",
    "validate",
]

log = structlog.get_logger("dripd.channels")

T = TypeVar("T")

#: The entry-point group custom providers are installed under.
ENTRY_POINT_GROUP = "dripd.providers"

#: The modules of dripd.channels that define a built-in provider's `SPEC`.
BUILTIN = (
    "smtp",
    "outbox",
    "sendgrid",
    "mailgun",
    "gmail",
    "ms365",
    "webhook",
    "slack",
    "pubsub",
    "twilio",
    "whatsapp_cloud",
    "telegram",
    "postmark",
    "mailersend",
    "ses",
    "sns",
)  # helpers: append your module names to this tuple

#: Every adapter may name its default sender, whatever its provider.
COMMON_CONFIG_KEYS = frozenset({"from"})


_providers: dict[str, ProviderSpec] = {}
_entry_points_loaded = False


def register(spec: ProviderSpec, *, replace: bool = False) -> None:
    """Make `spec.name` usable as an adapter provider."""
    if spec.name in _providers and not replace:
        raise ValueError(f"provider {spec.name!r} is already registered")
    _providers[spec.name] = spec


def names() -> list[str]:
    """The registered provider names, sorted."""
    return sorted(_providers)


def get(provider: str) -> ProviderSpec:
    """The spec of `provider` (the installed entry points are loaded on the first unknown
    name); ConfigError naming the known providers if there is none."""
    if provider not in _providers and not _entry_points_loaded:
        load_entry_points()
    try:
        return _providers[provider]
    except KeyError:
        raise ConfigError(
            f"unknown provider {provider!r}; known providers: {', '.join(names())}"
        ) from None


def redactor(provider: str, credentials: Mapping[str, Any]) -> Redactor:
    """The redactor for an adapter's decrypted credentials: every value is a secret but
    those of the provider's `identifier_keys`. For an unknown provider, every value is a
    secret."""
    spec = _providers.get(provider)
    identifiers = spec.identifier_keys if spec is not None else frozenset()
    return Redactor.from_credentials(credentials, identifiers=identifiers)


def validate(
    channel: str,
    provider: str,
    config: Mapping[str, Any],
    credentials: Mapping[str, Any],
) -> None:
    """Raise ConfigError naming the first offending key if this adapter cannot be built.
    The message never holds a credential, even if a provider's check quoted one."""
    try:
        _validate(channel, provider, config, credentials)
        return
    except ConfigError as exc:
        error = type(exc)(redactor(provider, credentials)(exc.message))
    # Raised outside the handler: the original, unredacted, is neither cause nor context.
    raise error from None


def _validate(
    channel: str,
    provider: str,
    config: Mapping[str, Any],
    credentials: Mapping[str, Any],
) -> None:
    spec = get(provider)
    if spec.channels is not None and channel not in spec.channels:
        raise ConfigError(
            f"provider {provider!r} does not serve channel {channel!r}; "
            f"it serves: {', '.join(sorted(spec.channels))}"
        )
    if misplaced := sorted(set(config) & (spec.credential_keys - spec.config_keys)):
        # The config is stored and listed in clear (`adapter list`); credentials are sealed.
        raise ConfigError(
            f"adapter config key {misplaced[0]!r} is a credential of provider {provider!r}: "
            "give it among the credentials (`--credentials-file`), which are stored encrypted"
        )
    _check_keys(
        "config",
        provider,
        set(config),
        allowed=spec.config_keys | COMMON_CONFIG_KEYS,
        required=spec.required_config,
    )
    _check_keys(
        "credentials",
        provider,
        set(credentials),
        allowed=spec.credential_keys,
        required=spec.required_credentials,
    )
    sender = config.get("from")
    if "from" in config and (not isinstance(sender, str) or not sender.strip()):
        raise ConfigError("adapter config `from` must be a non-empty string (the default sender)")
    if channel == "email" and isinstance(sender, str):
        # One check for every email provider: the default sender must read as a mailbox
        # (`addr` or `Name <addr>`), or every send would be refused by the provider.
        addresses.recipient("email", sender, field="adapter config `from`")
    if spec.check is not None:
        spec.check(config, credentials)


def build(adapter: Adapter, context: ChannelContext | None = None) -> RedactedChannel:
    """Validate `adapter` and create its channel; the caller closes it with `aclose()`.

    Every channel is built here and comes wrapped in a `RedactedChannel`: whatever a
    provider's errors say passes through the redactor of the adapter's credentials before
    it can become `last_error`, a message event, a log line or a circuit's last error. A
    provider with a batch endpoint (`send_batch`) is wrapped in a `Batcher` inside it.
    ConfigError (redacted) when the adapter does not hold, or its factory fails in any way:
    one adapter's bad values never take the daemon down.
    """
    redact = redactor(adapter.provider, adapter.credentials)
    try:
        validate(adapter.channel, adapter.provider, adapter.config, adapter.credentials)
        channel = _built(get(adapter.provider).factory, adapter, context or ChannelContext())
        if callable(getattr(channel, "send_batch", None)) and isinstance(
            getattr(channel, "max_batch", None), int
        ):
            channel = Batcher(_as_batch(channel))
        return RedactedChannel(channel, redact)
    except ConfigError as exc:
        error = type(exc)(redact(f"adapter {adapter.name!r}: {exc.message}"))
    raise error from None


def receiver(adapter: Adapter, context: ReceiverContext) -> Receiver | None:
    """The webhook receiver of `adapter`, or None when its provider sends no feedback.
    ConfigError (redacted) when the adapter's config or credentials do not hold, or the
    provider's receiver factory fails in any way."""
    spec = get(adapter.provider)
    if spec.receiver is None:
        return None
    try:
        validate(adapter.channel, adapter.provider, adapter.config, adapter.credentials)
        return _built(spec.receiver, adapter, context)
    except ConfigError as exc:
        redact = redactor(adapter.provider, adapter.credentials)
        error = type(exc)(redact(f"adapter {adapter.name!r}: {exc.message}"))
    raise error from None


def _built(factory: Callable[[Adapter, Any], T], adapter: Adapter, context: Any) -> T:
    """`factory(adapter, context)`; a provider's unexpected exception becomes a ConfigError
    naming its type (its text is redacted by the caller)."""
    try:
        return factory(adapter, context)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - a provider bug must not stop the daemon
        raise ConfigError(
            f"provider {adapter.provider!r} cannot build it: {type(exc).__name__}: {exc}"
        ) from None


def _as_batch(channel: Channel) -> BatchChannel:
    return channel  # type: ignore[return-value]  # checked by the caller


def load_entry_points() -> list[str]:
    """Register the providers installed under the entry-point group `dripd.providers`;
    returns their names. ConfigError naming the entry point when one cannot be loaded or
    is not a ProviderSpec (a name already registered by another is refused the same way)."""
    global _entry_points_loaded
    _entry_points_loaded = True
    loaded: list[str] = []
    for point in entry_points(group=ENTRY_POINT_GROUP):
        where = f"entry point {point.name!r} ({point.value}) in group {ENTRY_POINT_GROUP!r}"
        try:
            obj = point.load()
            spec = obj() if callable(obj) and not isinstance(obj, ProviderSpec) else obj
        except Exception as exc:  # noqa: BLE001 - any import error names the entry point
            raise ConfigError(f"{where}: cannot load: {type(exc).__name__}: {exc}") from None
        if not isinstance(spec, ProviderSpec):
            raise ConfigError(f"{where}: is {type(spec).__name__}, not a dripd ProviderSpec")
        current = _providers.get(spec.name)
        if current is spec:
            continue
        if current is not None:
            raise ConfigError(f"{where}: provider {spec.name!r} is already registered")
        register(spec)
        loaded.append(spec.name)
        log.info("custom provider registered", provider=spec.name, entry_point=point.value)
    return loaded


def _check_keys(
    what: str, provider: str, keys: set[str], *, allowed: frozenset[str], required: frozenset[str]
) -> None:
    if unknown := sorted(keys - allowed):
        known = ", ".join(sorted(allowed)) or "none"
        raise ConfigError(
            f"adapter {what} key {unknown[0]!r} is not known to provider {provider!r}; "
            f"known: {known}"
        )
    if missing := sorted(required - keys):
        raise ConfigError(f"adapter {what} key {missing[0]!r} is required by provider {provider!r}")


for _module in BUILTIN:
    register(importlib.import_module(f"dripd.channels.{_module}").SPEC)
