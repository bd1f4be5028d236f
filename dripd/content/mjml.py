"""MJML compiled to HTML by mrml (the Rust port of MJML), with errors that name their line.

mrml reports some errors with a byte position and others with none, and silently accepts
elements it does not know (a typo such as `<mj-colum>` renders nothing). So a small scanner
of the tags reads the document first: it refuses unknown, unclosed and mismatched MJML
elements and `<mj-include>` itself, and finds the line of what mrml refuses without saying
where. The element names are MJML 4's (mjml-preset-core) as mrml implements them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

from mjml import mjml2html

from dripd.content.liquid import OUTPUT_LIMIT, TemplateError, literal_text


class MjmlError(TemplateError):
    """MJML that does not compile; the message names the line (1-based) where it can."""


#: The elements mrml compiles.
ELEMENTS: Final = frozenset(
    {
        "mjml", "mj-head", "mj-body", "mj-attributes", "mj-all", "mj-class", "mj-breakpoint",
        "mj-font", "mj-preview", "mj-style", "mj-title", "mj-raw", "mj-section", "mj-column",
        "mj-group", "mj-wrapper", "mj-hero", "mj-text", "mj-image", "mj-button", "mj-divider",
        "mj-spacer", "mj-table", "mj-social", "mj-social-element", "mj-navbar",
        "mj-navbar-link", "mj-carousel", "mj-carousel-image", "mj-accordion",
        "mj-accordion-element", "mj-accordion-title", "mj-accordion-text",
    }
)  # fmt: skip
# MJML 4 elements mrml lacks (it would refuse them with only a byte position).
_NOT_IN_MRML: Final = frozenset({"mj-html-attributes", "mj-selector", "mj-html-attribute"})
# MJML's ending tags (`endingTag = true`): their content is HTML, text or CSS, not MJML.
_ENDING: Final = frozenset(
    {
        "mj-text", "mj-button", "mj-table", "mj-raw", "mj-navbar-link", "mj-accordion-title",
        "mj-accordion-text", "mj-social-element", "mj-carousel-image", "mj-style", "mj-title",
        "mj-preview", "mj-breakpoint",
    }
)  # fmt: skip
# HTML's void elements, as mrml lists them: they have no closing tag.
_VOID: Final = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param",
     "source", "track", "wbr"}
)  # fmt: skip

# What starts with `<`: the markers of a conditional comment (`<!--[if mso]>`,
# `<![endif]-->`, whose content mrml reads as tags), a comment, one never closed, a tag (`/`
# when it closes, its name, its attributes, `/` when it closes itself), else a `<` alone.
# Unquoted attribute values are read, so that one is reported as such rather than as a
# broken tag.
_TOKEN: Final = re.compile(
    r"""(<!--\[if[^\]>]*\]>|<!\[endif\]-->|<!--(?:>|.*?-->))|(<!--)"""
    r"""|(<(/?)([A-Za-z][^\s/>"'=<]*)"""
    r"""((?:\s+[^\s/>"'=<]+(?:\s*=\s*(?:"[^"]*"|'[^']*'|[^\s>"'=<`]+))?)*)\s*(/?)>)|<""",
    re.S,
)
# How many HTML elements up a closing tag's is looked for.
_HTML_DEPTH: Final = 64
_UNQUOTED: Final = re.compile(r"""=\s*[^\s"']""")
_TAG_LIKE: Final = re.compile(r"</?[A-Za-z!?]")
_NOT_SPACE: Final = re.compile(r"\S")
# Characters XML (and so mrml) refuses, and lone surrogates (no Unicode at all).
_BAD_CHAR: Final = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff]")
_NON_ASCII: Final = re.compile(r"[^\x00-\x7f]")
_CHAR_REF: Final = re.compile(r"&#(\d{3,7});")
_POSITION: Final = re.compile(r"(.*) in root template at position (\d+):(\d+)", re.S)


def compile_mjml(source: str, *, checked: bool = False) -> str:
    """The HTML the MJML document `source` compiles to, by mrml; it never reads a file
    (`<mj-include>` is refused).

    Raises MjmlError naming the line wherever it can be found: for a source longer than
    OUTPUT_LIMIT characters, a document that does not start with `<mjml>`, an unknown,
    unclosed or mismatched MJML element, an MJML element inside an ending tag (whose
    content is HTML), and whatever mrml refuses. `checked`: `source` is the render of a
    template `check_mjml_template` passed (at apply), whose escaped values cannot add
    elements: dripd's own structure scan (about three times mrml's time) then runs only to
    name the line of an error mrml reports."""
    if len(source) > OUTPUT_LIMIT:
        raise MjmlError(f"the MJML is {len(source)} characters long; the limit is {OUTPUT_LIMIT}")
    scan = _Scan(source)
    # (`| safe` data can write anything, <mj-include> too: never let mrml read a file.)
    if not checked or "mj-include" in source:
        problem = scan.run()
        if problem is not None:
            raise MjmlError(problem)
    # mrml gets ASCII only: it panics on some text holding a multi-byte character (it cuts
    # a string inside one: "byte index … is not a char boundary"). A character reference
    # means the same in HTML text and attributes, and the characters are put back once
    # compiled (so CSS and comments get theirs too); mrml's byte positions are then
    # character positions.
    plain = source.isascii()
    ascii_source = source if plain else _NON_ASCII.sub(lambda m: f"&#{ord(m[0])};", source)
    try:
        html = mjml2html(ascii_source)
    except ValueError as exc:
        if checked and (problem := scan.run()) is not None:
            raise MjmlError(problem) from exc
        raise MjmlError(_mrml_message(str(exc), ascii_source, scan)) from exc
    except BaseException as exc:  # pyo3's PanicException (a bug in mrml); nothing else
        if type(exc).__module__ != "pyo3_runtime":
            raise
        raise MjmlError(f"mrml failed on this MJML: {exc}") from exc
    return html if plain else _CHAR_REF.sub(_character, html)


def check_mjml_template(source: str) -> str | None:
    """Why the Liquid template `source`, which writes MJML, cannot compile (naming the line
    in `source`), or None. What is judged is the text the template writes as written
    (`literal_text`): a value rendered into it is HTML-escaped, so it cannot break the
    MJML's structure."""
    try:
        compile_mjml(literal_text(source))
    except MjmlError as exc:
        return str(exc)
    return None


def _character(match: re.Match[str]) -> str:
    code = int(match[1])
    if code < 0x80 or 0xD800 <= code <= 0xDFFF or code > 0x10FFFF:
        return match[0]  # not one made above: markup-significant, or no character
    return chr(code)


def _line(source: str, offset: int) -> int:
    return source.count("\n", 0, offset) + 1


def _mrml_message(error: str, source: str, scan: _Scan) -> str:
    """mrml's `error` with a line: from its position (a character offset in the ASCII
    `source`), else from what `scan` noticed."""
    where = _POSITION.fullmatch(error)
    if where is not None:
        start, end = int(where[2]), int(where[3])
        near = _CHAR_REF.sub(_character, source[start : min(end, start + 60)])
        return f"mrml: {where[1]} at line {_line(source, start)} ({near!r})"
    error = error.removesuffix(" in root template")
    if error.startswith("unexpected end of stream"):
        hint = scan.unclosed or scan.unreadable
    else:
        hint = scan.unreadable or scan.unclosed
    return f"mrml: {error}: {hint}" if hint is not None else f"mrml: {error}"


@dataclass(slots=True)
class _Open:
    """An open MJML element and the HTML elements open in it (name, offset)."""

    name: str
    offset: int
    html: list[tuple[str, int]] = field(default_factory=list)


class _Scan:
    """The tags of an MJML document, read once: `run` gives what makes it wrong whatever
    mrml says, and notes the first things mrml refuses without saying where: an HTML
    element left open (`unclosed`: mrml runs out of input) and text it cannot read as
    tags (`unreadable`). Comments are skipped. Linear in the length of the document."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.stack: list[_Open] = []  # the open MJML elements
        self.unclosed: str | None = None
        self.unreadable: str | None = None

    def line(self, offset: int) -> int:
        return _line(self.source, offset)

    def note(self, offset: int, what: str, then: str = "") -> None:
        """Note "`what` at line N`then`" as the first unreadable text."""
        if self.unreadable is None:
            self.unreadable = f"{what} at line {self.line(offset)}{then}"

    def run(self) -> str | None:
        source = self.source
        bad = _BAD_CHAR.search(source)
        if bad is not None:
            at = self.line(bad.start())
            return f"the character U+{ord(bad[0]):04X} at line {at} is not allowed"
        started = ended = False
        pos = 0
        for token in _TOKEN.finditer(source):
            lt = token.start()
            if not started or ended:
                text = _NOT_SPACE.search(source, pos, lt)
                if text is not None:
                    return self.outside(text.start(), ended)
            pos = token.end()
            if token[1] is not None:  # a comment, or a conditional one's marker
                continue
            if token[2] is not None:
                self.note(lt, "the comment", " is never closed")
                return None
            if token[3] is None:
                if _TAG_LIKE.match(source, lt):
                    # A broken tag: what follows cannot be read as tags, so no guesses.
                    self.note(lt, "a malformed tag", f": {source[lt : lt + 40]!r}")
                    return None
                self.note(lt, "'<' in text", " (write &lt;)")
                continue
            closing, name = token[4] == "/", token[5].lower()
            if _UNQUOTED.search(token[6]):
                self.note(lt, f"an unquoted attribute value in <{name}>")
            if ended or (not started and (closing or name != "mjml")):
                return self.outside(lt, ended)
            started = True
            problem = self.tag(name, lt, closing=closing, self_closing=token[7] == "/")
            if problem is not None:
                return problem
            ended = not self.stack
        text = _NOT_SPACE.search(source, pos)
        if text is not None and (not started or ended):
            return self.outside(text.start(), ended)
        if not started:
            return "an MJML document starts with <mjml>; this has none"
        if self.stack:
            inner = self.stack[-1]
            return f"<{inner.name}> opened at line {self.line(inner.offset)} is never closed"
        return None

    def outside(self, offset: int, ended: bool) -> str:
        if ended:
            return f"there is more after </mjml>, at line {self.line(offset)}"
        return f"an MJML document starts with <mjml> (line {self.line(offset)} has other text)"

    def tag(self, name: str, offset: int, *, closing: bool, self_closing: bool) -> str | None:
        """Apply one tag to the stack; what makes the document wrong, or None."""
        line, stack = self.line, self.stack
        if not stack:  # the first tag: <mjml> (`run` sees to that)
            if not self_closing:
                stack.append(_Open(name, offset))
            return None
        inner = stack[-1]
        if name != "mjml" and not name.startswith("mj-"):
            if not closing:
                if not self_closing and name not in _VOID:
                    inner.html.append((name, offset))
                return None
            # It closes its element and whatever is left open in that; a stray one is
            # mrml's to place. Deeper than _HTML_DEPTH is not searched (no quadratic time).
            html = inner.html
            for depth in range(len(html) - 1, max(len(html) - _HTML_DEPTH, 0) - 1, -1):
                if html[depth][0] == name:
                    if depth + 1 < len(html):
                        self.left_open(html[depth + 1])
                    del html[depth:]
                    break
            return None
        if name not in ELEMENTS:
            at = line(offset)
            if name == "mj-include":
                return f"mj-include is not supported: a template cannot read files (line {at})"
            if name in _NOT_IN_MRML:
                return f"<{name}> at line {at} is not supported by mrml, the MJML compiler"
            return f"unknown MJML element <{name}> at line {at}"
        if not closing:
            if inner.name in _ENDING:
                return (
                    f"<{name}> at line {line(offset)} is inside <{inner.name}> (line "
                    f"{line(inner.offset)}), whose content is HTML: is </{inner.name}> missing?"
                )
            if not self_closing:
                stack.append(_Open(name, offset))
            return None
        if inner.name == name:
            if inner.html:
                self.left_open(inner.html[0])
            stack.pop()
            return None
        if any(e.name == name for e in stack):
            return (
                f"<{inner.name}> opened at line {line(inner.offset)} is never closed "
                f"(</{name}> at line {line(offset)} comes first)"
            )
        return (
            f"mismatched </{name}> at line {line(offset)}: the open element is <{inner.name}> "
            f"from line {line(inner.offset)}"
        )

    def left_open(self, element: tuple[str, int]) -> None:
        if self.unclosed is None:
            at = self.line(element[1])
            self.unclosed = f"<{element[0]}> opened at line {at} is never closed"
