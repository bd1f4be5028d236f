"""The `when` expression language: parsed once into an immutable tree, evaluated with strict types.

Grammar, loosest binding first (no `eval`, no `ast`: a tokenizer and a recursive-descent parser):

    or         := and ("or" and)*
    and        := not ("and" not)*
    not        := "not" not | comparison
    comparison := sum [op sum]                  comparisons never chain: `a < b < c` is an error
    op         := "==" | "!=" | "<" | "<=" | ">" | ">=" | "in" | "not" "in"
    sum        := primary (("+" | "-") primary)*   left to right: `a - b - c` is `(a - b) - c`
    primary    := string | number | duration | "true" | "false" | "null" | name
                | "(" or ")" | "[" [or ("," or)* [","]] "]"
    duration   := integer unit                 with no space between: 90s, 15m, 2h, 3d, 1w
    unit       := "s" | "m" | "h" | "d" | "w"
    name       := ident ("." ident)*           e.g. data.plan, events.activated.count, now

Strings take single or double quotes with the escapes \\' \\" \\\\ \\n; numbers are integers or
decimals, and numbers and durations take an optional leading minus. A `-` right after a value
subtracts (`a-1`, `a -1` and `a - 1` are all subtractions); anywhere else it must sit directly
before a number or duration, which it makes negative (`x > -1`). Evaluation never coerces: see
`evaluate`.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Final, TypeAlias, assert_never

from dripd.errors import ConfigError

MAX_SOURCE_LENGTH: Final = 4096
MAX_DEPTH: Final = 64


class ExprSyntaxError(ConfigError):
    """The condition expression is not valid."""

    def __init__(self, reason: str, *, column: int) -> None:
        super().__init__(f"column {column}: {reason}")
        self.column = column
        self.reason = reason


class EvaluationError(Exception):
    """A condition could not be evaluated because its operands have the wrong types.

    Not a DripdError: it is raised per enrollment at run time, and the engine fails the
    transition closed (see `evaluate_safely`) rather than stopping.
    """


# -- the compiled tree -------------------------------------------------------------------------


class CompareOp(StrEnum):
    EQ = "=="
    NE = "!="
    LT = "<"
    LE = "<="
    GT = ">"
    GE = ">="
    IN = "in"
    NOT_IN = "not in"


class Logic(StrEnum):
    AND = "and"
    OR = "or"


class ArithOp(StrEnum):
    ADD = "+"
    SUB = "-"


Scalar: TypeAlias = str | int | float | bool | timedelta | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Const:
    value: Scalar
    column: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Name:
    path: tuple[str, ...]
    column: int

    @property
    def dotted(self) -> str:
        return ".".join(self.path)


@dataclass(frozen=True, slots=True, kw_only=True)
class ListOf:
    items: tuple[Node, ...]
    column: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Not:
    operand: Node
    column: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BoolOp:
    op: Logic
    operands: tuple[Node, ...]
    column: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Compare:
    op: CompareOp
    left: Node
    right: Node
    column: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Term:
    """One `+ operand` or `- operand` of a Sum; `column` is the operator's."""

    op: ArithOp
    operand: Node
    column: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Sum:
    """`first`, then each term applied left to right; `column` is the first operator's.

    Flat rather than nested, so that a long sum neither recurses nor hashes deeply.
    """

    first: Node
    terms: tuple[Term, ...]
    column: int


Node: TypeAlias = Const | Name | ListOf | Not | BoolOp | Compare | Sum


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class Expr:
    """A parsed condition. `str(expr)` is its source text; `names` the dotted names it reads."""

    source: str
    tree: Node
    names: frozenset[str]

    def __str__(self) -> str:
        return self.source

    def __repr__(self) -> str:
        return f"Expr({self.source!r})"


# -- tokens ------------------------------------------------------------------------------------


class _Kind(StrEnum):
    STRING = "string"
    NUMBER = "number"
    DURATION = "duration"
    NAME = "name"
    KEYWORD = "keyword"
    SYMBOL = "symbol"
    END = "end"


