"""Templates fail loudly on undefined values, never print Python's None/True/False, escape
the HTML part and keep header values on one line."""

from __future__ import annotations

import inspect
import itertools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from liquid import Environment
from liquid.exceptions import FilterArgumentError, UndefinedError
from support import SmtpSink, add_adapter, apply_text, running_daemon, smtp_config, wait_for

from dripd import api
from dripd.content.liquid import TemplateError, compile_template
from dripd.db import store
from dripd.engine.preview import preview

# Every filter python-liquid's default environment registers: a filter added by an upgrade
# is covered without touching this file.
BUILTIN_FILTERS = sorted(Environment().filters)

INPUTS: tuple[object, ...] = ("Ada", 3, [{"a": "x", "n": 1}, {"a": "y", "n": 2}])
ARGUMENTS: tuple[object, ...] = ("a", 2)
# What Liquid prints for each value of the null/boolean matrix (what it must behave as).
LIQUID_SPELLING: dict[str, tuple[object, object]] = {
    "nil": (None, ""),
    "true": (True, "true"),
    "false": (False, "false"),
    "array": ([None, True, False, "a"], ["", "true", "false", "a"]),
}
PYTHON_SPELLING = re.compile(r"(?i:none)|True|False")


def render(source: str, field: str = "text", **context: Any) -> str:
    return compile_template(source, field=field).render(context)


def failure(source: str, field: str = "text", **context: Any) -> TemplateError:
    with pytest.raises(TemplateError) as info:
        render(source, field, **context)
    return info.value


def _calls(name: str) -> Iterator[tuple[str, list[str]]]:
    """For each number of arguments `name` takes: a template calling it on `v` with `a0…`,
    and its variables (input first)."""
    params = [
        p
        for p in inspect.signature(Environment().filters[name]).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ][1:]
    required = sum(1 for p in params if p.default is p.empty)
    for count in range(required, len(params) + 1):
        names = [f"a{i}" for i in range(count)]
        call = f"{name}: {', '.join(names)}" if names else name
        yield f"{{{{ v | {call} }}}}", ["v", *names]


def _contexts(variables: list[str]) -> Iterator[dict[str, object]]:
    """Defined values for `variables`: every input with every mix of arguments."""
    for value in INPUTS:
        for args in itertools.product(ARGUMENTS, repeat=len(variables) - 1):
            yield dict(zip(variables, (value, *args), strict=True))


def _outcome(source: str, field: str, context: dict[str, object]) -> str | TemplateError:
    """The rendered text, or the TemplateError (any other exception fails the test)."""
    try:
        return render(source, field, **context)
    except TemplateError as exc:
        return exc


def _head(exc: TemplateError) -> str:
    return str(exc).split(" (line:column", 1)[0]


# --- every built-in filter ----------------------------------------------------------------


def test_every_builtin_filter_is_covered() -> None:
    assert len(BUILTIN_FILTERS) > 50
    assert {"floor", "append", "date", "join", "default", "safe"} <= set(BUILTIN_FILTERS)


@pytest.mark.parametrize("field", ["text", "html"])
@pytest.mark.parametrize("name", [n for n in BUILTIN_FILTERS if n != "default"])
def test_an_undefined_input_or_argument_fails_through_every_filter(name: str, field: str) -> None:
    for source, variables in _calls(name):
        for context in _contexts(variables):
            for missing in variables:
                defined = {k: v for k, v in context.items() if k != missing}
                error = failure(source, field, **defined)
                # The same error as printing it: the class and the message.
                assert isinstance(error.__cause__, UndefinedError), (source, missing, error)
                printed = failure(f"{{{{ {missing} }}}}", field)
                assert _head(error) == _head(printed) == f"{field}: '{missing}' is undefined"


@pytest.mark.parametrize("field", ["text", "html"])
@pytest.mark.parametrize("value", sorted(LIQUID_SPELLING))
@pytest.mark.parametrize("name", BUILTIN_FILTERS)
def test_nil_and_booleans_never_print_as_python_through_every_filter(
    name: str, value: str, field: str
) -> None:
    python, liquid = LIQUID_SPELLING[value]
    for source, variables in _calls(name):
        for context in _contexts(variables):
            for position in variables:
                got = _outcome(source, field, {**context, position: python})
                spelled = _outcome(source, field, {**context, position: liquid})
                where = (source, position, context)
                if isinstance(got, str) and got != spelled:
                    # Text Liquid itself can make (`true | capitalize` is "True") is fine.
                    assert not PYTHON_SPELLING.search(got), (*where, got)
                if value == "nil" and isinstance(spelled, str):
                    # nil is the empty string: it never fails where "" renders.
                    assert isinstance(got, str), (*where, got)


