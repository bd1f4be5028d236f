"""Fuzzing sequence files (hypothesis): valid files mutated (wrong types, huge and negative
integers, NUL and odd Unicode, trailing newlines, bad durations, deep nesting, random
templates, damaged text) either apply or are refused with a SequenceFileError naming the
file and where in it; never another exception, and never "Postgres refused"."""

from __future__ import annotations

import asyncio
import json
import math
import re
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dripd.content.liquid import TemplateError, compile_template
from dripd.db import store
from dripd.errors import SequenceFileError
from dripd.inputs import text_fault
from dripd.sequences import load_text

SOURCE = "fuzz.toml"
# What a refusal starts with: the file, then where in it.
WHERE = re.compile(
    r"fuzz\.toml: (not valid TOML: |line \d+: |key '|step |transition #\d+|hooks: "
    r"|a sequence needs at least one \[\[steps\]\])"
)
INT32 = 2**31 - 1

# --- what a file holds ------------------------------------------------------------------------

KEYS = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,12}", fullmatch=True)
EVENTS = st.sampled_from(["signed_up", "activated", "purchased", "opened"])
TIMEOUTS = st.sampled_from(["90s", "15m", "2h", "3d", "1w", "250ms", "3650d"])
DURATIONS = TIMEOUTS | st.just("0s")
BAD_DURATIONS = st.sampled_from(
    [
        "9999999999w",
        "١٢s",
        "１２s",
        "-1s",
        "1.5h",
        "",
        " ",
        "1d\n",
        "0x10s",
        "1" + "0" * 40 + "s",
        "3651d",
        "s",
        "12",
    ]
)
ODD = st.sampled_from(
    ["\x00", "\n", "\r\n", "\u2028", "\u202e", "\ufeff", "\U0001f600", "e\u0301", "\ud800", "\x7f"]
)


class Digits(str):
    """An integer too long for Python's `str(int)`, written as its digits."""


HUGE = st.sampled_from(
    [0, -1, 2**31 - 1, 2**31, -(2**31), 2**63, 2**64, -(2**63) - 1, 10**30, Digits("9" * 4400)]
)
GOOD_FRAGMENTS = [
    "Hi {{ first_name }}",
    "{{ first_name | default: 'there' | capitalize }}",
    "{% if plan == 'pro' %}pro{% else %}free{% endif %}",
    "{% for x in items %}{{ x }},{% endfor %}",
    "{% for i in (1..n) %}{{ i }}{% endfor %}",
    "{% for i in (1..3) reversed offset: 1 limit: 5 %}{{ i }}{% endfor %}",
    "{% for i in (1..n) limit: 2 offset: n %}{{ i }}{% endfor %}",
    "{% tablerow i in (1..4) cols: 2 %}{{ i }}{% endtablerow %}",
    "{% liquid\nassign a = 1\necho a %}",
    "{{ s | replace: 'a', s }}",
    "{{ items | join: s }}",
    "{{ items | uniq | sort | size }}",
    "{{ items | map: items }}",
    "{% assign r = (1..n) %}{{ r | join: ',' }}",
    "{{ n | times: n | times: n }}",
    "{% capture c %}{{ s }}{% endcapture %}{{ c | size }}",
    "{% cycle 'a', 'b' %}{% increment k %}",
    "{{ missing }}",
    "{% raw %}{{ x }}{% endraw %}",
    "{{ s | date: '%Y' }}",
    "{{ 'x' | split: '' | first }}",
]
BAD_FRAGMENTS = [
    "{% for i in (1..30000000) %}x{% endfor %}",
    "{% include 'footer' %}",
    "{% render 'footer' %}",
    "{{ hooks.crm.score }}",
    "{{",
    "{% if %}",
    "{% endfor %}",
    "{% if a %}" * 31 + "{% endif %}" * 31,
]
# Mostly templates that compile: one fragment in ten cannot.
FRAGMENTS = st.sampled_from(GOOD_FRAGMENTS * 3 + BAD_FRAGMENTS)
TEMPLATES = st.lists(FRAGMENTS | st.text(max_size=8), max_size=4).map("".join)
WINDOWS = st.sampled_from(
    [
        {"days": "mon-fri", "hours": "09:00-18:00"},
        {"hours": "08:00-20:00"},
        {"days": "mon-fri", "hours": "09:00-18:00"},
        {"days": "sat,sun", "hours": "10:00-12:00"},
        {"hours": "25:00-26:00"},
    ]
).map(dict)  # a fresh dict each time: the mutations change what they are given
CONDITIONS = st.sampled_from(
    [
        "data.plan == 'pro'",
        "events.opened.count > 2",
        "hooks.crm.score > 10",
        "data.x == 99999999999999999999999999999",
        "not (data.a and data.b)",
        "data.plan ==",
        "(" * 70 + "1" + ")" * 70,
        "now - 3d > data.since",
    ]
)