@dataclass(frozen=True, slots=True, kw_only=True)
class _Token:
    kind: _Kind
    text: str
    value: Scalar
    column: int

    def describe(self) -> str:
        match self.kind:
            case _Kind.END:
                return "end of input"
            case _Kind.STRING:
                text = self.text if len(self.text) <= 30 else self.text[:27] + "..."
                return f"string {text}"
            case _Kind.NUMBER:
                return f"number {self.text}"
            case _Kind.DURATION:
                return f"duration {self.text}"
            case _Kind.NAME:
                return f"name '{self.text}'"
            case _Kind.KEYWORD | _Kind.SYMBOL:
                return f"'{self.text}'"
            case _:
                assert_never(self.kind)

    def is_(self, text: str) -> bool:
        return self.kind in (_Kind.KEYWORD, _Kind.SYMBOL) and self.text == text


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*", re.ASCII)
_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?", re.ASCII)
_KEYWORDS: Final = frozenset({"and", "or", "not", "in", "true", "false", "null"})
_KEYWORD_VALUES: Final[Mapping[str, Scalar]] = {"true": True, "false": False, "null": None}
_UNIT_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# Longest first, so that `<=` is not read as `<` then `=`. A `-` is scanned on its own: it
# subtracts after a value, and is part of a number anywhere else.
_SYMBOLS: Final = ("==", "!=", "<=", ">=", "<", ">", "(", ")", "[", "]", ",", "+")
_ESCAPES: Final = {"'": "'", '"': '"', "\\": "\\", "n": "\n"}
_WHITESPACE: Final = " \t\r\n"
_PYTHON_SPELLINGS: Final = {"True": "true", "False": "false", "None": "null"}
_CHARACTER_HINTS: Final = {
    "=": "; did you mean '=='?",
    "!": "; did you mean '!=' or 'not'?",
    "&": "; use 'and'",
    "|": "; use 'or'",
    "-": "; '-' is only allowed after a value, to subtract, or directly before a number",
}


def _scan_string(text: str, start: int) -> tuple[str, int]:
    """The value of the string literal opening at `start`, and the index just past it."""
    quote = text[start]
    parts: list[str] = []
    i = start + 1
    while i < len(text):
        ch = text[i]
        if ch == quote:
            return "".join(parts), i + 1
        if ch == "\\" and i + 1 < len(text):
            escaped = text[i + 1]
            if escaped not in _ESCAPES:
                raise ExprSyntaxError(
                    f"unknown escape '\\{escaped}' in a string; "
                    "the escapes are \\', \\\", \\\\ and \\n",
                    column=i + 1,
                )
            parts.append(_ESCAPES[escaped])
            i += 2
            continue
        parts.append(ch)
        i += 1
    raise ExprSyntaxError(
        f"unterminated string: no closing {quote} before the end of input", column=start + 1
    )


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i = 0
    while True:
        while i < len(text) and text[i] in _WHITESPACE:
            i += 1
        if i >= len(text):
            break
        column = i + 1
        ch = text[i]
        if ch in "'\"":
            value, end = _scan_string(text, i)
            tokens.append(_Token(kind=_Kind.STRING, text=text[i:end], value=value, column=column))
            i = end
            continue
        if ch == "-" and _ends_value(tokens):
            tokens.append(_Token(kind=_Kind.SYMBOL, text="-", value=None, column=column))
            i += 1
            continue
        if number := _NUMBER.match(text, i):
            token = _number_token(text, number)
            tokens.append(token)
            i += len(token.text)
            continue
        if name := _NAME.match(text, i):
            word, end = name.group(), name.end()
            if end < len(text) and text[end] == ".":
                raise ExprSyntaxError("expected a name after '.'", column=end + 2)
            tokens.append(_word_token(word, column))
            i = end
            continue
        symbol = next((s for s in _SYMBOLS if text.startswith(s, i)), None)
        if symbol is None:
            hint = _CHARACTER_HINTS.get(ch, "")
            raise ExprSyntaxError(f"unexpected character {ch!r}{hint}", column=column)
        tokens.append(_Token(kind=_Kind.SYMBOL, text=symbol, value=None, column=column))
        i += len(symbol)
    # The end sits just past the last token, which is where a missing value belongs.
    end_column = len(text.rstrip(_WHITESPACE)) + 1
    tokens.append(_Token(kind=_Kind.END, text="", value=None, column=end_column))
    return tokens


