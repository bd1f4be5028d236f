"""The intake routes of the HTTP API: enroll, track events, suppress, read an enrollment.

Every route needs a bearer token (see `auth`). A tenant token acts in its tenant only;
a global token acts in the tenant a body names, or in the global scope. The POST routes
take an `Idempotency-Key` (`dripd.http.idempotency`, as every POST route does): the first
answer to a key is kept and replayed, and nothing runs twice. A malformed enrollment id is a
404, like an unknown one.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar, get_args

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from dripd import api
from dripd.db import store
from dripd.errors import DripdError, NotFound
from dripd.http.auth import ApiToken, authenticate
from dripd.http.bodies import decode_json, read_body
from dripd.http.context import HttpContext
from dripd.http.errors import ApiError, api_endpoint, api_error_response, dripd_error_response
from dripd.http.idempotency import key_of, once
from dripd.http.openapi import Operation, Reply, error_replies
from dripd.inputs import MAX_LENGTH, text_fault
from dripd.model import EnrollmentStatus

_encode = msgspec.json.Encoder().encode

# The lengths every surface applies (dripd.inputs.MAX_LENGTH).
Tenant = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=MAX_LENGTH["tenant"],
        description="Tenant key; a tenant token may only name its own (or leave it out)",
    ),
]
SubscriberId = Annotated[
    str, msgspec.Meta(min_length=1, max_length=MAX_LENGTH["subscriber_id"], examples=["user-42"])
]
SubscriberType = Annotated[
    str, msgspec.Meta(min_length=1, max_length=MAX_LENGTH["subscriber_type"], examples=["user"])
]
Data = Annotated[
    dict[str, Any],
    msgspec.Meta(
        description=(
            "Subscriber data; `email`, `phone` and `timezone` (IANA) are the default "
            "recipients and the recipient's zone"
        ),
        examples=[{"email": "ann@example.com", "first_name": "Ann", "timezone": "Europe/Berlin"}],
    ),
]
SuppressionReason = Literal["manual", "unsubscribe", "bounce", "complaint", "provider_block"]
assert set(get_args(SuppressionReason)) == api.SUPPRESSION_REASONS


# --- request bodies ------------------------------------------------------------------------


class EnrollmentRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Enroll a subscriber in the active version of a sequence."""

    sequence: Annotated[
        str,
        msgspec.Meta(
            min_length=1,
            max_length=MAX_LENGTH["sequence"],
            description="Sequence key",
            examples=["welcome"],
        ),
    ]
    subscriber_id: SubscriberId
    subscriber_type: SubscriberType = "user"
    data: Data = msgspec.field(default_factory=dict)
    tenant: Tenant | None = None


class EventRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Record an event of a subscriber: entry events enroll, exit events end, waits release."""

    subscriber_id: SubscriberId
    key: Annotated[
        str,
        msgspec.Meta(
            min_length=1,
            max_length=MAX_LENGTH["key"],
            description="Event key",
            examples=["signed_up"],
        ),
    ]
    subscriber_type: SubscriberType = "user"
    data: Data = msgspec.field(default_factory=dict)
    id: (
        Annotated[
            str,
            msgspec.Meta(
                min_length=1,
                max_length=MAX_LENGTH["idempotency_id"],
                description="Idempotency id of the event: the same id twice records one event",
            ),
        ]
        | None
    ) = None
    tenant: Tenant | None = None


class SuppressionRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Stop every send to an address on a channel (in the tenant, or everywhere if global)."""

    channel: Annotated[
        str,
        msgspec.Meta(
            min_length=1,
            max_length=MAX_LENGTH["channel"],
            description="Channel: email, sms, whatsapp, chat or webhook",
            examples=["email"],
        ),
    ]
    address: Annotated[
        str,
        msgspec.Meta(min_length=1, max_length=MAX_LENGTH["address"], examples=["ann@example.com"]),
    ]
    reason: SuppressionReason = "manual"
    tenant: Tenant | None = None


# --- response bodies -----------------------------------------------------------------------


class Enrollment(msgspec.Struct, kw_only=True):
    """An enrollment and its next step; `created` is false when it existed already."""

    id: uuid.UUID
    tenant_key: str | None
    sequence_key: str
    version: int
    subscriber_type: str
    subscriber_id: str
    status: EnrollmentStatus
    status_reason: str | None
    data: dict[str, Any]
    timezone: str | None
    created_at: datetime
    ended_at: datetime | None
    next_step: str | None
    next_due_at: datetime | None
    created: bool


class NotEnrolled(msgspec.Struct, kw_only=True):
    """An entry sequence the event did not enroll the subscriber in, and why."""

    sequence: str
    reason: str


