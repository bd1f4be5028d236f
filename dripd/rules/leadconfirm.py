"""Double opt-in of leads: the sealed token of a confirmation link, and the link itself.

A token is made when the confirmation message is rendered, never stored: it seals the
lead's id and tenant and an expiry with the vault (AES-256-GCM, aad `dripd.lead-confirm`),
the way unsubscribe tokens are sealed. Nobody can forge one for another lead, the database
holds nothing that opens a link, and whether a link still works (the lead is pending and
its `confirm_expires_at` has not passed) is the lead row's to say, so a token is used once.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from dripd.errors import ConfigError, CredentialsError
from dripd.rules.unsubscribe import Sealer

AAD: Final = b"dripd.lead-confirm"
PATH: Final = "/leads/confirm/{token}"
#: The name the confirmation message's templates read the link under.
URL_NAME: Final = "confirm_url"
#: The subscriber type of a lead's enrollments.
LEAD_TYPE: Final = "lead"
_MAX_TOKEN_CHARS: Final = 1024
_TOKEN = re.compile(r"[A-Za-z0-9_-]+", re.ASCII)


class InvalidConfirmToken(ConfigError):
    """This confirmation link is not valid."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfirmToken:
    """The lead a confirmation link confirms."""

    tenant: str | None
    lead_id: uuid.UUID
    expires_at: datetime  # whole seconds, aware UTC


def make_confirm_token(
    vault: Sealer, *, tenant: str | None, lead_id: uuid.UUID, expires_at: datetime
) -> str:
    """An opaque URL-safe token (base64url, unpadded) for a lead's confirmation link."""
    if expires_at.utcoffset() is None:
        raise ValueError(f"make_confirm_token needs an aware expires_at, got {expires_at!r}")
    payload: dict[str, Any] = {"l": lead_id.hex, "x": int(expires_at.timestamp())}
    if tenant is not None:
        payload["t"] = tenant
    blob = vault.encrypt(payload, aad=AAD)
    return base64.urlsafe_b64encode(blob).rstrip(b"=").decode("ascii")


def read_confirm_token(vault: Sealer, token: str, *, now: datetime) -> ConfirmToken:
    """The lead of a confirmation link once `vault` (its current or a retired key) opens it
    and `now` is before its expiry; InvalidConfirmToken otherwise, telling nothing more."""
    if len(token) > _MAX_TOKEN_CHARS or _TOKEN.fullmatch(token) is None:
        raise InvalidConfirmToken
    try:
        blob = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        payload = vault.decrypt(blob, aad=AAD)
    except (binascii.Error, ValueError, CredentialsError):
        raise InvalidConfirmToken from None
    tenant, lead, expires = payload.get("t"), payload.get("l"), payload.get("x")
    if not (
        (tenant is None or isinstance(tenant, str))
        and isinstance(lead, str)
        and isinstance(expires, int)
        and not isinstance(expires, bool)
    ):
        raise InvalidConfirmToken
    try:
        lead_id = uuid.UUID(hex=lead)
        expires_at = datetime.fromtimestamp(expires, UTC)
    except (ValueError, OverflowError, OSError):
        raise InvalidConfirmToken from None
    if now >= expires_at:
        raise InvalidConfirmToken
    return ConfirmToken(tenant=tenant, lead_id=lead_id, expires_at=expires_at)


def confirm_url(base_url: str, token: str) -> str:
    """`<base_url>/leads/confirm/<token>`."""
    return base_url.rstrip("/") + PATH.format(token=token)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfirmLinks:
    """What the pipeline needs to give a lead's confirmation message its `confirm_url`: the
    confirmation sequence of the leads' tenant, the public base URL, the vault and the
    confirmation's lifetime (config `leads.*`)."""

    vault: Sealer
    base_url: str
    tenant: str | None
    sequence_key: str
    ttl: timedelta

    def names(
        self,
        *,
        tenant: str | None,
        sequence_key: str,
        subscriber_type: str,
        subscriber_id: str,
        now: datetime,
    ) -> dict[str, str]:
        """`{"confirm_url": …}` for a lead's enrollment in the confirmation sequence, else
        nothing. The token expires `ttl` from now; the lead's own expiry still decides."""
        if (
            subscriber_type != LEAD_TYPE
            or sequence_key != self.sequence_key
            or tenant != self.tenant
        ):
            return {}
        try:
            lead_id = uuid.UUID(subscriber_id)
        except ValueError:
            return {}
        token = make_confirm_token(
            self.vault, tenant=tenant, lead_id=lead_id, expires_at=now + self.ttl
        )
        return {URL_NAME: confirm_url(self.base_url, token)}
