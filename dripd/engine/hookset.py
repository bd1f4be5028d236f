"""The daemon's hooks: one runner per version and tenant, secrets from the encrypted store."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import cast

import httpx
import structlog

from dripd.channels.credentials import Vault
from dripd.conditions.hooks import HookError, Hooks, PythonHook, build_client, load_python
from dripd.conditions.hookspecs import HookSpec, PythonHookSpec, parse_hooks
from dripd.db import store
from dripd.engine.advance import CompiledStep
from dripd.engine.pipeline import TemplateFunction
from dripd.errors import DripdError
from dripd.netguard import NetPolicy
from dripd.pyload import LoadError, load_async_function

log = structlog.get_logger("dripd.hooks")


def secret_aad(secret_id: uuid.UUID) -> bytes:
    """A secret is bound to its row: a blob copied to another row won't open."""
    return b"dripd.secret:" + secret_id.bytes


class HookSet:
    """Hook runners by (version, tenant), sharing one HTTP client and one Python loader."""

    def __init__(
        self,
        *,
        pool: store.Executor,
        vault: Vault | None,
        policy: NetPolicy,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self._pool = pool
        self._vault = vault
        self._policy = policy
        self._client = client or build_client()
        self._own_client = client is None
        self._runners: dict[tuple[uuid.UUID, str | None], Hooks] = {}
        self._python: dict[str, PythonHook | HookError] = {}
        self._templates: dict[str, TemplateFunction | LoadError] = {}

    def for_step(self, step: CompiledStep, tenant: str | None) -> Hooks:
        """The runner for `step`'s version, reading `tenant`'s secrets (else global ones)."""
        return self.for_version(step.step.version_id, step.hook_specs, tenant)

    def for_version(
        self, version_id: uuid.UUID, specs: Mapping[str, HookSpec], tenant: str | None
    ) -> Hooks:
        key = (version_id, tenant)
        runner = self._runners.get(key)
        if runner is None:
            runner = self._runners[key] = Hooks(
                specs,
                policy=self._policy,
                secrets=self.secrets_of(tenant),
                client=self._client,
                python_loader=self.python,
            )
        return runner

    def python(self, path: str) -> PythonHook:
        """Import a Python hook once; a failed import stays failed (and says why)."""
        found = self._python.get(path)
        if found is None:
            try:
                found = load_python(path)
            except HookError as exc:
                found = exc
            self._python[path] = found
        if isinstance(found, HookError):
            raise found
        return found

    def preload(self, hooks_tables: list[dict[str, object]]) -> None:
        """Import the Python hooks of the active versions at start, and say which fail."""
        for table in hooks_tables:
            try:
                specs = parse_hooks(table, where="hooks")
            except DripdError as exc:
                log.error("a stored hooks table is invalid", error=exc.message)
                continue
            for name, spec in specs.items():
                if isinstance(spec, PythonHookSpec):
                    try:
                        self.python(spec.path)
                    except HookError as exc:
                        log.error("python hook cannot be loaded", hook=name, error=exc.message)

    def template(self, path: str) -> TemplateFunction:
        """Import a step's Python template once; a failed import stays failed (LoadError
        saying why, without the imported code's own message, which may hold anything)."""
        found = self._templates.get(path)
        if found is None:
            try:
                found = cast(TemplateFunction, load_async_function(path))
            except LoadError as exc:
                found = exc
            self._templates[path] = found
        if isinstance(found, LoadError):
            raise found
        return found

    def preload_templates(self, paths: list[str]) -> None:
        """Import the Python templates of the active versions at start, and say which fail."""
        for path in paths:
            try:
                self.template(path)
            except LoadError as exc:
                log.error("python template cannot be loaded", template=path, error=exc.message)

    def secrets_of(self, tenant: str | None) -> Callable[[str], Awaitable[str]]:
        async def secret(name: str) -> str:
            if self._vault is None:
                raise HookError(f"secret {name!r}: DRIPD_ENCRYPTION_KEY is not set")
            try:
                row = await store.secret_row(self._pool, tenant, name)
            except DripdError as exc:
                raise HookError(f"secret {name!r}: {exc.message}") from exc
            if row is None:
                raise HookError(
                    f"secret {name!r} does not exist for tenant {tenant or '(global)'}; "
                    "create it with `dripd secret set`"
                )
            try:
                value = self._vault.decrypt(row.value, aad=secret_aad(row.id))["value"]
            except DripdError as exc:
                raise HookError(f"secret {name!r}: {exc.message}") from exc
            return str(value)

        return secret

    async def aclose(self) -> None:
        if self._own_client:
            await self._client.aclose()
