"""Hooks: HTTP endpoints and Python functions whose results steps read as `hooks.<name>`.

    [hooks.score]                       an HTTP hook: url, method, headers, body (Liquid
    url = "https://crm.example.com/…"   templates), auth, signing_secret, timeout, retries
    signing_secret = "crm_signing"

    [hooks.plan]                        a Python hook: an `async def fn(enrollment, step)`
    python = "myapp.hooks:plan_for"     of the host application, and a timeout

An HTTP hook may only reach public addresses (see `check_url`): its host is resolved once,
every address is checked, and the request connects to the checked address itself, so a second
DNS answer cannot rebind the name to an internal one. The `Host` header and, for https, the
httpcore `sni_hostname` request extension carry the original name, so the server's certificate
is verified against that name, not the address (httpcore passes the extension to
`ssl.SSLContext.wrap_socket(server_hostname=…)`). Redirects are never followed. Each request
is signed with Standard Webhooks headers.

Every failure at run time is a `HookError` that names the hook and never contains a secret;
the engine treats it as a transient failure of the step.
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import importlib
import inspect
import ipaddress
import math
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final, Literal, TypeAlias, TypeVar, assert_never, cast

import httpx
import msgspec
from standardwebhooks import Webhook
from standardwebhooks.webhooks import EmptyWebhookSecretError

from dripd import __version__
from dripd.content.liquid import Template, TemplateError, compile_template
from dripd.errors import ConfigError, DripdError, SequenceFileError
from dripd.model import format_duration, parse_duration

__all__ = [
    "MAX_RESPONSE_BYTES",
    "BasicAuth",
    "BearerAuth",
    "HeaderAuth",
    "HookEnrollment",
    "HookError",
    "HookSpec",
    "HookStep",
    "Hooks",
    "HttpHookSpec",
    "IPAddress",
    "NetPolicy",
    "PythonHook",
    "PythonHookSpec",
    "Resolver",
    "Secrets",
    "build_client",
    "check_url",
    "load_python",
    "parse_hooks",
    "resolve_host",
]

MAX_RESPONSE_BYTES: Final = 1024 * 1024
MAX_TIMEOUT: Final = timedelta(seconds=30)
BACKOFF_BASE: Final = 0.2
BACKOFF_CAP: Final = 5.0

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver: TypeAlias = Callable[[str, int], Awaitable[Sequence[IPAddress]]]
Secrets: TypeAlias = Callable[[str], Awaitable[str]]
Method: TypeAlias = Literal["GET", "POST", "PUT", "PATCH", "DELETE"]


class HookError(DripdError):
    """A hook failed."""

    code = "hook"


# -- specs -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class BearerAuth:
    secret: str


@dataclass(frozen=True, slots=True, kw_only=True)
class BasicAuth:
    username: str
    secret: str


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderAuth:
    name: str
    secret: str


Auth: TypeAlias = BearerAuth | BasicAuth | HeaderAuth


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpHookSpec:
    name: str
    url: Template
    method: Method = "GET"
    headers: Mapping[str, Template]
    body: Template | None = None
    auth: Auth | None = None
    signing_secret: str
    timeout: timedelta = timedelta(seconds=10)
    retries: int = 2


@dataclass(frozen=True, slots=True, kw_only=True)
class PythonHookSpec:
    name: str
    path: str
    timeout: timedelta = timedelta(seconds=5)


HookSpec: TypeAlias = HttpHookSpec | PythonHookSpec


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


# -- parsing -----------------------------------------------------------------------------------


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class _Bearer(_Strict, tag="bearer", tag_field="type"):
    secret: str


class _Basic(_Strict, tag="basic", tag_field="type"):
    username: str
    secret: str


class _Header(_Strict, tag="header", tag_field="type"):
    name: str
    secret: str


class _HttpWire(_Strict, kw_only=True):
    url: str
    method: Method = "GET"
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    body: str | None = None
    auth: _Bearer | _Basic | _Header | None = None
    signing_secret: str
    timeout: str = "10s"
    retries: Annotated[int, msgspec.Meta(ge=0, le=5)] = 2


class _PythonWire(_Strict, kw_only=True):
    python: str
    timeout: str = "5s"


_W = TypeVar("_W", bound=_Strict)

_NAME = re.compile(r"[a-z][a-z0-9_]*")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP header name (RFC 9110 token)
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
# Headers dripd sets itself; a sequence file may not override them.
_RESERVED = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
    }
)
_WITHOUT_BODY: Final = frozenset({"GET", "DELETE"})


def parse_hooks(raw: Mapping[str, Any], *, where: str) -> dict[str, HookSpec]:
    """Validate a sequence file's `[hooks]` table; every error names `hooks.<name>.<key>`."""
    if not isinstance(raw, Mapping):
        raise SequenceFileError(f"{where}: hooks: must be a table of hooks")
    hooks: dict[str, HookSpec] = {}
    for name, table in raw.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise SequenceFileError(
                f"{where}: hooks.{name}: a hook name is lowercase letters, digits and '_', "
                "starting with a letter"
            )
        if not isinstance(table, Mapping):
            raise SequenceFileError(f"{where}: hooks.{name}: must be a table")
        has_url, has_python = "url" in table, "python" in table
        if has_url and has_python:
            raise SequenceFileError(
                f"{where}: hooks.{name}: has both `url` and `python`; a hook is one or the other"
            )
        if has_url:
            hooks[name] = _http_spec(name, _convert(table, _HttpWire, name, where), where)
        elif has_python:
            hooks[name] = _python_spec(name, _convert(table, _PythonWire, name, where), where)
        else:
            raise SequenceFileError(
                f"{where}: hooks.{name}: needs `url` (an HTTP hook) or `python` (a Python hook)"
            )
    return hooks


