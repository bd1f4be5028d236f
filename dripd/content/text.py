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
    root = etree.fromstring(_CONTROL.sub("", html).encode("utf-8", "replace"), _PARSER)
    if root is None:  # nothing lxml can read
        return ""
    for element in _STYLED_NONE(root):  # a few: `border:none` and the like mostly
        if _DISPLAY_NONE.search(element.get("style", "")):
            element.set(_HIDDEN_MARK, "")
    try:
        marked = str(_TO_TEXT(root))
    except etree.XSLTError:  # libxslt's own limits (nesting past lxml's): nothing readable
        return ""
    text = _LINK.sub(_link, marked.replace("\r", " ").replace("\n", " "))
    text = _BREAKS.sub(_breaks, text)
    lines = (" ".join(line.split()) for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip("\n")


# One parser for every call (a parser costs as much to make as a small mail to parse);
# parsing holds no state between documents, and the event loop calls one at a time.
_PARSER: Final = etree.HTMLParser(encoding="utf-8", remove_comments=True, remove_pis=True)

# The tree is read by libxslt (C; a walk in Python took three times as long), which writes
# its text with private-use marks where lines break, for the regular expressions below:
# U+E001 a line break around a block, U+E002 a blank line around a paragraph, U+E003 a
# <br>, and a link as U+E004 URL U+E005 its text U+E006.
_LINE, _PARAGRAPH, _BR = "\ue001", "\ue002", "\ue003"
# Elements styled `display:none` (a preheader) are marked before libxslt reads the tree:
# one XPath finds the few whose style says "none" at all, a regular expression decides.
_DISPLAY_NONE: Final = re.compile(r"display\s*:\s*none", re.I)
_STYLED_NONE: Final = etree.XPath(
    "//@style[contains(., 'none') or contains(., 'NONE') or contains(., 'None')]/.."
)
_HIDDEN_MARK: Final = "data-dripd-hidden"
_MARKS: Final = f"[{_LINE}{_PARAGRAPH}{_BR}]"
_TO_TEXT: Final = etree.XSLT(
    etree.XML(
        f"""<xsl:stylesheet version="1.0" xmlns:xsl="http://www.w3.org/1999/XSL/Transform">
<xsl:output method="text" encoding="utf-8"/>
<xsl:template match="{"|".join(sorted(_HIDDEN))}"/>
<xsl:template match="*[@{_HIDDEN_MARK}]" priority="2"/>
<xsl:template match="{"|".join(sorted(_PARAGRAPHS))}">
  &#xE002;<xsl:apply-templates/>&#xE002;</xsl:template>
<xsl:template match="{"|".join(sorted(_LINES - {"li"}))}">
  &#xE001;<xsl:apply-templates/>&#xE001;</xsl:template>
<xsl:template match="li">&#xE001;- <xsl:apply-templates/>&#xE001;</xsl:template>
<xsl:template match="br">&#xE003;</xsl:template>
<xsl:template match="img"><xsl:value-of select="@alt"/></xsl:template>
<xsl:template match="a">&#xE004;<xsl:value-of
  select="translate(@href, '&#xE001;&#xE002;&#xE003;&#xE004;&#xE005;&#xE006;', '')"/>
  &#xE005;<xsl:apply-templates/>&#xE006;</xsl:template>
</xsl:stylesheet>"""
    )
)
# A link: its URL, and what it wrote (no link inside a link: the HTML parser closes one
# before it opens the next).
_LINK: Final = re.compile("\ue004([^\ue005]*)\ue005([^\ue004\ue006]*)\ue006")
# A run of line breaks, with the spaces around them.
_BREAKS: Final = re.compile(f"\\s*{_MARKS}[\\s{_MARKS[1:-1]}]*")


def _link(match: re.Match[str]) -> str:
    """A link's text, then " (URL)" when the URL is http(s) or mailto and not the text."""
    url, text = match[1].strip(), match[2]
    if not _LINKED.match(url):
        return text
    label = " ".join(re.sub(_MARKS, " ", text).split())
    if not label:
        return f"{text} {url.removeprefix('mailto:')}"
    if label in (url, url.removeprefix("mailto:"), url.rstrip("/")):
        return text
    return f"{text} ({url})"


def _breaks(match: re.Match[str]) -> str:
    """A run of marks as the line breaks it makes: a block asks for at least one (a
    paragraph two), each <br> adds one; at most one blank line."""
    count = 0
    for mark in match[0]:
        if mark == _BR:
            count += 1
        elif mark == _LINE:
            count = max(count, 1)
        elif mark == _PARAGRAPH:
            count = 2
    return "\n" if count == 1 else "\n\n"
