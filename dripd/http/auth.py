"""Bearer-token authentication of the HTTP API: `Authorization: Bearer <token>` to `ApiToken`."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from starlette.requests import Request

from dripd.db import intake
from dripd.http.context import HttpContext
from dripd.http.errors import ApiError

# The realm every WWW-Authenticate challenge names.
_REALM = 'Bearer realm="dripd"'
# RFC 6750 `b64token` after the scheme (which is case-insensitive).
_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9\-._~+/]+=*)")
# What `intake.new_token` makes: the prefix and 43 URL-safe base64 characters.
_TOKEN = re.compile(re.escape(intake.TOKEN_PREFIX) + r"[A-Za-z0-9_-]{43}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiToken:
    """The token a request was authenticated with; `tenant_key` None is a global token."""

    id: uuid.UUID
    tenant_key: str | None
    name: str


def _unauthorized(message: str, *, invalid: bool) -> ApiError:
    # RFC 6750 §3.1: a request without credentials gets the bare challenge.
    challenge = f'{_REALM}, error="invalid_token"' if invalid else _REALM
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": challenge})


async def authenticate(request: Request, ctx: HttpContext) -> ApiToken:
    """The token of `Authorization: Bearer <token>`; 401 when missing, malformed, unknown or
    revoked, 400 when the header is sent more than once. Tokens are looked up by their
    SHA-256, never compared in the clear."""
    headers = request.headers.getlist("authorization")
    if len(headers) > 1:
        # RFC 6750 §3.1 `invalid_request` (400): a proxy and dripd may pick different ones.
        raise ApiError(
            400,
            "bad_request",
            f"{len(headers)} Authorization headers: send exactly one",
            headers={"WWW-Authenticate": f'{_REALM}, error="invalid_request"'},
        )
    header = headers[0] if headers else None
    if header is None or not header.strip():
        raise _unauthorized(
            "authentication required: send `Authorization: Bearer <token>`", invalid=False
        )
    match = _BEARER.fullmatch(header.strip())
    if match is None:
        raise _unauthorized(
            "malformed Authorization header: expected `Bearer <token>`", invalid=True
        )
    token = match.group(1)
    found = None
    if _TOKEN.fullmatch(token):
        # A database error passes: the route's handler answers it (`dripd_error_response`).
        found = await intake.find_token(ctx.pool, intake.hash_token(token))
    if found is None:
        raise _unauthorized("unknown token", invalid=True)
    if found.revoked_at is not None:
        raise _unauthorized("the token was revoked", invalid=True)
    return ApiToken(id=found.id, tenant_key=found.tenant_key, name=found.name)