def _convert(table: Mapping[str, Any], wire: type[_W], name: str, where: str) -> _W:
    try:
        return msgspec.convert(dict(table), wire)
    except msgspec.ValidationError as exc:
        message = str(exc)
        match = re.search(r" - at `\$\.?(.*)`$", message)
        key = match.group(1).replace("[...]", "") if match else ""  # `[...]`: a table's value
        text = message[: match.start()] if match else message
        if unknown := re.fullmatch(r"Object contains unknown field `(.*)`", text):
            key, text = f"{key}.{unknown.group(1)}".lstrip("."), "unknown key"
        elif missing := re.fullmatch(r"Object missing required field `(.*)`", text):
            key, text = f"{key}.{missing.group(1)}".lstrip("."), "required key is missing"
        raise SequenceFileError(f"{where}: {_key(name, key)}: {text}") from exc


def _key(name: str, key: str) -> str:
    return f"hooks.{name}.{key}" if key else f"hooks.{name}"


def _http_spec(name: str, wire: _HttpWire, where: str) -> HttpHookSpec:
    def fail(key: str, text: str) -> SequenceFileError:
        return SequenceFileError(f"{where}: {_key(name, key)}: {text}")

    if wire.body is not None and wire.method in _WITHOUT_BODY:
        raise fail("body", f"a {wire.method} request has no body; use POST, PUT or PATCH")
    reserved = set(_RESERVED)
    if isinstance(wire.auth, _Bearer | _Basic):
        reserved.add("authorization")
    if isinstance(wire.auth, _Basic) and ":" in wire.auth.username:
        raise fail("auth.username", "must not contain ':'")
    if isinstance(wire.auth, _Header):
        if not _TOKEN.fullmatch(wire.auth.name) or wire.auth.name.lower() in reserved:
            raise fail("auth.name", f"{wire.auth.name!r} is not a header name dripd can send")
        reserved.add(wire.auth.name.lower())
    seen: set[str] = set()
    for header in wire.headers:
        if not _TOKEN.fullmatch(header):
            raise fail(f"headers.{header}", "is not a valid header name")
        if header.lower() in reserved:
            raise fail(f"headers.{header}", "is set by dripd (or by `auth`) and cannot be given")
        if header.lower() in seen:
            raise fail(f"headers.{header}", "is given twice (header names ignore case)")
        seen.add(header.lower())
    return HttpHookSpec(
        name=name,
        url=_template(wire.url, _key(name, "url"), where),
        method=wire.method,
        headers={
            header: _template(value, _key(name, f"headers.{header}"), where)
            for header, value in wire.headers.items()
        },
        body=None if wire.body is None else _template(wire.body, _key(name, "body"), where),
        auth=_auth(wire.auth),
        signing_secret=wire.signing_secret,
        timeout=_timeout(wire.timeout, _key(name, "timeout"), where),
        retries=wire.retries,
    )


def _python_spec(name: str, wire: _PythonWire, where: str) -> PythonHookSpec:
    if _split_path(wire.python) is None:
        raise SequenceFileError(
            f"{where}: {_key(name, 'python')}: {wire.python!r} is not a Python path; "
            'use "package.module:function" or "package.module.function"'
        )
    return PythonHookSpec(
        name=name, path=wire.python, timeout=_timeout(wire.timeout, _key(name, "timeout"), where)
    )


def _auth(wire: _Bearer | _Basic | _Header | None) -> Auth | None:
    if wire is None:
        return None
    if isinstance(wire, _Bearer):
        return BearerAuth(secret=wire.secret)
    if isinstance(wire, _Basic):
        return BasicAuth(username=wire.username, secret=wire.secret)
    if isinstance(wire, _Header):
        return HeaderAuth(name=wire.name, secret=wire.secret)
    assert_never(wire)


