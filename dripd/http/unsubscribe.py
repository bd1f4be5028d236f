"""One-click unsubscribe (RFC 8058): `GET /u/{token}` asks, `POST /u/{token}` unsubscribes."""

from __future__ import annotations

import base64
import hashlib
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import HTTP
from html import escape
from typing import Final
from urllib.parse import urlencode

import structlog
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Route

from dripd import api
from dripd.addresses import InvalidAddress
from dripd.channels.credentials import ENV_VAR
from dripd.db import feedback, store
from dripd.http.bodies import TooLarge, read_limited, urlencoded_fields
from dripd.http.context import HttpContext
from dripd.http.idempotency import keep_successes, once
from dripd.http.responses import error_response, json_response
from dripd.model import MessageEventType
from dripd.rules.unsubscribe import InvalidToken, UnsubscribeToken, read_token

log = structlog.get_logger("dripd.unsubscribe")

PATH: Final = "/u/{token}"
FIELD: Final = "List-Unsubscribe"
VALUE: Final = "One-Click"
_MAX_FIELDS: Final = 20  # a one-click body has one field; a flood is not a one-click body

_STYLE: Final = (
    "body{font:1rem/1.5 system-ui,sans-serif;margin:0;padding:1rem}"
    "main{max-width:32rem;margin:2rem auto}"
    "button{font:inherit;padding:.5rem 1.25rem}"
)
_STYLE_HASH: Final = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()
_HEADERS: Final = {
    # No script at all; the one inline style is allowed by its hash.
    "Content-Security-Policy": (
        f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; form-action 'self'; "
        "base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    # The token in the URL is the recipient's: no Referer, cache or index keeps it.
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Robots-Tag": "noindex",
}


class _Rejected(Exception):
    """A request this endpoint answers with an error page (or error JSON)."""

    def __init__(self, status: int, code: str, title: str, text: str) -> None:
        super().__init__(text)
        self.status, self.code, self.title, self.text = status, code, title, text


def routes(ctx: HttpContext) -> list[BaseRoute]:
    """`GET /u/{token}` (a confirmation page, no side effect) and `POST /u/{token}` (the
    one-click unsubscribe); both answer 503 while no encryption key is set."""
    endpoint = _Unsubscribe(ctx)
    return [
        Route(PATH, endpoint.confirm, methods=["GET"], name="unsubscribe"),
        Route(PATH, endpoint.unsubscribe, methods=["POST"]),
    ]


class _Unsubscribe:
    def __init__(self, ctx: HttpContext) -> None:
        self.ctx = ctx

    def _token(self, request: Request) -> UnsubscribeToken:
        if self.ctx.vault is None:
            raise _Rejected(
                503,
                "unavailable",
                "Unsubscribe is not available",
                f"Unsubscribe links need {ENV_VAR}, and this server was started without it.",
            )
        try:
            return read_token(
                self.ctx.vault, request.path_params["token"], now=self.ctx.clock.now()
            )
        except InvalidToken as exc:
            raise _Rejected(400, exc.code, "This link does not work", exc.message) from None

    async def confirm(self, request: Request) -> Response:
        """The confirmation page: a form that POSTs the one-click body to this same URL."""
        try:
            token = self._token(request)
        except _Rejected as exc:
            return _error(request, exc)
        return _page(
            "Unsubscribe",
            f"<h1>Unsubscribe</h1>\n<p>Stop receiving these {escape(_kind(token.channel))} "
            "messages at this address?</p>\n"
            # No action: the form posts to the URL of this page, token included.
            f'<form method="post">\n<input type="hidden" name="{FIELD}" value="{VALUE}">\n'
            '<button type="submit">Unsubscribe</button>\n</form>\n',
        )

    async def unsubscribe(self, request: Request) -> Response:
        """Suppress the token's address, record the unsubscribe on the message that carried
        the link, and confirm; idempotent, and with an `Idempotency-Key` replayed."""
        try:
            token = self._token(request)
            fields = await _read_form(request, self.ctx.config.http.max_body_bytes)
        except _Rejected as exc:
            return _error(request, exc)
        if (FIELD, VALUE) not in fields:
            return _error(
                request,
                _Rejected(
                    400,
                    "bad_input",
                    "Not an unsubscribe request",
                    f"The request body must be the form field {FIELD}={VALUE}.",
                ),
            )

        async def run(db: store.Executor) -> Response:
            return await self._unsubscribe(request, db, token)

        # A form body's fields identify the request; only a success is kept for a key (a
        # refusal kept for every key would let anyone fill the table).
        body = urlencode(fields).encode()
        return await once(request, self.ctx, owner=None, body=body, run=run, keep=keep_successes)

    async def _unsubscribe(
        self, request: Request, db: store.Executor, token: UnsubscribeToken
    ) -> Response:
        now = self.ctx.clock.now()
        try:
            # One transaction: the suppression's row lock orders concurrent clicks, so the
            # second one sees the first one's event and records none.
            async with store.transaction(db) as conn:
                await api.suppress(
                    conn,
                    tenant=token.tenant,
                    channel=token.channel,
                    address=token.address,  # stored in its one spelling, whatever this is
                    reason="unsubscribe",
                    source="one_click",
                    now=now,
                )
                recorded = token.execution_id is not None and await feedback.record_feedback(
                    conn,
                    tenant=token.tenant,
                    execution_id=token.execution_id,
                    type=MessageEventType.UNSUBSCRIBED,
                    reason="one_click",
                    now=now,
                    once=True,
                )
        except InvalidAddress:
            # Tokens are sealed by us: only one made before sends checked addresses gets here.
            invalid = _Rejected(400, "bad_token", "This link does not work", InvalidToken().message)
            return _error(request, invalid)
        log.info(
            "unsubscribed",
            tenant=token.tenant,
            channel=token.channel,
            execution_id=str(token.execution_id) if token.execution_id else None,
            event_recorded=recorded,
        )
        if _wants_json(request):
            return json_response({"unsubscribed": True}, 200)
        return _page(
            "You are unsubscribed",
            "<h1>You are unsubscribed</h1>\n"
            f"<p>You will not get these {escape(_kind(token.channel))} messages any more.</p>\n",
        )


async def _read_form(request: Request, limit: int) -> list[tuple[str, str]]:
    """The fields of a form body, `application/x-www-form-urlencoded` or
    `multipart/form-data` (RFC 8058 allows both), read within `limit` bytes."""
    content_type = request.headers.get("content-type", "")
    media_type = content_type.partition(";")[0].strip().lower()
    if media_type not in ("application/x-www-form-urlencoded", "multipart/form-data"):
        raise _Rejected(
            400,
            "bad_input",
            "Not an unsubscribe request",
            f"The request body must be the form field {FIELD}={VALUE}, sent as "
            "application/x-www-form-urlencoded or multipart/form-data.",
        )
    try:
        body = await read_limited(request, limit)
    except TooLarge:
        raise _Rejected(
            413, "payload_too_large", "Too large", "The request body is larger than a form needs."
        ) from None
    unreadable = _Rejected(
        400, "bad_input", "Not an unsubscribe request", "The form could not be read."
    )
    if media_type == "multipart/form-data":
        fields = _multipart_fields(content_type, body)
        if fields is None:
            raise unreadable
        return fields
    try:
        return urlencoded_fields(body, max_fields=_MAX_FIELDS)
    except ValueError:  # UnicodeDecodeError included
        raise unreadable from None


def _multipart_fields(content_type: str, body: bytes) -> list[tuple[str, str]] | None:
    """The text fields of a `multipart/form-data` body, or None if it is not one.

    The standard library's MIME parser reads it: a form body is a MIME multipart entity
    (RFC 7578) once its Content-Type header is put in front of it.
    """
    try:
        head = f"Content-Type: {content_type}\r\n\r\n".encode("ascii")
    except UnicodeEncodeError:
        return None
    entity = BytesParser(policy=HTTP).parsebytes(head + body)
    if not isinstance(entity, EmailMessage) or not entity.is_multipart():
        return None
    fields: list[tuple[str, str]] = []
    for part in entity.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if not isinstance(name, str) or not isinstance(payload, bytes):
            continue
        try:
            fields.append((name, payload.decode(part.get_content_charset() or "utf-8")))
        except (LookupError, UnicodeDecodeError):
            return None
        if len(fields) > _MAX_FIELDS:
            return None
    return fields


def _kind(channel: str) -> str:
    return {"sms": "SMS", "whatsapp": "WhatsApp"}.get(channel, channel)


def _wants_json(request: Request) -> bool:
    """Whether the client asked for JSON rather than a page (browsers accept text/html)."""
    accept = request.headers.get("accept", "").lower()
    return "application/json" in accept and "text/html" not in accept


def _error(request: Request, exc: _Rejected) -> Response:
    if _wants_json(request):
        return error_response(exc.status, exc.code, exc.text)
    return _page(
        exc.title, f"<h1>{escape(exc.title)}</h1>\n<p>{escape(exc.text)}</p>\n", exc.status
    )


def _page(title: str, main: str, status: int = 200) -> Response:
    body = (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="robots" content="noindex">\n'
        f"<title>{escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n"
        f"<body>\n<main>\n{main}</main>\n</body>\n</html>\n"
    )
    return HTMLResponse(body, status_code=status, headers=_HEADERS)
