"""Spintax picks one option per group, the same one for the same seed, keeps braces that are
not groups, and names the brace that breaks it."""

from __future__ import annotations

import re
import uuid
from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dripd.content.liquid import TemplateError
from dripd.content.spintax import MAX_DEPTH, SpintaxError, seed_for, spin, static_problem

EXECUTION = uuid.UUID("0b7e4a52-3f55-4d1c-9a43-7c1d2f0e9b11")
SEEDS = [i.to_bytes(2, "big") for i in range(300)]


def outcomes(text: str, seeds: list[bytes] = SEEDS) -> Counter[str]:
    return Counter(spin(text, seed) for seed in seeds)


# --- determinism ------------------------------------------------------------------------------


def test_same_seed_same_text() -> None:
    text = "{Hi|Hello|Hey} {there|friend}, {|very }{good|great} {news|to see you}" * 5
    seed = seed_for(EXECUTION, 0, "subject")
    assert len({spin(text, seed) for _ in range(20)}) == 1
    assert spin(text, seed) == spin(text, seed_for(EXECUTION, 0, "subject"))


def test_different_seeds_eventually_differ() -> None:
    text = "{a|b}"
    by_replay = {spin(text, seed_for(EXECUTION, replay, "text")) for replay in range(64)}
    by_execution = {spin(text, seed_for(uuid.UUID(int=n), 0, "text")) for n in range(64)}
    assert by_replay == by_execution == {"a", "b"}


def test_fields_draw_from_their_own_streams() -> None:
    text = "{0|1}" * 40
    assert spin(text, seed_for(EXECUTION, 0, "subject")) != spin(
        text, seed_for(EXECUTION, 0, "text")
    )
    assert spin(text, seed_for(EXECUTION, 0, "text")) != spin(text, seed_for(EXECUTION, 1, "text"))


def test_seed_is_stable_across_releases() -> None:
    # A retry after an upgrade must send the same words: changing how seeds are made or
    # drawn breaks this pin, which is the point.
    text = "{a|b|c|d|e|f|g|h}" * 8
    assert spin(text, seed_for(uuid.UUID(int=1), 0, "subject")) == "dcdehcff"


def test_every_option_is_reachable_with_even_odds() -> None:
    counts = outcomes("{a|b|c|d}")
    assert set(counts) == {"a", "b", "c", "d"}
    assert min(counts.values()) > len(SEEDS) / 4 * 0.6


# --- options, nesting -------------------------------------------------------------------------


def test_empty_option_is_a_choice() -> None:
    # Options are trimmed, so an optional word brings a space or punctuation outside it.
    assert set(outcomes("Hello{|, friend}!")) == {"Hello!", "Hello, friend!"}
    assert set(outcomes("{|very } good")) == {" good", "very good"}
    # An empty option keeps its share: DripDrop's dropping it would make this {a, b} only.
    counts = outcomes("{a||b}")
    assert set(counts) == {"a", "", "b"}
    assert counts[""] > len(SEEDS) / 3 * 0.6
    assert set(outcomes("{|}")) == {""}


def test_options_are_trimmed() -> None:
    assert set(outcomes("x{ a |\n b\t}y")) == {"xay", "xby"}
    assert set(outcomes("{ {a|b} | c }!")) == {"a!", "b!", "c!"}


def test_nested_groups_resolve_innermost_first() -> None:
    assert set(outcomes("{a|{b|c}}")) == {"a", "b", "c"}
    assert set(outcomes("{x {b|c} y|z}")) == {"x b y", "x c y", "z"}


def test_twenty_deep() -> None:
    text = "x"
    for level in range(20):
        text = f"{{{level}|{text}}}"
    seen = set(outcomes(text, [n.to_bytes(4, "big") for n in range(3000)]))
    assert seen <= {"x", *map(str, range(20))}
    assert {"19", "18", "17"} <= seen


def test_pipes_outside_groups_are_text() -> None:
    assert spin("a | b || c", b"s") == "a | b || c"
    assert set(outcomes("a | {b|c} |")) == {"a | b |", "a | c |"}


# --- literal braces ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "a { color: red } .b{margin:0}",
        '{"a": 1, "b": {"c": [1, {}]}}',
        "@media (max-width: 600px) { .col { width: 100% !important; } }",
        "{}",
        "{ }",
        "{ {} }",
    ],
)
def test_braces_without_a_pipe_are_kept(text: str) -> None:
    assert spin(text, b"s") == text


def test_groups_inside_literal_braces_are_resolved() -> None:
    assert set(outcomes('{"greeting": "{Hi|Hello}"}')) == {
        '{"greeting": "Hi"}',
        '{"greeting": "Hello"}',
    }
    assert set(outcomes("p { color: {red|blue} } {Hi|Hey}")) == {
        "p { color: red } Hi",
        "p { color: red } Hey",
        "p { color: blue } Hi",
        "p { color: blue } Hey",
    }


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a}", "'}' at line 1, column 2 has no matching '{'"),
        ("{a|b}}", "'}' at line 1, column 6 has no matching '{'"),
        ("one\ntwo\n    {a|b\n", "'{' at line 3, column 5 is never closed"),
        ("{a {b|c}", "'{' at line 1, column 1 is never closed"),
        ("x\n{ {\n}", "'{' at line 2, column 1 is never closed"),
        ("{ok|fine}\n\n}{", "'}' at line 3, column 1 has no matching '{'"),
        ("héllo }", "'}' at line 1, column 7 has no matching '{'"),
    ],
)
def test_unbalanced_braces_name_the_brace(text: str, message: str) -> None:
    with pytest.raises(SpintaxError) as info:
        spin(text, b"s")
    assert str(info.value) == f"unbalanced spintax: {message}"
    assert isinstance(info.value, TemplateError)