def test_default_fills_undefined_and_nil_values() -> None:
    assert render("{{ missing | default: 'there' }}") == "there"
    assert render("{{ nothing | default: 'there' }}", nothing=None) == "there"
    assert render("{{ name | default: missing }}", name="Ada") == "Ada"
    # A chain of fallbacks: the first defined one wins; none at all still fails.
    assert render("{{ a | default: b | default: 'c' }}") == "c"
    assert render("{{ a | default: b | default: 'c' }}", b="B") == "B"
    assert "'b' is undefined" in str(failure("{{ a | default: b }}"))
    assert "'b' is undefined" in str(failure("{{ a | default: b | upcase }}"))


# --- the cases of the issue ---------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "Hello {{ username | floor }}",
        "{{ username | plus: 1 }}",
        "{{ 3 | times: username }}",
        "{{ username | date: '%Y' }}",
        "{{ 'now' | date: username }}",
        "{{ username | size }}",
        "{{ username | upcase }}",
        "{{ 'Hi ' | append: username }}",
        "{% assign n = username | round %}{{ n }}",
    ],
)
def test_an_undefined_variable_fails_the_step_through_a_filter(source: str) -> None:
    error = failure(source)
    assert _head(error) == "text: 'username' is undefined"


def test_nil_renders_as_the_empty_string() -> None:
    assert render("{{ 'Hi ' | append: first_name }}", first_name=None) == "Hi "
    assert render("{{ first_name | prepend: 'Hi ' }}|{{ first_name }}", first_name=None) == "Hi |"
    assert render("{{ born | date: '%Y' }}", born=None) == ""
    assert render("{{ tags | join: ', ' }}", tags=None) == ""
    users = [{"nick": "Ann"}, {"nick": None}, {"nick": "Bo"}]
    assert render("{{ users | map: 'nick' | join: ', ' }}", users=users) == "Ann, , Bo"
    assert render("{{ users | map: 'nick' | compact | join: ', ' }}", users=users) == "Ann, Bo"


def test_values_print_as_liquid_spells_them() -> None:
    context: dict[str, Any] = {
        "yes": True,
        "no": False,
        "xs": ["a", None, True, 1],
        "h": {"a": None, "b": False},
    }
    source = "{{ yes }} {{ no }} {{ xs }} {{ xs | join: ',' }} {{ h }} {% echo no %}"
    assert render(source, **context) == 'true false atrue1 a,,true,1 {"a": null, "b": false} false'
    assert render("{{ yes | append: no }} {{ 'x' | append: yes }}", yes=True, no=False) == (
        "truefalse xtrue"
    )


def test_undefined_stays_falsy_in_if_tests() -> None:
    source = "{% if missing %}a{% else %}b{% endif %}{% unless missing %}c{% endunless %}"
    assert render(source) == "bc"
    assert render("{% if missing == nil %}nil{% endif %}") == "nil"
    assert render("{% if missing %}{{ missing | upcase }}{% endif %}") == ""


@pytest.mark.parametrize(
    ("source", "context"),
    [
        ("{{ 'abc' | sum }}", {}),  # decimal.InvalidOperation
        ("{{ v | base64_decode }}", {"v": "////"}),  # UnicodeDecodeError
        ("{{ 'Ada' | compact: 5 }}", {}),  # IndexError
    ],
)
def test_a_filters_python_error_fails_the_step(source: str, context: dict[str, Any]) -> None:
    error = failure(source, **context)
    assert isinstance(error.__cause__, FilterArgumentError)
    assert isinstance(error.__cause__.__cause__, ArithmeticError | LookupError | ValueError)


# --- escaping -----------------------------------------------------------------------------

LINK = '<a href="https://phish.example/reset">Reset your password</a>'
ESCAPED = "&lt;a href=&#34;https://phish.example/reset&#34;&gt;Reset your password&lt;/a&gt;"


