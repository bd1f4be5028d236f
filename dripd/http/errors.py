"""The HTTP API's one error shape: `ApiError`, and dripd errors mapped to it.

Routes raise `ApiError` (or let a `DripdError` through) and wrap their endpoint in
`api_endpoint`, which answers either as `{"error": {"code", "message", "field"?}}`.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from dripd import logs
from dripd.errors import (
    ConfigError,
    Conflict,
    DatabaseError,
    DripdError,
    NotFound,
    Refused,
    SchemaError,
)
from dripd.http.responses import json_response

Endpoint = Callable[[Request], Awaitable[Response]]

_log = logs.get("dripd.http")


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
    """The HTTP form of a dripd error: bad input 422, NotFound 404, Conflict 409, an
    unreachable or busy database 503; anything else, a statement Postgres refused among
    them (retrying will not help, and its text is the server's), 500 without details.

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
    if isinstance(exc, SchemaError) or (
        isinstance(exc, DatabaseError) and not isinstance(exc, Refused)
    ):
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
            return dripd_error_response(exc, fields=fields)

    return endpoint


def dripd_error_response(exc: DripdError, *, fields: Mapping[str, str] | None = None) -> Response:
    """The answer to a DripdError (`error_from_dripd`); a 503 is logged as a warning (the
    operator's to see, not only the client's), and what maps to 500 is re-raised for the
    app's handler, which logs its traceback and answers 500."""
    mapped = error_from_dripd(exc, fields=fields)
    if mapped.status == 500:
        raise exc
    if mapped.status == 503:
        _log.warning("HTTP request answered 503", error=exc.message, code=exc.code)
    return api_error_response(mapped)
