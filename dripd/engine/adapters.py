"""The daemon's adapters: loaded once, credentials decrypted once, channels built once."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import structlog

from dripd.channels import registry
from dripd.channels.base import Channel
from dripd.channels.credentials import Vault
from dripd.db.store import EnabledAdapterRow
from dripd.errors import CredentialsError, DripdError
from dripd.model import Adapter

log = structlog.get_logger("dripd.adapters")


def adapter_aad(adapter_id: uuid.UUID) -> bytes:
    """Credentials are bound to their adapter row: a blob copied to another row won't open."""
    return b"dripd.adapter:" + adapter_id.bytes


class AdapterSet:
    """Enabled adapters by tenant/channel/name, with their channels; rebuilt on change."""

    def __init__(self, vault: Vault | None) -> None:
        self._vault = vault
        self._by_id: dict[uuid.UUID, tuple[Adapter, Channel | str]] = {}
        self._signature: dict[uuid.UUID, Any] = {}
        self._named: dict[tuple[str | None, str], uuid.UUID] = {}
        self._default: dict[tuple[str | None, str], uuid.UUID] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    async def load(self, rows: Iterable[EnabledAdapterRow]) -> None:
        """Replace the set with `rows` (load_adapters.sql); unchanged ones keep their channel."""
        fresh: dict[uuid.UUID, tuple[Adapter, Channel | str]] = {}
        signatures: dict[uuid.UUID, Any] = {}
        stale: list[Channel] = []
        for row in rows:
            signature = (
                row.config,
                row.credentials,
                row.channel,
                row.provider,
                row.name,
                row.tenant_key,
                row.is_default,
            )
            old = self._by_id.get(row.id)
            if old is not None and self._signature.get(row.id) == signature:
                # A pause or its lifting keeps the channel (and its open connections).
                fresh[row.id] = (replace(old[0], paused_reason=row.paused_reason), old[1])
            else:
                fresh[row.id] = self._build(row)
                if old is not None and not isinstance(old[1], str):
                    stale.append(old[1])
            signatures[row.id] = signature
        for adapter_id, (_, channel) in self._by_id.items():
            if adapter_id not in fresh and not isinstance(channel, str):
                stale.append(channel)
        self._by_id, self._signature = fresh, signatures
        self._named = {(a.tenant_key, a.name): a.id for a, _ in fresh.values()}
        self._default = {(a.tenant_key, a.channel): a.id for a, _ in fresh.values() if a.is_default}
        for channel in stale:
            await _close(channel)

    def _build(self, row: EnabledAdapterRow) -> tuple[Adapter, Channel | str]:
        credentials: dict[str, Any] = {}
        problem: str | None = None
        if row.credentials is not None:
            if self._vault is None:
                problem = (
                    f"adapter {row.name!r} has credentials but DRIPD_ENCRYPTION_KEY is not set"
                )
            else:
                try:
                    credentials = self._vault.decrypt(row.credentials, aad=adapter_aad(row.id))
                except CredentialsError as exc:
                    problem = f"adapter {row.name!r}: {exc.message}"
        adapter = Adapter(
            id=row.id,
            tenant_key=row.tenant_key,
            name=row.name,
            channel=row.channel,
            provider=row.provider,
            config=dict(row.config),
            credentials=credentials,
            is_default=row.is_default,
            enabled=True,
            paused_reason=row.paused_reason,
        )
        if problem is None:
            try:
                return adapter, registry.build(adapter)
            except DripdError as exc:
                problem = f"adapter {row.name!r}: {exc.message}"
        log.error("adapter unusable", adapter=row.name, problem=problem)
        return adapter, problem

    def resolve(
        self, tenant: str | None, channel: str, name: str | None
    ) -> tuple[Adapter, Channel] | str:
        """The adapter for a send: the step's named one, else the tenant's default for the
        channel, else the global default. A string says why there is none."""
        adapter_id: uuid.UUID | None
        if name is not None:
            adapter_id = self._named.get((tenant, name)) or self._named.get((None, name))
            if adapter_id is None:
                return f"no enabled adapter named {name!r} for tenant {tenant or '(global)'}"
        else:
            adapter_id = self._default.get((tenant, channel)) or self._default.get((None, channel))
            if adapter_id is None:
                return (
                    f"no enabled default adapter for channel {channel!r} "
                    f"in tenant {tenant or '(global)'}"
                )
        adapter, impl = self._by_id[adapter_id]
        if isinstance(impl, str):
            return impl
        if adapter.channel != channel:
            return f"adapter {adapter.name!r} serves channel {adapter.channel!r}, not {channel!r}"
        return adapter, impl

    async def aclose(self) -> None:
        for _, channel in self._by_id.values():
            if not isinstance(channel, str):
                await _close(channel)
        self._by_id.clear()


async def _close(channel: Channel) -> None:
    try:
        await channel.aclose()
    except Exception:  # closing a broken channel must not stop a reload
        log.warning("closing an adapter failed", provider=channel.provider, exc_info=True)