def _template(source: str, field: str, where: str) -> Template:
    try:
        return compile_template(source, field=field)
    except TemplateError as exc:
        raise SequenceFileError(f"{where}: {exc}") from exc


def _timeout(text: str, field: str, where: str) -> timedelta:
    try:
        value = parse_duration(text, where=field)
    except ConfigError as exc:
        raise SequenceFileError(f"{where}: {exc.message}") from exc
    if not timedelta(0) < value <= MAX_TIMEOUT:
        raise SequenceFileError(f"{where}: {field}: must be more than 0s and at most 30s")
    return value


def _split_path(path: str) -> tuple[str, str] | None:
    """`("package.module", "attr")` from "package.module:attr" or "package.module.attr"."""
    if ":" in path:
        module, _, attr = path.partition(":")
    else:
        module, _, attr = path.rpartition(".")
    if not (_DOTTED.fullmatch(module) and _DOTTED.fullmatch(attr)):
        return None
    return module, attr


# -- the SSRF guard ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class NetPolicy:
    """Where HTTP hooks may connect: public https addresses, plus `allowed_networks`."""

    allow_http: bool = False
    allowed_networks: tuple[IPNetwork, ...] = ()


def _nets(*cidrs: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(cidr) for cidr in cidrs)


# The first matching class names the refusal; anything else not globally routable is refused
# as "special-purpose" (Python's reading of the IANA registries).
_V4_CLASSES: Final = (
    ("broadcast", _nets("255.255.255.255/32")),
    ("unspecified", _nets("0.0.0.0/8")),
    ("loopback", _nets("127.0.0.0/8")),
    ("private", _nets("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")),
    ("link-local", _nets("169.254.0.0/16")),
    ("shared (CGNAT)", _nets("100.64.0.0/10")),
    ("documentation", _nets("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")),
    ("benchmarking", _nets("198.18.0.0/15")),
    ("IETF protocol", _nets("192.0.0.0/24")),
    ("multicast", _nets("224.0.0.0/4")),
    ("reserved", _nets("240.0.0.0/4")),
)
_V6_CLASSES: Final = (
    ("unspecified", _nets("::/128")),
    ("loopback", _nets("::1/128")),
    ("private", _nets("fc00::/7")),
    ("link-local", _nets("fe80::/10")),
    ("site-local", _nets("fec0::/10")),
    ("multicast", _nets("ff00::/8")),
    ("documentation", _nets("2001:db8::/32", "3fff::/20")),
    ("benchmarking", _nets("2001:2::/48")),
    ("discard-only", _nets("100::/64")),
    ("Teredo", _nets("2001::/32")),
    ("local-use NAT64", _nets("64:ff9b:1::/48")),
)
_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE: Final = ipaddress.IPv6Network("::/96")


def _refusal(address: IPAddress) -> str | None:
    """Why hooks may not connect to `address`, or None when it is a public address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            form, v4 = embedded
            inner = _refusal(v4)
            return f"{form} {v4}: {inner}" if inner else None
    classes = _V4_CLASSES if isinstance(address, ipaddress.IPv4Address) else _V6_CLASSES
    for label, networks in classes:
        if any(address in network for network in networks):
            return label
    return None if address.is_global else "special-purpose"


def _embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    # These forms reach an IPv4 address (the OS, a relay or a NAT64 gateway translates), so
    # they are judged by that address: a NAT64 address of a public host is fine.
    if address.ipv4_mapped is not None:
        return "IPv4-mapped", address.ipv4_mapped
    if address.sixtofour is not None:
        return "6to4", address.sixtofour
    low32 = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _NAT64:
        return "NAT64", low32
    if address in _IPV4_COMPATIBLE and int(address) > 1:  # `::` and `::1` are not IPv4
        return "IPv4-compatible", low32
    return None


async def resolve_host(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to, with the event loop's getaddrinfo (OSError if none)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))


@dataclass(frozen=True, slots=True, kw_only=True)
class _Target:
    url: httpx.URL
    host: str  # ASCII (IDNA) host name or address, without brackets
    port: int


def _target(url: str, policy: NetPolicy) -> _Target:
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise HookError(f"{url!r} is not a URL: {exc}") from exc
    if parsed.scheme != "https" and not (parsed.scheme == "http" and policy.allow_http):
        allowed = "https or http" if policy.allow_http else "https"
        raise HookError(f"URL scheme {parsed.scheme!r} is not allowed; use {allowed}")
    host = parsed.raw_host.decode("ascii")
    if not host:
        raise HookError("the URL has no host")
    if parsed.userinfo:
        raise HookError("the URL must not contain credentials; use `auth`")
    return _Target(
        url=parsed, host=host, port=parsed.port or (443 if parsed.scheme == "https" else 80)
    )


async def _checked_addresses(
    target: _Target, policy: NetPolicy, resolve: Resolver
) -> list[IPAddress]:
    """The addresses of `target`'s host, all allowed; OSError when it does not resolve."""
    try:
        addresses: Sequence[IPAddress] = [ipaddress.ip_address(target.host)]
    except ValueError:
        addresses = await resolve(target.host, target.port)
    if not addresses:
        raise OSError(f"{target.host!r} resolves to no address")
    for address in addresses:
        if any(address in network for network in policy.allowed_networks):
            continue
        refusal = _refusal(address)
        if refusal is not None:
            raise HookError(
                f"refused host {target.host!r}: {address} is not a public address ({refusal})"
            )
    return list(addresses)


