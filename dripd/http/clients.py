"""Who sent a request: the client address a per-client budget is kept under.

The client is the TCP peer, the only address nobody can forge. Only when the peer is one of
`leads.trusted_proxies` (a reverse proxy of the operator's) is `X-Forwarded-For` read: from
its right end, the first address that is not a trusted proxy is the client (each proxy
appends the peer it saw, so what a client wrote itself is further left and never chosen).
uvicorn's own proxy-header handling is off (dripd.http.app), so the peer is always the
socket's. IPv6 clients are counted per /64: one host commonly holds a whole /64.
"""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

from starlette.requests import Request

Network = IPv4Network | IPv6Network

#: The prefix an IPv6 client is counted under.
IPV6_PREFIX = 64


def client_address(
    request: Request, trusted: Sequence[Network]
) -> IPv4Address | IPv6Address | None:
    """The request's client address (see the module's docstring); None when the server did
    not learn the peer (not over TCP)."""
    peer = _address(request.client.host if request.client else None)
    if peer is None or not _in(peer, trusted):
        return peer
    forwarded = ",".join(request.headers.getlist("x-forwarded-for"))
    client = peer
    for part in reversed([p.strip() for p in forwarded.split(",") if p.strip()]):
        hop = _address(part)
        if hop is None:
            break  # a malformed entry: nothing left of it can be trusted
        client = hop
        if not _in(hop, trusted):
            break
    return client


def client_key(address: IPv4Address | IPv6Address | None) -> str:
    """The budget key of a client address: `addr:<IPv4>`, `addr:<IPv6 /64>`, or
    `addr:unknown`."""
    if address is None:
        return "addr:unknown"
    if isinstance(address, IPv6Address):
        if address.ipv4_mapped is not None:
            return f"addr:{address.ipv4_mapped}"
        return f"addr:{ip_network(f'{address}/{IPV6_PREFIX}', strict=False)}"
    return f"addr:{address}"


def _address(text: str | None) -> IPv4Address | IPv6Address | None:
    if not text:
        return None
    if text.startswith("[") and "]" in text:  # "[v6]:port", as some proxies write it
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # "v4:port"
        text = text.partition(":")[0]
    try:
        return ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def _in(address: IPv4Address | IPv6Address, networks: Sequence[Network]) -> bool:
    return any(address.version == n.version and address in n for n in networks)