def _ends_value(tokens: list[_Token]) -> bool:
    """Whether the last token can end an operand, so that a `-` after it subtracts."""
    if not tokens:
        return False
    last = tokens[-1]
    if last.kind in (_Kind.STRING, _Kind.NUMBER, _Kind.DURATION, _Kind.NAME):
        return True
    if last.kind is _Kind.KEYWORD:
        return last.text in _KEYWORD_VALUES
    return last.is_(")") or last.is_("]")


def _number_token(text: str, number: re.Match[str]) -> _Token:
    """The number or duration whose digits `number` matched, with its unit if it has one."""
    raw, start = number.group(), number.start()
    end = number.end()
    while end < len(text) and (text[end].isalnum() or text[end] in "._"):
        end += 1
    word, unit = text[start:end], text[number.end() : end]
    column = start + 1
    if unit in _UNIT_SECONDS:
        if "." in raw:
            raise ExprSyntaxError(
                f"malformed duration {word!r}: a duration is a whole number and a unit, "
                "e.g. 90m rather than 1.5h",
                column=column,
            )
        try:
            value: Scalar = timedelta(seconds=int(raw) * _UNIT_SECONDS[unit])
        except OverflowError:
            raise ExprSyntaxError(
                f"duration {word!r} is out of range (at most 999999999 days)", column=column
            ) from None
        return _Token(kind=_Kind.DURATION, text=word, value=value, column=column)
    if unit:
        hint = ""
        if unit[0].isascii() and unit[0].isalpha():
            hint = "; a duration is a whole number directly followed by s, m, h, d or w"
        raise ExprSyntaxError(f"malformed number {word!r}{hint}", column=column)
    value = float(raw) if "." in raw else int(raw)
    return _Token(kind=_Kind.NUMBER, text=raw, value=value, column=column)


def _word_token(word: str, column: int) -> _Token:
    if word in _KEYWORDS:
        return _Token(kind=_Kind.KEYWORD, text=word, value=_KEYWORD_VALUES.get(word), column=column)
    first = word.split(".", 1)[0]
    if first in _KEYWORDS:
        raise ExprSyntaxError(f"'{first}' is a keyword and cannot start a name", column=column)
    if word in _PYTHON_SPELLINGS:
        raise ExprSyntaxError(
            f"unknown name '{word}'; did you mean '{_PYTHON_SPELLINGS[word]}'?", column=column
        )
    return _Token(kind=_Kind.NAME, text=word, value=None, column=column)


# -- parser ------------------------------------------------------------------------------------

_ARITH_SYMBOLS: Final = {"+": ArithOp.ADD, "-": ArithOp.SUB}
_COMPARE_SYMBOLS: Final = {
    "==": CompareOp.EQ,
    "!=": CompareOp.NE,
    "<": CompareOp.LT,
    "<=": CompareOp.LE,
    ">": CompareOp.GT,
    ">=": CompareOp.GE,
}


