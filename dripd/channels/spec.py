"""What a provider declares: the channels it serves, its config and credential keys, how to
build its channel and its webhook receiver (dripd.channels.registry registers these)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dripd.channels.base import Channel, ChannelContext
from dripd.channels.feedback import Receiver, ReceiverContext
from dripd.model import Adapter

__all__ = ["ConfigCheck", "Factory", "ProviderSpec", "ReceiverFactory"]

ConfigCheck = Callable[[Mapping[str, Any], Mapping[str, Any]], None]
Factory = Callable[[Adapter, ChannelContext], Channel]
ReceiverFactory = Callable[[Adapter, ReceiverContext], Receiver]


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderSpec:
    """What a provider serves and accepts; `check` validates types and values of both maps.

    `identifier_keys` are the credential keys that name an account rather than hold a
    secret (an SMTP login): their values are redacted whole in every encoding, but their
    fragments only inside base64 (dripd.redaction).

    `factory(adapter, context)` builds the channel (its `send`/`aclose`, see
    dripd.channels.base.Channel; a `send_batch` makes it a BatchChannel). `receiver`, when
    the provider sends feedback, builds the adapter's webhook receiver
    (dripd.channels.feedback.Receiver) behind `POST /webhooks/{name}/{adapter}`.
    """

    name: str
    channels: frozenset[str] | None
    config_keys: frozenset[str]
    required_config: frozenset[str]
    credential_keys: frozenset[str]
    required_credentials: frozenset[str]
    factory: Factory
    check: ConfigCheck | None = None
    identifier_keys: frozenset[str] = frozenset()
    receiver: ReceiverFactory | None = None
