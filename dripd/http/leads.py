"""Lead intake over HTTP: the public lead form (`/leads/new`), `POST /v1/leads` for clients,
and the confirmation link of double opt-in (`/leads/confirm/{token}`).

The defences of the public surface: a per-client budget of posts shared by every daemon
(429 with Retry-After), a honeypot field, a daily cap per mailbox (`victim+N@` is one
mailbox), double opt-in, and answers that tell nobody which addresses the form knows.
"""

from __future__ import annotations

import base64
import hashlib
import math
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta
from html import escape
from typing import Annotated, Any

import msgspec
import structlog
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Route

from dripd import api
from dripd.db import leads as lead_store
from dripd.db import store
from dripd.errors import DripdError
from dripd.http.auth import authenticate
from dripd.http.bodies import TooLarge, decode_json, read_body, read_limited, urlencoded_fields
from dripd.http.clients import client_address, client_key
from dripd.http.context import HttpContext
from dripd.http.errors import ApiError, Error, api_endpoint, api_error_response
from dripd.http.idempotency import keep_successes, key_of, once
from dripd.http.openapi import Operation, Reply, describe, error_replies
from dripd.http.responses import json_response
from dripd.model import format_duration
from dripd.rules.leadconfirm import PATH as CONFIRM_PATH
from dripd.rules.leadconfirm import ConfirmToken, InvalidConfirmToken, read_confirm_token

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
    """A stored lead and the enrollment it entered: `active` (in the lead sequence), or
    `pending` until its confirmation (double opt-in, before `confirm_expires_at`)."""

    id: uuid.UUID
    tenant_key: str | None
    name: str
    email: str | None
    phone: str | None
    notes: str | None
    enrollment_id: uuid.UUID | None
    created_at: datetime
    status: api.LeadStatus
    confirm_expires_at: datetime | None


_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds until the request can be taken",
        "required": True,
        "schema": {"type": "string"},
    }
}