@pytest.mark.parametrize("field", ["html", "mjml"])
def test_html_is_escaped_unless_marked_safe(field: str) -> None:
    assert render("<p>Hi {{ name }}</p>", field, name=LINK) == f"<p>Hi {ESCAPED}</p>"
    assert render("{{ name | upcase | safe }}", field, name="<b>") == "<B>"
    assert render("{{ name | safe }}", field, name=LINK) == LINK
    # Markup the template itself writes is the author's: it is kept.
    assert render("{{ '<b>' }}{{ name | append: '</b>' }}", field, name="<i>") == (
        "<b>&lt;i&gt;</b>"
    )
    assert render("{{ name | escape }}", field, name="<&>") == "&lt;&amp;&gt;"  # once
    assert render("{{ xs }}", field, xs=["<", None]) == "&lt;"


@pytest.mark.parametrize("field", ["subject", "text", "body", "to"])
def test_other_fields_are_plain_text(field: str) -> None:
    assert render("Hi {{ name }} & co", field, name=LINK) == f"Hi {LINK} & co"


# --- header folding -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "brk", ["\r\n", "\n", "\r", "\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x00", "\x1b"]
)
@pytest.mark.parametrize("field", ["subject", "to"])
def test_a_header_value_is_folded_to_one_line(field: str, brk: str) -> None:
    name = f"{brk} Ada {brk}{brk}  Lovelace\t{brk}"
    assert render("Hi {{ name }} ", field, name=name) == "Hi Ada Lovelace"
    assert render("Hi  {{ 'Ada' }}\tthere", field) == "Hi  Ada\tthere"  # no break: kept


@pytest.mark.parametrize("field", ["text", "html", "body"])
def test_a_body_keeps_its_line_breaks(field: str) -> None:
    assert render("Hi {{ name }}\n", field, name="Ada\r\nLovelace") == "Hi Ada\r\nLovelace\n"


# --- through the daemon and `dripd preview` ------------------------------------------------

LEADS = """
[sequence]
key = "leads"

[[steps]]
key = "hello"
channel = "email"
subject = "Thanks {{ name }}{% if notes %}: {{ notes }}{% endif %}"
text = "Hi {{ name }},\\n{{ notes | default: 'no notes' }}"
html = "<p>Hi {{ name }}</p><p>{{ notes | newline_to_br }}</p><p>{{ phone | append: notes }}</p>"
"""


async def _lead(pool: asyncpg.Pool) -> api.Lead:
    await apply_text(pool, LEADS)
    return await api.create_lead(
        pool,
        tenant=None,
        sequence_key="leads",
        name=LINK,
        email="ada@example.com",
        phone=None,
        notes="line one\r\nline <two>",
    )


async def test_preview_renders_a_lead_by_the_rules(dsn: str, pool: asyncpg.Pool) -> None:
    lead = await _lead(pool)
    assert lead.enrollment_id is not None
    enrollment = await api.get_enrollment(pool, tenant=None, enrollment_id=lead.enrollment_id)
    conn = await store.connect(dsn)
    try:
        (step,) = await preview(
            conn, tenant=None, sequence_key="leads", subscriber_id="x", data=enrollment.data
        )
    finally:
        await conn.close()
    assert step["subject"] == f"Thanks {LINK}: line one line <two>"
    assert step["text"] == f"Hi {LINK},\nline one\r\nline <two>"
    assert step["html"] == (
        f"<p>Hi {ESCAPED}</p><p>line one<br />\nline &lt;two&gt;</p>"
        "<p>line one\r\nline &lt;two&gt;</p>"
    )


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    s = SmtpSink().start()
    yield s
    s.stop()


async def test_a_sent_mail_escapes_its_html_and_folds_its_subject(
    dsn: str, pool: asyncpg.Pool, sink: SmtpSink, tmp_path: Path
) -> None:
    await add_adapter(
        pool, name="smtp", channel="email", provider="smtp", config=smtp_config(sink.port)
    )
    async with running_daemon(dsn, tmp_path):
        await _lead(pool)
        await wait_for(lambda: sink.count() == 1)
    (mail,) = sink.messages
    assert mail["Subject"] == f"Thanks {LINK}: line one line <two>"
    part = mail.get_body(("html",))
    assert part is not None
    html = part.get_content()
    assert ESCAPED in html
    assert "<a href" not in html
