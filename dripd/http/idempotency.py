"""`Idempotency-Key` for every POST route: the first answer to a key is kept and replayed.

Every POST handler calls `once` at the point where its request starts to act (after what
refuses it without acting: authentication, an unreadable body, a schema it does not fit).
`once` runs the handler's `run` in a transaction that first inserts the key's row, and hands
`run` that transaction's connection: the work and the stored answer commit together. A
concurrent request with the same key waits on the row's unique index, then finds and replays
the answer (`Idempotent-Replayed: true`); nothing runs twice. The same key with another
request (method, path or body) is 422 `idempotency_key_reuse`. What is kept is decided by
`keep`: by default every answer but 429 and 5xx (they change nothing and say "try again"),
which roll back and leave the key free. Keys are kept 24 hours (the daemon's housekeeping
purges them), per API token, and in one namespace of their own on the public routes.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Awaitable, Callable
from typing import Final

from starlette.requests import Request
from starlette.responses import Response

from dripd.db import intake, store
from dripd.http.context import HttpContext
from dripd.http.errors import ApiError, api_error_response

HEADER: Final = "Idempotency-Key"
REPLAYED: Final = "Idempotent-Replayed"
MAX_KEY_LENGTH: Final = 255

# Header fields of the answer that are the connection's, not the answer's.
_NOT_KEPT: Final = frozenset({"content-length", "transfer-encoding", "connection", "date"})

Run = Callable[[store.Executor], Awaitable[Response]]


def keep_answers(status: int) -> bool:
    """The default of `once`: every answer is kept but 429 (try later) and 5xx."""
    return status < 500 and status != 429


def keep_successes(status: int) -> bool:
    """Only 2xx answers are kept: a public route's refusals change nothing, and keeping them
    would let anyone fill the table."""
    return 200 <= status < 300


def key_of(request: Request) -> str | None:
    """The request's `Idempotency-Key`; ApiError 400 `invalid_idempotency_key` unless it is
    1 to 255 characters, or the header comes more than once (which one would count?)."""
    keys = request.headers.getlist(HEADER.lower())
    if not keys:
        return None
    if len(keys) > 1:
        raise ApiError(400, "invalid_idempotency_key", f"{HEADER} must be given once")
    [key] = keys
    if not 1 <= len(key) <= MAX_KEY_LENGTH:
        raise ApiError(
            400, "invalid_idempotency_key", f"{HEADER} must be 1 to {MAX_KEY_LENGTH} characters"
        )
    return key


class _Discarded(Exception):
    """An answer not to keep: leaving the transaction with it rolls the work back."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


async def once(
    request: Request,
    ctx: HttpContext,
    *,
    owner: uuid.UUID | None,
    body: bytes,
    run: Run,
    keep: Callable[[int], bool] = keep_answers,
) -> Response:
    """`run` once per `Idempotency-Key` of `owner` (the API token; None: a public route).

    Without the header, `run(pool)`. With it, `run(conn)` inside the transaction that holds
    the key, the answer stored with it when `keep(status)`; a retry gets the stored answer.
    `body` is the raw request body: with the method and path it identifies the request.
    A malformed key is 400 and a reused one 422, both as the API's JSON errors. Exceptions
    from `run` roll back and pass (the key stays free).
    """
    try:
        key = key_of(request)
    except ApiError as exc:
        return api_error_response(exc)
    if key is None:
        return await run(ctx.pool)
    method, path = request.method, request.url.path
    request_hash = hashlib.sha256(b"\n".join([method.encode(), path.encode(), body])).digest()
    try:
        async with store.transaction(ctx.pool) as conn:
            stored = await intake.claim_idempotency(
                conn,
                token_id=owner,
                key=key,
                method=method,
                path=path,
                request_hash=request_hash,
                now=ctx.clock.now(),
            )
            if stored is not None:
                if stored.request_hash != request_hash:
                    return api_error_response(
                        ApiError(
                            422,
                            "idempotency_key_reuse",
                            f"{HEADER} {key!r} was used for a different request "
                            f"({stored.method} {stored.path})",
                        )
                    )
                return Response(
                    stored.body,
                    status_code=stored.status,
                    headers={**stored.headers, REPLAYED: "true"},
                )
            response = await run(conn)
            if not keep(response.status_code):
                raise _Discarded(response)
            await intake.finish_idempotency(
                conn,
                token_id=owner,
                key=key,
                status=response.status_code,
                body=bytes(response.body),
                headers=_kept_headers(response),
            )
    except _Discarded as discarded:
        return discarded.response
    return response


def _kept_headers(response: Response) -> dict[str, str]:
    fields: dict[str, str] = {}
    for name, value in response.headers.items():
        if name not in _NOT_KEPT:
            fields[name] = value
    return fields
