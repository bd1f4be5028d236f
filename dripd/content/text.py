"""A plain-text part made from an email's HTML (RFC 2046 §5.1.4 multipart/alternative)."""

from __future__ import annotations

import re
from typing import Final

from lxml import etree  # type: ignore[import-untyped]  # lxml ships no type hints

# Not text a reader sees.
_HIDDEN: Final = frozenset({"head", "title", "style", "script", "template", "noscript"})
# Blocks with a blank line around them, and blocks on lines of their own (table cells too:
# a layout table's cells are read in order, one after the other, not drawn as a grid).
_PARAGRAPHS: Final = frozenset(
    {"p", "h1", "h2", "h3", "h4", "h5", "h6", "table", "tr", "blockquote", "ul", "ol", "dl",
     "pre", "hr", "figure"}
)  # fmt: skip
_LINES: Final = frozenset(
    {"div", "li", "td", "th", "dt", "dd", "section", "article", "header", "footer", "nav",
     "aside", "main", "address", "center", "caption", "figcaption", "form", "fieldset",
     "legend", "tbody", "thead", "tfoot", "body", "details", "summary"}
)  # fmt: skip
_DISPLAY_NONE: Final = re.compile(r"display\s*:\s*none", re.I)
_LINKED: Final = re.compile(r"(?i:https?://|mailto:)\S")
# Control characters (line breaks and tabs excepted): no text, and libxml2 refuses them.
_CONTROL: Final = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_BLANK_LINES: Final = re.compile(r"\n{3,}")


def html_to_text(html: str) -> str:
    """The text of `html` as lines: what a reader sees, for the text/plain alternative of
    an email whose HTML part it is (MJML's output, with its nested layout tables, included).

    Head, style, script and title, comments (Outlook's conditional ones too) and elements
    styled `display:none` (a preheader) are left out. Blocks start new lines, paragraphs,
    headings, lists and tables with at most one blank line between them; table cells follow
    one another. Whitespace runs (non-breaking spaces too) become one space; entities are
    decoded. A link to an http(s) or mailto URL reads `label (URL)` (the URL alone when the
    label is empty or is the URL); an image reads as its alt text; a list item starts
    with "- ". Lines are stripped, and so are blank lines at both ends.

    Never raises: HTML that lxml cannot read gives what it could read, or ""."""
    if not html.strip():
        return ""
    parser = etree.HTMLParser(encoding="utf-8", remove_comments=True, remove_pis=True)
    root = etree.fromstring(_CONTROL.sub("", html).encode("utf-8", "replace"), parser)
    if root is None:  # nothing lxml can read
        return ""
    text = _Text()
    text.walk(root)
    lines = (" ".join(line.split()) for line in "".join(text.out).split("\n"))
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip("\n")


class _Text:
    """The text of a tree, written in order: `breaks` newlines wait for the next text."""

    def __init__(self) -> None:
        self.out: list[str] = []
        self.breaks = 0

    def write(self, text: str | None) -> None:
        if not text:
            return
        if self.breaks:
            text = text.lstrip()
            if not text:
                return
            if self.out:
                self.out.append("\n" * min(self.breaks, 2))
            self.breaks = 0
        self.out.append(text.replace("\n", " "))

    def block(self, lines: int) -> None:
        self.breaks = max(self.breaks, lines)

    def walk(self, root: etree._Element) -> None:
        """Write `root`'s text, depth first, without recursion (no depth limit)."""
        # (element, where its text started in `out`) when leaving it, else (element, -1).
        todo: list[tuple[etree._Element, int]] = [(root, -1)]
        while todo:
            element, start = todo.pop()
            tag = element.tag if isinstance(element.tag, str) else ""
            if start >= 0:
                self.leave(element, tag, start)
                self.write(element.tail)
                continue
            if not tag or tag in _HIDDEN or _DISPLAY_NONE.search(element.get("style") or ""):
                self.write(element.tail)
                continue
            self.enter(element, tag)
            todo.append((element, len(self.out)))
            todo.extend((child, -1) for child in reversed(element))
            self.write(element.text)

    def enter(self, element: etree._Element, tag: str) -> None:
        if tag in _PARAGRAPHS:
            self.block(2)
        elif tag in _LINES:
            self.block(1)
        if tag == "li":
            self.write("- ")
        elif tag == "img":
            self.write(element.get("alt"))

    def leave(self, element: etree._Element, tag: str, start: int) -> None:
        if tag == "br":
            self.breaks += 1
        elif tag in _PARAGRAPHS:
            self.block(2)
        elif tag in _LINES:
            self.block(1)
        elif tag == "a":
            url = (element.get("href") or "").strip()
            if _LINKED.match(url):
                label = " ".join("".join(self.out[start:]).split())
                if not label:
                    self.write(url.removeprefix("mailto:"))
                elif label not in (url, url.removeprefix("mailto:"), url.rstrip("/")):
                    self.write(f" ({url})")
