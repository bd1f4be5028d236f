"""The OpenAPI 3.1 document of the HTTP API, generated from the msgspec Structs of its bodies.

Each route module describes its routes as `Operation`s; `openapi_route` serves the
document of all of them at `/openapi.json`. Schemas come from
`msgspec.json.schema_components`, so the document cannot drift from the code that
decodes requests and encodes responses. Component names are the Structs' class names:
keep them unique across route modules.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dripd import __version__
from dripd.http.errors import Error

_REF = "#/components/schemas/{name}"
SECURITY_SCHEME = "bearer"

# What each error status means on this API (the `description` of its response).
ERROR_MEANINGS: Mapping[int, str] = {
    400: "The body is not JSON (`invalid_json`) or a header is malformed",
    401: "No valid bearer token: missing, malformed, unknown or revoked",
    403: "The token may not act in the tenant the request names (`forbidden_tenant`)",
    404: "Not found in the token's tenant scope",
    409: "The request conflicts with the current state",
    413: "The body is larger than `http.max_body_bytes`",
    415: "The body is not sent as `application/json`, or is compressed",
    422: (
        "The body does not fit the schema, a value is invalid (`field` names it), or an "
        "`Idempotency-Key` is reused for a different request (`idempotency_key_reuse`)"
    ),
    503: "The database is unreachable or not migrated: retry later",
}

_HEADER_DESCRIPTIONS: Mapping[int, Mapping[str, Any]] = {
    401: {
        "WWW-Authenticate": {
            "description": 'The bearer challenge, e.g. `Bearer realm="dripd"`',
            "required": True,
            "schema": {"type": "string"},
        }
    },
}

IDEMPOTENCY_KEY_PARAMETER: Mapping[str, Any] = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": (
        "Makes the request safe to retry: the first response to a key (per token) is kept "
        "24 h and replayed, with `Idempotent-Replayed: true`, for a retry of the same "
        "request; the same key with a different request is refused (422)."
    ),
    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
}

REPLAYED_HEADER: Mapping[str, Any] = {
    "Idempotent-Replayed": {
        "description": "`true` when this is the stored response to an earlier request",
        "required": False,
        "schema": {"type": "string", "enum": ["true"]},
    }
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Reply:
    """One documented response of an operation."""

    description: str
    body: type[Any] | None = None  # a msgspec Struct, encoded as application/json
    headers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Operation:
    """One route as the OpenAPI document describes it."""

    method: str
    path: str
    operation_id: str
    summary: str
    responses: Mapping[int, Reply]
    description: str = ""
    request: type[Any] | None = None  # a msgspec Struct
    request_media_types: Sequence[str] = ("application/json",)
    parameters: Sequence[Mapping[str, Any]] = ()
    secured: bool = True  # bearer token required (documents 401 and its challenge)
    idempotency_key: bool = False  # takes `Idempotency-Key`
    tags: Sequence[str] = ()


def error_replies(*statuses: int) -> dict[int, Reply]:
    """The error responses `statuses`, each with the one error body."""
    return {
        status: Reply(
            description=ERROR_MEANINGS.get(status, HTTPStatus(status).phrase),
            body=Error,
            headers=_HEADER_DESCRIPTIONS.get(status, {}),
        )
        for status in statuses
    }


def describe(operations: Iterable[Operation]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The `paths` and `components` of `operations`, for `openapi_document`."""
    ops = list(operations)
    types: list[type[Any]] = [Error]
    for op in ops:
        bodies = [op.request, *(r.body for r in op.responses.values())]
        types += [t for t in bodies if t is not None and t not in types]
    refs, schemas = msgspec.json.schema_components(types, ref_template=_REF)
    ref_of = dict(zip(types, refs, strict=True))
    paths: dict[str, Any] = {}
    for op in ops:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, ref_of)
    return paths, {"schemas": schemas}


def _operation(op: Operation, ref_of: Mapping[type[Any], Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"operationId": op.operation_id, "summary": op.summary}
    if op.description:
        out["description"] = op.description
    if op.tags:
        out["tags"] = list(op.tags)
    parameters = [dict(p) for p in op.parameters]
    if op.idempotency_key:
        parameters.append(dict(IDEMPOTENCY_KEY_PARAMETER))
    if parameters:
        out["parameters"] = parameters
    if op.request is not None:
        out["requestBody"] = {
            "required": True,
            "content": {m: {"schema": ref_of[op.request]} for m in op.request_media_types},
        }
    responses = dict(op.responses)
    if op.secured:
        out["security"] = [{SECURITY_SCHEME: []}]
        responses.setdefault(401, error_replies(401)[401])
    out["responses"] = {
        str(status): _reply(reply, ref_of, replayable=op.idempotency_key and _kept(status))
        for status, reply in sorted(responses.items())
    }
    return out


def _kept(status: int) -> bool:
    # The answers of a request that ran: what an idempotency key keeps and replays.
    return status < 300 or status in (404, 409, 422)


def _reply(reply: Reply, ref_of: Mapping[type[Any], Any], *, replayable: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"description": reply.description}
    headers = {**reply.headers, **(REPLAYED_HEADER if replayable else {})}
    if headers:
        out["headers"] = {name: dict(spec) for name, spec in headers.items()}
    if reply.body is not None:
        out["content"] = {"application/json": {"schema": ref_of[reply.body]}}
    return out


def openapi_document(paths: Mapping[str, Any], components: Mapping[str, Any]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `paths` and `components` (see `describe`), with the error
    schema and the bearer security scheme added."""
    _, base = describe(())
    sections: dict[str, dict[str, Any]] = {
        "schemas": dict(base["schemas"]),
        "securitySchemes": {
            SECURITY_SCHEME: {
                "type": "http",
                "scheme": "bearer",
                "description": "An API token from `dripd token create`",
            }
        },
    }
    for section, entries in components.items():
        sections.setdefault(section, {}).update(entries)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "dripd",
            "version": __version__,
            "description": (
                "The HTTP API of dripd. Every error is "
                '`{"error": {"code": ..., "message": ..., "field": ...}}`.'
            ),
        },
        "paths": {path: dict(item) for path, item in paths.items()},
        "components": sections,
    }


def openapi_route(
    operations: Iterable[Operation] = (),
    *,
    paths: Mapping[str, Any] | None = None,
    components: Mapping[str, Any] | None = None,
) -> Route:
    """`GET /openapi.json`: the document of `operations`, plus any ready-made `paths` and
    `components`. Public: it holds no secret and needs no token."""
    own_paths, own_components = describe(operations)
    for path, item in (paths or {}).items():
        own_paths.setdefault(path, {}).update(item)
    for section, entries in (components or {}).items():
        own_components.setdefault(section, {}).update(entries)
    body = msgspec.json.encode(openapi_document(own_paths, own_components))

    async def document(_request: Request) -> Response:
        return Response(body, media_type="application/json")

    return Route("/openapi.json", document, methods=["GET"])
