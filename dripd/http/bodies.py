"""Request bodies: read within a size limit, form fields, and JSON decoded into Structs
(400/413/415/422 as `ApiError`s naming the field)."""

from __future__ import annotations

import re
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl

import msgspec
from starlette.requests import Request

from dripd import inputs
from dripd.http.context import HttpContext
from dripd.http.errors import ApiError
from dripd.inputs import InvalidInput, check_json, json_fault

T = TypeVar("T", bound=msgspec.Struct)


class TooLarge(Exception):
    """The body is larger than the limit (declared in Content-Length, or as it streamed)."""


async def read_limited(request: Request, limit: int) -> bytes:
    """The whole body, or TooLarge as soon as it passes `limit` bytes (the rest is never
    buffered)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def urlencoded_fields(body: bytes, *, max_fields: int) -> list[tuple[str, str]]:
    """The fields of an `application/x-www-form-urlencoded` body, blanks kept; ValueError
    when it is not UTF-8 or has more than `max_fields` fields."""
    return parse_qsl(
        body.decode("utf-8"),
        keep_blank_values=True,
        encoding="utf-8",
        errors="strict",
        max_num_fields=max_fields,
    )


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


#: How deep a JSON body may nest (Struct fields count as a level): `dripd.inputs.MAX_DEPTH`.
MAX_DEPTH = inputs.MAX_DEPTH

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
    except msgspec.DecodeError as exc:
        message = f"the body is not valid JSON: {json_fault(body, exc)}"
        raise ApiError(400, "invalid_json", message) from None
    except UnicodeDecodeError as exc:
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
    # The one check of every surface (dripd.inputs): NUL, text that is not Unicode, nesting
    # (encoding, for Postgres and for the response, recurses deeper than decoding did).
    try:
        check_json(value, where="", level=0)
    except InvalidInput as exc:
        raise ApiError(422, "invalid_input", exc.message, field=exc.field or None) from None
