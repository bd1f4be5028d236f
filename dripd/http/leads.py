"""Lead intake over HTTP: the public lead form (`/leads/new`) and `POST /v1/leads` for clients."""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections.abc import Mapping
from datetime import datetime
from html import escape
from typing import Annotated, Any

import msgspec
import structlog
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Route

from dripd import api
from dripd.errors import DripdError
from dripd.http.auth import authenticate
from dripd.http.bodies import TooLarge, read_json, read_limited, urlencoded_fields
from dripd.http.context import HttpContext
from dripd.http.errors import ApiError, Error, api_endpoint
from dripd.http.openapi import Operation, Reply, describe, error_replies
from dripd.http.responses import json_response

log = structlog.get_logger("dripd.leads")

FORM_PATH = "/leads/new"
API_PATH = "/v1/leads"
_FIELDS = ("name", "email", "phone", "notes")
_MAX_FORM_FIELDS = 20  # the form has four; a flood of fields is not a lead
# The code of an invalid field, as `read_json` answers for a body that does not fit.
INVALID = "invalid_input"


# --- wire formats (and the API document's schemas) ----------------------------------------


class NewLead(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A lead to add: a name, and an email address or a phone number (or both)."""

    name: Annotated[
        str, msgspec.Meta(min_length=1, max_length=api.LEAD_NAME_MAX, description="Full name.")
    ]
    email: Annotated[str, msgspec.Meta(max_length=320, description="Stored lowercased.")] | None = (
        None
    )
    phone: (
        Annotated[
            str,
            msgspec.Meta(
                max_length=64,
                description="International (+…) or a number of the configured default region; "
                "stored in E.164.",
            ),
        ]
        | None
    ) = None
    notes: Annotated[str, msgspec.Meta(max_length=api.LEAD_NOTES_MAX)] | None = None


class Lead(msgspec.Struct, kw_only=True):
    """A stored lead and the enrollment it entered."""

    id: uuid.UUID
    tenant_key: str | None
    name: str
    email: str | None
    phone: str | None
    notes: str | None
    enrollment_id: uuid.UUID | None
    created_at: datetime


OPERATION = Operation(
    method="POST",
    path=API_PATH,
    operation_id="createLead",
    summary="Add a lead and enroll it in the lead sequence",
    description=(
        "Validates the lead (email syntax; phone parsed to E.164, a national number read in "
        "`recipients.default_region`), refuses a lead whose email or phone another lead of "
        "the tenant has, and enrolls it in the sequence `leads.sequence` in the same "
        "transaction. A tenant token must be of the tenant `leads.tenant`."
    ),
    request=NewLead,
    responses={
        201: Reply(description="The lead, stored and enrolled", body=Lead),
        **error_replies(400, 413, 415),
        403: Reply(
            description="A tenant token of another tenant than `leads.tenant` (`forbidden_tenant`)",
            body=Error,
        ),
        422: Reply(
            description=(
                f"The body does not fit the schema or a field is invalid (`{INVALID}`), or "
                "another lead of the tenant has this email or phone (`duplicate`); `field` "
                "names the field"
            ),
            body=Error,
        ),
        503: Reply(
            description=(
                "The lead sequence is missing or has no active version, or the database is "
                "unreachable (`unavailable`): retry later"
            ),
            body=Error,
        ),
    },
    tags=("leads",),
)


def openapi_paths() -> dict[str, Any]:
    """The `paths` entry of `POST /v1/leads` for the API document."""
    return describe([OPERATION])[0]


def openapi_components() -> dict[str, Any]:
    """The `components` (schemas) that `openapi_paths` refers to."""
    return describe([OPERATION])[1]


# --- routes -------------------------------------------------------------------------------


def routes(ctx: HttpContext) -> list[BaseRoute]:
    """The lead form and `POST /v1/leads`; none unless `leads.enabled`."""
    if not ctx.config.leads.enabled:
        return []
    intake = _Intake(ctx)
    return [
        Route(FORM_PATH, intake.show_form, methods=["GET"], name="lead_form"),
        Route(FORM_PATH, intake.submit_form, methods=["POST"]),
        Route(API_PATH, api_endpoint(intake.create), methods=["POST"], name="create_lead"),
    ]


class _Unavailable(Exception):
    """The lead could not be stored for a reason the visitor cannot fix."""


class _Intake:
    def __init__(self, ctx: HttpContext) -> None:
        self.ctx = ctx
        self.tenant = ctx.config.leads.tenant or None

    async def _create_lead(self, values: Mapping[str, str | None]) -> api.Lead:
        """api.create_lead with the configured sequence, tenant, region and zone.
        InvalidLead and DuplicateLead pass; a fault of the setup becomes _Unavailable."""
        cfg = self.ctx.config
        try:
            lead = await api.create_lead(
                self.ctx.pool,
                tenant=self.tenant,
                sequence_key=cfg.leads.sequence,
                name=values.get("name") or "",
                email=values.get("email"),
                phone=values.get("phone"),
                notes=values.get("notes"),
                default_region=cfg.recipients.default_region,
                default_timezone=cfg.timezone_of(self.tenant),
                now=self.ctx.clock.now(),
            )
        except (api.InvalidLead, api.DuplicateLead):
            raise
        except DripdError as exc:
            # A missing lead sequence (NotFound), one without an active version (Conflict),
            # or the database: the operator's to fix, so the log says what, and the client
            # is only told to come back.
            log.error("lead not taken", sequence=cfg.leads.sequence, error=exc.message)
            raise _Unavailable(exc.message) from exc
        log.info("lead created", lead_id=str(lead.id), enrollment_id=str(lead.enrollment_id))
        return lead

    # The JSON API.

    async def create(self, request: Request) -> Response:
        token = await authenticate(request, self.ctx)
        if token.tenant_key is not None and token.tenant_key != self.tenant:
            raise ApiError(
                403,
                "forbidden_tenant",
                f"a token of tenant {token.tenant_key!r} cannot add leads to "
                + (f"tenant {self.tenant!r}" if self.tenant else "the global scope"),
            )
        body = await read_json(request, self.ctx, NewLead)
        values = {"name": body.name, "email": body.email, "phone": body.phone, "notes": body.notes}
        try:
            lead = await self._create_lead(values)
        except api.DuplicateLead as exc:
            raise ApiError(422, "duplicate", exc.message, field=exc.field) from exc
        except api.InvalidLead as exc:
            raise ApiError(422, INVALID, exc.message, field=exc.field) from exc
        except _Unavailable as exc:
            raise ApiError(
                503, "unavailable", "leads cannot be taken right now; try again later"
            ) from exc
        return json_response(msgspec.convert(lead, Lead, from_attributes=True), 201)

    # The form.

    async def show_form(self, _request: Request) -> Response:
        return _html(_form_page({}, None))

    async def submit_form(self, request: Request) -> Response:
        try:
            values = await _read_form(request, self.ctx.config.http.max_body_bytes)
        except _FormRejected as exc:
            return _html(_message_page(exc.title, exc.text), exc.status)
        try:
            lead = await self._create_lead(values)
        except (api.InvalidLead, api.DuplicateLead) as exc:
            return _html(_form_page(values, (exc.field, exc.message)), 422)
        except _Unavailable:
            text = "We could not take your details right now. Please try again later."
            return _html(_message_page("Sorry", text), 503)
        return _html(_thanks_page(lead))


class _FormRejected(Exception):
    def __init__(self, status: int, title: str, text: str) -> None:
        super().__init__(text)
        self.status, self.title, self.text = status, title, text


async def _read_form(request: Request, limit: int) -> dict[str, str]:
    """The form's fields (first value of each), read within `limit` bytes."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/x-www-form-urlencoded":
        raise _FormRejected(415, "Unsupported form", "Send the form as a web browser does.")
    try:
        body = await read_limited(request, limit)
    except TooLarge:
        raise _FormRejected(413, "Too long", "The form is too long; shorten the notes.") from None
    try:
        pairs = urlencoded_fields(body, max_fields=_MAX_FORM_FIELDS)
    except ValueError as exc:  # UnicodeDecodeError included
        raise _FormRejected(400, "Unreadable form", "The form could not be read.") from exc
    values: dict[str, str] = {}
    for key, value in pairs:
        if key in _FIELDS:
            values.setdefault(key, value)
    return values


# --- pages --------------------------------------------------------------------------------

_STYLE = (
    "body{font:1rem/1.5 system-ui,sans-serif;margin:0;padding:1rem}"
    "main{max-width:32rem;margin:0 auto}"
    "label{display:block;font-weight:600;margin-top:1rem}"
    "input,textarea{box-sizing:border-box;width:100%;font:inherit;padding:.4rem}"
    "button{font:inherit;margin-top:1.25rem;padding:.5rem 1.25rem}"
    ".error,.hint{display:block;margin:.25rem 0}"
    ".error{color:#b00020;font-weight:600}"
    "[aria-invalid=true]{border:2px solid #b00020}"
    ".summary{border:3px solid #b00020;padding:0 1rem;margin:1rem 0}"
    ".hint{color:#555}"
)
_STYLE_HASH = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()
_HEADERS = {
    # No script at all; the one inline style is allowed by its hash.
    "Content-Security-Policy": (
        f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; form-action 'self'; "
        "base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # A re-rendered form holds what the visitor typed: no cache keeps it.
    "Cache-Control": "no-store",
}

_LABELS = {"name": "Name", "email": "Email", "phone": "Phone", "notes": "Notes"}
_INPUTS = {
    "name": f'type="text" autocomplete="name" required maxlength="{api.LEAD_NAME_MAX}"',
    "email": 'type="email" autocomplete="email" maxlength="320"',
    "phone": 'type="tel" autocomplete="tel" maxlength="64"',
}
_HINTS = {"phone": "With the country code if it is not a local number."}


def _html(body: str, status: int = 200) -> Response:
    return HTMLResponse(body, status_code=status, headers=_HEADERS)


def _document(title: str, main: str) -> str:
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n"
        f"<body>\n<main>\n{main}</main>\n</body>\n</html>\n"
    )


def _reason(message: str, field: str) -> str:
    """An error message without its leading field name, as a sentence."""
    reason = message.removeprefix(f"{field}:").strip() or message
    return reason[:1].upper() + reason[1:]


def _field(name: str, value: str, error: str | None) -> str:
    described = [f"{name}-hint"] if name in _HINTS else []
    parts = [f'<div class="field">\n<label for="{name}">{_LABELS[name]}</label>']
    if name in _HINTS:
        parts.append(f'<span class="hint" id="{name}-hint">{escape(_HINTS[name])}</span>')
    if error is not None:
        described.append(f"{name}-error")
        parts.append(f'<span class="error" id="{name}-error">Error: {escape(error)}</span>')
    attrs = f'id="{name}" name="{name}"'
    if described:
        attrs += f' aria-describedby="{" ".join(described)}"'
    if error is not None:
        attrs += ' aria-invalid="true"'
    if name == "notes":
        # A parser drops one newline right after <textarea>; this one, not the visitor's.
        limit = f'maxlength="{api.LEAD_NOTES_MAX}"'
        parts.append(f'<textarea {attrs} rows="5" {limit}>\n{escape(value)}</textarea>')
    else:
        parts.append(f'<input {attrs} {_INPUTS[name]} value="{escape(value, quote=True)}">')
    return "\n".join(parts) + "\n</div>\n"


def _form_page(values: dict[str, str], error: tuple[str, str] | None) -> str:
    """The lead form with `values` filled in and, for `(field, message)`, the error shown
    beside that field and in a summary that links to it."""
    field, message = error or ("", "")
    reason = _reason(message, field) if error else None
    summary = ""
    if reason is not None:
        summary = (
            '<div class="summary" role="alert" aria-labelledby="summary-title">\n'
            '<h2 id="summary-title">There is a problem</h2>\n'
            f'<ul><li><a href="#{escape(field, quote=True)}">{escape(reason)}</a></li></ul>\n'
            "</div>\n"
        )
    fields = "".join(
        _field(name, values.get(name, ""), reason if name == field else None) for name in _FIELDS
    )
    main = (
        "<h1>Get in touch</h1>\n"
        f"{summary}"
        f'<form method="post" action="{FORM_PATH}" accept-charset="utf-8">\n'
        "<p>Leave your name and an email address, a phone number, or both.</p>\n"
        f"{fields}"
        '<button type="submit">Send</button>\n'
        "</form>\n"
    )
    return _document(("Error: " if error else "") + "Get in touch", main)


def _thanks_page(lead: api.Lead) -> str:
    return _document(
        "Thank you",
        f"<h1>Thanks, {escape(lead.name)}</h1>\n"
        "<p>We have your details and will be in touch.</p>\n",
    )


def _message_page(title: str, text: str) -> str:
    return _document(title, f"<h1>{escape(title)}</h1>\n<p>{escape(text)}</p>\n")