class Event(msgspec.Struct, kw_only=True):
    """A recorded event and what it did (nothing when its `id` was seen before: `created`
    false)."""

    id: int
    created: bool
    enrolled: list[uuid.UUID]
    not_enrolled: list[NotEnrolled]
    exited: list[uuid.UUID]
    released: list[uuid.UUID]


class Suppression(msgspec.Struct, kw_only=True):
    """A suppression; `created` is false when it existed already."""

    tenant_key: str | None
    channel: str
    address: str
    reason: str
    created: bool


# --- the routes ----------------------------------------------------------------------------

# Names in dripd's messages → the request's JSON fields.
_FIELDS = {
    "tenant": "tenant",
    "sequence_key": "sequence",
    "sequence": "sequence",
    "subscriber_id": "subscriber_id",
    "subscriber_type": "subscriber_type",
    "data": "data",
    "key": "key",
    "idempotency_id": "id",
    "channel": "channel",
    "address": "address",
    "reason": "reason",
}

_S = TypeVar("_S", bound=msgspec.Struct)


def _enrollment_headers(status: int, body: bytes) -> dict[str, str]:
    if status != 201:
        return {}
    enrollment_id = msgspec.json.decode(body, type=Enrollment).id
    return {"Location": f"/v1/enrollments/{enrollment_id}"}


def _no_headers(_status: int, _body: bytes) -> dict[str, str]:
    return {}


def _scope(token: ApiToken, named: str | None) -> str | None:
    """The tenant a request acts in: a tenant token's own, or what a global token names."""
    if token.tenant_key is None:
        return named
    if named is None or named == token.tenant_key:
        return token.tenant_key
    raise ApiError(
        403,
        "forbidden_tenant",
        f"this token acts in tenant {token.tenant_key!r} only",
        field="tenant",
    )


class _Routes:
    def __init__(self, ctx: HttpContext) -> None:
        self.ctx = ctx

    async def _post(
        self,
        request: Request,
        type_: type[_S],
        run: Callable[[store.Executor, str | None, _S], Awaitable[tuple[int, Any]]],
        headers_of: Callable[[int, bytes], dict[str, str]],
    ) -> Response:
        """Authenticate, decode, scope, and run once per idempotency key (`idempotency`)."""
        ctx = self.ctx
        token = await authenticate(request, ctx)
        key_of(request)  # a malformed key is refused before the body is read
        raw = await read_body(request, ctx)
        body = decode_json(raw, type_)
        tenant = _scope(token, getattr(body, "tenant", None))

        async def answer(db: store.Executor) -> Response:
            try:
                status, payload = await run(db, tenant, body)
            # A refusal is the request's answer too: kept and replayed like a success (not a
            # 5xx: `once` keeps none); what maps to 500 passes to the app's handler.
            except ApiError as exc:
                return api_error_response(exc)
            except DripdError as exc:
                return dripd_error_response(exc, fields=_FIELDS)
            encoded = _encode(payload)
            return Response(
                encoded,
                status_code=status,
                headers=headers_of(status, encoded),
                media_type="application/json",
            )

        return await once(request, ctx, owner=token.id, body=raw, run=answer)

    async def enroll(self, request: Request) -> Response:
        ctx = self.ctx

        async def run(
            db: store.Executor, tenant: str | None, body: EnrollmentRequest
        ) -> tuple[int, Any]:
            try:
                enrollment = await api.enroll(
                    db,
                    tenant=tenant,
                    sequence_key=body.sequence,
                    subscriber_id=body.subscriber_id,
                    subscriber_type=body.subscriber_type,
                    data=body.data,
                    now=ctx.clock.now(),
                    default_timezone=ctx.config.timezone_of(tenant),
                )
            except NotFound as exc:
                raise ApiError(404, "not_found", exc.message, field="sequence") from exc
            out = msgspec.convert(enrollment, Enrollment, from_attributes=True)
            return (201 if out.created else 200), out

        return await self._post(request, EnrollmentRequest, run, _enrollment_headers)

    async def event(self, request: Request) -> Response:
        ctx = self.ctx

        async def run(
            db: store.Executor, tenant: str | None, body: EventRequest
        ) -> tuple[int, Any]:
            event = await api.track_event(
                db,
                tenant=tenant,
                subscriber_id=body.subscriber_id,
                key=body.key,
                subscriber_type=body.subscriber_type,
                data=body.data,
                idempotency_id=body.id,
                now=ctx.clock.now(),
                default_timezone=ctx.config.timezone_of(tenant),
            )
            return 202, msgspec.convert(event, Event, from_attributes=True)

        return await self._post(request, EventRequest, run, _no_headers)

    async def suppress(self, request: Request) -> Response:
        ctx = self.ctx

        async def run(
            db: store.Executor, tenant: str | None, body: SuppressionRequest
        ) -> tuple[int, Any]:
            suppression = await api.suppress(
                db,
                tenant=tenant,
                channel=body.channel,
                address=body.address,
                reason=body.reason,
                source="http",
                now=ctx.clock.now(),
                default_region=ctx.config.recipients.default_region,
            )
            out = msgspec.convert(suppression, Suppression, from_attributes=True)
            return (201 if out.created else 200), out

        return await self._post(request, SuppressionRequest, run, _no_headers)

    async def get_enrollment(self, request: Request) -> Response:
        ctx = self.ctx
        token = await authenticate(request, ctx)
        raw_id: str = request.path_params["id"]
        named = request.query_params.get("tenant")
        if named is not None and (not named.strip() or text_fault(named) is not None):
            raise ApiError(422, "invalid_input", "tenant: must be a tenant key", field="tenant")
        if named is not None and len(named) > MAX_LENGTH["tenant"]:
            raise ApiError(
                422,
                "invalid_input",
                f"tenant: must be at most {MAX_LENGTH['tenant']} characters",
                field="tenant",
            )
        if token.tenant_key is not None and named not in (None, token.tenant_key):
            # Reads never say 403: another tenant's enrollments do not exist for this token.
            raise ApiError(404, "not_found", f"no enrollment {raw_id!r}")
        tenant = token.tenant_key if token.tenant_key is not None else named
        try:
            enrollment_id = uuid.UUID(raw_id)
        except ValueError:
            raise ApiError(404, "not_found", f"no enrollment {raw_id!r}") from None
        enrollment = await api.get_enrollment(ctx.pool, tenant=tenant, enrollment_id=enrollment_id)
        out = msgspec.convert(enrollment, Enrollment, from_attributes=True)
        return Response(_encode(out), media_type="application/json")