class _Parser:
    def __init__(self, tokens: list[_Token], roots: frozenset[str] | None) -> None:
        self._tokens = tokens
        self._pos = 0
        self._depth = 0
        self._roots = roots
        self.names: set[str] = set()

    def parse(self) -> Node:
        if self._peek().kind is _Kind.END:
            raise ExprSyntaxError("the condition is empty", column=1)
        node = self._or()
        token = self._peek()
        if token.kind is not _Kind.END:
            raise ExprSyntaxError(
                f"expected an operator or end of input, found {token.describe()}",
                column=token.column,
            )
        return node

    def _peek(self, ahead: int = 0) -> _Token:
        return self._tokens[min(self._pos + ahead, len(self._tokens) - 1)]

    def _advance(self) -> _Token:
        token = self._peek()
        self._pos = min(self._pos + 1, len(self._tokens) - 1)
        return token

    def _enter(self, token: _Token) -> None:
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise ExprSyntaxError(f"nesting is deeper than {MAX_DEPTH} levels", column=token.column)

    def _logic(self, op: Logic, operand: Callable[[], Node]) -> Node:
        first = self._peek()
        operands = [operand()]
        while self._peek().is_(op.value):
            self._advance()
            operands.append(operand())
        if len(operands) == 1:
            return operands[0]
        return BoolOp(op=op, operands=tuple(operands), column=first.column)

    def _or(self) -> Node:
        return self._logic(Logic.OR, self._and)

    def _and(self) -> Node:
        return self._logic(Logic.AND, self._not)

    def _not(self) -> Node:
        token = self._peek()
        if not token.is_("not"):
            return self._comparison()
        self._advance()
        self._enter(token)
        operand = self._not()
        self._depth -= 1
        return Not(operand=operand, column=token.column)

    def _compare_op(self) -> CompareOp | None:
        """The comparison operator at the cursor, consumed; None (nothing consumed) if none."""
        token = self._peek()
        if token.kind is _Kind.SYMBOL and token.text in _COMPARE_SYMBOLS:
            self._advance()
            return _COMPARE_SYMBOLS[token.text]
        if token.is_("in"):
            self._advance()
            return CompareOp.IN
        if token.is_("not"):
            following = self._peek(1)
            if not following.is_("in"):
                raise ExprSyntaxError(
                    f"expected 'in' after 'not', found {following.describe()}",
                    column=following.column,
                )
            self._advance()
            self._advance()
            return CompareOp.NOT_IN
        return None

    def _comparison(self) -> Node:
        left = self._sum()
        op_token = self._peek()
        op = self._compare_op()
        if op is None:
            return left
        right = self._sum()
        chained = self._peek()
        if self._compare_op() is not None:
            raise ExprSyntaxError(
                f"comparisons cannot be chained: found {chained.describe()} after a "
                f"'{op.value}' comparison; join them with 'and'",
                column=chained.column,
            )
        return Compare(op=op, left=left, right=right, column=op_token.column)

    def _sum(self) -> Node:
        first = self._primary()
        terms: list[Term] = []
        while (token := self._peek()).kind is _Kind.SYMBOL and token.text in _ARITH_SYMBOLS:
            self._advance()
            operand = self._primary()
            terms.append(Term(op=_ARITH_SYMBOLS[token.text], operand=operand, column=token.column))
        if not terms:
            return first
        return Sum(first=first, terms=tuple(terms), column=terms[0].column)

    def _primary(self) -> Node:
        token = self._peek()
        match token.kind:
            case _Kind.STRING | _Kind.NUMBER | _Kind.DURATION:
                self._advance()
                return Const(value=token.value, column=token.column)
            case _Kind.NAME:
                self._advance()
                return self._name(token)
            case _Kind.KEYWORD if token.text in _KEYWORD_VALUES:
                self._advance()
                return Const(value=token.value, column=token.column)
            case _Kind.SYMBOL if token.text == "(":
                self._advance()
                self._enter(token)
                inner = self._or()
                self._close(")", token)
                self._depth -= 1
                return inner
            case _Kind.SYMBOL if token.text == "[":
                self._advance()
                self._enter(token)
                items = self._list_items(token)
                self._depth -= 1
                return ListOf(items=items, column=token.column)
            case _:
                raise self._expected_value(token)

    def _list_items(self, opening: _Token) -> tuple[Node, ...]:
        items: list[Node] = []
        while not self._peek().is_("]"):
            items.append(self._or())
            if not self._peek().is_(","):
                break
            self._advance()
        self._close("]", opening)
        return tuple(items)

    def _close(self, closing: str, opening: _Token) -> None:
        token = self._peek()
        if not token.is_(closing):
            what = "',' or ']' to continue or close" if closing == "]" else f"'{closing}' to close"
            raise ExprSyntaxError(
                f"expected {what} the '{opening.text}' at column {opening.column}, "
                f"found {token.describe()}",
                column=token.column,
            )
        self._advance()

    def _name(self, token: _Token) -> Name:
        node = Name(path=tuple(token.text.split(".")), column=token.column)
        if self._roots is not None and node.path[0] not in self._roots:
            allowed = ", ".join(sorted(self._roots)) or "(none)"
            raise ExprSyntaxError(
                f"unknown name '{token.text}': names start with one of {allowed}",
                column=token.column,
            )
        self.names.add(token.text)
        return node

    def _expected_value(self, found: _Token) -> ExprSyntaxError:
        after = ""
        if self._pos > 0:
            after = f" after {self._tokens[self._pos - 1].describe()}"
        return ExprSyntaxError(
            f"expected a value{after}, found {found.describe()}", column=found.column
        )


