"""Liquid templates, compiled once per step version and rendered per execution."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from liquid import Environment, FalsyStrictUndefined
from liquid.exceptions import LiquidError


class _Undefined(FalsyStrictUndefined):
    """Strict: printing or filtering an undefined variable is an error.

    It is still falsy in `{% if %}`, so templates can test for optional data,
    and `| default:` works, so they can fill it in.
    """

    force_liquid_default = True


_ENV = Environment(undefined=_Undefined, autoescape=False)


class TemplateError(Exception):
    """A template failed to compile or render (a permanent failure of its step)."""


@dataclass(frozen=True, slots=True)
class Template:
    source: str
    field: str
    _compiled: Any

    def render(self, context: Mapping[str, Any]) -> str:
        """Render with `context`; an undefined variable or a template error raises TemplateError."""
        try:
            return str(self._compiled.render(**context))
        except LiquidError as exc:
            raise TemplateError(f"{self.field}: {_first_line(exc)}") from exc

    def hooks(self) -> frozenset[str]:
        """The hooks this template reads (`hooks.<name>…`); `*` when it reads `hooks` whole."""
        return frozenset(
            str(path[1]) if len(path) > 1 else "*"
            for path in self._compiled.global_variable_segments()
            if path[0] == "hooks"
        )


def compile_template(source: str, *, field: str) -> Template:
    """Compile `source`; a syntax error raises TemplateError naming `field`, line and column."""
    try:
        return Template(source, field, _ENV.from_string(source))
    except LiquidError as exc:
        raise TemplateError(f"{field}: {_first_line(exc)}") from exc


def _first_line(exc: LiquidError) -> str:
    text = str(exc).strip()
    head = text.splitlines()[0] if text else type(exc).__name__
    # python-liquid adds "-> 'source' line:col" on the second line; keep the position.
    lines = text.splitlines()
    where = next((ln.strip() for ln in lines[1:2] if ln.strip().startswith("->")), "")
    position = where.rsplit(" ", 1)[-1] if where else ""
    return f"{head} (line:column {position})" if position else head
