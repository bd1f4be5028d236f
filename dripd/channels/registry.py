"""Which providers exist, which adapter config each accepts, and how to build its channel."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dripd.channels import outbox, smtp
from dripd.channels.base import Channel
from dripd.errors import ConfigError
from dripd.model import Adapter

__all__ = ["ProviderSpec", "build", "get", "names", "register", "validate"]

#: Every adapter may name its default sender, whatever its provider.
COMMON_CONFIG_KEYS = frozenset({"from"})

ConfigCheck = Callable[[Mapping[str, Any], Mapping[str, Any]], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderSpec:
    """What a provider serves and accepts; `check` validates types and values of both maps."""

    name: str
    channels: frozenset[str] | None
    config_keys: frozenset[str]
    required_config: frozenset[str]
    credential_keys: frozenset[str]
    required_credentials: frozenset[str]
    factory: Callable[[Adapter], Channel]
    check: ConfigCheck | None = None


_providers: dict[str, ProviderSpec] = {}


def register(spec: ProviderSpec, *, replace: bool = False) -> None:
    """Make `spec.name` usable as an adapter provider."""
    if spec.name in _providers and not replace:
        raise ValueError(f"provider {spec.name!r} is already registered")
    _providers[spec.name] = spec


def names() -> list[str]:
    """The registered provider names, sorted."""
    return sorted(_providers)


def get(provider: str) -> ProviderSpec:
    """The spec of `provider`; ConfigError naming the known providers if there is none."""
    try:
        return _providers[provider]
    except KeyError:
        raise ConfigError(
            f"unknown provider {provider!r}; known providers: {', '.join(names())}"
        ) from None


def validate(
    channel: str,
    provider: str,
    config: Mapping[str, Any],
    credentials: Mapping[str, Any],
) -> None:
    """Raise ConfigError naming the first offending key if this adapter cannot be built."""
    spec = get(provider)
    if spec.channels is not None and channel not in spec.channels:
        raise ConfigError(
            f"provider {provider!r} does not serve channel {channel!r}; "
            f"it serves: {', '.join(sorted(spec.channels))}"
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
    if spec.check is not None:
        spec.check(config, credentials)


def build(adapter: Adapter) -> Channel:
    """Validate `adapter` and create its channel; the caller closes it with `aclose()`."""
    try:
        validate(adapter.channel, adapter.provider, adapter.config, adapter.credentials)
        return get(adapter.provider).factory(adapter)
    except ConfigError as exc:
        raise type(exc)(f"adapter {adapter.name!r}: {exc.message}") from exc


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


register(
    ProviderSpec(
        name="smtp",
        channels=frozenset({"email"}),
        config_keys=smtp.CONFIG_KEYS,
        required_config=frozenset({"host", "from"}),
        credential_keys=frozenset({"username", "password"}),
        required_credentials=frozenset(),
        factory=smtp.from_adapter,
        check=smtp.check,
    )
)
register(
    ProviderSpec(
        name="outbox",
        channels=None,
        config_keys=frozenset({"path"}),
        required_config=frozenset({"path"}),
        credential_keys=frozenset(),
        required_credentials=frozenset(),
        factory=outbox.from_adapter,
        check=outbox.check,
    )
)
