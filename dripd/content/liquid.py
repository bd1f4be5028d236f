"""Liquid templates, compiled once per step version and rendered per execution."""

from __future__ import annotations

import functools
import inspect
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TextIO

from liquid import Environment, FalsyStrictUndefined, Markup, RenderContext, Undefined
from liquid.builtin.output import Output, OutputNode
from liquid.builtin.tags.echo_tag import EchoNode, EchoTag
from liquid.exceptions import FilterArgumentError, LiquidError
from liquid.filter import flatten, string_filter
from liquid.stringify import to_liquid_string

# Fields rendered with HTML auto-escaping: a value is escaped unless the template marks it
# `| safe`. Every other field (subject, text, body, to, hook fields) is plain text.
HTML_FIELDS = frozenset({"html", "mjml"})
# Fields that become a header value (or its display name): folded to one line.
HEADER_FIELDS = frozenset({"subject", "to", "from", "reply_to"})

# Control characters and Unicode line breaks (tab excepted); a run of whitespace holding one
# of them would end a header line, so the run becomes one space.
_BREAKS = "\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029"
_BREAK_RUN = re.compile(rf"\s*[{_BREAKS}][\s{_BREAKS}]*")


class _Undefined(FalsyStrictUndefined):
    """Strict: printing or filtering an undefined variable is an error.

    It is still falsy in `{% if %}`, so templates can test for optional data,
    and `| default:` works, so they can fill it in.
    """

    force_liquid_default = True


class TemplateError(Exception):
    """A template failed to compile or render (a permanent failure of its step)."""


@dataclass(frozen=True, slots=True)
class Template:
    source: str
    field: str
    _compiled: Any

    def render(self, context: Mapping[str, Any]) -> str:
        """Render with `context`; an undefined variable or a template error raises
        TemplateError. A header field comes back folded to one line."""
        try:
            text = str(self._compiled.render(**context))
        except LiquidError as exc:
            raise TemplateError(f"{self.field}: {_first_line(exc)}") from exc
        return fold_header(text) if self.field in HEADER_FIELDS else text

    def hooks(self) -> frozenset[str]:
        """The hooks this template reads (`hooks.<name>…`); `*` when it reads `hooks` whole."""
        return frozenset(
            str(path[1]) if len(path) > 1 else "*"
            for path in self._compiled.global_variable_segments()
            if path[0] == "hooks"
        )


def compile_template(source: str, *, field: str) -> Template:
    """Compile `source` for `field` (auto-escaped if it is an HTML field); a syntax error
    raises TemplateError naming `field`, line and column."""
    env = _HTML if field in HTML_FIELDS else _PLAIN
    try:
        return Template(source, field, env.from_string(source))
    except LiquidError as exc:
        raise TemplateError(f"{field}: {_first_line(exc)}") from exc


def fold_header(value: str) -> str:
    """`value` on one line: each whitespace run holding a line break or another control
    character becomes one space, and the ends are stripped."""
    return _BREAK_RUN.sub(" ", value).strip()


def _first_line(exc: LiquidError) -> str:
    text = str(exc).strip()
    head = text.splitlines()[0] if text else type(exc).__name__
    # python-liquid adds "-> 'source' line:col" on the second line; keep the position.
    lines = text.splitlines()
    where = next((ln.strip() for ln in lines[1:2] if ln.strip().startswith("->")), "")
    position = where.rsplit(" ", 1)[-1] if where else ""
    return f"{head} (line:column {position})" if position else head


# --- what a value prints as ---------------------------------------------------------------


_SCALARS: Final = frozenset({str, int, float})


def _text(value: object, *, autoescape: bool) -> str:
    """`value` as output prints it: nil as nothing, booleans as `true`/`false` (also inside
    arrays, whose items run together), a hash as JSON, anything else as python-liquid
    prints it (an undefined value raises)."""
    if type(value) in _SCALARS:  # the common case, without the ABC checks below
        return to_liquid_string(value, autoescape)
    if isinstance(value, (list, tuple)):
        parts = [_text(item, autoescape=autoescape) for item in value]
        return Markup("").join(parts) if autoescape else "".join(parts)
    if isinstance(value, Mapping) and not isinstance(value, Undefined):
        value = json.dumps(value, ensure_ascii=False, default=str)
    return to_liquid_string(value, autoescape)


def _spelled(value: object) -> object:
    """`value` as a filter that turns it into a string should see it (Liquid's spelling of
    nil, booleans, arrays and hashes, not Python's); other values unchanged."""
    if type(value) in _SCALARS:
        return value
    hash_ = isinstance(value, Mapping) and not isinstance(value, Undefined)
    if value is None or isinstance(value, (bool, list, tuple)) or hash_:
        return _text(value, autoescape=False)
    return value


