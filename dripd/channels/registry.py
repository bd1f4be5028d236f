"""Which providers exist, which adapter config each accepts, and how to build its channel."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dripd.channels import outbox, smtp
from dripd.channels.base import Channel, RedactedChannel
from dripd.errors import ConfigError
from dripd.model import Adapter
from dripd.redaction import Redactor

__all__ = ["ProviderSpec", "build", "get", "names", "redactor", "register", "validate"]

#: Every adapter may name its default sender, whatever its provider.
COMMON_CONFIG_KEYS = frozenset({"from"})

ConfigCheck = Callable[[Mapping[str, Any], Mapping[str, Any]], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderSpec:
    """What a provider serves and accepts; `check` validates types and values of both maps.

    `identifier_keys` are the credential keys that name an account rather than hold a
    secret (an SMTP login): their values are redacted whole in every encoding, but their
    fragments only inside base64 (dripd.redaction).
    """

    name: str
    channels: frozenset[str] | None
    config_keys: frozenset[str]
    required_config: frozenset[str]
    credential_keys: frozenset[str]
    required_credentials: frozenset[str]
    factory: Callable[[Adapter], Channel]
    check: ConfigCheck | None = None
    identifier_keys: frozenset[str] = frozenset()


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
    if spec.check is not None:
        spec.check(config, credentials)


def build(adapter: Adapter) -> RedactedChannel:
    """Validate `adapter` and create its channel; the caller closes it with `aclose()`.

    Every channel is built here and comes wrapped in a `RedactedChannel`: whatever a
    provider's errors say passes through the redactor of the adapter's credentials before
    it can become `last_error`, a message event, a log line or a circuit's last error.
    """
    redact = redactor(adapter.provider, adapter.credentials)
    try:
        validate(adapter.channel, adapter.provider, adapter.config, adapter.credentials)
        return RedactedChannel(get(adapter.provider).factory(adapter), redact)
    except ConfigError as exc:
        error = type(exc)(redact(f"adapter {adapter.name!r}: {exc.message}"))
    raise error from None


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
        identifier_keys=frozenset({"username"}),
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