OPERATION = Operation(
    method="POST",
    path=API_PATH,
    operation_id="createLead",
    summary="Add a lead and enroll it in the lead sequence",
    description=(
        "Validates the lead (email syntax; phone parsed to E.164, a national number read in "
        "`recipients.default_region`), refuses a lead whose email, mailbox (the email "
        "without a `+tag`) or phone another lead of the tenant has, and enrolls it in the "
        "sequence `leads.sequence` in the same transaction; with `leads.double_opt_in`, it "
        "is stored `pending` and enrolled in `leads.confirm_sequence` instead, until the "
        "link in that message confirms it. A tenant token must be of the tenant "
        "`leads.tenant`. Each token may add `leads.api_rate_limit` leads, and a mailbox "
        "gets at most `leads.max_per_mailbox_per_day` new leads in any 24 hours."
    ),
    request=NewLead,
    idempotency_key=True,
    responses={
        201: Reply(
            description="The lead, stored and enrolled (`pending` until confirmed)", body=Lead
        ),
        429: Reply(
            description=(
                "The token's budget of leads is spent (`rate_limited`), or the mailbox got its "
                "most new leads in the last 24 hours (`mailbox_limited`): retry after "
                "`Retry-After` seconds"
            ),
            body=Error,
            headers=_RETRY_AFTER,
        ),
        **error_replies(400, 413, 415),
        403: Reply(
            description="A tenant token of another tenant than `leads.tenant` (`forbidden_tenant`)",
            body=Error,
        ),
        422: Reply(
            description=(
                f"The body does not fit the schema or a field is invalid (`{INVALID}`), "
                "another live lead of the tenant has this email, its mailbox or this phone "
                "(`duplicate`), or an `Idempotency-Key` is reused for a different request "
                "(`idempotency_key_reuse`); `field` names the field"
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
    """The lead form and `POST /v1/leads`, and with `leads.double_opt_in` the confirmation
    link's page (`/leads/confirm/{token}`); none unless `leads.enabled`. Every POST takes an
    `Idempotency-Key` (dripd.http.idempotency)."""
    if not ctx.config.leads.enabled:
        return []
    intake = _Intake(ctx)
    found: list[BaseRoute] = [
        Route(FORM_PATH, intake.show_form, methods=["GET"], name="lead_form"),
        Route(FORM_PATH, intake.submit_form, methods=["POST"]),
        Route(API_PATH, api_endpoint(intake.create), methods=["POST"], name="create_lead"),
    ]
    if ctx.config.leads.double_opt_in:
        found += [
            Route(CONFIRM_PATH, intake.show_confirm, methods=["GET"], name="confirm_lead"),
            Route(CONFIRM_PATH, intake.confirm, methods=["POST"]),
        ]
    return found


class _Unavailable(Exception):
    """The lead could not be stored for a reason the visitor cannot fix."""


class _Intake:
    def __init__(self, ctx: HttpContext) -> None:
        self.ctx = ctx
        settings = ctx.config.leads
        self.tenant = settings.tenant or None
        self.form_rate = settings.form_rate
        self.api_rate = settings.api_rate
        self.proxies = settings.proxies
        self.honeypot = settings.honeypot_field or None
        self.double_opt_in = settings.double_opt_in

    def _count(self, outcome: str) -> None:
        self.ctx.metrics.leads.labels(outcome=outcome).inc()

    async def _take(
        self, db: store.Executor, client: str, rate: tuple[int, timedelta]
    ) -> datetime | None:
        """Take one post of `client`'s shared budget: None when taken, else when to retry.
        A database that fails raises _Unavailable."""
        limit, window = rate
        try:
            budget = await lead_store.take_budget(
                db, client=client, limit=limit, window=window, now=self.ctx.clock.now()
            )
        except DripdError as exc:
            log.error("lead budget unavailable", error=exc.message)
            raise _Unavailable(exc.message) from exc
        if budget.taken:
            return None
        self._count("rate_limited")
        return budget.retry_at or self.ctx.clock.now() + window

    async def _create_lead(self, db: store.Executor, values: Mapping[str, str | None]) -> api.Lead:
        """api.create_lead with the configured sequences, tenant, region, zone and cap.
        InvalidLead, DuplicateLead and MailboxLimited pass (counted); a fault of the setup
        becomes _Unavailable."""
        cfg = self.ctx.config
        confirm = cfg.leads.confirm_sequence if self.double_opt_in else None
        try:
            lead = await api.create_lead(
                db,
                tenant=self.tenant,
                sequence_key=cfg.leads.sequence,
                name=values.get("name") or "",
                email=values.get("email"),
                phone=values.get("phone"),
                notes=values.get("notes"),
                default_region=cfg.recipients.default_region,
                default_timezone=cfg.timezone_of(self.tenant),
                now=self.ctx.clock.now(),
                confirm_sequence=confirm,
                confirm_ttl=cfg.leads.confirm_for if confirm else None,
                max_per_mailbox=cfg.leads.max_per_mailbox_per_day,
            )
        except api.InvalidLead:
            self._count("invalid")
            raise
        except api.DuplicateLead:
            self._count("duplicate")
            raise
        except api.MailboxLimited:
            self._count("mailbox_limited")
            log.info("lead refused: mailbox limit", limit=cfg.leads.max_per_mailbox_per_day)
            raise
        except DripdError as exc:
            # A missing lead sequence (NotFound), one without an active version (Conflict),
            # or the database: the operator's to fix, so the log says what, and the client
            # is only told to come back.
            self._count("unavailable")
            sequence = confirm or cfg.leads.sequence
            log.error("lead not taken", sequence=sequence, error=exc.message)
            raise _Unavailable(exc.message) from exc
        self._count(lead.status.value if lead.status is api.LeadStatus.PENDING else "created")
        log.info(
            "lead created",
            lead_id=str(lead.id),
            status=lead.status.value,
            enrollment_id=str(lead.enrollment_id) if lead.enrollment_id else None,
        )
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
        key_of(request)  # a malformed key is refused before the body is read
        raw = await read_body(request, self.ctx)
        body = decode_json(raw, NewLead)
        values = {"name": body.name, "email": body.email, "phone": body.phone, "notes": body.notes}

        async def run(db: store.Executor) -> Response:
            try:
                return await self._create_json(db, token.id, values)
            except ApiError as exc:
                return api_error_response(exc)

        return await once(request, self.ctx, owner=token.id, body=raw, run=run)

    async def _create_json(
        self, db: store.Executor, token_id: uuid.UUID, values: Mapping[str, str | None]
    ) -> Response:
        unavailable = ApiError(
            503,
            "unavailable",
            "leads cannot be taken right now; try again later",
            headers={"Retry-After": "60"},
        )
        try:
            retry_at = await self._take(db, f"token:{token_id}", self.api_rate)
            if retry_at is not None:
                limit, window = self.api_rate
                raise ApiError(
                    429,
                    "rate_limited",
                    f"this token may add at most {limit} leads in {format_duration(window)}; "
                    "try again later",
                    headers={"Retry-After": _retry_after(retry_at, self.ctx.clock.now())},
                )
            lead = await self._create_lead(db, values)
        except api.DuplicateLead as exc:
            raise ApiError(422, "duplicate", exc.message, field=exc.field) from exc
        except api.MailboxLimited as exc:
            raise ApiError(
                429,
                "mailbox_limited",
                exc.message,
                field=exc.field,
                headers={"Retry-After": _retry_after(exc.retry_at, self.ctx.clock.now())},
            ) from exc
        except api.InvalidLead as exc:
            raise ApiError(422, INVALID, exc.message, field=exc.field) from exc
        except _Unavailable as exc:
            raise unavailable from exc
        return json_response(msgspec.convert(lead, Lead, from_attributes=True), 201)

    # The form.

    async def show_form(self, _request: Request) -> Response:
        return _html(_form_page({}, None, honeypot=self.honeypot))

    async def submit_form(self, request: Request) -> Response:
        try:
            raw, values = await _read_form(
                request, self.ctx.config.http.max_body_bytes, honeypot=self.honeypot
            )
        except _FormRejected as exc:
            return _html(_message_page(exc.title, exc.text), exc.status)
        client = client_key(client_address(request, self.proxies))

        async def run(db: store.Executor) -> Response:
            return await self._submit(db, client, values)

        # Only a thank-you page is kept for a key: a refusal stored for every key would let
        # anyone fill the table.
        return await once(request, self.ctx, owner=None, body=raw, run=run, keep=keep_successes)

    async def _submit(self, db: store.Executor, client: str, values: dict[str, str]) -> Response:
        """One form post: the client's budget, the honeypot, then the lead. The thank-you
        page is the same whether the lead was new, a duplicate, over its mailbox's daily
        cap or a bot's, so the form tells nobody which addresses it knows."""
        unavailable = "We could not take your details right now. Please try again later."
        try:
            retry_at = await self._take(db, client, self.form_rate)
        except _Unavailable:
            return _html(_form_page(values, ("", unavailable), honeypot=self.honeypot), 503)
        if retry_at is not None:
            wait = _retry_after(retry_at, self.ctx.clock.now())
            text = (
                "We have had too many forms from your network. Please try again in "
                f"{_in_words(int(wait))}."
            )
            return _html(_message_page("Too many requests", text), 429, {"Retry-After": wait})
        thanks = _thanks_page(values.get("name", ""), confirming=self.double_opt_in)
        if self.honeypot is not None and values.get(self.honeypot):
            # A field no person sees or reaches was filled in: a bot. It is told what a
            # person is told, and nothing is stored or sent.
            self._count("honeypot")
            log.info("lead form honeypot filled: nothing stored")
            return _html(thanks)
        try:
            await self._create_lead(db, values)
        except api.InvalidLead as exc:
            return _html(_form_page(values, (exc.field, exc.message), honeypot=self.honeypot), 422)
        except (api.DuplicateLead, api.MailboxLimited):
            return _html(thanks)
        except _Unavailable:
            # The form comes back filled in: sending it again later is all the visitor does.
            return _html(_form_page(values, ("", unavailable), honeypot=self.honeypot), 503)
        return _html(thanks)

    # The confirmation link (double opt-in).

    def _confirm_token(self, request: Request) -> ConfirmToken:
        if self.ctx.vault is None:
            raise _FormRejected(
                503,
                "Confirmation is not available",
                "This server cannot read confirmation links right now. Please try later.",
            )
        try:
            token = read_confirm_token(
                self.ctx.vault, request.path_params["token"], now=self.ctx.clock.now()
            )
        except InvalidConfirmToken:
            token = None
        if token is None or token.tenant != self.tenant:
            raise _FormRejected(
                400,
                "This link does not work",
                "The confirmation link is not valid or has expired. Please send the form again.",
            )
        return token

    async def show_confirm(self, request: Request) -> Response:
        """The confirmation page: a button that POSTs to this same URL. Nothing changes on
        GET, so a mail scanner that follows the link confirms nobody."""
        try:
            self._confirm_token(request)
        except _FormRejected as exc:
            return _html(_message_page(exc.title, exc.text), exc.status, _NO_INDEX)
        main = (
            "<h1>Confirm your details</h1>\n"
            "<p>Confirm that you asked us to get in touch.</p>\n"
            # No action: the form posts to the URL of this page, token included.
            '<form method="post">\n<button type="submit">Confirm</button>\n</form>\n'
        )
        return _html(_document("Confirm your details", main), 200, _NO_INDEX)

    async def confirm(self, request: Request) -> Response:
        """Confirm the link's lead: it enters the lead sequence (api.confirm_lead)."""
        try:
            token = self._confirm_token(request)
            raw = await read_limited(request, self.ctx.config.http.max_body_bytes)
        except _FormRejected as exc:
            return _html(_message_page(exc.title, exc.text), exc.status, _NO_INDEX)
        except TooLarge:
            return _html(_message_page("Too long", "The request is too long."), 413, _NO_INDEX)

        async def run(db: store.Executor) -> Response:
            return await self._confirm(db, token)

        return await once(request, self.ctx, owner=None, body=raw, run=run, keep=keep_successes)

    async def _confirm(self, db: store.Executor, token: ConfirmToken) -> Response:
        cfg = self.ctx.config
        try:
            done = await api.confirm_lead(
                db,
                tenant=self.tenant,
                lead_id=token.lead_id,
                sequence_key=cfg.leads.sequence,
                default_timezone=cfg.timezone_of(self.tenant),
                now=self.ctx.clock.now(),
            )
        except DripdError as exc:
            self._count("unavailable")
            log.error("lead not confirmed", sequence=cfg.leads.sequence, error=exc.message)
            text = "We could not confirm your details right now. Please try again later."
            return _html(_message_page("Sorry", text), 503, {**_NO_INDEX, "Retry-After": "60"})
        if done.outcome is api.ConfirmOutcome.EXPIRED:
            text = "This confirmation link has expired. Please send the form again."
            return _html(_message_page("This link has expired", text), 410, _NO_INDEX)
        if done.outcome is api.ConfirmOutcome.CONFIRMED:
            self._count("confirmed")
            assert done.lead is not None
            log.info(
                "lead confirmed",
                lead_id=str(done.lead.id),
                enrollment_id=str(done.lead.enrollment_id),
            )
        text = "Your details are confirmed. We will be in touch."
        return _html(_message_page("Thank you", text), 200, _NO_INDEX)


class _FormRejected(Exception):
    def __init__(self, status: int, title: str, text: str) -> None:
        super().__init__(text)
        self.status, self.title, self.text = status, title, text


def _retry_after(at: datetime, now: datetime) -> str:
    """A `Retry-After` value: whole seconds from `now` until `at`, at least 1."""
    return str(max(1, math.ceil((at - now).total_seconds())))


def _in_words(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds} seconds"
    if seconds < 7200:
        return f"{math.ceil(seconds / 60)} minutes"
    return f"{math.ceil(seconds / 3600)} hours"


async def _read_form(
    request: Request, limit: int, *, honeypot: str | None
) -> tuple[bytes, dict[str, str]]:
    """The raw body and the form's fields (first value of each, the honeypot's included),
    read within `limit` bytes."""
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
    names = {*_FIELDS, honeypot} if honeypot else set(_FIELDS)
    values: dict[str, str] = {}
    for key, value in pairs:
        if key in names:
            values.setdefault(key, value)
    return body, values


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
    # The honeypot: off the screen, not hidden, so a bot that skips hidden inputs fills it.
    ".hp{position:absolute;left:-10000px;top:auto;width:1px;height:1px;overflow:hidden}"
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


# The confirmation link's token is the lead's: no search engine indexes its pages.
_NO_INDEX = {"X-Robots-Tag": "noindex"}


def _html(body: str, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return HTMLResponse(body, status_code=status, headers={**_HEADERS, **(headers or {})})


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


def _honeypot(name: str) -> str:
    """A field for bots only: off the screen, hidden from screen readers (`aria-hidden`),
    out of the tab order and never autofilled; a person leaves it empty."""
    return (
        '<div class="hp" aria-hidden="true">\n'
        f'<label for="{name}">Leave this field empty</label>\n'
        f'<input id="{name}" name="{name}" type="text" tabindex="-1" autocomplete="off" '
        'value="">\n'
        "</div>\n"
    )


def _form_page(
    values: dict[str, str], error: tuple[str, str] | None, *, honeypot: str | None = None
) -> str:
    """The lead form with `values` filled in and, for `(field, message)`, the error shown
    beside that field and in a summary that links to it (field "": the form's as a whole);
    with the `honeypot` field (config `leads.honeypot_field`) when it is named."""
    field, message = error or ("", "")
    reason = _reason(message, field) if error else None
    summary = ""
    if reason is not None:
        summary = (
            '<div class="summary" role="alert" aria-labelledby="summary-title">\n'
            '<h2 id="summary-title">There is a problem</h2>\n'
            "<ul><li>"
            + (
                f'<a href="#{escape(field, quote=True)}">{escape(reason)}</a>'
                if field
                else escape(reason)
            )
            + "</li></ul>\n"
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
        f"{_honeypot(honeypot) if honeypot else ''}"
        '<button type="submit">Send</button>\n'
        "</form>\n"
    )
    return _document(("Error: " if error else "") + "Get in touch", main)


def _thanks_page(name: str, *, confirming: bool) -> str:
    """The page after a post, the same whatever became of it (a new lead, a duplicate, one
    over its mailbox's cap, a bot's): it tells nobody which addresses the form knows."""
    shown = name.strip()[: api.LEAD_NAME_MAX]
    text = (
        "If these details are new to us, we have sent you a message to confirm them: "
        "follow its link to finish."
        if confirming
        else "We have your details and will be in touch."
    )
    heading = f"Thanks, {escape(shown)}" if shown else "Thank you"
    return _document("Thank you", f"<h1>{heading}</h1>\n<p>{escape(text)}</p>\n")


def _message_page(title: str, text: str) -> str:
    return _document(title, f"<h1>{escape(title)}</h1>\n<p>{escape(text)}</p>\n")
