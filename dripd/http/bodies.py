"""Reading request bodies within a size limit, and form bodies (the API, the forms)."""

from __future__ import annotations

from urllib.parse import parse_qsl

from starlette.requests import Request


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
