"""What every route of the HTTP API shares: bearer tokens, JSON bodies and the one error shape.

Routes raise `ApiError` (or let a `DripdError` through) and wrap their endpoint in
`api_endpoint`, which answers either as `{"error": {"code", "message", "field"?}}`.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from dripd.db import intake
from dripd.errors import (
    ConfigError,
    Conflict,
    DatabaseError,
    DripdError,
    NotFound,
    SchemaError,
)
from dripd.http.app import json_response
from dripd.http.bodies import TooLarge, read_limited
from dripd.http.context import HttpContext

T = TypeVar("T", bound=msgspec.Struct)

Endpoint = Callable[[Request], Awaitable[Response]]

# The realm every WWW-Authenticate challenge names.
_REALM = 'Bearer realm="dripd"'


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiToken:
    """The token a request was authenticated with; `tenant_key` None is a global token."""

    id: uuid.UUID
    tenant_key: str | None
    name: str


class ApiError(Exception):
    """An HTTP API error: the status, a stable `code`, a message, and the JSON field it concerns."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers: dict[str, str] = dict(headers or {})


class ErrorDetail(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What went wrong."""

    code: str
    message: str
    field: str | msgspec.UnsetType = msgspec.UNSET


class Error(msgspec.Struct, kw_only=True):
    """The body of every error response of the HTTP API."""

    error: ErrorDetail


def error_body(exc: ApiError) -> Error:
    """The body of the response to `exc`."""
    field = msgspec.UNSET if exc.field is None else exc.field
    return Error(error=ErrorDetail(code=exc.code, message=exc.message, field=field))


def api_error_response(exc: ApiError) -> Response:
    """`{"error": {"code", "message", "field"?}}` with the error's status and headers."""
    response = json_response(error_body(exc), exc.status)
    response.headers.update(exc.headers)
    return response


# A field path at the start of a dripd message: "data.timezone: 'Mars/Base' is not …".
_FIELD_PREFIX = re.compile(r"([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*): ")


def error_from_dripd(exc: DripdError, *, fields: Mapping[str, str] | None = None) -> ApiError:
    """The HTTP form of a dripd error: bad input 422, NotFound 404, Conflict 409, database 503.

    A message that starts with a field path (`"data.timezone: …"`) names that field; with
    `fields` (names in dripd's messages → JSON fields of the request), only those count and
    are renamed, e.g. `{"idempotency_id": "id"}`.
    """
    if isinstance(exc, ConfigError):
        return ApiError(422, "invalid_input", exc.message, field=_field_in(exc.message, fields))
    if isinstance(exc, NotFound):
        return ApiError(404, "not_found", exc.message)
    if isinstance(exc, Conflict):
        return ApiError(409, "conflict", exc.message)
    if isinstance(exc, SchemaError | DatabaseError):
        return ApiError(503, exc.code, exc.message)
    return ApiError(500, "internal", "internal error; see the daemon log")


def _field_in(message: str, fields: Mapping[str, str] | None) -> str | None:
    match = _FIELD_PREFIX.match(message)
    if match is None:
        return None
    head, dot, rest = match.group(1).partition(".")
    if fields is not None:
        if head not in fields:
            return None
        head = fields[head]
    return head + dot + rest


def api_endpoint(handler: Endpoint, *, fields: Mapping[str, str] | None = None) -> Endpoint:
    """`handler` answering its ApiErrors and DripdErrors (see `error_from_dripd`) as JSON."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return api_error_response(exc)
        except DripdError as exc:
            mapped = error_from_dripd(exc, fields=fields)
            if mapped.status == 500:
                raise  # unexpected: the app's handler logs it and answers 500
            return api_error_response(mapped)

    return endpoint


# --- authentication ------------------------------------------------------------------------

# RFC 6750 `b64token` after the scheme (which is case-insensitive).
_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9\-._~+/]+=*)")
# What `intake.new_token` makes: the prefix and 43 URL-safe base64 characters.
_TOKEN = re.compile(re.escape(intake.TOKEN_PREFIX) + r"[A-Za-z0-9_-]{43}")


def _unauthorized(message: str, *, invalid: bool) -> ApiError:
    # RFC 6750 §3.1: a request without credentials gets the bare challenge.
    challenge = f'{_REALM}, error="invalid_token"' if invalid else _REALM
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": challenge})


async def authenticate(request: Request, ctx: HttpContext) -> ApiToken:
    """The token of `Authorization: Bearer <token>`; 401 when missing, malformed, unknown or
    revoked. Tokens are looked up by their SHA-256, never compared in the clear."""
    header = request.headers.get("authorization")
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
        try:
            found = await intake.find_token(ctx.pool, intake.hash_token(token))
        except DripdError as exc:
            raise error_from_dripd(exc) from exc
    if found is None:
        raise _unauthorized("unknown token", invalid=True)
    if found.revoked_at is not None:
        raise _unauthorized("the token was revoked", invalid=True)
    return ApiToken(id=found.id, tenant_key=found.tenant_key, name=found.name)


# --- JSON bodies ---------------------------------------------------------------------------


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"the body is larger than {limit} bytes")


async def read_body(request: Request, ctx: HttpContext) -> bytes:
    """The raw body of a JSON request: 413 over `http.max_body_bytes` (declared in
    Content-Length or streamed), 415 unless the Content-Type is application/json and the
    body is not compressed."""
    limit = ctx.config.http.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise ApiError(400, "bad_request", "Content-Length is not a number") from None
        if length > limit:
            raise _too_large(limit)
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(
            415,
            "unsupported_media_type",
            "the body must be JSON, sent with `Content-Type: application/json`",
        )
    coding = request.headers.get("content-encoding", "identity").strip().lower()
    if coding != "identity":
        raise ApiError(
            415,
            "unsupported_media_type",
            f"content coding {coding!r} is not supported: send the body uncompressed",
            headers={"Accept-Encoding": "identity"},  # RFC 9110 §12.5.3
        )
    try:
        return await read_limited(request, limit)
    except TooLarge:
        raise _too_large(limit) from None


#: How deep a JSON body may nest (Struct fields count as a level).
MAX_DEPTH = 32

_DECODERS: dict[type[Any], msgspec.json.Decoder[Any]] = {}

# msgspec's path of a ValidationError: "… - at `$.data.email`".
_AT = re.compile(r"(?P<text>.*?)(?: - at `\$(?P<path>[^`]*)`)?", re.DOTALL)
_NAMED = re.compile(r"Object (?:missing required|contains unknown) field `(?P<name>[^`]*)`")


def decode_json(body: bytes, type_: type[T]) -> T:
    """`body` decoded into the Struct `type_`: 400 code "invalid_json" for a body that is not
    JSON, 422 naming the field for one that does not fit `type_` (the Struct should forbid
    unknown fields), and 422 for a NUL character (Postgres cannot store it) or nesting
    deeper than `MAX_DEPTH`."""
    decoder = _DECODERS.get(type_)
    if decoder is None:
        decoder = _DECODERS[type_] = msgspec.json.Decoder(type_)
    try:
        value = cast(T, decoder.decode(body))
    except msgspec.ValidationError as exc:
        text, field = _validation_field(str(exc))
        raise ApiError(422, "invalid_input", text, field=field) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "invalid_json", "the body's JSON is nested too deeply") from None
    _check_values(value)
    return value


async def read_json(request: Request, ctx: HttpContext, type_: type[T]) -> T:
    """The request's JSON body as a `type_` (see `read_body` and `decode_json`)."""
    return decode_json(await read_body(request, ctx), type_)


def _validation_field(message: str) -> tuple[str, str | None]:
    match = _AT.fullmatch(message)
    assert match is not None  # the pattern matches any text
    text, path = match.group("text"), (match.group("path") or "").lstrip(".")
    named = _NAMED.fullmatch(text)
    if named is not None:
        path = f"{path}.{named.group('name')}" if path else named.group("name")
    return message, path or None


def _check_values(value: msgspec.Struct) -> None:
    # Iterative, and bounded in depth: encoding (for Postgres, for the response) recurses,
    # from deeper in the stack than decoding did.
    stack: list[tuple[str, Any, int]] = [
        (name, getattr(value, name), 1) for name in value.__struct_fields__
    ]
    while stack:
        path, item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ApiError(
                422, "invalid_input", f"{path}: nested deeper than {MAX_DEPTH} levels", field=path
            )
        if isinstance(item, str):
            if "\x00" in item:
                raise ApiError(
                    422, "invalid_input", f"{path}: must not contain NUL (\\u0000)", field=path
                )
        elif isinstance(item, dict):
            for key, sub in item.items():
                if "\x00" in key:
                    raise ApiError(
                        422, "invalid_input", f"{path}: keys must not contain NUL (\\u0000)",
                        field=path,
                    )  # fmt: skip
                stack.append((f"{path}.{key}", sub, depth + 1))
        elif isinstance(item, list | tuple):
            stack.extend((f"{path}[{i}]", sub, depth + 1) for i, sub in enumerate(item))
        elif isinstance(item, msgspec.Struct):
            stack.extend(
                (f"{path}.{n}", getattr(item, n), depth + 1) for n in item.__struct_fields__
            )
