"""RFC 8058 one-click unsubscribe: encrypted tokens and the List-Unsubscribe headers."""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Protocol

from dripd.errors import ConfigError, CredentialsError

AAD: Final = b"dripd.unsubscribe"
# A token is ~150 characters; anything far longer is not one of ours.
_MAX_TOKEN_CHARS: Final = 1024
_TOKEN = re.compile(r"[A-Za-z0-9_-]+", re.ASCII)
_UNSAFE_IN_HEADER = re.compile(r"[\s<>,\"]")


class Sealer(Protocol):
    """What tokens need of `dripd.channels.credentials.Vault` (rules do not import channels):
    AES-GCM sealing bound to an `aad`, opened by the current key or a retired one."""

    def encrypt(self, data: dict[str, Any], *, aad: bytes) -> bytes: ...

    def decrypt(self, blob: bytes, *, aad: bytes) -> dict[str, Any]: ...


class InvalidToken(ConfigError):
    """This unsubscribe link is not valid."""

    code = "bad_token"


class ExpiredToken(InvalidToken):
    """This unsubscribe link has expired."""


@dataclass(frozen=True, slots=True, kw_only=True)
class UnsubscribeToken:
    """Who a one-click unsubscribe link stops: an address on a channel, in a tenant scope."""

    tenant: str | None
    channel: str
    address: str
    execution_id: uuid.UUID | None  # the message that carried the link, if any
    expires_at: datetime  # whole seconds, aware UTC


def make_token(
    vault: Sealer,
    *,
    tenant: str | None,
    channel: str,
    address: str,
    execution_id: uuid.UUID | None,
    expires_at: datetime,
) -> str:
    """An opaque URL-safe token (base64url, unpadded) for the link in a message.

    The payload is sealed by `vault` (AES-256-GCM with the aad `dripd.unsubscribe`), so
    nobody can read the address in the URL or forge a token for another address.
    `expires_at` (aware) is kept to the second, rounded down.
    """
    if expires_at.utcoffset() is None:
        raise ValueError(f"make_token needs an aware expires_at, got {expires_at!r}")
    payload: dict[str, Any] = {"c": channel, "a": address, "x": int(expires_at.timestamp())}
    if tenant is not None:
        payload["t"] = tenant
    if execution_id is not None:
        payload["e"] = execution_id.hex
    blob = vault.encrypt(payload, aad=AAD)
    return base64.urlsafe_b64encode(blob).rstrip(b"=").decode("ascii")


def read_token(vault: Sealer, token: str, *, now: datetime) -> UnsubscribeToken:
    """The link's contents, once `vault` (its current or a retired key) opens it.

    Raises InvalidToken, with a message that tells nothing of the payload, for anything that
    is not a token sealed by one of the vault's keys for unsubscribing, and ExpiredToken (an
    InvalidToken) once `now` has reached its expiry.
    """
    if now.utcoffset() is None:
        raise ValueError(f"read_token needs an aware now, got {now!r}")
    if len(token) > _MAX_TOKEN_CHARS or _TOKEN.fullmatch(token) is None:
        raise InvalidToken
    try:
        blob = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raise InvalidToken from None
    try:
        payload = vault.decrypt(blob, aad=AAD)
    except CredentialsError:
        raise InvalidToken from None
    read = _from_payload(payload)
    if read is None:
        raise InvalidToken
    if now >= read.expires_at:
        raise ExpiredToken
    return read


def _from_payload(payload: dict[str, Any]) -> UnsubscribeToken | None:
    tenant, channel = payload.get("t"), payload.get("c")
    address, execution, expires = payload.get("a"), payload.get("e"), payload.get("x")
    if not (
        (tenant is None or isinstance(tenant, str))
        and isinstance(channel, str)
        and isinstance(address, str)
        and (execution is None or isinstance(execution, str))
        and isinstance(expires, int)
        and not isinstance(expires, bool)
    ):
        return None
    try:
        execution_id = uuid.UUID(hex=execution) if execution is not None else None
        expires_at = datetime.fromtimestamp(expires, UTC)
    except (ValueError, OverflowError, OSError):
        return None
    return UnsubscribeToken(
        tenant=tenant,
        channel=channel,
        address=address,
        execution_id=execution_id,
        expires_at=expires_at,
    )


def unsubscribe_headers(*, base_url: str, token: str, mailto: str | None) -> dict[str, str]:
    """The RFC 8058 (§3.1) header fields of a message: `List-Unsubscribe` with the one-click
    URL `<base_url>/u/<token>` (and a `mailto:` address when given), and
    `List-Unsubscribe-Post: List-Unsubscribe=One-Click`.

    RFC 8058 wants an https URL, and a DKIM signature covering both fields; receivers ignore
    one-click for an http one. A `mailto` without its scheme gets `mailto:` prepended.
    """
    url = f"{base_url.rstrip('/')}/u/{token}"
    if _UNSAFE_IN_HEADER.search(url):
        raise ConfigError(
            f"unsubscribe.base_url: {base_url!r} cannot go in a List-Unsubscribe header "
            "(it holds a space, a comma, a quote or an angle bracket)"
        )
    uris = [url]
    if mailto:
        target = mailto if mailto.lower().startswith("mailto:") else f"mailto:{mailto}"
        if _UNSAFE_IN_HEADER.search(target):
            raise ConfigError(
                f"unsubscribe.mailto: {mailto!r} cannot go in a List-Unsubscribe header "
                "(it holds a space, a comma, a quote or an angle bracket)"
            )
        uris.append(target)
    return {
        "List-Unsubscribe": ", ".join(f"<{uri}>" for uri in uris),
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }
