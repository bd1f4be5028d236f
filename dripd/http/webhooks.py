"""`POST /webhooks/{provider}/{adapter}`: provider feedback in (README, "Provider feedback").

The adapter is named by its name, with `?tenant=T` for a tenant's adapter; it must be an
enabled adapter of that provider whose provider receives webhooks, else 404 (nothing says
which part was wrong). The body is read up to `webhooks.max_body_bytes` (413 beyond), the
adapter's receiver verifies it exactly as the provider signs it (401 and nothing written
when it does not hold) and maps it to feedback events, which are recorded in one
transaction (dripd.db.feedback.ingest). 200 once recorded, also for a redelivery; 503 when
the database failed, so the provider delivers again.
"""

from __future__ import annotations

from typing import Protocol
from urllib.parse import parse_qs

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from dripd.channels import registry
from dripd.channels.feedback import BadPayload, InboundRequest, Receiver, Unverified
from dripd.db import feedback
from dripd.errors import DripdError
from dripd.http.bodies import TooLarge, read_limited
from dripd.http.context import HttpContext
from dripd.inputs import NAME
from dripd.logs import Throttle
from dripd.model import Adapter

__all__ = ["PATH", "WebhookTargets", "routes"]

log = structlog.get_logger("dripd.webhooks")

PATH = "/webhooks/{provider}/{adapter}"

#: Form bodies hold at most this many fields (Twilio sends about 20).
MAX_FORM_FIELDS = 1000


class WebhookTargets(Protocol):
    """The daemon's adapters as the webhook route needs them."""

    def webhook_target(
        self, provider: str, tenant: str | None, name: str
    ) -> tuple[Adapter, Receiver] | None:
        """The enabled adapter `name` of `tenant` (None: global) with this provider and its
        receiver, or None when there is none (or its provider takes no webhooks)."""
        ...


def routes(ctx: HttpContext) -> list[BaseRoute]:
    """The webhook route, when the daemon gave the context its adapters."""
    if ctx.webhooks is None:
        return []
    endpoint = _Webhooks(ctx)
    return [
        Route(PATH, endpoint.receive, methods=["POST"], name="webhook"),
        Route(PATH, endpoint.challenge, methods=["GET"]),
    ]


class _Webhooks:
    def __init__(self, ctx: HttpContext) -> None:
        self.ctx = ctx
        self.throttles: dict[tuple[str, str], Throttle] = {}

    def _count(self, provider: str, outcome: str) -> None:
        self.ctx.metrics.webhooks.labels(provider=provider, outcome=outcome).inc()

    def _target(self, request: Request) -> tuple[Adapter, Receiver] | None:
        provider = request.path_params["provider"]
        name = request.path_params["adapter"]
        tenant = request.query_params.get("tenant") or None
        if not all(NAME.fullmatch(part) for part in (provider, name, tenant or "x")):
            return None
        assert self.ctx.webhooks is not None
        return self.ctx.webhooks.webhook_target(provider, tenant, name)

    async def challenge(self, request: Request) -> Response:
        """GET: a provider's check of the URL before it sends anything (Meta's
        `hub.challenge`), for receivers that have one; 404 otherwise."""
        target = self._target(request)
        check = getattr(target[1], "challenge", None) if target is not None else None
        if target is None or check is None:
            self._count("unknown", "not_found")
            return _answer(404, "not_found", "no webhook at this address")
        try:
            answer = check(dict(request.query_params))
        except Unverified as exc:
            self._count(target[0].provider, "unverified")
            self._warn("webhook challenge refused", target[0], exc.message)
            return _answer(401, "unverified", "the request could not be verified")
        return Response(answer, media_type="text/plain")

    async def receive(self, request: Request) -> Response:
        target = self._target(request)
        if target is None:
            self._count("unknown", "not_found")
            return _answer(404, "not_found", "no webhook at this address")
        adapter, receiver = target
        provider = adapter.provider
        try:
            body = await read_limited(request, self.ctx.config.webhooks.max_body_bytes)
        except TooLarge:
            self._count(provider, "too_large")
            limit = self.ctx.config.webhooks.max_body_bytes
            return _answer(413, "payload_too_large", f"the body is larger than {limit} bytes")
        inbound = InboundRequest(
            url=self._url(request),
            headers={k.lower(): v for k, v in _joined(request).items()},
            body=body,
            received_at=self.ctx.clock.now(),
            form=_form(request, body),
        )
        try:
            events = await receiver.receive(inbound)
        except Unverified as exc:
            self._count(provider, "unverified")
            self._warn("webhook refused: not verified", adapter, exc.message)
            return _answer(401, "unverified", "the request could not be verified")
        except BadPayload as exc:
            self._count(provider, "bad_payload")
            self._warn("webhook refused: unreadable payload", adapter, exc.message)
            return _answer(400, "bad_payload", exc.message)
        except Exception as exc:  # noqa: BLE001 - a receiver's bug: the provider retries
            self._count(provider, "error")
            redact = registry.redactor(adapter.provider, adapter.credentials)
            log.error(
                "webhook receiver failed",
                adapter=adapter.name,
                provider=provider,
                error=redact(f"{type(exc).__name__}: {exc}")[:500],
            )
            return _answer(500, "internal", "the request could not be handled")
        try:
            result = await feedback.ingest(
                self.ctx.pool, adapter=adapter, events=events, now=self.ctx.clock.now()
            )
        except DripdError as exc:
            self._count(provider, "unavailable")
            log.warning("webhook not recorded; the provider will retry", error=exc.message)
            return _answer(503, "unavailable", "try again later", retry_after=True)
        self._count(provider, "accepted")
        counted = self.ctx.metrics.feedback_events
        for event in events:
            counted.labels(provider=provider, type=event.type).inc()
        if result.duplicates:
            counted.labels(provider=provider, type="duplicate").inc(result.duplicates)
        # A provider that reads the answer (Twilio wants TwiML) says what it should be.
        reply = getattr(receiver, "reply", None)
        if isinstance(reply, tuple):
            media_type, content = reply
            return Response(content, media_type=media_type)
        return JSONResponse(
            {
                "recorded": result.recorded,
                "matched": result.matched,
                "duplicates": result.duplicates,
                "suppressed": result.suppressed,
            }
        )

    def _url(self, request: Request) -> str:
        """The URL as the provider called it: `webhooks.public_url` + path and query when
        set (a proxy in front changes what the request says), else the request's own."""
        base = self.ctx.config.webhooks.public_url.rstrip("/")
        if not base:
            return str(request.url)
        query = request.url.query
        return f"{base}{request.url.path}" + (f"?{query}" if query else "")

    def _warn(self, what: str, adapter: Adapter, reason: str) -> None:
        """Log a refusal, at most every 10 s per adapter and kind (a flood of forged
        requests would otherwise fill the log), with the count held back."""
        key = (str(adapter.id), what)
        throttle = self.throttles.get(key)
        if throttle is None:
            if len(self.throttles) > 10_000:
                self.throttles.clear()
            throttle = self.throttles[key] = Throttle(10.0)
        held = throttle.due()
        if held is not None:
            log.warning(
                what,
                adapter=adapter.name,
                provider=adapter.provider,
                reason=reason,
                suppressed=held,
            )


def _joined(request: Request) -> dict[str, str]:
    """Headers by name; a name sent twice keeps its values joined by ", " (RFC 9110 §5.3)."""
    out: dict[str, str] = {}
    for key, value in request.headers.items():
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


def _form(request: Request, body: bytes) -> dict[str, list[str]]:
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        return {}
    try:
        return parse_qs(
            body.decode("utf-8"),
            keep_blank_values=True,
            strict_parsing=False,
            max_num_fields=MAX_FORM_FIELDS,
        )
    except (UnicodeDecodeError, ValueError):
        return {}


def _answer(status: int, code: str, message: str, *, retry_after: bool = False) -> Response:
    headers = {"Retry-After": "5"} if retry_after else None
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )
