"""dripd's short-link redirect: `GET /l/{code}` and `HEAD /l/{code}` answer 302 to the link's
destination; a GET records a `clicked` message event."""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import quote

import structlog
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from dripd.db import links as link_store
from dripd.errors import DripdError
from dripd.http.context import HttpContext

log = structlog.get_logger("dripd.links")

PATH: Final = "/l/{code}"
#: What any code of a short link looks like (schema 0008's check); dripd makes 10 characters.
CODE: Final = re.compile(r"[A-Za-z0-9]{8,32}")
#: Seconds a client is asked to wait when the database cannot answer.
RETRY_AFTER: Final = "5"
#: Characters kept as they are in `Location`: RFC 3986's reserved ones, `%` (escapes made
#: already) and `~`; the rest (spaces, non-ASCII, controls, quotes) is percent-encoded.
_SAFE: Final = ":/?#[]@!$&'()*+,;=%~"
_HEADERS: Final = {
    # The destination is the sender's to see, not a redirect cache's; and the code, in the
    # Referer, is the recipient's.
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
}


def routes(ctx: HttpContext) -> list[BaseRoute]:
    """`GET /l/{code}` and `HEAD /l/{code}` (Starlette answers HEAD for a GET route)."""

    async def redirect(request: Request) -> Response:
        """302 to the destination of the link `code` (RFC 9110 §15.4.3), the click recorded
        on a GET of a tracked link; HEAD records nothing (link scanners and prefetchers
        send it; a scanner's GET counts as a click, as nothing tells it from a person's).
        404 (plain text) for a code that is malformed or unknown; 503 with Retry-After
        when the database cannot answer."""
        code = request.path_params["code"]
        found = None
        if CODE.fullmatch(code):
            try:
                found = await link_store.click(
                    ctx.pool, code, now=ctx.clock.now(), record=request.method == "GET"
                )
            except DripdError as exc:
                log.warning("short link redirect failed", error=exc.message, code=exc.code)
                return PlainTextResponse(
                    "Service unavailable, try again shortly.\n",
                    503,
                    headers={**_HEADERS, "Retry-After": RETRY_AFTER},
                )
        if found is None:
            ctx.metrics.short_link_clicks.labels(outcome="unknown").inc()
            return PlainTextResponse("Not found\n", 404, headers=_HEADERS)
        ctx.metrics.short_link_clicks.labels(outcome="redirected").inc()
        location = quote(found.destination, safe=_SAFE)
        return Response(status_code=302, headers={**_HEADERS, "Location": location})

    return [Route(PATH, redirect, methods=["GET"], name="short_link")]
