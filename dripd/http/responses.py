"""JSON responses of the HTTP surface, and its one error shape."""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.responses import Response

_encode = msgspec.json.Encoder().encode


def json_response(body: Any, status: int = 200) -> Response:
    """A JSON response encoded with msgspec (datetimes, UUIDs and Structs included)."""
    return Response(_encode(body), status_code=status, media_type="application/json")


def error_response(status: int, code: str, message: str) -> Response:
    """The one error shape of the HTTP surface: `{"error": {"code": ..., "message": ...}}`."""
    return json_response({"error": {"code": code, "message": message}}, status)
