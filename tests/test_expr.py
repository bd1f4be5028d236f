"""The `when` expression language: parsing, columns in syntax errors, strict evaluation."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dripd.conditions.expr import (
    MAX_DEPTH,
    MAX_SOURCE_LENGTH,
    ArithOp,
    BoolOp,
    Compare,
    CompareOp,
    Const,
    EvaluationError,
    ExprSyntaxError,
    Logic,
    Name,
    Not,
    Sum,
    evaluate,
    evaluate_safely,
    parse,
)
from dripd.errors import ConfigError, DripdError

ROOTS = frozenset({"data", "event", "events", "now", "hooks"})
NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
CONTEXT: dict[str, Any] = {
    "data": {
        "plan": "pro",
        "age": 30,
        "score": 2.5,
        "vip": True,
        "off": False,
        "nothing": None,
        "tags": ["a", "b"],
        "nums": [1, 2.5],
        "trial_ends_at": NOW + timedelta(days=3),
        "iso": "2024-05-04T12:00:00+00:00",
        "naive": datetime(2024, 5, 1, 12, 0),
        "profile": {"city": "Oslo"},
        "wait": timedelta(hours=2),
        "first_day": datetime(1, 1, 1, tzinfo=UTC),
        "huge": 10**400,
    },
    "event": {"key": "signup"},
    "events": {"activated": {"count": 3}},
    "now": NOW,
    "hooks": {"score": {"value": 0.75}},
}


def run(text: str, context: Mapping[str, Any] = CONTEXT) -> bool:
    return evaluate(parse(text), context)


# -- operators -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("data.plan == 'pro'", True),
        ("data.plan == 'free'", False),
        ("data.plan != 'free'", True),
        ("data.plan != 'pro'", False),
        ("data.age < 31", True),
        ("data.age < 30", False),
        ("data.age <= 30", True),
        ("data.age <= 29", False),
        ("data.age > 29", True),
        ("data.age > 30", False),
        ("data.age >= 30", True),
        ("data.age >= 31", False),
        ("'b' < 'c'", True),
        ("'b' >= 'c'", False),
        ("data.trial_ends_at > now", True),
        ("data.trial_ends_at <= now", False),
        ("data.plan in ['free', 'pro']", True),
        ("data.plan in ['free']", False),
        ("data.plan not in ['free']", True),
        ("data.plan not in ['free', 'pro']", False),
        ("'b' in data.tags", True),
        ("'z' not in data.tags", True),
        ("'r' in data.plan", True),
        ("'x' in data.plan", False),
        ("'x' not in data.plan", True),
        ("data.vip and true", True),
        ("data.vip and data.off", False),
        ("data.off or data.vip", True),
        ("data.off or false", False),
        ("not data.off", True),
        ("not data.vip", False),
        ("events.activated.count >= 3", True),
        ("hooks.score.value > 0.5", True),
        ('event.key == "signup"', True),
        ("data.profile.city == 'Oslo'", True),
    ],
)
def test_each_operator(text: str, expected: bool) -> None:
    assert run(text) is expected


def test_ints_and_floats_compare_with_each_other() -> None:
    assert run("1 == 1.0")
    assert run("data.score > 2")
    assert run("2.5 in data.nums")
    assert run("data.age < 30.5")


def test_equality_is_not_coerced_inside_lists() -> None:
    assert run("[1, 2] == [1, 2]")
    assert not run("[1, true] == [1, 1]")
    assert not run("[1] == [1, 1]")
    assert run("data.tags == ['a', 'b']")


def test_missing_names_are_null() -> None:
    assert run("data.missing == null")
    assert run("nope.at.all == null")
    assert run("data.nothing == null")
    # Walking past a non-object is missing, not an error.
    assert run("data.plan.tier == null")
    assert not run("data.plan == null")
    assert run("data.plan != null")
    assert run("null == null")


def test_null_can_be_looked_for_in_a_list() -> None:
    assert run("data.missing in [null, 'a']")
    assert not run("data.missing in ['a']")


# -- precedence and parentheses ----------------------------------------------------------------


def test_not_binds_looser_than_comparison() -> None:
    expr = parse("not data.age == 3")
    assert isinstance(expr.tree, Not)
    assert isinstance(expr.tree.operand, Compare)
    # Read as `(not data.age) == 3` it would be a type error instead.
    assert evaluate(expr, CONTEXT) is True


def test_and_binds_tighter_than_or() -> None:
    context = {"a": True, "b": False, "c": False}
    expr = parse("a or b and c")
    assert isinstance(expr.tree, BoolOp)
    assert expr.tree.op is Logic.OR
    assert evaluate(expr, context) is True
    assert run("false and false or true") is True


def test_parentheses_override_precedence() -> None:
    context = {"a": True, "b": False, "c": False}
    assert evaluate(parse("(a or b) and c"), context) is False
    assert evaluate(parse("not (data.age == 3 or data.vip)"), CONTEXT) is False
    assert evaluate(parse("((((data.vip))))"), CONTEXT) is True


def test_and_or_chains_are_flat() -> None:
    tree = parse("a and b and c").tree
    assert isinstance(tree, BoolOp)
    assert len(tree.operands) == 3


def test_and_or_short_circuit() -> None:
    # The right-hand operands would be type errors if they were evaluated.
    assert run("false and data.plan") is False
    assert run("true or data.plan") is True
    assert run("data.off and data.age < 'x'") is False
    with pytest.raises(EvaluationError, match="'and'"):
        run("true and data.plan")


# -- literals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("'pro'", "pro"),
        ('"pro"', "pro"),
        ("''", ""),
        (r"'it\'s'", "it's"),
        (r'"say \"hi\""', 'say "hi"'),
        (r"'back\\slash'", "back\\slash"),
        (r"'two\nlines'", "two\nlines"),
        ('"it\'s"', "it's"),
        ("'say \"hi\"'", 'say "hi"'),
        ("42", 42),
        ("-7", -7),
        ("0", 0),
        ("3.25", 3.25),
        ("-0.5", -0.5),
        ("true", True),
        ("false", False),
        ("null", None),
        ("90s", timedelta(seconds=90)),
        ("15m", timedelta(minutes=15)),
        ("2h", timedelta(hours=2)),
        ("3d", timedelta(days=3)),
        ("1w", timedelta(weeks=1)),
        ("0s", timedelta(0)),
        ("-3d", timedelta(days=-3)),
        ("999999999d", timedelta(days=999999999)),
    ],
)
def test_literals(text: str, value: object) -> None:
    tree = parse(text).tree
    assert isinstance(tree, Const)
    assert tree.value == value
    assert type(tree.value) is type(value)


def test_literals_compare_with_context_values() -> None:
    context = {"data": {"s": 'it\'s "x"\\\n', "n": -7, "d": -0.5}}
    assert evaluate(parse(r"data.s == 'it\'s \"x\"\\\n'"), context)
    assert evaluate(parse("data.n == -7 and data.d < -0.25 and -1 < 0"), context)


def test_lists() -> None:
    assert run("[] == []")
    assert not run("'a' in []")
    assert run("data.age in [1, 30, 2.5]")
    assert run("data.plan in [event.key, 'pro',]")
    assert run("[1, 2] in [[1, 2], [3]]")
    assert not run("[true] in [[1], [0]]")


def test_names_are_collected() -> None:
    expr = parse("data.plan == 'pro' and (events.activated.count > 1 or now > data.t)")
    assert expr.names == frozenset({"data.plan", "events.activated.count", "now", "data.t"})
    assert isinstance(parse("events.activated.count").tree, Name)


# -- datetimes ---------------------------------------------------------------------------------


def test_aware_datetimes_order_but_iso_strings_are_not_coerced() -> None:
    assert run("now < data.trial_ends_at")
    with pytest.raises(EvaluationError, match=r"'<'.*datetime.*string"):
        run("now < data.iso")


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(EvaluationError, match="without a timezone"):
        run("data.naive < now")


# -- arithmetic and durations ------------------------------------------------------------------

NEW_YORK = ZoneInfo("America/New_York")


def computes(text: str, expected: object, context: Mapping[str, Any] = CONTEXT) -> bool:
    """Whether `text` evaluates to `expected`: same type and value, as `==` compares."""
    return evaluate(parse(f"({text}) == expected"), {**context, "expected": expected})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # number ± number
        ("data.age + 1", 31),
        ("data.age - 1", 29),
        ("data.score + 1", 3.5),
        ("data.age - 0.5", 29.5),
        ("1 - 2", -1),
        ("data.age - -1", 31),
        # datetime ± duration, duration + datetime
        ("now + 3d", NOW + timedelta(days=3)),
        ("now - 90s", NOW - timedelta(seconds=90)),
        ("now + -1h", NOW - timedelta(hours=1)),
        ("now - data.wait", NOW - timedelta(hours=2)),
        ("1w + now", NOW + timedelta(weeks=1)),
        ("data.wait + now", NOW + timedelta(hours=2)),
        # duration ± duration
        ("1w - 1d", timedelta(days=6)),
        ("2h + 30m", timedelta(minutes=150)),
        ("data.wait + 15m", timedelta(minutes=135)),
        ("1m - 90s", timedelta(seconds=-30)),
        # datetime − datetime
        ("data.trial_ends_at - now", timedelta(days=3)),
        ("now - data.trial_ends_at", timedelta(days=-3)),
        ("now - now", timedelta(0)),
        # left to right
        ("1 - 2 - 3", -4),
        ("10 - (2 - 3)", 11),
        ("now - 1d - 1d", NOW - timedelta(days=2)),
        ("now + 1d - now", timedelta(days=1)),
        ("1d + now - 1d", NOW),
    ],
)
def test_arithmetic(text: str, expected: object) -> None:
    assert computes(text, expected)


def test_arithmetic_results_have_the_right_type() -> None:
    # `==` is strict: a result of another type is an error, not merely unequal.
    assert not computes("now + 1d", NOW)
    with pytest.raises(EvaluationError, match=r"cannot compare datetime with expected \(number"):
        computes("now + 1d", 1)
    with pytest.raises(EvaluationError, match=r"cannot compare duration with expected \(number"):
        computes("now - now", 0)
    with pytest.raises(EvaluationError, match=r"cannot compare number with expected \(duration"):
        computes("1 + 1", timedelta(2))


@pytest.mark.parametrize(
    "text",
    [
        "data.age - 1 == 29",
        "data.age -1 == 29",
        "data.age-1 == 29",
        "(data.age)-1 == 29",
        "data.age--1 == 31",
        "data.age - -1 == 31",
        "-1 - 1 == -2",
        "-1-1 == -2",
        "data.age > -1",
        "data.age >-1",
        "-1 < data.age",
        "[1 -2] == [-1]",
        "[1, -2] == [1, -2]",
        "-2 in [1, -2]",
        "not -1 == data.age",
        "now-1d < now",
        "3d-1d == 2d",
        "data.wait-1h == 1h",
        "'a'-1 == null or true",
    ],
)
def test_minus_after_a_value_subtracts(text: str) -> None:
    expr = parse(text)
    if text.startswith("'a'"):
        # After a string, too: it parses, and only fails once evaluated.
        with pytest.raises(EvaluationError, match="got string and number"):
            evaluate(expr, CONTEXT)
        return
    assert evaluate(expr, CONTEXT) is True


def test_minus_trees() -> None:
    for text in ("a - 1", "a -1", "a-1"):
        tree = parse(text).tree
        assert isinstance(tree, Sum)
        assert tree.first == Name(path=("a",), column=1)
        assert [(term.op, term.operand) for term in tree.terms] == [
            (ArithOp.SUB, Const(value=1, column=len(text)))
        ]
    compare = parse("x > -1").tree
    assert isinstance(compare, Compare)
    assert compare.right == Const(value=-1, column=5)
    for text in ("[1]-1", "true-1", "null -1", "(a)-1", "'s'- 1", "3d-1"):
        assert isinstance(parse(text).tree, Sum), text


def test_sums_bind_tighter_than_comparisons_and_looser_than_primaries() -> None:
    expr = parse("data.age + 1 > 2 and data.age - 1 < 30")
    assert isinstance(expr.tree, BoolOp)
    first = expr.tree.operands[0]
    assert isinstance(first, Compare)
    assert isinstance(first.left, Sum)
    assert first.right == Const(value=2, column=16)
    assert evaluate(expr, CONTEXT) is True
    # Read as `(not data.age) - 30 == 0` it would be a type error instead.
    assert run("not data.age - 30 == 0") is False
    assert run("data.age == 29 + 1")
    assert run("[0 + 1, 4 - 2] == [1, 2]")
    assert run("data.age + 1 in [31]")


def test_sums_are_flat_and_left_to_right() -> None:
    tree = parse("a - b + c - d").tree
    assert isinstance(tree, Sum)
    assert [term.op for term in tree.terms] == [ArithOp.SUB, ArithOp.ADD, ArithOp.SUB]
    assert tree.column == 3
    assert [term.column for term in tree.terms] == [3, 7, 11]
    # Right to left, this would be 10 - (5 - (2 - 1)) == 6.
    assert evaluate(parse("a - b - c - d == 2"), {"a": 10, "b": 5, "c": 2, "d": 1})


def test_long_sums_evaluate() -> None:
    text = " + ".join(["1"] * 1000) + " == 1000"
    assert len(text) <= MAX_SOURCE_LENGTH
    expr = parse(text)
    assert evaluate(expr, CONTEXT) is True
    assert hash(expr) == hash(parse(text))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1d > 23h", True),
        ("1d < 23h", False),
        ("1w >= 7d", True),
        ("1w <= 6d", False),
        ("90s == 1m + 30s", True),
        ("1d == 24h", True),
        ("1d != 2d", True),
        ("1d != 24h", False),
        ("-1d < 0s", True),
        ("data.wait < 3h", True),
        ("data.wait > 3h", False),
        ("1d == null", False),
        ("data.missing != 1d", True),
        ("1d in [1d, 2d]", True),
        ("24h in [1d]", True),
        ("5m not in [1d, null]", True),
        ("[1d, 2h] == [24h, 120m]", True),
        # What the feature is for.
        ("data.trial_ends_at > now + 2d", True),
        ("data.trial_ends_at > now + 3d", False),
        ("now - data.trial_ends_at >= 1w", False),
        ("data.trial_ends_at - now >= 3d", True),
    ],
)
def test_durations_compare(text: str, expected: bool) -> None:
    assert run(text) is expected


def test_the_feature_examples() -> None:
    now = datetime(2026, 3, 10, 9, 0, tzinfo=UTC)
    context = {
        "now": now,
        "events": {"activated": {"last_at": now - timedelta(days=2, hours=23)}},
        "data_signup": now - timedelta(days=7),
    }
    assert evaluate(parse("events.activated.last_at > now - 3d"), context)
    assert evaluate(parse("now - data_signup >= 1w"), context)
    context["events"] = {"activated": {"last_at": now - timedelta(days=3)}}
    context["data_signup"] = now - timedelta(days=6, hours=23, minutes=59, seconds=59)
    assert not evaluate(parse("events.activated.last_at > now - 3d"), context)
    assert not evaluate(parse("now - data_signup >= 1w"), context)


def test_datetime_arithmetic_is_elapsed_time_across_dst() -> None:
    # New York springs forward on 2026-03-08: noon to noon that weekend is 23 hours.
    context = {
        "sat": datetime(2026, 3, 7, 12, 0, tzinfo=NEW_YORK),
        "sun": datetime(2026, 3, 8, 12, 0, tzinfo=NEW_YORK),
    }
    assert evaluate(parse("sun - sat == 23h"), context)
    assert evaluate(parse("sat - sun == -23h"), context)
    assert evaluate(parse("sat + 23h == sun"), context)
    assert evaluate(parse("sat + 1d > sun"), context)
    # Datetimes in different zones subtract as instants.
    context["utc"] = datetime(2026, 3, 7, 17, 0, tzinfo=UTC)
    assert evaluate(parse("utc - sat == 0s and sat == utc"), context)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "data.plan + 1",
            "column 11: '+' needs two numbers, two durations, or a datetime and a duration, "
            "got data.plan (string) and number",
        ),
        (
            "now - 1",
            "column 5: '-' needs two numbers, two durations, two datetimes, or a datetime minus a "
            "duration, got now (datetime) and number",
        ),
        ("'a' + 'b'", "column 5: '+' needs two numbers, two durations, or a datetime and a "),
        ("'a' + 'b'", "got string and string"),
        ("data.missing + 1d", "got data.missing (null or missing) and duration"),
        ("null - 1", "column 6: '-' needs two numbers, two durations, two datetimes, or a "),
        ("null - 1", "got null and number"),
        ("1 + null", "got number and null"),
        ("data.vip + 1", "got data.vip (boolean) and number"),
        ("true - false", "got boolean and boolean"),
        ("data.tags + ['c']", "got data.tags (list) and list"),
        ("data.profile - 1", "got data.profile (object) and number"),
        (
            "now + now",
            "'+' needs two numbers, two durations, or a datetime and a duration, got now",
        ),
        ("now + now", "got now (datetime) and now (datetime)"),
        ("1d - now", "'-' needs two numbers, two durations, two datetimes, or a datetime minus"),
        ("1d - now", "got duration and now (datetime)"),
        ("1 + 1d", "got number and duration"),
        ("1d - 1", "got duration and number"),
        ("now + data.age", "got now (datetime) and data.age (number)"),
        ("data.naive + 1d", "got data.naive (datetime without a timezone) and duration"),
        ("now - data.naive", "got now (datetime) and data.naive (datetime without a timezone)"),
        ("'3d' + now", "got string and now (datetime)"),
        # After the first term, the running total is named by its type only.
        ("data.age + 1 + 'x'", "column 14: '+' needs"),
        ("data.age + 1 + 'x'", "got number and string"),
        # Ordering takes two durations, not a duration and anything else.
        (
            "1d < 1",
            "column 4: '<' needs two numbers, two strings, two datetimes or two durations, ",
        ),
        ("1d < 1", "got duration and number"),
        ("1d >= now", "got duration and now (datetime)"),
        ("data.wait == 7200", "'==' cannot compare data.wait (duration) with number"),
        ("1d == '1d'", "'==' cannot compare duration with string"),
        ("1d in data.plan", "'in' with a string on the right needs a string on the left"),
        ("1d in [1d, 1]", "'in' cannot look for duration in a list holding a number"),
        ("data.age + 1", "column 10: the condition must be true or false, got number"),
        ("(now - 1d) and true", "'and' needs true or false, got datetime"),
        # Out of range is an evaluation error, not a crash.
        ("now + 999999999d", "column 5: '+' of now (datetime) and duration is out of range"),
        ("data.first_day - 1s", "'-' of data.first_day (datetime) and duration is out of range"),
        ("999999999d + 1d", "'+' of duration and duration is out of range"),
        ("-999999999d - 1d - 1d", "column 13: '-' of duration and duration is out of range"),
        ("data.huge + 0.5", "'+' of data.huge (number) and number is out of range"),
    ],
)
def test_arithmetic_type_errors(text: str, message: str) -> None:
    expr = parse(text)
    with pytest.raises(EvaluationError) as info:
        evaluate(expr, CONTEXT)
    assert message in str(info.value)
    assert evaluate_safely(expr, CONTEXT) == (False, str(info.value))


def test_names_inside_sums_are_collected() -> None:
    expr = parse("now - data.signup_at >= 1w and events.a.last_at > now - 3d + hooks.h.value")
    assert expr.names == frozenset({"now", "data.signup_at", "events.a.last_at", "hooks.h.value"})
    with pytest.raises(ExprSyntaxError) as info:
        parse("now - dta.x > 1d", roots=ROOTS)
    assert info.value.column == 7


# -- type errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("data.plan == 1", ["'=='", "data.plan (string)", "number"]),
        ("data.age != 'x'", ["'!='", "data.age (number)", "string"]),
        ("data.vip == 1", ["'=='", "boolean", "number"]),
        ("data.vip > 0", ["'>'", "boolean", "number"]),
        ("data.age < 'x'", ["'<'", "number", "string"]),
        ("data.nothing < 3", ["'<'", "data.nothing (null or missing)", "number"]),
        ("data.missing >= 3", ["'>='", "data.missing (null or missing)", "number"]),
        ("null <= null", ["'<='", "null"]),
        ("data.tags < data.tags", ["'<'", "list"]),
        ("data.plan and true", ["'and'", "data.plan (string)"]),
        ("false or 1", ["'or'", "number"]),
        ("not data.age", ["'not'", "data.age (number)"]),
        ("not null", ["'not'", "null"]),
        ("data.age in data.tags", ["'in'", "data.age (number)", "string"]),
        ("'a' in data.age", ["'in'", "list or a string", "data.age (number)"]),
        ("'a' not in data.missing", ["'not in'", "list or a string", "null"]),
        ("1 in data.plan", ["'in'", "string on the left", "number"]),
        ("'a' in data.profile", ["'in'", "object"]),
        ("data.plan", ["true or false", "data.plan (string)"]),
        ("data.missing", ["true or false", "null"]),
        ("data.naive == null", ["'=='", "without a timezone"]),
    ],
)
def test_type_errors(text: str, fragments: list[str]) -> None:
    expr = parse(text)
    with pytest.raises(EvaluationError) as info:
        evaluate(expr, CONTEXT)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert evaluate_safely(expr, CONTEXT) == (False, str(info.value))


def test_evaluation_errors_name_the_column() -> None:
    with pytest.raises(EvaluationError, match=r"^column 11: "):
        run("data.plan == 1")


def test_evaluation_error_is_not_a_dripd_error() -> None:
    assert not issubclass(EvaluationError, DripdError)
    assert issubclass(ExprSyntaxError, ConfigError)


def test_evaluate_safely_passes_results_through() -> None:
    assert evaluate_safely(parse("data.vip"), CONTEXT) == (True, None)
    assert evaluate_safely(parse("data.off"), CONTEXT) == (False, None)


def test_evaluate_safely_fails_closed_on_recursion() -> None:
    left: list[object] = []
    left.append(left)
    right: list[object] = []
    right.append(right)
    ok, reason = evaluate_safely(parse("data.l == data.r"), {"data": {"l": left, "r": right}})
    assert not ok
    assert reason is not None
    assert "nested too deeply" in reason


class _Hostile(Mapping[str, Any]):
    def __getitem__(self, key: str) -> Any:
        raise TypeError("nope")

    def __contains__(self, key: object) -> bool:
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def test_evaluate_safely_fails_closed_on_a_stray_type_error() -> None:
    ok, reason = evaluate_safely(parse("data.x == 1"), {"data": _Hostile()})
    assert not ok
    assert reason is not None
    assert "TypeError" in reason


# -- syntax errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "column", "fragment"),
    [
        ("data.plan == 'pro", 14, "unterminated string"),
        ('a == "x\\"', 6, "unterminated string"),
        ("a ==", 5, "expected a value after '==', found end of input"),
        ("data.plan ==   ", 13, "expected a value after '=='"),
        ("(a", 3, "expected ')' to close the '(' at column 1"),
        ("(a or (b)", 10, "expected ')'"),
        ("a < b < c", 7, "cannot be chained"),
        ("a == b != c", 8, "cannot be chained"),
        ("a in b not in c", 8, "cannot be chained"),
        ("a $ b", 3, "unexpected character '$'"),
        ("a = b", 3, "did you mean '=='"),
        ("a && b", 3, "use 'and'"),
        ("- 3 < a", 1, "'-'"),
        ("a == 'x\\q'", 8, "unknown escape"),
        ("", 1, "empty"),
        ("a b", 3, "expected an operator or end of input, found name 'b'"),
        ("a not b", 7, "expected 'in' after 'not'"),
        ("a == not b", 6, "expected a value after '==', found 'not'"),
        ("[1, 2", 6, "expected ',' or ']'"),
        ("[1 2]", 4, "expected ',' or ']'"),
        ("data.", 6, "expected a name after '.'"),
        ("1.", 1, "malformed number"),
        ("12abc == 1", 1, "malformed number"),
        ("a and", 6, "expected a value after 'and'"),
        ("not", 4, "expected a value after 'not'"),
        ("()", 2, "expected a value after '('"),
        ("True", 1, "did you mean 'true'"),
        ("a == None", 6, "did you mean 'null'"),
        ("null.x == 1", 1, "keyword"),
        ("a == 'x' )", 10, "found ')'"),
        ("now - 3 d", 9, "expected an operator or end of input, found name 'd'"),
        ("now - 1.5h", 7, "malformed duration '1.5h': a duration is a whole number and a unit"),
        ("a < -2.5d", 5, "malformed duration '-2.5d'"),
        ("a < 250ms", 5, "malformed number '250ms'; a duration is a whole number directly"),
        ("a < 3D", 5, "malformed number '3D'; a duration"),
        ("a < 3dd", 5, "malformed number '3dd'"),
        ("a < 3d5", 5, "malformed number '3d5'"),
        ("a < 3d.x", 5, "malformed number '3d.x'"),
        ("a < 9999999999w", 5, "duration '9999999999w' is out of range"),
        ("a 3d", 3, "expected an operator or end of input, found duration 3d"),
        ("a +", 4, "expected a value after '+', found end of input"),
        ("a -", 4, "expected a value after '-', found end of input"),
        ("a + + 1", 5, "expected a value after '+', found '+'"),
        ("a + not b", 5, "expected a value after '+', found 'not'"),
        ("+1 > a", 1, "expected a value, found '+'"),
        ("-a", 1, "unexpected character '-'; '-' is only allowed after a value"),
        ("a - - 1", 5, "unexpected character '-'"),
        ("a == (- 1)", 7, "unexpected character '-'"),
        ("a < 1 + 2 < 3", 11, "cannot be chained"),
    ],
)
def test_syntax_errors_report_the_column(text: str, column: int, fragment: str) -> None:
    with pytest.raises(ExprSyntaxError) as info:
        parse(text)
    assert info.value.column == column
    assert fragment in str(info.value)
    assert str(info.value).startswith(f"column {column}: ")


def test_unknown_root_is_rejected_with_its_column() -> None:
    with pytest.raises(ExprSyntaxError) as info:
        parse("data.plan == 'pro' and dta.age > 3", roots=ROOTS)
    assert info.value.column == 24
    assert "unknown name 'dta.age'" in str(info.value)
    assert "data, event, events, hooks, now" in str(info.value)


def test_known_roots_are_accepted() -> None:
    expr = parse("data.a == event.b and events.c.count > 0 and now > hooks.h.value", roots=ROOTS)
    assert expr.names == frozenset({"data.a", "event.b", "events.c.count", "now", "hooks.h.value"})
    # Without roots, any name parses.
    assert parse("anything.goes").names == frozenset({"anything.goes"})


# -- the compiled object -----------------------------------------------------------------------


def test_expr_keeps_its_source_and_is_immutable() -> None:
    text = "data.plan == 'pro'  and not (data.age < 18)"
    expr = parse(text)
    assert str(expr) == text
    assert expr.source == text
    assert repr(expr) == f"Expr({text!r})"
    with pytest.raises(dataclasses.FrozenInstanceError):
        expr.source = "true"  # type: ignore[misc]
    assert expr == parse(text)
    assert hash(expr) == hash(parse(text))


def test_compare_op_is_recorded() -> None:
    tree = parse("a not in b").tree
    assert isinstance(tree, Compare)
    assert tree.op is CompareOp.NOT_IN


# -- limits ------------------------------------------------------------------------------------


def test_source_length_limit() -> None:
    longest = "'" + "x" * (MAX_SOURCE_LENGTH - 12) + "' == data.s"
    assert len(longest) == MAX_SOURCE_LENGTH
    assert not evaluate(parse(longest), CONTEXT)
    with pytest.raises(ExprSyntaxError, match="limit is 4096") as info:
        parse(longest + " ")
    assert info.value.column == MAX_SOURCE_LENGTH + 1


@pytest.mark.parametrize(
    ("opening", "closing"),
    [("(", ")"), ("[", "]"), ("not ", "")],
)
def test_depth_limit(opening: str, closing: str) -> None:
    def nested(depth: int) -> str:
        return opening * depth + "true" + closing * depth

    parse(nested(MAX_DEPTH))
    with pytest.raises(ExprSyntaxError, match="deeper than 64") as info:
        parse(nested(MAX_DEPTH + 1))
    assert info.value.column == len(opening) * MAX_DEPTH + 1


def test_long_flat_chains_evaluate() -> None:
    # Far more operands than Python's recursion limit allows frames: chains must not nest.
    context = {"t": True, "f": False}
    every = " and ".join(["t"] * 680)
    some = " or ".join(["f"] * 790) + " or t"
    assert len(every) <= MAX_SOURCE_LENGTH
    assert len(some) <= MAX_SOURCE_LENGTH
    assert evaluate(parse(every), context) is True
    assert evaluate(parse(some), context) is True


# -- properties --------------------------------------------------------------------------------

SEGMENTS = ["plan", "age", "tags", "count", "value", "x"]
OPS = ["==", "!=", "<", "<=", ">", ">=", "in", "not in"]

# A tree is ("atom", text) | ("list", [tree]) | ("not", tree) | ("and"|"or", [tree]) |
# ("cmp", op, tree, tree) | ("sum", tree, [(op, space_before, space_after, tree)]); it is
# rendered to text twice, minimally and fully parenthesized.
Tree = tuple[Any, ...]


def _render_string(value: str, quote: str) -> str:
    escaped = value.replace("\\", "\\\\").replace(quote, "\\" + quote).replace("\n", "\\n")
    return quote + escaped + quote


names = st.builds(
    lambda root, rest: ".".join([root, *rest]),
    st.sampled_from(sorted(ROOTS)),
    st.lists(st.sampled_from(SEGMENTS), max_size=2),
)
literals = st.one_of(
    st.integers(min_value=-(10**6), max_value=10**6).map(str),
    st.builds(
        lambda sign, whole, frac: f"{sign}{whole}.{frac}",
        st.sampled_from(["", "-"]),
        st.integers(0, 999),
        st.integers(0, 999),
    ),
    st.builds(_render_string, st.text(max_size=8), st.sampled_from(["'", '"'])),
    st.sampled_from(["true", "false", "null"]),
    st.builds(
        lambda amount, unit: f"{amount}{unit}",
        st.integers(min_value=-(10**6), max_value=10**6),
        st.sampled_from(["s", "m", "h", "d", "w"]),
    ),
)
atoms = st.one_of(names, literals).map(lambda text: ("atom", text))
SPACES = st.sampled_from(["", " "])


def _extend(children: st.SearchStrategy[Tree]) -> st.SearchStrategy[Tree]:
    return st.one_of(
        st.lists(children, max_size=3).map(lambda items: ("list", items)),
        children.map(lambda child: ("not", child)),
        st.tuples(st.sampled_from(["and", "or"]), st.lists(children, min_size=2, max_size=3)),
        st.tuples(st.just("cmp"), st.sampled_from(OPS), children, children),
        st.tuples(
            st.just("sum"),
            children,
            st.lists(
                # Unspaced too: `a-1` and `a -1` subtract just like `a - 1`.
                st.tuples(st.sampled_from(["+", "-"]), SPACES, SPACES, children),
                min_size=1,
                max_size=3,
            ),
        ),
    )


trees = st.recursive(atoms, _extend, max_leaves=10)

_PRECEDENCE = {"or": 1, "and": 2, "not": 3, "cmp": 4, "sum": 5, "atom": 6, "list": 6}


def render(tree: Tree, *, minimal: bool) -> str:
    kind = tree[0]

    def operand(child: Tree, at_least: int) -> str:
        text = render(child, minimal=minimal)
        child_kind = child[0]
        if child_kind in ("atom", "list"):
            return text
        if minimal and _PRECEDENCE[child_kind] >= at_least:
            return text
        return f"({text})"

    if kind == "atom":
        return str(tree[1])
    if kind == "list":
        return "[" + ", ".join(render(item, minimal=minimal) for item in tree[1]) + "]"
    if kind == "not":
        return "not " + operand(tree[1], _PRECEDENCE["not"])
    if kind in ("and", "or"):
        return f" {kind} ".join(operand(child, _PRECEDENCE[kind]) for child in tree[1])
    if kind == "sum":
        # Sums run left to right: a sum needs no brackets as the first operand of another.
        text = operand(tree[1], _PRECEDENCE["sum"])
        for op, before, after, child in tree[2]:
            text += f"{before}{op}{after}{operand(child, _PRECEDENCE['atom'])}"
        return text
    _, op, left, right = tree
    return f"{operand(left, _PRECEDENCE['sum'])} {op} {operand(right, _PRECEDENCE['sum'])}"


def names_in(tree: Tree) -> set[str]:
    kind = tree[0]
    if kind == "atom":
        text = str(tree[1])
        return {text} if text.split(".")[0] in ROOTS else set()
    if kind == "not":
        return names_in(tree[1])
    if kind == "cmp":
        return names_in(tree[2]) | names_in(tree[3])
    if kind == "sum":
        return names_in(tree[1]).union(*(names_in(term[3]) for term in tree[2]))
    return set().union(*(names_in(child) for child in tree[1]))


json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(),
        st.text(max_size=5),
        st.datetimes(
            timezones=st.sampled_from(
                [UTC, None, timezone(timedelta(hours=14)), ZoneInfo("America/New_York")]
            )
        ),
        st.timedeltas(),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.sampled_from(SEGMENTS), children, max_size=3),
    ),
    max_leaves=8,
)
contexts = st.dictionaries(st.sampled_from(sorted(ROOTS)), json_values, max_size=5)


@settings(max_examples=300, deadline=None)
@given(tree=trees, context=contexts)
def test_random_expressions_parse_and_never_raise(tree: Tree, context: dict[str, Any]) -> None:
    minimal = parse(render(tree, minimal=True), roots=ROOTS)
    bracketed = parse(render(tree, minimal=False), roots=ROOTS)
    assert minimal.names == bracketed.names == frozenset(names_in(tree))

    ok, reason = evaluate_safely(minimal, context)
    assert isinstance(ok, bool)
    assert (reason is None) or (ok is False and isinstance(reason, str))
    # Precedence: the minimal rendering means what the fully bracketed one says.
    ok_bracketed, reason_bracketed = evaluate_safely(bracketed, context)
    assert (ok, reason is None) == (ok_bracketed, reason_bracketed is None)

    # evaluate_safely is evaluate, with EvaluationError turned into its message.
    outcome: bool | str
    try:
        outcome = evaluate(minimal, context)
    except EvaluationError as exc:
        outcome = str(exc)
    assert outcome == (ok if reason is None else reason)


TOKENS = [
    "data.plan",
    "a",
    "x.",
    "(",
    ")",
    "[",
    "]",
    ",",
    "==",
    "!=",
    "<",
    "<=",
    ">",
    ">=",
    "=",
    "!",
    "-",
    "in",
    "not",
    "and",
    "or",
    "true",
    "false",
    "null",
    "'s'",
    '"d"',
    "'",
    '"',
    "\\",
    "1",
    "-2.5",
    "1.",
    ".",
    "é",
    "+",
    "3d",
    "-2w",
    "90s",
    "1.5h",
    "250ms",
    "d",
    "9999999999w",
]
token_soup = st.lists(
    st.tuples(st.sampled_from(TOKENS), st.sampled_from(["", " ", "\n"])), max_size=30
).map(lambda parts: "".join(token + sep for token, sep in parts))


@settings(max_examples=500, deadline=None)
@given(text=st.one_of(st.text(max_size=60), token_soup))
def test_any_text_parses_or_raises_a_syntax_error(text: str) -> None:
    error: ExprSyntaxError | None = None
    try:
        expr = parse(text)
    except ExprSyntaxError as exc:
        error = exc
    if error is None:
        assert expr.source == text
    else:
        assert 1 <= error.column <= len(text) + 1
        assert str(error).startswith(f"column {error.column}: ")


UNITS = {"s": timedelta(seconds=1), "m": timedelta(minutes=1), "h": timedelta(hours=1)}
UNITS |= {"d": timedelta(days=1), "w": timedelta(weeks=1)}
amounts = st.integers(min_value=-(10**6), max_value=10**6)


@settings(max_examples=200, deadline=None)
@given(
    first=st.tuples(amounts, st.sampled_from(sorted(UNITS))),
    rest=st.lists(
        st.tuples(st.sampled_from(["+", "-"]), amounts, st.sampled_from(sorted(UNITS))),
        max_size=4,
    ),
    at=st.datetimes(timezones=st.just(UTC)),
)
def test_duration_sums_are_timedelta_sums(
    first: tuple[int, str], rest: list[tuple[str, int, str]], at: datetime
) -> None:
    text = f"{first[0]}{first[1]}"
    expected = first[0] * UNITS[first[1]]
    for op, amount, unit in rest:
        text += f" {op} {amount}{unit}"
        expected += (amount if op == "+" else -amount) * UNITS[unit]
    assert computes(text, expected, {})
    # Added to a datetime, it is that datetime moved, or out of range.
    try:
        moved: datetime | None = at + expected
    except OverflowError:
        moved = None
    ok, reason = evaluate_safely(parse(f"at + ({text}) == moved"), {"at": at, "moved": moved})
    if moved is None:
        assert reason is not None
        assert "out of range" in reason
    else:
        assert (ok, reason) == (True, None)
