"""Hooks at run time: HTTP endpoints and Python functions whose results steps read as
`hooks.<name>` (their specs are `dripd.conditions.hookspecs`).

An HTTP hook connects to an address the network guard (`dripd.netguard`) has just
checked, never to the name again. The `Host` header and, for https, the httpcore
`sni_hostname` request extension carry the original name, so the server's certificate is
verified against that name, not the address (httpcore passes the extension to
`ssl.SSLContext.wrap_socket(server_hostname=…)`). Redirects are never followed. Each request
is signed with Standard Webhooks headers.

Every failure at run time is a `HookError` that names the hook and never contains a secret
(the text of a network error passes through the redactor of the call's secrets) nor more of
the rendered URL than its scheme and host (its path and query can carry subscriber data); the engine
treats it as a transient failure of the step.
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import math
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, TypeAlias, assert_never, cast

import anyio
import httpx
import msgspec
from standardwebhooks import Webhook
from standardwebhooks.webhooks import EmptyWebhookSecretError

from dripd import __version__
from dripd.conditions.hookspecs import (
    BasicAuth,
    BearerAuth,
    HeaderAuth,
    HookSpec,
    HttpHookSpec,
    PythonHookSpec,
)
from dripd.content.liquid import RENDER_THREADS, Template, TemplateError, render_fields
from dripd.errors import HookError
from dripd.model import format_duration
from dripd.netguard import (
    IPAddress,
    NetPolicy,
    Resolver,
    Target,
    checked_addresses,
    parse_target,
    pinned_request,
    resolve_host,
)
from dripd.pyload import LoadError, load_async_function, split_python_path
from dripd.redaction import Redactor, urls_for_log

__all__ = [
    "MAX_RESPONSE_BYTES",
    "HookEnrollment",
    "HookError",
    "HookStep",
    "Hooks",
    "PythonHook",
    "Secrets",
    "build_client",
    "load_python",
]

MAX_RESPONSE_BYTES: Final = 1024 * 1024
BACKOFF_BASE: Final = 0.2
BACKOFF_CAP: Final = 5.0

Secrets: TypeAlias = Callable[[str], Awaitable[str]]


@dataclass(frozen=True, slots=True, kw_only=True)
class HookEnrollment:
    """What a Python hook is told about the enrollment it runs for."""

    id: str  # the enrollment's UUID, as text
    tenant_key: str | None
    sequence_key: str
    subscriber_type: str
    subscriber_id: str
    data: Mapping[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class HookStep:
    """What a Python hook is told about the step it runs for."""

    key: str
    channel: str | None  # None for a step that only waits


PythonHook: TypeAlias = Callable[[HookEnrollment, HookStep], Awaitable[Any]]


# -- Python hooks ------------------------------------------------------------------------------


def load_python(path: str) -> PythonHook:
    """Import the async function at `path` ("module:attr" or "module.attr"); HookError if not."""
    try:
        return cast(PythonHook, load_async_function(path))
    except LoadError as exc:
        if split_python_path(path) is None:
            raise HookError(f"{path!r} is not a Python path") from None
        detail = f": {exc.detail}" if exc.detail is not None else ""
        raise HookError(f"{path}: {exc.message}{detail}") from exc


def _check_json(value: Any, where: str = "result", depth: int = 0) -> None:
    """Raise HookError unless `value` is JSON: None, bool, int, finite float, str, list, dict."""
    if depth > 64:
        raise HookError(f"{where}: nested too deeply")
    if value is None or isinstance(value, bool | int | str):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise HookError(f"{where}: {value} is not a JSON number")
        return
    if isinstance(value, list):
        for n, item in enumerate(value):
            _check_json(item, f"{where}[{n}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise HookError(f"{where}: key {key!r} is not a string")
            _check_json(item, f"{where}[{key!r}]", depth + 1)
        return
    raise HookError(f"{where}: a {type(value).__name__} is not a JSON value")


# -- HTTP hooks --------------------------------------------------------------------------------


def build_client(*, verify: ssl.SSLContext | bool = True) -> httpx.AsyncClient:
    """An httpx client fit for hooks; its creator closes it.

    No proxies from the environment (a proxy would connect by name and defeat the address
    check and `sni_hostname`) and no cookie jar (hooks to different hosts on one address would
    otherwise share cookies).
    """
    no_cookies = http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    return httpx.AsyncClient(
        trust_env=False,
        follow_redirects=False,
        cookies=no_cookies,
        # No kept-alive connections: the pool is keyed by (scheme, address, port), so a TLS
        # connection verified for one host name could otherwise carry a request for another
        # name on the same address. A handshake per call is the price of that guarantee.
        limits=httpx.Limits(max_keepalive_connections=0),
        verify=verify,
        headers={"user-agent": f"dripd/{__version__}"},
    )


class _Retry(Exception):
    """An attempt failed in a way another attempt may not: network, timeout, HTTP 429 or 5xx."""


@dataclass(frozen=True, slots=True, kw_only=True)
class _Prepared:
    """One hook call's request, rendered and authenticated once for all its attempts.
    Only the target shows in its repr: the rest holds secrets and subscriber data."""

    target: Target
    headers: dict[str, str] = field(repr=False)
    body: str = field(repr=False)
    auth: httpx.Auth | None = field(repr=False)
    signer: Webhook = field(repr=False)
    secrets: tuple[str, ...] = field(repr=False)  # the signing key and the auth secret

    def clean(self, text: str) -> str:
        """`text` (a network error's) without this call's secrets, in any encoding, and
        with every URL in it cut to scheme and host (`url_for_log`)."""
        return Redactor(self.secrets)(urls_for_log(text))


def _wall_now() -> datetime:
    return datetime.now(UTC)


class Hooks:
    """Runs a sequence's hooks by name.

    `secrets` maps a secret's name to its value (raising HookError when it is missing).
    `now` is the wall clock the signatures are stamped with: receivers compare it with their
    own clock, so it is never the daemon's domain clock. `sleep` waits between attempts.
    """

    def __init__(
        self,
        specs: Mapping[str, HookSpec],
        *,
        policy: NetPolicy,
        secrets: Secrets,
        client: httpx.AsyncClient,
        python_loader: Callable[[str], PythonHook] = load_python,
        resolve: Resolver = resolve_host,
        now: Callable[[], datetime] = _wall_now,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._specs = dict(specs)
        self._policy = policy
        self._secrets = secrets
        self._client = client
        self._python_loader = python_loader
        self._resolve = resolve
        self._now = now
        self._sleep = sleep
        self._loaded: dict[str, PythonHook] = {}
        self._render_limiter = anyio.CapacityLimiter(RENDER_THREADS)  # slow renders' threads

    async def run(
        self,
        name: str,
        *,
        context: Mapping[str, Any],
        webhook_id: str,
        enrollment: HookEnrollment,
        step: HookStep,
    ) -> Any:
        """The result of hook `name`: a JSON value (or text for a non-JSON HTTP response)."""
        spec = self._specs.get(name)
        if spec is None:
            raise HookError(f"no hook named {name!r} in this sequence")
        if isinstance(spec, HttpHookSpec):
            return await self._run_http(spec, context=context, webhook_id=webhook_id)
        if isinstance(spec, PythonHookSpec):
            return await self._run_python(spec, enrollment=enrollment, step=step)
        assert_never(spec)

    # -- python

    def _function(self, spec: PythonHookSpec) -> PythonHook:
        fn = self._loaded.get(spec.path)
        if fn is None:
            try:
                fn = self._loaded[spec.path] = self._python_loader(spec.path)
            except HookError as exc:
                raise HookError(f"hook {spec.name!r}: {exc.message}") from exc
        return fn

    async def _run_python(
        self, spec: PythonHookSpec, *, enrollment: HookEnrollment, step: HookStep
    ) -> Any:
        fn = self._function(spec)
        label = f"hook {spec.name!r} ({spec.path})"
        deadline = asyncio.timeout(spec.timeout.total_seconds())
        try:
            async with deadline:
                result = await fn(enrollment, step)
        except Exception as exc:  # the host application's code: any error fails the step
            if isinstance(exc, TimeoutError) and deadline.expired():
                raise HookError(f"{label} timed out after {format_duration(spec.timeout)}") from exc
            raise HookError(f"{label} raised {type(exc).__name__}: {_clip(str(exc))}") from exc
        try:
            _check_json(result)
        except HookError as exc:
            raise HookError(f"{label} returned a non-JSON value: {exc.message}") from None
        return result

    # -- http

    async def _run_http(
        self, spec: HttpHookSpec, *, context: Mapping[str, Any], webhook_id: str
    ) -> Any:
        try:
            prepared = await self._prepare(spec, context)
        except HookError as exc:
            raise HookError(f"hook {spec.name!r}: {exc.message}") from exc
        label = f"hook {spec.name!r} ({spec.method} {prepared.target.host})"
        attempts = spec.retries + 1
        reason = ""
        for attempt in range(attempts):
            if attempt:
                await self._sleep(min(BACKOFF_BASE * 2 ** (attempt - 1), BACKOFF_CAP))
            try:
                return await self._attempt(spec, prepared, webhook_id, attempt)
            except _Retry as exc:
                reason = prepared.clean(str(exc))
            except HookError as exc:
                raise HookError(f"{label}: {exc.message}") from exc
        tries = "1 attempt" if attempts == 1 else f"{attempts} attempts"
        raise HookError(f"{label}: {reason} (gave up after {tries})")

    async def _prepare(self, spec: HttpHookSpec, context: Mapping[str, Any]) -> _Prepared:
        url = await self._render(spec.url, context)
        target = parse_target(url, self._policy)
        headers = {}
        for header, template in spec.headers.items():
            value = await self._render(template, context)
            if not _header_safe(value):
                raise HookError(f"header {header!r}: the rendered value has a control character")
            headers[header] = value
        body = "" if spec.body is None else await self._render(spec.body, context)
        if spec.body is not None and not any(h.lower() == "content-type" for h in headers):
            headers["content-type"] = "application/json"

        signing_key = await self._secret(spec.signing_secret)
        try:
            signer = Webhook(signing_key)
        except (ValueError, EmptyWebhookSecretError):  # binascii.Error is a ValueError
            raise HookError(
                f"secret {spec.signing_secret!r} is not a Standard Webhooks key (whsec_…)"
            ) from None
        auth: httpx.Auth | None = None
        secrets = [signing_key]
        if spec.auth is not None:
            secret = await self._secret(spec.auth.secret)
            secrets.append(secret)
            if isinstance(spec.auth, BearerAuth):
                headers["authorization"] = f"Bearer {secret}"
            elif isinstance(spec.auth, BasicAuth):
                auth = httpx.BasicAuth(spec.auth.username, secret)
            elif isinstance(spec.auth, HeaderAuth):
                headers[spec.auth.name] = secret
            else:
                assert_never(spec.auth)
        return _Prepared(
            target=target,
            headers=headers,
            body=body,
            auth=auth,
            signer=signer,
            secrets=tuple(secrets),
        )

    async def _render(self, template: Template, context: Mapping[str, Any]) -> str:
        """`template` rendered (off the event loop when it is slow: `render_fields`)."""
        try:
            rendered = await render_fields(
                {template.field: template}, context, limiter=self._render_limiter
            )
        except TemplateError as exc:
            raise HookError(f"cannot render {exc}") from exc
        return rendered[template.field]

    async def _secret(self, name: str) -> str:
        # A value h11 would refuse would be quoted in h11's error: refuse it here, by name.
        value = await self._secrets(name)
        if not value or value != value.strip() or not _header_safe(value):
            raise HookError(
                f"secret {name!r} is empty, has surrounding whitespace or a control character"
            )
        return value

    async def _attempt(
        self, spec: HttpHookSpec, prepared: _Prepared, webhook_id: str, attempt: int
    ) -> Any:
        target = prepared.target
        try:
            async with asyncio.timeout(spec.timeout.total_seconds()):
                addresses = await checked_addresses(target, self._policy, self._resolve)
                # Connect to an address just checked: looking the name up again could rebind it.
                address = addresses[attempt % len(addresses)]
                request = self._request(spec, prepared, webhook_id, address)
                response = await self._client.send(
                    request, auth=prepared.auth, follow_redirects=False, stream=True
                )
                try:
                    return await _result(response)
                finally:
                    await response.aclose()
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise _Retry(f"timed out after {format_duration(spec.timeout)}") from exc
        except httpx.TransportError as exc:
            detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise _Retry(detail) from exc
        except OSError as exc:  # from the resolver
            raise _Retry(f"cannot resolve {target.host!r}: {exc.strerror or exc}") from exc

    def _request(
        self, spec: HttpHookSpec, prepared: _Prepared, webhook_id: str, address: IPAddress
    ) -> httpx.Request:
        target = prepared.target
        timestamp = self._now().astimezone(UTC)
        signed = {
            "webhook-id": webhook_id,
            "webhook-timestamp": str(math.floor(timestamp.timestamp())),
            "webhook-signature": prepared.signer.sign(webhook_id, timestamp, prepared.body),
        }
        return pinned_request(
            self._client,
            spec.method,
            target,
            address,
            headers={**prepared.headers, **signed},
            content=None if spec.body is None else prepared.body.encode(),
            timeout=httpx.Timeout(spec.timeout.total_seconds()),
        )


async def _result(response: httpx.Response) -> Any:
    status = response.status_code
    if status == 429 or status >= 500:
        raise _Retry(f"HTTP {status}")
    if 300 <= status < 400:
        raise HookError(f"answered HTTP {status} (redirects are not followed)")
    if not 200 <= status < 300:
        raise HookError(f"answered HTTP {status}")
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_RESPONSE_BYTES:
        raise HookError(f"the response is larger than {MAX_RESPONSE_BYTES} bytes")
    content = bytearray()
    async for chunk in response.aiter_bytes():
        content += chunk
        if len(content) > MAX_RESPONSE_BYTES:
            raise HookError(f"the response is larger than {MAX_RESPONSE_BYTES} bytes")
    if not content:
        return None
    media_type = response.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type == "application/json" or media_type.endswith("+json"):
        try:
            return msgspec.json.decode(bytes(content))
        except msgspec.DecodeError as exc:
            raise HookError(f"the response is not valid JSON: {exc}") from exc
    try:
        return content.decode(response.charset_encoding or "utf-8", errors="replace")
    except LookupError:  # an unknown charset
        return content.decode("utf-8", errors="replace")


def _header_safe(value: str) -> bool:
    return not any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in value)


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else f"{text[:limit]}…"
