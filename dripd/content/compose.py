"""A step's message fields from its templates: Liquid → spintax → MJML → text part.

DESIGN.md orders the render stage Liquid → MJML → spintax; dripd resolves spintax before
compiling MJML, so that the CSS the compiler writes (`@media … { … }`) never goes through
spintax, and the text part generated from the HTML says the same words as the HTML.
Short links and headers come after, when the message is sent (dripd.engine.pipeline).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, Final

import anyio

from dripd.content.liquid import (
    HEADER_FIELDS,
    HEADER_PREFIX,
    Template,
    TemplateError,
    fold_header,
    is_spun,
    render_fields,
)
from dripd.content.mjml import compile_mjml
from dripd.content.spintax import SpintaxError, spin
from dripd.content.text import html_to_text

#: How many extra headers one step may set.
MAX_HEADERS: Final = 50
#: Headers dripd writes itself (or the provider must): a step may not set them.
RESERVED_HEADERS: Final = frozenset(
    {
        "bcc",
        "cc",
        "content-transfer-encoding",
        "content-type",
        "date",
        "dkim-signature",
        "from",
        "list-unsubscribe",
        "list-unsubscribe-post",
        "message-id",
        "mime-version",
        "received",
        "reply-to",
        "return-path",
        "sender",
        "subject",
        "to",
    }
)
# RFC 5322 §3.6.8: a field name is printable US-ASCII but the colon.
_HEADER_NAME: Final = re.compile(r"[\x21-\x39\x3b-\x7e]{1,76}")


def header_problem(name: str) -> str | None:
    """Why `name` cannot be a step's extra header (not an RFC 5322 field name, or one dripd
    sets itself), or None."""
    if not _HEADER_NAME.fullmatch(name):
        return (
            f"{name[:80]!r} is not a header name (printable ASCII without ':', at most 76 "
            "characters)"
        )
    lowered = name.lower()
    if lowered in RESERVED_HEADERS or lowered.startswith("x-dripd-"):
        return (
            "dripd sets this header itself (use the step's `from`, `reply_to`, `subject` or "
            "`to`, or the unsubscribe settings)"
        )
    return None


#: The fields a Python template may return (`headers` is a table of extra headers).
PYTHON_FIELDS: Final = frozenset(
    {"subject", "text", "html", "mjml", "body", "to", "from", "reply_to", "headers"}
)


async def compose(
    templates: Mapping[str, Template],
    context: Mapping[str, Any],
    *,
    limiter: anyio.CapacityLimiter,
    made: Mapping[str, str] | None = None,
    spintax: Callable[[str], bytes] | None = None,
    on_unbalanced: Callable[[str], None] = lambda field: None,
    text_part: bool = False,
    keep_mjml: bool = False,
) -> dict[str, str]:
    """The message fields of a step: `templates` rendered with `context` (see
    `render_fields`), then `made` (a Python template's fields, which win), then

    - spintax, when `spintax` gives each field's seed (see dripd.content.spintax): a field
      whose rendered braces do not balance (they came from data) is left as it is and
      `on_unbalanced(field)` is told;
    - `mjml` compiled into `html` (dripd.content.mjml);
    - with `text_part`, a `text` made from the `html` when there is none (RFC 2046
      multipart/alternative wants both).

    With `keep_mjml`, `mjml` is left to compile (`finish_mjml`) once its links are short:
    mrml's HTML is seven times the MJML's size, and reading its links took longer than
    compiling it.

    Raises TemplateError (a permanent failure of the step) for a render or a compile that
    fails."""
    fields = await render_fields(templates, context, limiter=limiter)
    if made:
        fields.update(made)
    checked = not (made and "mjml" in made)
    if keep_mjml and "mjml" in fields:
        finish(fields, spintax=spintax, on_unbalanced=on_unbalanced, checked=checked, mjml=False)
        if not checked:
            compile_mjml(fields["mjml"])  # refused now, before anything else happens
        return fields
    return finish(
        fields,
        spintax=spintax,
        on_unbalanced=on_unbalanced,
        text_part=text_part,
        checked=checked,
    )


def finish(
    fields: dict[str, str],
    *,
    spintax: Callable[[str], bytes] | None = None,
    on_unbalanced: Callable[[str], None] = lambda field: None,
    text_part: bool = False,
    checked: bool = True,
    mjml: bool = True,
) -> dict[str, str]:
    """Spintax, MJML and the text part on rendered `fields` (see `compose`), in place.
    `checked`: an `mjml` field is the render of a template checked at apply (see
    `compile_mjml`), not a Python template's. `mjml` False: spintax only."""
    if spintax is not None:
        for name, value in fields.items():
            if is_spun(name):
                try:
                    fields[name] = spin(value, spintax(name))
                except SpintaxError:
                    on_unbalanced(name)
    if not mjml:
        return fields
    if "mjml" in fields:
        fields["html"] = compile_mjml(fields.pop("mjml"), checked=checked)
    if text_part and "html" in fields and not fields.get("text", "").strip():
        fields["text"] = html_to_text(fields["html"])
    return fields


def python_fields(result: object, *, path: str) -> dict[str, str]:
    """A Python template's answer as template fields: a mapping of PYTHON_FIELDS to text
    (`headers`: a mapping of header names to text, as `header:<Name>` fields). TemplateError
    naming `path` and the key for anything else."""
    if not isinstance(result, Mapping):
        raise TemplateError(
            f"Python template {path!r} returned {type(result).__name__}, not a mapping of "
            "message fields"
        )
    fields: dict[str, str] = {}
    for key, value in result.items():
        if key not in PYTHON_FIELDS:
            raise TemplateError(
                f"Python template {path!r} returned the key {str(key)[:80]!r}; it may return "
                + ", ".join(sorted(PYTHON_FIELDS))
            )
        if value is None:
            continue
        if key == "headers":
            if not isinstance(value, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()
            ):
                raise TemplateError(
                    f"Python template {path!r}: `headers` must map header names to text"
                )
            if len(value) > MAX_HEADERS:
                raise TemplateError(f"Python template {path!r}: at most {MAX_HEADERS} headers")
            for name, text in value.items():
                problem = header_problem(name)
                if problem is not None:
                    raise TemplateError(
                        f"Python template {path!r}: header {name[:80]!r}: {problem}"
                    )
                fields[f"{HEADER_PREFIX}{name}"] = fold_header(text)
        elif isinstance(value, str):
            fields[key] = fold_header(value) if key in HEADER_FIELDS else value
        else:
            raise TemplateError(
                f"Python template {path!r}: `{key}` must be text, not {type(value).__name__}"
            )
    return fields