@st.composite
def steps(draw: st.DrawFn, key: str) -> dict[str, Any]:
    kind = draw(st.sampled_from(["email", "sms", "webhook", "wait"]))
    step: dict[str, Any] = {"key": key}
    if kind == "wait":
        step["wait_for"] = {"event": draw(EVENTS), "timeout": draw(TIMEOUTS)}
        return step
    step["channel"] = kind
    if kind == "email":
        step.update(subject=draw(TEMPLATES), text=draw(TEMPLATES))
    else:
        step["body"] = draw(TEMPLATES)
    if kind == "webhook":
        step["to"] = "https://hooks.example.com/{{ subscriber_id }}"
    optional = {
        "after": DURATIONS,
        "max_attempts": st.integers(1, 1000),
        "on_failure": st.sampled_from(["fail", "continue"]),
        "window": WINDOWS,
        "when": CONDITIONS,
        "cron": st.sampled_from(["0 9 * * *", "*/15 * * * mon-fri"]),
        "require_verified": st.booleans(),
    }
    for name in draw(st.lists(st.sampled_from(sorted(optional)), max_size=3, unique=True)):
        step[name] = draw(optional[name])
    if kind == "sms" and draw(st.booleans()):
        step["max_length"] = draw(st.integers(1, 1600))
    return step


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    """A sequence file as tomllib would read it; most of them valid."""
    keys = draw(st.lists(KEYS, min_size=1, max_size=4, unique=True))
    sequence: dict[str, Any] = {"key": draw(KEYS)}
    optional = {
        "name": st.text(max_size=20),
        "tenant": st.sampled_from(["acme", "globex"]),
        "timezone": st.sampled_from(["Europe/Berlin", "UTC", "America/New_York", "Mars/Base"]),
        "reenroll": st.sampled_from(["never", "after_exit", "always"]),
        "entry_events": st.lists(
            EVENTS.filter(lambda e: e != "purchased"), max_size=2, unique=True
        ),
        "exit_events": st.just(["purchased"]).map(list),
        "window": WINDOWS,
    }
    for name in draw(st.lists(st.sampled_from(sorted(optional)), max_size=4, unique=True)):
        sequence[name] = draw(optional[name])
    doc: dict[str, Any] = {"sequence": sequence, "steps": [draw(steps(k)) for k in keys]}
    transitions = draw(
        st.lists(
            st.fixed_dictionaries(
                {"from": st.sampled_from(keys)},
                optional={
                    "to": st.sampled_from(keys),
                    "priority": st.integers(-5, 5),
                    "when": CONDITIONS,
                },
            ),
            max_size=3,
        )
    )
    if transitions:
        doc["transitions"] = transitions
    if draw(st.booleans()):
        doc["hooks"] = {
            "crm": {
                "url": "https://crm.example.com/{{ subscriber_id }}",
                "signing_secret": "crm",
                "timeout": draw(st.sampled_from(["1s", "5s", "30s", "250ms"])),
            }
        }
    return doc