def test_depth_limit() -> None:
    assert spin("{" * MAX_DEPTH + "a|b" + "}" * MAX_DEPTH, b"s") in {
        "{" * (MAX_DEPTH - 1) + c + "}" * (MAX_DEPTH - 1) for c in "ab"
    }
    with pytest.raises(SpintaxError) as info:
        spin("x\n" + "{" * (MAX_DEPTH + 1) + "}" * (MAX_DEPTH + 1), b"s")
    assert str(info.value) == f"spintax nested deeper than {MAX_DEPTH}: '{{' at line 2, column 51"


# --- static check of a Liquid source ----------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "Hi {{ first_name }}, {Hi|Hello} {there|friend}",
        '{{ "}" }} {% if vip %}{Hi|Hello}{% else %}Hey{% endif %} {{ "{" | append: x }}',
        "{% comment %} { } } {% endcomment %}{a|b}",
        "{% raw %}{a|b}{% endraw %} {{- name -}}",
        "p { color: {{ colour }} }",
        "",
    ],
)
def test_static_problem_accepts(source: str) -> None:
    assert static_problem(source) is None


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{{ first_name }} {oops", "'{' at line 1, column 18 is never closed"),
        ('{% assign x = "{" %}\nText {a|b\n{{ "}" }}', "'{' at line 2, column 6 is never closed"),
        ("{% if a %}\n  {{ b }} }\n{% endif %}", "'}' at line 2, column 11 has no matching '{'"),
        ("{% raw %}{a|b{% endraw %}", "'{' at line 1, column 10 is never closed"),
    ],
)
def test_static_problem_names_the_literal_brace(source: str, message: str) -> None:
    assert static_problem(source) == f"unbalanced spintax: {message}"


def test_static_problem_refuses_depth() -> None:
    problem = static_problem("{{ x }}" + "{ " * (MAX_DEPTH + 1) + "} " * (MAX_DEPTH + 1))
    assert problem == f"spintax nested deeper than {MAX_DEPTH}: '{{' at line 1, column 108"


# --- properties -------------------------------------------------------------------------------


# A balanced structure: text, groups and literal pairs. Leaf text has no braces, pipes or
# whitespace, so trimming never changes an option and the outcomes of a structure are
# exactly what `_pattern` matches.
@dataclass(frozen=True)
class Group:
    options: list[list[Node]]


@dataclass(frozen=True)
class Pair:
    body: list[Node]


Node = str | Group | Pair
LEAF = st.text(alphabet="abxyz.,:'\"é", max_size=3)


def _node(children: st.SearchStrategy[Node]) -> st.SearchStrategy[Node]:
    sequence = st.lists(children, max_size=3)
    return st.one_of(
        st.builds(Group, st.lists(sequence, min_size=2, max_size=4)), st.builds(Pair, sequence)
    )


STRUCTURE = st.lists(st.recursive(LEAF, _node, max_leaves=12), max_size=5)


def _text(nodes: list[Node]) -> str:
    return "".join(
        node
        if isinstance(node, str)
        else "{" + "|".join(map(_text, node.options)) + "}"
        if isinstance(node, Group)
        else "{" + _text(node.body) + "}"
        for node in nodes
    )


def _pattern(nodes: list[Node]) -> str:
    return "".join(
        re.escape(node)
        if isinstance(node, str)
        else "(?:" + "|".join(map(_pattern, node.options)) + ")"
        if isinstance(node, Group)
        else r"\{" + _pattern(node.body) + r"\}"
        for node in nodes
    )


@given(st.text(alphabet=st.characters(blacklist_characters="{}")), st.binary(max_size=8))
def test_text_without_braces_is_unchanged(text: str, seed: bytes) -> None:
    assert spin(text, seed) == text


@settings(max_examples=150, deadline=None)
@given(STRUCTURE, st.binary(max_size=8))
def test_balanced_structures_spin_to_one_of_their_outcomes(nodes: list[Node], seed: bytes) -> None:
    text = _text(nodes)
    result = spin(text, seed)
    assert "|" not in result
    assert re.fullmatch(_pattern(nodes), result, re.S)
    assert spin(text, seed) == result


def test_a_mebibyte_spins_in_one_pass() -> None:
    chunk = '{Hi|Hello} {a|{b|c}} x { y } {"k": "{|v}"}\n'
    text = chunk * (2**20 // len(chunk))
    result = spin(text, b"s")
    assert "|" not in result
    assert result.count("{ y }") == text.count("{ y }")
