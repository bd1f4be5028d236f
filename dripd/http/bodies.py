"""Request bodies: read within a size limit, form fields, and JSON decoded into Structs
(400/413/415/422 as `ApiError`s naming the field)."""

from __future__ import annotations

import re
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl

import msgspec
from starlette.requests import Request

from dripd.http.context import HttpContext
from dripd.http.errors import ApiError

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