def parse(text: str, roots: frozenset[str] | None = None) -> Expr:
    """Compile `text` once; with `roots`, every name must start with one of them.

    Raises ExprSyntaxError (a ConfigError) whose `.column` is 1-based.
    """
    if len(text) > MAX_SOURCE_LENGTH:
        raise ExprSyntaxError(
            f"the condition is {len(text)} characters long; the limit is {MAX_SOURCE_LENGTH}",
            column=MAX_SOURCE_LENGTH + 1,
        )
    parser = _Parser(_tokenize(text), roots)
    tree = parser.parse()
    return Expr(source=text, tree=tree, names=frozenset(parser.names))


# -- evaluation --------------------------------------------------------------------------------


class _Type(StrEnum):
    NULL = "null"
    BOOLEAN = "boolean"
    NUMBER = "number"
    STRING = "string"
    DATETIME = "datetime"
    DURATION = "duration"
    LIST = "list"
    OBJECT = "object"
    UNSUPPORTED = "unsupported"


def _type_of(value: object) -> _Type:
    if value is None:
        return _Type.NULL
    if isinstance(value, bool):
        return _Type.BOOLEAN
    if isinstance(value, int | float):
        return _Type.NUMBER
    if isinstance(value, str):
        return _Type.STRING
    if isinstance(value, datetime):
        # Naive datetimes cannot be ordered against the aware ones dripd uses everywhere.
        return _Type.DATETIME if value.utcoffset() is not None else _Type.UNSUPPORTED
    if isinstance(value, timedelta):
        return _Type.DURATION
    if isinstance(value, list | tuple):
        return _Type.LIST
    if isinstance(value, Mapping):
        return _Type.OBJECT
    return _Type.UNSUPPORTED


def _type_name(value: object) -> str:
    kind = _type_of(value)
    if kind is not _Type.UNSUPPORTED:
        return kind.value
    if isinstance(value, datetime):
        return "datetime without a timezone"
    return f"unsupported type {type(value).__name__}"


def _describe(node: Node, value: object) -> str:
    """How an operand appears in an error: its type, and its name when it has one."""
    if isinstance(node, Name):
        if value is None:
            return f"{node.dotted} (null or missing)"
        return f"{node.dotted} ({_type_name(value)})"
    return _type_name(value)


def _resolve(path: tuple[str, ...], context: Mapping[str, Any]) -> object:
    current: object = context
    for part in path:
        if not isinstance(current, Mapping) or part not in current:
            return None
        current = current[part]
    return current


def _same(left: object, right: object) -> bool:
    """Equality without coercion: `1 == true` is false, even inside lists."""
    kind = _type_of(left)
    if kind is not _type_of(right):
        return False
    if isinstance(left, list | tuple) and isinstance(right, list | tuple):
        return len(left) == len(right) and all(
            _same(a, b) for a, b in zip(left, right, strict=True)
        )
    if isinstance(left, Mapping) and isinstance(right, Mapping):
        return left.keys() == right.keys() and all(_same(left[k], right[k]) for k in left)
    if kind is _Type.UNSUPPORTED:
        return False
    return bool(left == right)


