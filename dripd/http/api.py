"""The intake routes of the HTTP API: enroll, track events, suppress, read an enrollment.

Every route needs a bearer token (see `auth`). A tenant token acts in its tenant only;
a global token acts in the tenant a body names, or in the global scope. The POST routes
take an `Idempotency-Key`: the request's transaction first inserts the key's row, so a
concurrent request with the same key waits on that row's primary key, then finds and
replays the stored response; nothing runs twice. A malformed enrollment id is a 404, like
an unknown one.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar, get_args

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from dripd import api
from dripd.db import intake, store
from dripd.errors import DripdError, NotFound
from dripd.http.auth import ApiToken, authenticate
from dripd.http.bodies import decode_json, read_body
from dripd.http.context import HttpContext
from dripd.http.errors import ApiError, api_endpoint, error_body, error_from_dripd
from dripd.http.openapi import Operation, Reply, error_replies
from dripd.model import EnrollmentStatus

_encode = msgspec.json.Encoder().encode

# Lengths that keep every indexed column well inside a btree entry (2704 bytes).
Tenant = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=128,
        description="Tenant key; a tenant token may only name its own (or leave it out)",
    ),
]
SubscriberId = Annotated[str, msgspec.Meta(min_length=1, max_length=200, examples=["user-42"])]
SubscriberType = Annotated[str, msgspec.Meta(min_length=1, max_length=64, examples=["user"])]
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
            min_length=1, max_length=128, description="Sequence key", examples=["welcome"]
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
        msgspec.Meta(min_length=1, max_length=128, description="Event key", examples=["signed_up"]),
    ]
    subscriber_type: SubscriberType = "user"
    data: Data = msgspec.field(default_factory=dict)
    id: (
        Annotated[
            str,
            msgspec.Meta(
                min_length=1,
                max_length=200,
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
        msgspec.Meta(min_length=1, max_length=64, description="Channel", examples=["email"]),
    ]
    address: Annotated[
        str, msgspec.Meta(min_length=1, max_length=320, examples=["ann@example.com"])
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


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    body: bytes
    headers: Mapping[str, str]

    def response(self, *, replayed: bool = False) -> Response:
        headers = {**self.headers, **({"Idempotent-Replayed": "true"} if replayed else {})}
        return Response(
            self.body, status_code=self.status, headers=headers, media_type="application/json"
        )


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


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not 1 <= len(key) <= 255:
        raise ApiError(
            400, "invalid_idempotency_key", "Idempotency-Key must be 1 to 255 characters"
        )
    return key


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
        """Authenticate, decode, scope, and run once per idempotency key."""
        ctx = self.ctx
        token = await authenticate(request, ctx)
        key = _idempotency_key(request)
        raw = await read_body(request, ctx)
        body = decode_json(raw, type_)
        tenant = _scope(token, getattr(body, "tenant", None))

        async def reply(db: store.Executor) -> _Reply:
            status, payload = await run(db, tenant, body)
            encoded = _encode(payload)
            return _Reply(status, encoded, headers_of(status, encoded))

        if key is None:
            return (await reply(ctx.pool)).response()
        method, path = request.method, request.url.path
        request_hash = hashlib.sha256(b"\n".join([method.encode(), path.encode(), raw])).digest()
        async with store.transaction(ctx.pool) as conn:
            stored = await intake.claim_idempotency(
                conn,
                token_id=token.id,
                key=key,
                method=method,
                path=path,
                request_hash=request_hash,
                now=ctx.clock.now(),
            )
            if stored is not None:
                if stored.request_hash != request_hash:
                    raise ApiError(
                        422,
                        "idempotency_key_reuse",
                        f"Idempotency-Key {key!r} was used for a different request "
                        f"({stored.method} {stored.path})",
                    )
                return _Reply(
                    stored.status, stored.body, headers_of(stored.status, stored.body)
                ).response(replayed=True)
            try:
                result = await reply(conn)
            except (ApiError, DripdError) as exc:
                error = exc if isinstance(exc, ApiError) else error_from_dripd(exc, fields=_FIELDS)
                if error.status >= 500:
                    raise  # the transaction rolls back: a retry runs again
                # A refusal is the request's answer too: kept and replayed like a success.
                result = _Reply(error.status, _encode(error_body(error)), error.headers)
            await intake.finish_idempotency(
                conn, token_id=token.id, key=key, status=result.status, body=result.body
            )
        return result.response()

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
        if named is not None and (not named.strip() or "\x00" in named):
            raise ApiError(422, "invalid_input", "tenant: must be a tenant key", field="tenant")
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