class _OutputNode(OutputNode):
    def render_to_output(self, context: RenderContext, buffer: TextIO) -> int:
        return buffer.write(_text(self.expression.evaluate(context), autoescape=context.autoescape))

    async def render_to_output_async(self, context: RenderContext, buffer: TextIO) -> int:
        value = await self.expression.evaluate_async(context)
        return buffer.write(_text(value, autoescape=context.autoescape))


class _Output(Output):
    node_class = _OutputNode


class _EchoNode(_OutputNode, EchoNode):
    pass


class _Echo(EchoTag):
    node_class = _EchoNode


# --- filters ------------------------------------------------------------------------------

# Every wrapper python-liquid's `string_filter` makes shares this code object: it marks the
# filters that stringify their input (with Python's `str`, which spells nil `None`).
_STRING_FILTER_CODE = string_filter(lambda value: value).__code__


def _strict(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """`func` as dripd's templates call it.

    - An undefined input or argument fails as printing it would (python-liquid's filters
      would read it as `""` or `0`).
    - A nil or boolean argument reaches the filter as Liquid spells it (`""`, `true`,
      `false`), except where the filter itself takes nil to mean "not given".
    - A string filter's input and arguments are spelled the same way, arrays and hashes
      included.
    - A Python error of the filter on a bad value fails the step as a filter error.
    """
    params = [
        p
        for p in inspect.signature(func).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ][1:]
    positions = [p.name for p in params]
    nil_means_absent = {p.name for p in params if p.default is None}
    takes_text = getattr(func, "__code__", None) is _STRING_FILTER_CODE

    def argument(param: str | None, value: object) -> object:
        if type(value) in _SCALARS or param in nil_means_absent:
            return value
        if value is None or isinstance(value, bool) or takes_text:
            return _spelled(value)
        return value  # an array stays one: `concat` takes it

    @functools.wraps(func)
    def strict(left: object, *args: object, **kwargs: object) -> Any:
        for value in (left, *args, *kwargs.values()):
            if isinstance(value, Undefined):
                value.poke()  # raises UndefinedError, as printing it does
        if takes_text:
            left = _spelled(left)
        if args:
            args = tuple(
                argument(positions[i] if i < len(positions) else None, v)
                for i, v in enumerate(args)
            )
        if kwargs:
            kwargs = {k: argument(k, v) if k in positions else v for k, v in kwargs.items()}
        try:
            return func(left, *args, **kwargs)
        except (ArithmeticError, LookupError, ValueError) as exc:
            raise FilterArgumentError(f"{name}: {type(exc).__name__}: {exc}", token=None) from exc

    return strict


def _spelling_items(join: Callable[..., Any]) -> Callable[..., Any]:
    """`join` with its items and separator spelled as Liquid prints them (`str` would
    spell nil `None`)."""

    @functools.wraps(join)
    def spelled(left: object, *args: object, **kwargs: object) -> Any:
        if isinstance(left, (list, tuple)):
            left = [_spelled(item) for item in flatten(left)]
        else:
            left = _spelled(left)
        return join(left, *map(_spelled, args), **kwargs)

    return spelled


def _nil_as_empty(date: Callable[..., Any]) -> Callable[..., Any]:
    """`date` giving nothing for nil, as it does for an undefined value and Liquid does."""

    @functools.wraps(date)
    def dated(left: object, *args: object, **kwargs: object) -> Any:
        return "" if left is None else date(left, *args, **kwargs)

    return dated


class _Environment(Environment):
    """python-liquid's default environment with dripd's rules: strict undefined values
    (also through filters), nil printed as nothing, booleans as `true`/`false`."""

    def __init__(self, *, autoescape: bool) -> None:
        super().__init__(undefined=_Undefined, autoescape=autoescape)

    def setup_tags_and_filters(self, *, extra: bool = False) -> None:
        super().setup_tags_and_filters(extra=extra)
        self.add_tag(_Output)
        self.add_tag(_Echo)
        self.filters["join"] = _spelling_items(self.filters["join"])
        self.filters["date"] = _nil_as_empty(self.filters["date"])
        for name, func in list(self.filters.items()):
            if name != "default":  # it exists to fill in undefined and nil values
                self.filters[name] = _strict(name, func)


_PLAIN = _Environment(autoescape=False)
_HTML = _Environment(autoescape=True)