_ORDERING: Final[Mapping[CompareOp, Callable[[Any, Any], Any]]] = {
    CompareOp.LT: operator.lt,
    CompareOp.LE: operator.le,
    CompareOp.GT: operator.gt,
    CompareOp.GE: operator.ge,
}
_ORDERABLE: Final = frozenset({_Type.NUMBER, _Type.STRING, _Type.DATETIME, _Type.DURATION})
_ARITHMETIC: Final[Mapping[ArithOp, Callable[[Any, Any], Any]]] = {
    ArithOp.ADD: operator.add,
    ArithOp.SUB: operator.sub,
}
_ARITH_NEEDS: Final = {
    ArithOp.ADD: "two numbers, two durations, or a datetime and a duration",
    ArithOp.SUB: "two numbers, two durations, two datetimes, or a datetime minus a duration",
}


def _fail(node: Node | Term, message: str) -> EvaluationError:
    return EvaluationError(f"column {node.column}: {message}")


def _equal(node: Compare, left: object, right: object) -> bool:
    left_type, right_type = _type_of(left), _type_of(right)
    if _Type.UNSUPPORTED in (left_type, right_type):
        raise _fail(
            node,
            f"'{node.op.value}' cannot compare {_describe(node.left, left)} "
            f"with {_describe(node.right, right)}",
        )
    if _Type.NULL in (left_type, right_type):
        return left_type is right_type
    if left_type is not right_type:
        raise _fail(
            node,
            f"'{node.op.value}' cannot compare {_describe(node.left, left)} "
            f"with {_describe(node.right, right)}; only null compares with every type",
        )
    return _same(left, right)


def _order(node: Compare, left: object, right: object) -> bool:
    left_type, right_type = _type_of(left), _type_of(right)
    if left_type is not right_type or left_type not in _ORDERABLE:
        raise _fail(
            node,
            f"'{node.op.value}' needs two numbers, two strings, two datetimes or two durations, "
            f"got {_describe(node.left, left)} and {_describe(node.right, right)}",
        )
    return bool(_ORDERING[node.op](left, right))


def _contains(node: Compare, left: object, right: object) -> bool:
    left_type = _type_of(left)
    op = node.op.value
    if isinstance(right, str):
        if not isinstance(left, str):
            raise _fail(
                node,
                f"'{op}' with a string on the right needs a string on the left, "
                f"got {_describe(node.left, left)}",
            )
        return left in right
    if not isinstance(right, list | tuple):
        raise _fail(
            node,
            f"'{op}' needs a list or a string on the right, got {_describe(node.right, right)}",
        )
    if left_type is _Type.UNSUPPORTED:
        raise _fail(node, f"'{op}' cannot look for {_describe(node.left, left)}")
    for item in right:
        item_type = _type_of(item)
        if left_type is not _Type.NULL and item_type not in (left_type, _Type.NULL):
            raise _fail(
                node,
                f"'{op}' cannot look for {_describe(node.left, left)} in a list "
                f"holding a {_type_name(item)}",
            )
    return any(_same(left, item) for item in right)


def _compare(node: Compare, context: Mapping[str, Any]) -> bool:
    left = _eval(node.left, context)
    right = _eval(node.right, context)
    match node.op:
        case CompareOp.EQ:
            return _equal(node, left, right)
        case CompareOp.NE:
            return not _equal(node, left, right)
        case CompareOp.LT | CompareOp.LE | CompareOp.GT | CompareOp.GE:
            return _order(node, left, right)
        case CompareOp.IN:
            return _contains(node, left, right)
        case CompareOp.NOT_IN:
            return not _contains(node, left, right)
        case _:
            assert_never(node.op)


def _elapsed(later: datetime, earlier: datetime) -> timedelta:
    """`later - earlier` in elapsed time, even when both share a zone with DST changes.

    Python subtracts datetimes with the same tzinfo by wall clock; this does not, and unlike
    converting both to UTC it cannot leave the datetime range.
    """
    wall = later.replace(tzinfo=None) - earlier.replace(tzinfo=None)
    offsets = (later.utcoffset() or timedelta(0)) - (earlier.utcoffset() or timedelta(0))
    return wall - offsets


