"""Liquid templates, compiled once per step version and rendered per execution.

dripd's dialect of python-liquid: strict about undefined values, Liquid's spelling of nil
and booleans, no `include` or `render`, and bounded (README, "Sequence file and template
limits"): loop iterations, output, filter results, variables, nesting and time per
render. What a template's text alone breaks is refused when it compiles (at apply); the
rest fails its render with a TemplateError naming the limit. `render_fields` keeps slow
renders off the event loop.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from io import StringIO
from itertools import islice
from typing import Any, Final, TextIO

import anyio
from liquid import (
    BoundTemplate,
    Environment,
    FalsyStrictUndefined,
    Markup,
    RenderContext,
    Undefined,
)
from liquid.ast import BlockNode, Node
from liquid.builtin.content import ContentNode
from liquid.builtin.expressions import LoopExpression, StringLiteral
from liquid.builtin.expressions.primitive import IntegerLiteral, RangeLiteral
from liquid.builtin.output import Output, OutputNode
from liquid.builtin.tags.echo_tag import EchoNode, EchoTag
from liquid.builtin.tags.for_tag import ForNode, ForTag
from liquid.builtin.tags.liquid_tag import LiquidNode
from liquid.builtin.tags.tablerow_tag import TablerowNode, TablerowTag
from liquid.exceptions import (
    BlockNestingError,
    ContextDepthError,
    FilterArgumentError,
    LiquidError,
    LiquidSyntaxError,
    LocalNamespaceLimitError,
    LoopIterationLimitError,
    OutputStreamLimitError,
    ResourceLimitError,
)
from liquid.expression import Expression
from liquid.filter import flatten, sequence_filter, string_filter
from liquid.stream import TokenStream
from liquid.stringify import to_liquid_string
from liquid.tag import Tag
from liquid.token import Token

# Fields rendered with HTML auto-escaping: a value is escaped unless the template marks it
# `| safe`. Every other field (subject, text, body, to, hook fields) is plain text.
HTML_FIELDS = frozenset({"html", "mjml"})
# Fields that become a header value (or its display name): folded to one line.
HEADER_FIELDS = frozenset({"subject", "to", "from", "reply_to"})
#: A step's extra email header `Name` is the template field `header:Name` (folded too).
HEADER_PREFIX = "header:"
#: A step's `whatsapp_template` is the template fields `wa:name`, `wa:language` and one
#: `wa:param:N` per body parameter.
WA_NAME = "wa:name"
WA_LANGUAGE = "wa:language"
WA_PARAM = "wa:param:"
#: The fields a step's `spintax = true` resolves in: the message's words (and a WhatsApp
#: template's parameters), never its addresses or extra headers.
SPUN_FIELDS = frozenset({"subject", "text", "html", "mjml", "body"})


def is_spun(field: str) -> bool:
    """Whether spintax applies to template field `field`."""
    return field in SPUN_FIELDS or field.startswith(WA_PARAM)


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


class RenderTimeout(TemplateError):
    """A render ran past its time limit."""


# --- limits -------------------------------------------------------------------------------
# What one render may spend (README, "Sequence file and template limits"). Each is enforced
# while rendering; what a template's text alone already exceeds is refused when it is
# compiled (at apply).

#: The longest template source, in characters.
MAX_TEMPLATE_CHARS: Final = 65_536
#: The most loop iterations one render runs, counted over all its `for` and `tablerow`
#: loops; a single loop (times the loops around it) over more items fails before it starts.
LOOP_LIMIT: Final = 10_000
#: The most characters a rendered template, a capture in it, or a filter's result on the
#: way may hold.
OUTPUT_LIMIT: Final = 1_048_576
#: The most items an array a filter makes may hold.
MAX_ITEMS: Final = 100_000
#: The largest integer a filter may make, in bits (about 4200 digits: Python prints
#: integers of at most 4300).
MAX_INT_BITS: Final = 14_000
#: How much the variables a template assigns or captures may hold: python-liquid's local
#: namespace limit, which sums `sys.getsizeof` of the values (about their size in bytes).
NAMESPACE_LIMIT: Final = 1_048_576
#: How deep blocks may nest ({% if %} in {% for %} …) and render contexts may stack:
#: python-liquid's defaults.
NESTING_LIMIT: Final = 30
#: The longest one template field may take to render, in seconds.
RENDER_TIMEOUT: Final = 1.0
#: A render that takes longer than this (seconds) is finished in a worker thread, so that
#: it does not hold up the event loop; so is one that gives a filter an array, a hash or a
#: string longer than INLINE_CHARS (what a filter then costs grows with that input).
INLINE_RENDER: Final = 0.005
INLINE_CHARS: Final = 4096
#: How many worker threads may render at once (see `render_fields`).
RENDER_THREADS: Final = 2


class RenderTimeLimitError(ResourceLimitError):
    """A render ran past its deadline."""


@dataclass(slots=True)
class _Budget:
    """What the render running in this context has left: its deadline (time.monotonic())
    and the loop iterations it has run. `inline`: it runs on the event loop (see
    `render_fields`), and gives up on any filter input that may be slow."""

    deadline: float
    timeout: float
    inline: bool = False
    iterations: int = 0


_BUDGET: ContextVar[_Budget | None] = ContextVar("dripd_render_budget", default=None)


def _check_time() -> None:
    budget = _BUDGET.get()
    if budget is not None and time.monotonic() > budget.deadline:
        raise RenderTimeLimitError("render time limit reached", token=None)


def _inline() -> bool:
    budget = _BUDGET.get()
    return budget is not None and budget.inline


def _limit_message(exc: ResourceLimitError, timeout: float) -> str:
    """What a limit error says, naming the limit."""
    if isinstance(exc, LoopIterationLimitError):
        return f"more than {LOOP_LIMIT} loop iterations (the limit per render)"
    if isinstance(exc, OutputStreamLimitError):
        return f"output longer than {OUTPUT_LIMIT} characters (the limit)"
    if isinstance(exc, LocalNamespaceLimitError):
        return f"assigned variables hold more than {NAMESPACE_LIMIT} bytes (the limit)"
    if isinstance(exc, BlockNestingError):
        return f"blocks nest more than {NESTING_LIMIT} deep (the limit)"
    if isinstance(exc, ContextDepthError):
        return f"contexts nest more than {NESTING_LIMIT} deep (the limit)"
    if isinstance(exc, RenderTimeLimitError):
        return f"rendering took longer than {timeout:g}s (the limit)"
    return _head_line(exc)


@dataclass(frozen=True, slots=True)
class Template:
    source: str
    field: str
    _compiled: Any
    _broken: str | None = None  # why a stored template no longer compiles (compile_stored)

    def render(self, context: Mapping[str, Any], *, timeout: float = RENDER_TIMEOUT) -> str:
        """Render with `context`; an undefined variable, a template error or a limit
        exceeded (README, "Sequence file and template limits") raises TemplateError, and
        running past `timeout` seconds RenderTimeout. A header field comes back folded to
        one line."""
        return self._render(context, _Budget(deadline=time.monotonic() + timeout, timeout=timeout))

    def _render(self, context: Mapping[str, Any], budget: _Budget) -> str:
        if self._broken is not None:
            raise TemplateError(self._broken)
        token = _BUDGET.set(budget)
        try:
            text = str(self._compiled.render(**context))
        except RenderTimeLimitError as exc:
            raise RenderTimeout(f"{self.field}: {_described(exc, budget.timeout)}") from exc
        except LiquidError as exc:
            raise TemplateError(f"{self.field}: {_described(exc, budget.timeout)}") from exc
        finally:
            _BUDGET.reset(token)
        if self.field in HEADER_FIELDS or self.field.startswith(HEADER_PREFIX):
            return fold_header(text)
        return text

    def hooks(self) -> frozenset[str]:
        """The hooks this template reads (`hooks.<name>…`); `*` when it reads `hooks` whole."""
        if self._broken is not None:
            return frozenset()
        return frozenset(
            str(path[1]) if len(path) > 1 else "*"
            for path in self._compiled.global_variable_segments()
            if path[0] == "hooks"
        )


def compile_template(source: str, *, field: str) -> Template:
    """Compile `source` for `field` (auto-escaped if it is an HTML field); a syntax error,
    a template longer than MAX_TEMPLATE_CHARS, `{% include %}` or `{% render %}`, or loops
    whose literal ranges alone exceed a limit raise TemplateError naming `field` (and
    line and column)."""
    if len(source) > MAX_TEMPLATE_CHARS:
        raise TemplateError(
            f"{field}: the template is {len(source)} characters long; the limit is "
            f"{MAX_TEMPLATE_CHARS}"
        )
    env = _HTML if field in HTML_FIELDS else _PLAIN
    try:
        compiled = env.from_string(source)
    except LiquidError as exc:
        raise TemplateError(f"{field}: {_described(exc, RENDER_TIMEOUT)}") from exc
    problem = _static_problem(compiled.nodes)
    if problem is not None:
        raise TemplateError(f"{field}: {problem}")
    return Template(source, field, compiled)


def compile_stored(source: str, *, field: str) -> Template:
    """`compile_template` for a template `dripd apply` stored: one an earlier dripd
    accepted may break a limit added since, and then every render of it fails (a
    permanent failure of its step, naming the limit) instead of its whole batch."""
    try:
        return compile_template(source, field=field)
    except TemplateError as exc:
        return Template(source, field, None, f"{exc} (stored by an earlier dripd)")


async def render_fields(
    templates: Mapping[str, Template],
    context: Mapping[str, Any],
    *,
    limiter: anyio.CapacityLimiter,
) -> dict[str, str]:
    """Render each of `templates` with `context` (TemplateError as `Template.render`).

    Most renders take microseconds and run right here. One still running after
    INLINE_RENDER seconds (all fields together), or giving a filter an input that may be
    slow (see INLINE_CHARS), is stopped, and the whole set is rendered again in a worker
    thread (at most `limiter`'s tokens at once), each field within RENDER_TIMEOUT: a slow
    template holds up the event loop for a few milliseconds, not for its whole render."""
    deadline = time.monotonic() + INLINE_RENDER
    try:
        return {
            name: template._render(
                context, _Budget(deadline=deadline, timeout=INLINE_RENDER, inline=True)
            )
            for name, template in templates.items()
        }
    except RenderTimeout:
        pass  # slow: render again off the event loop
    return await anyio.to_thread.run_sync(
        functools.partial(render_all, templates, context), limiter=limiter
    )


def render_all(templates: Mapping[str, Template], context: Mapping[str, Any]) -> dict[str, str]:
    """Render each of `templates` with `context`, each within RENDER_TIMEOUT."""
    return {name: template.render(context) for name, template in templates.items()}


def _described(exc: LiquidError, timeout: float) -> str:
    """`exc` in one line with its position: a limit names the limit."""
    head = _limit_message(exc, timeout) if isinstance(exc, ResourceLimitError) else _head_line(exc)
    position = _position(exc)
    return f"{head} (line:column {position})" if position else head


def fold_header(value: str) -> str:
    """`value` on one line: each whitespace run holding a line break or another control
    character becomes one space, and the ends are stripped."""
    return _BREAK_RUN.sub(" ", value).strip()


def _head_line(exc: LiquidError) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _position(exc: LiquidError) -> str:
    # python-liquid adds "-> 'source' line:col" on the second line; keep the position.
    lines = str(exc).strip().splitlines()
    where = next((ln.strip() for ln in lines[1:2] if ln.strip().startswith("->")), "")
    return where.rsplit(" ", 1)[-1] if where else ""


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
        value = self.expression.evaluate(context)
        if isinstance(value, list | tuple | Mapping) and _inline():
            # Printing an array or a hash costs what it holds: not on the event loop.
            raise RenderTimeLimitError("not on the event loop", token=None)
        return buffer.write(_text(value, autoescape=context.autoescape))

    async def render_to_output_async(self, context: RenderContext, buffer: TextIO) -> int:
        value = await self.expression.evaluate_async(context)
        return buffer.write(_text(value, autoescape=context.autoescape))


class _Output(Output):
    node_class = _OutputNode


@functools.cache
def _timed(node_class: type[Node]) -> type[Node]:
    """`node_class`, checking the render's deadline before each node renders: a tag can
    cost much (an `if` testing a long array, an `assign` summing every variable's size
    for the namespace limit), and a template can hold thousands of them."""

    def render_to_output(self: Node, context: RenderContext, buffer: TextIO) -> int:
        _check_time()
        return node_class.render_to_output(self, context, buffer)

    namespace = {"__slots__": (), "render_to_output": render_to_output}
    timed: type[Node] = type(f"Timed{node_class.__name__}", (node_class,), namespace)
    return timed


class _EchoNode(_OutputNode, EchoNode):
    pass


class _Echo(EchoTag):
    node_class = _EchoNode


# --- loops --------------------------------------------------------------------------------


def _spending(items: Iterator[object]) -> Iterator[object]:
    """`items`, each one spending a loop iteration of the render's budget and checking its
    deadline, so that neither many loops nor a slow loop body escape the limits."""
    budget = _BUDGET.get()
    for item in items:
        if budget is not None:
            budget.iterations += 1
            if budget.iterations > LOOP_LIMIT:
                raise LoopIterationLimitError("loop iteration limit reached", token=None)
            if time.monotonic() > budget.deadline:
                raise RenderTimeLimitError("render time limit reached", token=None)
        yield item


class _Loop(LoopExpression):
    """A `for` or `tablerow` loop expression whose iterations spend the render's budget.

    A range (`(1..n)`) is sliced as a range: python-liquid would skip an `offset` item by
    item and list a `reversed` loop whole before any limit is checked, which for
    `(1..30000000)` alone takes seconds; and a loop longer than LOOP_LIMIT fails before
    anything is listed.
    """

    __slots__ = ()

    @classmethod
    def of(cls, loop: LoopExpression) -> _Loop:
        return cls(
            loop.token,
            loop.identifier,
            loop.iterable,
            limit=loop.limit,
            offset=loop.offset,
            reversed_=loop.reversed,
            cols=loop.cols,
        )

    def evaluate(self, context: RenderContext) -> tuple[Iterator[object], int]:
        """python-liquid's `LoopExpression.evaluate` and `_slice`, but a range is sliced as
        a range, and a `limit` that ends before the `offset` gives no items (python-liquid's
        `islice` raises ValueError)."""
        iterable = self.iterable.evaluate(context)
        limit = (
            self._to_int(self.limit.evaluate(context), token=self.limit.token)
            if self.limit is not None
            else None
        )
        offset: int | str | None = None
        if isinstance(self.offset, StringLiteral):
            value = self.offset.value
            offset = value if value == "continue" else self._to_int(value, token=self.offset.token)
        elif self.offset is not None:
            offset = self._to_int(self.offset.evaluate(context), token=self.offset.token)
        items: range | Iterator[object]
        if isinstance(iterable, range):
            items, length = iterable, max(iterable.stop - iterable.start, 0)  # steps by 1
        else:
            items, length = self._to_iter(iterable, context)
        key = f"{self.identifier}-{self.iterable}"
        start = context.stopindex(key) if offset == "continue" else int(offset or 0)
        stop = None if limit is None else limit + start
        first = min(max(start, 0), length)
        last = min(stop or length, length)
        context.stopindex(key=key, index=last)
        count = max(last - first, 0)
        if count > LOOP_LIMIT:
            raise LoopIterationLimitError("loop iteration limit reached", token=None)
        selected: Iterable[object]
        if isinstance(items, range):
            selected = items[first : first + count]
        else:
            selected = islice(items, first, first + count)
        if self.reversed:
            selected = reversed(list(selected))
        return _spending(iter(selected)), count

    async def evaluate_async(self, context: RenderContext) -> tuple[Iterator[object], int]:
        return self.evaluate(context)  # dripd renders synchronously; nothing here awaits


class _ForNode(ForNode):
    def __init__(
        self,
        token: Token,
        expression: LoopExpression,
        block: BlockNode,
        default: BlockNode | None = None,
    ) -> None:
        super().__init__(token, expression=_Loop.of(expression), block=block, default=default)


class _For(ForTag):
    node_class = _ForNode


class _TablerowNode(TablerowNode):
    def __init__(self, token: Token, expression: LoopExpression, block: BlockNode) -> None:
        super().__init__(token, expression=_Loop.of(expression), block=block)


class _Tablerow(TablerowTag):
    node_class = _TablerowNode


class _Unsupported(Tag):
    """`{% include %}` and `{% render %}`: a sequence's templates are self-contained, so a
    template naming another is refused when it is compiled (python-liquid would fail only
    when rendering: no template can be found)."""

    block = False

    def parse(self, stream: TokenStream) -> Node:
        raise LiquidSyntaxError(
            f"{{% {self.name} %}} is not supported: dripd has no other templates to "
            "include; write the text into this template",
            token=stream.current,
        )


class _Include(_Unsupported):
    name = "include"


class _Render(_Unsupported):
    name = "render"


def _static_problem(nodes: Iterable[Node]) -> str | None:
    """A limit that the loops over literal ranges (`{% for i in (1..20000) %}`) exceed
    whatever the data: iterations, or output from the text inside them; else None."""
    iterations, output = _static_cost(nodes)
    if iterations > LOOP_LIMIT:
        return (
            f"its loops over literal ranges run more than {LOOP_LIMIT} iterations (the "
            "limit per render)"
        )
    if output > OUTPUT_LIMIT:
        return (
            f"its loops over literal ranges write more than {OUTPUT_LIMIT} characters (the "
            "limit per template)"
        )
    return None


def _static_cost(nodes: Iterable[Node]) -> tuple[int, int]:
    """(iterations, bytes of output) that rendering `nodes` takes at least: text outside
    any block, and loops over literal ranges with their bodies; every other block may
    render nothing. Counts stop growing past the limits (so that nested loops stay small
    numbers)."""
    iterations = output = 0
    for node in nodes:
        if isinstance(node, ContentNode):
            output += len(node.text)
        elif isinstance(node, ForNode | TablerowNode):
            count = _literal_count(node.expression)
            if count:
                inner, text = _static_cost(node.block.nodes)
                iterations += count * (1 + inner)
                output += 0 if node.block.blank else count * text
        elif isinstance(node, LiquidNode):  # `{% liquid … %}`: its statements, unconditional
            inner, text = _static_cost(node.block.nodes)
            iterations, output = iterations + inner, output + text
        iterations, output = min(iterations, LOOP_LIMIT + 1), min(output, OUTPUT_LIMIT + 1)
    return iterations, output


def _literal_count(loop: LoopExpression) -> int:
    """How many times a loop over a literal range runs (its literal `limit` and `offset`
    applied), or 0 when that depends on the data."""
    if not isinstance(loop.iterable, RangeLiteral):
        return 0
    bounds = (loop.iterable.start, loop.iterable.stop)
    if not all(isinstance(b, IntegerLiteral) for b in bounds):
        return 0
    extras = [e for e in (loop.limit, loop.offset) if e is not None]
    if not all(isinstance(e, IntegerLiteral) for e in extras):
        return 0
    start, stop = (_int_value(b) for b in bounds)
    offset = _int_value(loop.offset) if loop.offset is not None else 0
    length = max(stop + 1 - start, 0)
    first = min(max(offset, 0), length)
    last = length if loop.limit is None else min(_int_value(loop.limit) + offset, length)
    return max(last - first, 0)


def _int_value(expression: Expression | None) -> int:
    assert isinstance(expression, IntegerLiteral)
    return int(expression.value)


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
        if type(value) in _SCALARS:
            return value
        if param in _PROPERTY_PARAMS and isinstance(value, list | tuple | Mapping):
            # Array filters read a property by this name (`map` spells it with `str` for
            # every item): spell an array or hash once, as Liquid does.
            return _spelled(value)
        if param in nil_means_absent:
            return value
        if value is None or isinstance(value, bool) or takes_text:
            return _spelled(value)
        return value  # an array stays one: `concat` takes it

    precheck = _PRECHECKS.get(name)
    may_be_slow = _may_be_slow if name not in _CONSTANT_TIME else lambda value: False

    @functools.wraps(func)
    def strict(left: object, *args: object, **kwargs: object) -> Any:
        budget = _BUDGET.get()
        if budget is not None and time.monotonic() > budget.deadline:
            raise RenderTimeLimitError("render time limit reached", token=None)
        for value in (left, *args, *kwargs.values()):
            if isinstance(value, Undefined):
                value.poke()  # raises UndefinedError, as printing it does
            elif isinstance(value, range) and value.stop - value.start > LOOP_LIMIT:
                # A filter walks a range as a loop would (a Liquid range steps by 1).
                raise LoopIterationLimitError("loop iteration limit reached", token=None)
            elif budget is not None and budget.inline and may_be_slow(value):
                raise RenderTimeLimitError("not on the event loop", token=None)
        if takes_text:
            left = _spelled(left)
        if args:
            args = tuple(
                argument(positions[i] if i < len(positions) else None, v)
                for i, v in enumerate(args)
            )
        if kwargs:
            kwargs = {k: argument(k, v) if k in positions else v for k, v in kwargs.items()}
        if precheck is not None:
            precheck(left, args, kwargs)
        try:
            result = func(left, *args, **kwargs)
        except (ArithmeticError, LookupError, ValueError) as exc:
            raise FilterArgumentError(f"{name}: {type(exc).__name__}: {exc}", token=None) from exc
        return _bounded(name, result)

    return strict


# Filters whose cost does not grow with their input: they stay on the event loop.
_CONSTANT_TIME: Final = frozenset({"size", "first", "last"})
# The parameters of array filters that name a property of each item.
_PROPERTY_PARAMS: Final = frozenset({"key", "attr"})


def _may_be_slow(value: object) -> bool:
    """What a filter may take long over: an array, a hash, a long string."""
    if isinstance(value, str):
        return len(value) > INLINE_CHARS
    return isinstance(value, list | tuple | range | Mapping)


def _bounded(name: str, result: Any) -> Any:
    """`result`, once it is within the limits on what one filter may make (a long string
    or array, or a huge integer, grows with every filter that takes it)."""
    if isinstance(result, str) and len(result) > OUTPUT_LIMIT:
        raise OutputStreamLimitError("output stream limit reached", token=None)
    if isinstance(result, list) and len(result) > MAX_ITEMS:
        raise FilterArgumentError(
            f"{name}: the result has more than {MAX_ITEMS} items (the limit)", token=None
        )
    if type(result) is int and result.bit_length() > MAX_INT_BITS:
        raise FilterArgumentError(
            f"{name}: the result is larger than {MAX_INT_BITS} bits (the limit)", token=None
        )
    return result


def _replace_size(left: object, args: tuple[object, ...], kwargs: Mapping[str, object]) -> None:
    """Refuse a `replace` whose result would pass OUTPUT_LIMIT before making it: each
    match may grow the text by the whole replacement (`"xxxx…" | replace: "x", long`)."""
    text = str(left)
    old = str(args[0] if args else kwargs.get("seq", ""))
    new = str(args[1] if len(args) > 1 else kwargs.get("sub", ""))
    count = text.count(old) if old else len(text) + 1
    if len(text) + count * (len(new) - len(old)) > OUTPUT_LIMIT:
        raise OutputStreamLimitError("output stream limit reached", token=None)


_PRECHECKS: Final[
    Mapping[str, Callable[[object, tuple[object, ...], Mapping[str, object]], None]]
] = {
    "replace": _replace_size,
}


def _spelling_items(join: Callable[..., Any]) -> Callable[..., Any]:
    """`join` with its items and separator spelled as Liquid prints them (`str` would
    spell nil `None`)."""

    @functools.wraps(join)
    def spelled(left: object, *args: object, **kwargs: object) -> Any:
        args = tuple(map(_spelled, args))
        if isinstance(left, (list, tuple)):
            left = [_spelled(item) for item in flatten(left)]
            # The separator repeats once per item: refuse before joining what cannot fit.
            separator = str(args[0] if args else kwargs.get("separator", " "))
            size = sum(len(str(item)) for item in left) + len(separator) * (len(left) - 1)
            if size > OUTPUT_LIMIT:
                raise OutputStreamLimitError("output stream limit reached", token=None)
        else:
            left = _spelled(left)
        return join(left, *args, **kwargs)

    return spelled


_MISSING: Final = object()


@sequence_filter
def _uniq(sequence: Iterable[object], key: object = None) -> list[object]:
    """Liquid's `uniq`: the items (or the items whose `key` property) not seen before.
    python-liquid compares each item with every one before it, which takes minutes for a
    long array; this remembers what it has seen (JSON for a hash or an array)."""
    seen: set[object] = set()
    unique: list[object] = []
    for obj in sequence:
        item = obj
        if key is not None:
            try:
                item = obj[key]  # type: ignore[index]
            except KeyError:
                item = _MISSING
            except TypeError as exc:
                raise FilterArgumentError(
                    f"can't read property '{key}' of {obj}", token=None
                ) from exc
        try:
            marker: object = (0, item, hash(item))
        except TypeError:  # a hash or an array
            marker = (1, json.dumps(item, sort_keys=True, default=repr))
        if marker not in seen:
            seen.add(marker)
            unique.append(obj)
    return unique


def _nil_as_empty(date: Callable[..., Any]) -> Callable[..., Any]:
    """`date` giving nothing for nil, as it does for an undefined value and Liquid does."""

    @functools.wraps(date)
    def dated(left: object, *args: object, **kwargs: object) -> Any:
        return "" if left is None else date(left, *args, **kwargs)

    return dated


class _Buffer(StringIO):
    """What a render (or a capture in it) writes: at most OUTPUT_LIMIT characters."""

    def write(self, text: str) -> int:
        if self.tell() + len(text) > OUTPUT_LIMIT:
            raise OutputStreamLimitError("output stream limit reached", token=None)
        return super().write(text)


class _Context(RenderContext):
    __slots__ = ()

    def get_buffer(self, buf: TextIO | None = None) -> StringIO:
        return _Buffer()


class _Bound(BoundTemplate):
    context_class = _Context

    def render(self, *args: Any, **kwargs: Any) -> str:
        """python-liquid's `render`, into a _Buffer."""
        context = self.context_class(self, globals=self.make_globals(dict(*args, **kwargs)))
        buffer = _Buffer()
        self.render_with_context(context, buffer)
        return buffer.getvalue()

    async def render_async(self, *args: Any, **kwargs: Any) -> str:
        """python-liquid's `render_async`, into a _Buffer."""
        context = self.context_class(self, globals=self.make_globals(dict(*args, **kwargs)))
        buffer = _Buffer()
        await self.render_with_context_async(context, buffer)
        return buffer.getvalue()


class _Environment(Environment):
    """python-liquid's default environment with dripd's rules: strict undefined values
    (also through filters), nil printed as nothing, booleans as `true`/`false`, no
    `include` or `render`, and the limits above."""

    template_class = _Bound
    loop_iteration_limit = LOOP_LIMIT
    # The output limit is _Buffer's: python-liquid's LimitedStringIO would read "\r\n" as "\n".
    output_stream_limit = None
    local_namespace_limit = NAMESPACE_LIMIT
    context_depth_limit = NESTING_LIMIT
    block_nesting_limit = NESTING_LIMIT

    def __init__(self, *, autoescape: bool) -> None:
        super().__init__(undefined=_Undefined, autoescape=autoescape)

    def setup_tags_and_filters(self, *, extra: bool = False) -> None:
        super().setup_tags_and_filters(extra=extra)
        for tag in (_Output, _Echo, _For, _Tablerow, _Include, _Render):
            self.add_tag(tag)
        for registered in self.tags.values():
            node_class = getattr(registered, "node_class", None)
            timed = isinstance(node_class, type) and issubclass(node_class, Node)
            if timed and node_class is not ContentNode:  # text: one write, checked by size
                registered.node_class = _timed(node_class)  # type: ignore[attr-defined]
        self.filters["join"] = _spelling_items(self.filters["join"])
        self.filters["uniq"] = _uniq
        self.filters["date"] = _nil_as_empty(self.filters["date"])
        for name, func in list(self.filters.items()):
            if name != "default":  # it exists to fill in undefined and nil values
                self.filters[name] = _strict(name, func)


_PLAIN = _Environment(autoescape=False)
_HTML = _Environment(autoescape=True)


# Liquid markup in a template's source: output `{{ … }}`, tags `{% … %}`, and a `raw` block,
# whose body is output as written (group 1 is its body).
_MARKUP: Final = re.compile(
    r"\{%-?\s*raw\s*-?%\}(.*?)\{%-?\s*endraw\s*-?%\}"
    r"|\{%-?\s*comment\s*-?%\}.*?\{%-?\s*endcomment\s*-?%\}"
    r"|\{\{.*?\}\}|\{%.*?%\}",
    re.S,
)
_NOT_NEWLINE: Final = re.compile(r"[^\n]")


def literal_text(source: str) -> str:
    """The text a Liquid template outputs as written: every piece of Liquid markup (and a
    comment's body) becomes spaces, line breaks kept, so that an offset or a line:column in
    the result is the same in `source`. What the markup outputs comes from data; what is
    left is what a static check (MJML structure, spintax braces) can judge at apply."""

    def blank(match: re.Match[str]) -> str:
        whole = _NOT_NEWLINE.sub(" ", match[0])
        if match[1] is None:
            return whole
        start, end = match.start(1) - match.start(), match.end(1) - match.start()
        return whole[:start] + match[1] + whole[end:]

    return _MARKUP.sub(blank, source)