def routes(ctx: HttpContext) -> list[BaseRoute]:
    """`POST /v1/enrollments`, `GET /v1/enrollments/{id}`, `POST /v1/events` and
    `POST /v1/suppressions` (described for OpenAPI by `OPERATIONS`)."""
    r = _Routes(ctx)
    return [
        Route("/v1/enrollments", api_endpoint(r.enroll, fields=_FIELDS), methods=["POST"]),
        Route(
            "/v1/enrollments/{id}",
            api_endpoint(r.get_enrollment, fields=_FIELDS),
            methods=["GET"],
        ),
        Route("/v1/events", api_endpoint(r.event, fields=_FIELDS), methods=["POST"]),
        Route("/v1/suppressions", api_endpoint(r.suppress, fields=_FIELDS), methods=["POST"]),
    ]


_POST_ERRORS = (400, 401, 403, 413, 415, 422, 503)

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        method="POST",
        path="/v1/enrollments",
        operation_id="enroll",
        summary="Enroll a subscriber in a sequence",
        request=EnrollmentRequest,
        idempotency_key=True,
        responses={
            201: Reply(
                description="Enrolled",
                body=Enrollment,
                headers={
                    "Location": {
                        "description": "The enrollment's URL",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                },
            ),
            200: Reply(
                description="Already enrolled: the live enrollment, with `created` false",
                body=Enrollment,
            ),
            **error_replies(*_POST_ERRORS, 404, 409),
        },
    ),
    Operation(
        method="GET",
        path="/v1/enrollments/{id}",
        operation_id="get_enrollment",
        summary="Read an enrollment and its next step",
        description=(
            "A global token reads the global scope, or the tenant named by `tenant`. Another "
            "tenant's enrollment, like a malformed id, is 404."
        ),
        parameters=(
            {
                "name": "id",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "format": "uuid"},
            },
            {
                "name": "tenant",
                "in": "query",
                "required": False,
                "description": "Tenant scope of a global token",
                "schema": {"type": "string", "minLength": 1, "maxLength": 128},
            },
        ),
        responses={
            200: Reply(description="The enrollment", body=Enrollment),
            **error_replies(401, 404, 422, 503),
        },
    ),
    Operation(
        method="POST",
        path="/v1/events",
        operation_id="track_event",
        summary="Record an event of a subscriber and act on it",
        request=EventRequest,
        idempotency_key=True,
        responses={
            202: Reply(description="Recorded, with what it did", body=Event),
            **error_replies(*_POST_ERRORS),
        },
    ),
    Operation(
        method="POST",
        path="/v1/suppressions",
        operation_id="suppress",
        summary="Suppress an address on a channel",
        request=SuppressionRequest,
        idempotency_key=True,
        responses={
            201: Reply(description="Suppressed", body=Suppression),
            200: Reply(
                description="Already suppressed: the suppression, with `created` false",
                body=Suppression,
            ),
            **error_replies(*_POST_ERRORS),
        },
    ),
)