def _calculate(op: ArithOp, left: Any, right: Any) -> object:
    """`left op right` for operand types that go together, else None (never a result)."""
    calc = _ARITHMETIC[op]
    match _type_of(left), _type_of(right):
        case (_Type.NUMBER, _Type.NUMBER) | (_Type.DURATION, _Type.DURATION):
            return calc(left, right)
        case (_Type.DATETIME, _Type.DURATION):
            # In UTC, so that a duration is elapsed time across DST changes too.
            return calc(left.astimezone(UTC), right)
        case (_Type.DURATION, _Type.DATETIME) if op is ArithOp.ADD:
            return right.astimezone(UTC) + left
        case (_Type.DATETIME, _Type.DATETIME) if op is ArithOp.SUB:
            return _elapsed(left, right)
        case _:
            return None


def _sum(node: Sum, context: Mapping[str, Any]) -> object:
    total = _eval(node.first, context)
    # Errors name the first operand, and only the type of a running total.
    left: Node = node.first
    for term in node.terms:
        right = _eval(term.operand, context)
        try:
            result = _calculate(term.op, total, right)
        except OverflowError:
            raise _fail(
                term,
                f"'{term.op.value}' of {_describe(left, total)} and "
                f"{_describe(term.operand, right)} is out of range",
            ) from None
        if result is None:
            raise _fail(
                term,
                f"'{term.op.value}' needs {_ARITH_NEEDS[term.op]}, got "
                f"{_describe(left, total)} and {_describe(term.operand, right)}",
            )
        total, left = result, node
    return total


def _boolean(node: Node, operator_name: str, context: Mapping[str, Any]) -> bool:
    value = _eval(node, context)
    if not isinstance(value, bool):
        raise _fail(node, f"'{operator_name}' needs true or false, got {_describe(node, value)}")
    return value


def _eval(node: Node, context: Mapping[str, Any]) -> object:
    match node:
        case Const():
            return node.value
        case Name():
            return _resolve(node.path, context)
        case ListOf():
            return [_eval(item, context) for item in node.items]
        case Not():
            return not _boolean(node.operand, "not", context)
        case BoolOp():
            # `or` stops at the first true operand, `and` at the first false one.
            stop = node.op is Logic.OR
            for operand in node.operands:
                if _boolean(operand, node.op.value, context) is stop:
                    return stop
            return not stop
        case Compare():
            return _compare(node, context)
        case Sum():
            return _sum(node, context)
        case _:
            assert_never(node)


def evaluate(expr: Expr, context: Mapping[str, Any]) -> bool:
    """Evaluate `expr` against `context` (e.g. {"data": {...}, "now": datetime}) strictly.

    Names walk nested mappings; a missing name is null. `==`/`!=` need two values of one type
    unless one is null; ordering needs two numbers, strings, aware datetimes or durations (bool
    is not a number, ISO strings are not dates); `in` needs a list, or a string for a
    substring; `and`/`or`/`not` need booleans and short-circuit. `+` and `-` take two numbers
    or two durations, a datetime plus or minus a duration (a datetime), a duration plus a
    datetime, or a datetime minus a datetime (a duration); datetime arithmetic is in elapsed
    time, and its results are in UTC. A duration is a `timedelta`, in the context as in
    literals. Anything else, and a result out of range, raises EvaluationError.
    """
    result = _eval(expr.tree, context)
    if not isinstance(result, bool):
        raise _fail(
            expr.tree,
            f"the condition must be true or false, got {_describe(expr.tree, result)}",
        )
    return result


def evaluate_safely(expr: Expr, context: Mapping[str, Any]) -> tuple[bool, str | None]:
    """`(evaluate(expr, context), None)`, or `(False, reason)` when it cannot be evaluated.

    Never raises: a condition that cannot be decided does not hold.
    """
    try:
        return evaluate(expr, context), None
    except EvaluationError as exc:
        return False, str(exc)
    except RecursionError:
        return False, "the condition's values are nested too deeply to compare"
    except (TypeError, ValueError, LookupError) as exc:
        # Context values come from hooks and host applications; an odd mapping or sequence
        # type must fail the condition closed rather than crash the step.
        return False, f"the condition could not be evaluated: {type(exc).__name__}: {exc}"