async def check_url(
    url: str, *, policy: NetPolicy, resolve: Resolver = resolve_host
) -> list[IPAddress]:
    """The addresses a hook may connect to for `url`; HookError if any of them is not allowed.

    The URL must be https (or http when `policy.allow_http`) with a host, and every address
    the host resolves to must be public or inside `policy.allowed_networks`. IPv4-mapped,
    IPv4-compatible, 6to4 and NAT64 (64:ff9b::/96) addresses are judged by the IPv4 address
    they embed.
    """
    target = _target(url, policy)
    try:
        return await _checked_addresses(target, policy, resolve)
    except OSError as exc:
        raise HookError(f"cannot resolve {target.host!r}: {exc.strerror or exc}") from exc


# -- Python hooks ------------------------------------------------------------------------------


def load_python(path: str) -> PythonHook:
    """Import the async function at `path` ("module:attr" or "module.attr"); HookError if not."""
    split = _split_path(path)
    if split is None:
        raise HookError(f"{path!r} is not a Python path")
    module_name, attr = split
    try:
        found: object = importlib.import_module(module_name)
    except Exception as exc:  # importing runs the host application's code, which may raise anything
        raise HookError(
            f"{path}: cannot import {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    for part in attr.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise HookError(f"{path}: {module_name!r} has no attribute {attr!r}") from None
    if not inspect.iscoroutinefunction(found):
        raise HookError(f"{path}: is not an async function (define it with `async def`)")
    return cast(PythonHook, found)


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
    """One hook call's request, rendered and authenticated once for all its attempts."""

    target: _Target
    headers: dict[str, str]
    body: str
    auth: httpx.Auth | None
    signer: Webhook


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
                reason = str(exc)
            except HookError as exc:
                raise HookError(f"{label}: {exc.message}") from exc
        tries = "1 attempt" if attempts == 1 else f"{attempts} attempts"
        raise HookError(f"{label}: {reason} (gave up after {tries})")

    async def _prepare(self, spec: HttpHookSpec, context: Mapping[str, Any]) -> _Prepared:
        url = _render(spec.url, context)
        target = _target(url, self._policy)
        headers = {}
        for header, template in spec.headers.items():
            value = _render(template, context)
            if not _header_safe(value):
                raise HookError(f"header {header!r}: the rendered value has a control character")
            headers[header] = value
        body = "" if spec.body is None else _render(spec.body, context)
        if spec.body is not None and not any(h.lower() == "content-type" for h in headers):
            headers["content-type"] = "application/json"
        headers["host"] = _host_header(target)

        signing_key = await self._secret(spec.signing_secret)
        try:
            signer = Webhook(signing_key)
        except (ValueError, EmptyWebhookSecretError):  # binascii.Error is a ValueError
            raise HookError(
                f"secret {spec.signing_secret!r} is not a Standard Webhooks key (whsec_…)"
            ) from None
        auth: httpx.Auth | None = None
        if spec.auth is not None:
            secret = await self._secret(spec.auth.secret)
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
        )

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
                addresses = await _checked_addresses(target, self._policy, self._resolve)
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
        # httpcore gives `sni_hostname` to the TLS handshake as its server_hostname, so the
        # server sees the name and its certificate is verified against the name, not `address`.
        extensions = {"sni_hostname": target.host} if target.url.scheme == "https" else {}
        return self._client.build_request(
            spec.method,
            target.url.copy_with(host=str(address)),
            headers={**prepared.headers, **signed},
            content=None if spec.body is None else prepared.body.encode(),
            timeout=httpx.Timeout(spec.timeout.total_seconds()),
            extensions=extensions,
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


def _render(template: Template, context: Mapping[str, Any]) -> str:
    try:
        return template.render(context)
    except TemplateError as exc:
        raise HookError(f"cannot render {exc}") from exc


def _host_header(target: _Target) -> str:
    host = f"[{target.host}]" if ":" in target.host else target.host
    return host if target.url.port is None else f"{host}:{target.url.port}"


def _header_safe(value: str) -> bool:
    return not any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in value)


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else f"{text[:limit]}…"
