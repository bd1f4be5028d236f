"""The daemon's adapters: loaded once, credentials decrypted once, channels built once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import structlog

from dripd.channels import registry
from dripd.channels.base import Channel, ChannelContext
from dripd.channels.credentials import Vault
from dripd.channels.feedback import Receiver, ReceiverContext
from dripd.db.store import EnabledAdapterRow
from dripd.errors import CredentialsError, DripdError
from dripd.model import Adapter

log = structlog.get_logger("dripd.adapters")


def adapter_aad(adapter_id: uuid.UUID) -> bytes:
    """Credentials are bound to their adapter row: a blob copied to another row won't open."""
    return b"dripd.adapter:" + adapter_id.bytes


class AdapterSet:
    """Enabled adapters by tenant/channel/name, with their channels and, built on the first
    webhook, their providers' receivers; rebuilt on change.

    `context(adapter)` gives each channel what the daemon holds for it (dripd.channels.base.
    ChannelContext); `receiver_context` is handed to every webhook receiver.
    """

    def __init__(
        self,
        vault: Vault | None,
        *,
        context: Callable[[Adapter], ChannelContext] | None = None,
        receiver_context: ReceiverContext | None = None,
    ) -> None:
        self._vault = vault
        self._context = context or (lambda _adapter: ChannelContext())
        self._receiver_context = receiver_context or ReceiverContext()
        self._receivers: dict[uuid.UUID, Receiver | None] = {}
        self._closing: set[asyncio.Task[None]] = set()
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
        stale_receivers: list[Receiver | None] = []
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
                stale_receivers.append(self._receivers.pop(row.id, None))
            signatures[row.id] = signature
        for adapter_id, (_, channel) in self._by_id.items():
            if adapter_id not in fresh:
                stale_receivers.append(self._receivers.pop(adapter_id, None))
                if not isinstance(channel, str):
                    stale.append(channel)
        self._by_id, self._signature = fresh, signatures
        self._named = {(a.tenant_key, a.name): a.id for a, _ in fresh.values()}
        self._default = {(a.tenant_key, a.channel): a.id for a, _ in fresh.values() if a.is_default}
        # Closed in the background: a replaced channel may have a send in flight (a slow
        # provider, a batch), and closing waits for it; the reload must not.
        closables: list[Channel | Receiver] = [*stale]
        closables += [r for r in stale_receivers if r is not None]
        for closable in closables:
            task = asyncio.get_running_loop().create_task(_close(closable))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

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
                return adapter, registry.build(adapter, self._context(adapter))
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

    def webhook_target(
        self, provider: str, tenant: str | None, name: str
    ) -> tuple[Adapter, Receiver] | None:
        """The enabled adapter `name` of exactly `tenant` with this provider, and its
        webhook receiver (built on first use); None when there is none, its provider takes
        no webhooks, or its credentials cannot be read (logged)."""
        adapter_id = self._named.get((tenant, name))
        if adapter_id is None:
            return None
        adapter, _ = self._by_id[adapter_id]
        if adapter.provider != provider:
            return None
        if adapter_id not in self._receivers:
            self._receivers[adapter_id] = self._receiver(adapter)
        receiver = self._receivers[adapter_id]
        return (adapter, receiver) if receiver is not None else None

    def _receiver(self, adapter: Adapter) -> Receiver | None:
        problem = self._by_id[adapter.id][1]
        if isinstance(problem, str):  # its credentials or config do not hold (logged)
            return None
        try:
            return registry.receiver(adapter, self._receiver_context)
        except DripdError as exc:
            log.error("webhook receiver unusable", adapter=adapter.name, problem=exc.message)
            return None

    async def aclose(self) -> None:
        for _, channel in self._by_id.values():
            if not isinstance(channel, str):
                await _close(channel)
        for receiver in self._receivers.values():
            if receiver is not None:
                await _close(receiver)
        self._by_id.clear()
        self._receivers.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


async def _close(closable: Channel | Receiver) -> None:
    try:
        await closable.aclose()
    except Exception:  # closing a broken channel must not stop a reload
        log.warning(
            "closing an adapter failed",
            provider=getattr(closable, "provider", None),
            exc_info=True,
        )