def _places(value: Any, out: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Every (container, key or index) in `value`."""
    if isinstance(value, dict):
        for key, item in value.items():
            out.append((value, key))
            _places(item, out)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            out.append((value, index))
            _places(item, out)
    return out


def _nested(depth: int, leaf: Any, as_table: bool) -> Any:
    for _ in range(depth):
        leaf = {"a": leaf} if as_table else [leaf]
    return leaf


@st.composite
def weird_values(draw: st.DrawFn, old: Any) -> Any:
    choice = draw(st.integers(0, 8))
    if choice == 0:
        return draw(HUGE)
    if choice == 1:
        return draw(st.floats(allow_nan=True, allow_infinity=True))
    if choice == 2:
        return draw(st.booleans())
    if choice == 3:
        return draw(BAD_DURATIONS)
    if choice == 4:
        return _nested(draw(st.integers(2, 60)), old, draw(st.booleans()))
    if choice == 5:
        return draw(st.lists(st.integers(), max_size=3))
    if choice == 6:
        return datetime(2026, 1, 1, tzinfo=UTC)
    if choice == 7:
        return draw(st.text(max_size=12))
    return {}


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    doc = draw(documents())
    for _ in range(draw(st.sampled_from([0, 1, 1, 2, 3]))):
        places = _places(doc, [])
        container, key = places[draw(st.integers(0, len(places) - 1))]
        old = container[key]
        how = draw(st.integers(0, 5))
        if how == 0:  # a value of another type or size
            container[key] = draw(weird_values(old))
        elif how == 1 and isinstance(old, str):  # an odd character inside
            at = draw(st.integers(0, len(old)))
            container[key] = old[:at] + draw(ODD) + old[at:]
        elif how == 2 and isinstance(old, str):  # a trailing newline
            container[key] = old + "\n"
        elif how == 3 and isinstance(container, dict):  # an odd or unknown key
            container[key + draw(ODD | st.just("_extra"))] = container.pop(key)
        elif how == 4 and isinstance(container, dict):
            del container[key]
        elif how == 5 and isinstance(old, int) and not isinstance(old, bool):
            container[key] = draw(HUGE)
    return doc


@st.composite
def hostile(draw: st.DrawFn) -> dict[str, Any]:
    """A file with one thing Postgres would refuse: a NUL or a lone surrogate in some text
    (a value or a key), a trailing newline, or an integer too large for its column."""
    doc = draw(documents())
    places = [(c, k) for c, k in _places(doc, []) if isinstance(c[k], str | int)]
    container, key = places[draw(st.integers(0, len(places) - 1))]
    old = container[key]
    if isinstance(old, bool | int):
        container[key] = draw(HUGE)
    elif isinstance(container, dict) and draw(st.booleans()):
        container[key + draw(st.sampled_from(["\x00", "\ud800", "\n"]))] = container.pop(key)
    else:
        container[key] = old + draw(st.sampled_from(["\x00", "\ud800", "\n"]))
    return doc


# --- TOML text --------------------------------------------------------------------------------

_BARE = re.compile(r"[A-Za-z0-9_-]+")


def _key(name: str) -> str:
    return name if _BARE.fullmatch(name) else json.dumps(name, ensure_ascii=False)


def toml(value: Any) -> str:
    """`value` as an inline TOML value; strings keep odd characters as they are."""
    if isinstance(value, Digits):
        return str.__str__(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(value, list):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{_key(k)} = {toml(v)}" for k, v in value.items()) + "}"


def document_text(doc: dict[str, Any]) -> str:
    """`doc` as a sequence file: [sequence] and [hooks.*] as tables, steps and
    transitions as arrays of tables (where their shape allows), the rest inline."""
    lines = [f"{_key(k)} = {toml(v)}" for k, v in doc.items() if not isinstance(v, dict | list)]
    for name, value in doc.items():
        tables = isinstance(value, list) and value and all(isinstance(v, dict) for v in value)
        if isinstance(value, dict):
            lines.append(f"[{_key(name)}]")
            lines.extend(f"{_key(k)} = {toml(v)}" for k, v in value.items())
        elif tables:
            for item in value:
                lines.append(f"[[{_key(name)}]]")
                lines.extend(f"{_key(k)} = {toml(v)}" for k, v in item.items())
        elif isinstance(value, list):
            lines.insert(0, f"{_key(name)} = {toml(value)}")
    return "\n".join(lines) + "\n"


@st.composite
def damaged(draw: st.DrawFn, text: str) -> str:
    """`text`, sometimes with its characters damaged: cut, doubled or with others put in."""
    how = draw(st.integers(0, 9))
    at = draw(st.integers(0, len(text)))
    if how == 0:
        return text[:at]
    if how == 1:
        return text[:at] + draw(st.text(max_size=4) | ODD) + text[at:]
    if how == 2:
        return text[:at] + text[at : at + 40] * 2 + text[at + 40 :]
    if how == 3:
        return text + "deep = " + "[" * 3000 + "]" * 3000 + "\n"
    return text


FILES = mutated().flatmap(lambda doc: damaged(document_text(doc)))

# --- the properties ---------------------------------------------------------------------------

DATA = st.fixed_dictionaries(
    {
        "first_name": st.sampled_from(["Ada", None, "\u202eevil"]),
        "plan": st.sampled_from(["pro", "free"]),
        "items": st.lists(st.integers(-5, 5) | st.text(max_size=3), max_size=6),
        "s": st.text(max_size=6),
        "n": st.sampled_from([0, 3, 10_000, 10_001, 10**18]),
        "hooks": st.just({"crm": {"score": 1}}),
        "subscriber_id": st.just("s1"),
    }
)


def check_refusal(exc: SequenceFileError) -> None:
    message = exc.message
    assert WHERE.match(message), message
    assert "Postgres" not in message


def check_names_field(exc: TemplateError, field: str) -> None:
    assert str(exc).startswith(f"{field}: "), exc


def check_accepted(version: Any, data: dict[str, Any]) -> None:
    """What `apply` would store, and what the daemon would render of it, is sound."""
    msgspec.json.encode(version.source)
    for value in _strings(version.source):
        assert text_fault(value) is None, repr(value)
    for step in version.steps:
        assert step.max_attempts is None or 0 < step.max_attempts <= 1000
        assert step.max_length is None or 0 < step.max_length <= INT32
        for field, source in step.template.items():
            template = compile_template(source, field=field)
            try:
                template.render(data, timeout=0.25)
            except TemplateError as exc:
                event(f"render refused: {str(exc)[:50]}")
    for transition in version.transitions:
        assert -INT32 <= transition.priority <= INT32


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(text=FILES, data=DATA)
def test_a_mutated_file_applies_or_is_refused_naming_where(text: str, data: dict[str, Any]) -> None:
    try:
        version = load_text(text, source=SOURCE)
    except SequenceFileError as exc:
        event("refused")
        check_refusal(exc)
        return
    event("accepted")
    check_accepted(version, data)


@FUZZ
@given(doc=documents(), data=DATA)
def test_an_unmutated_file_applies_unless_its_template_or_condition_is_bad(
    doc: dict[str, Any], data: dict[str, Any]
) -> None:
    """The skeleton itself: refused only for what its random parts may hold."""
    try:
        version = load_text(document_text(doc), source=SOURCE)
    except SequenceFileError as exc:
        check_refusal(exc)
        event(exc.message.split(": ")[-1][:30])
        return
    check_accepted(version, data)


@FUZZ
@given(
    source=st.lists(FRAGMENTS | st.text(max_size=12) | ODD, max_size=8).map("".join),
    field=st.sampled_from(["subject", "text", "html", "body", "to"]),
    data=DATA,
)
def test_a_random_template_compiles_and_renders_or_says_why(
    source: str, field: str, data: dict[str, Any]
) -> None:
    try:
        template = compile_template(source, field=field)
    except TemplateError as exc:
        check_names_field(exc, field)
        event("refused at apply")
        return
    try:
        rendered = template.render(data, timeout=0.25)
    except TemplateError as exc:
        check_names_field(exc, field)
        event("refused at send")
        return
    event("rendered")
    assert len(rendered) <= 1_048_576


async def _apply(dsn: str, text: str) -> str:
    """`dripd apply`'s validation and write for `text`: "applied" or the refusal."""
    try:
        version = load_text(text, source=SOURCE)
    except SequenceFileError as exc:
        check_refusal(exc)
        return "refused"
    conn = await asyncpg.connect(dsn)
    try:
        async with store.transaction(conn) as tx:
            await store.apply_version(tx, version, now=datetime.now(UTC))
    finally:
        await conn.close()
    return "applied"


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(text=st.one_of(FILES, documents().map(document_text), hostile().map(document_text)))
def test_what_validation_accepts_postgres_stores(dsn: str, text: str) -> None:
    # Any DripdError here (Refused: "Postgres refused: …") fails the test.
    event(asyncio.run(_apply(dsn, text)))


@pytest.mark.parametrize(
    "doc",
    [
        {"sequence": {"key": "x\x00"}, "steps": [{"key": "a", "channel": "sms", "body": "b"}]},
        {"sequence": {"key": "x"}, "steps": [{"key": "a\n", "channel": "sms", "body": "b"}]},
        {"sequence": {"key": "x"}, "steps": [{"key": "a", "channel": "sms", "body": "\ud800"}]},
        {
            "sequence": {"key": "x"},
            "steps": [{"key": "a", "channel": "sms", "body": "b"}],
            "transitions": [{"from": "a", "priority": 2**63}],
        },
        {"sequence": {"key": "x"}, "steps": [{"key": "a", "after": "١٢s"}]},
        {"sequence": {"key": "x", "name": _nested(40, "n", True)}, "steps": []},
    ],
)
def test_the_mutations_the_fuzzer_relies_on_are_refused(doc: dict[str, Any]) -> None:
    with pytest.raises(SequenceFileError) as info:
        load_text(document_text(doc), source=SOURCE)
    check_refusal(info.value)
