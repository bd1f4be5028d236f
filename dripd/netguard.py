"""The network guard of user-configured URLs (HTTP hooks, the `webhook` and `slack`
channels): which addresses they may reach, checked after resolving.

Such a URL may only reach public addresses, or ones inside the configured
`allowed_networks`: its host is resolved once, every address is checked, and the caller
connects to a checked address itself (`pinned_request`), so a second DNS answer cannot
rebind the name to an internal one. IPv4-mapped, IPv4-compatible, 6to4 and NAT64 addresses
are judged by the IPv4 address they embed. A refusal is a `HookError`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, TypeAlias

import httpx

from dripd.errors import HookError

__all__ = [
    "IPAddress",
    "IPNetwork",
    "NetPolicy",
    "Resolver",
    "Target",
    "check_url",
    "checked_addresses",
    "host_header",
    "parse_target",
    "pinned_request",
    "resolve_host",
]

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver: TypeAlias = Callable[[str, int], Awaitable[Sequence[IPAddress]]]


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
class Target:
    url: httpx.URL = field(repr=False)  # rendered: its query can hold subscriber data
    host: str  # ASCII (IDNA) host name or address, without brackets
    port: int


def parse_target(url: str, policy: NetPolicy) -> Target:
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        # The URL is not quoted: rendered, its query can hold subscriber data. httpx's
        # message names the part it refused (a port, a character's position).
        raise HookError(f"the URL is not valid: {exc}") from None
    if parsed.scheme != "https" and not (parsed.scheme == "http" and policy.allow_http):
        allowed = "https or http" if policy.allow_http else "https"
        raise HookError(f"URL scheme {parsed.scheme!r} is not allowed; use {allowed}")
    host = parsed.raw_host.decode("ascii")
    if not host:
        raise HookError("the URL has no host")
    if parsed.userinfo:
        raise HookError("the URL must not contain credentials; use `auth`")
    return Target(
        url=parsed, host=host, port=parsed.port or (443 if parsed.scheme == "https" else 80)
    )


async def checked_addresses(
    target: Target, policy: NetPolicy, resolve: Resolver
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
    target = parse_target(url, policy)
    try:
        return await checked_addresses(target, policy, resolve)
    except OSError as exc:
        raise HookError(f"cannot resolve {target.host!r}: {exc.strerror or exc}") from exc


def host_header(target: Target) -> str:
    """The `Host` header for `target`: its name (an IPv6 literal in brackets), and its port
    when the URL names one (RFC 9110 §7.2)."""
    host = f"[{target.host}]" if ":" in target.host else target.host
    return host if target.url.port is None else f"{host}:{target.url.port}"


def pinned_request(
    client: httpx.AsyncClient,
    method: str,
    target: Target,
    address: IPAddress,
    *,
    headers: httpx.Headers | dict[str, str],
    content: bytes | None = None,
    timeout: httpx.Timeout | None = None,
) -> httpx.Request:
    """A request for `target` that connects to `address` (one `checked_addresses` returned),
    never to the name again.

    The URL carries the address; the `Host` header (replacing any given) and, for https,
    the httpcore `sni_hostname` request extension carry the original name, so the server
    sees the name and its certificate is verified against the name, not the address
    (httpcore gives the extension to `ssl.SSLContext.wrap_socket(server_hostname=…)`).
    `timeout` None: the client's.
    """
    sent = httpx.Headers(headers)
    sent["host"] = host_header(target)
    extensions = {"sni_hostname": target.host} if target.url.scheme == "https" else {}
    return client.build_request(
        method,
        target.url.copy_with(host=str(address)),
        headers=sent,
        content=content,
        timeout=httpx.USE_CLIENT_DEFAULT if timeout is None else timeout,
        extensions=extensions,
    )
