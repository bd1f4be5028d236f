"""Finding and rewriting links in rendered HTML and plain text, byte for byte, for short links.

Pure functions: the caller collects the links (`html_links`, `text_links`), decides which to
shorten (`LinkRules.eligible`), builds destinations (`with_utm`) and writes the short URLs back
(`rewrite_html`, `rewrite_text`). Follows DripDrop (reference §5, "Short links") with these
differences: HTML is scanned with the HTML Living Standard's tokenizer rules (§13.2.5) instead
of re-serialised, so nothing outside a rewritten attribute value changes, and textarea/title
contents, comments, CDATA and character references in attribute values are read as a browser
reads them; the default exclude list also covers opt-outs, `reset-password`, `sig=`
and dripd's own `/u/` unsubscribe links; balanced parentheses stay inside a plain-text URL;
UTM parameters never overwrite ones the URL already has.
"""

from __future__ import annotations

import functools
import html as _html
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from html.entities import html5 as _ENTITIES
from typing import Any, Final
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from dripd.config import UTM_KEYS, exclude_patterns

#: Links never shortened, whatever the configuration adds: regular expressions searched,
#: case-insensitively, in the whole URL (and in its percent-decoded form).
DEFAULT_EXCLUDE: Final[tuple[str, ...]] = (
    r"unsubscribe",
    r"opt[-_]?out",
    r"privacy",
    r"password[_-]?reset",
    r"reset[_-]?password",
    r"token=",
    r"signature=",
    r"sig=",
    r"/u/",  # dripd's own one-click unsubscribe path
)

#: Longer URLs are left alone (the de-facto limit browsers and proxies agree on).
MAX_URL_LENGTH: Final = 2048

_UNSAFE: Final = re.compile(r"[\x00-\x20\x7f-\x9f\s]")
_SHORT_HOST: Final = re.compile(r"[^\s/:?#@]+")
# An absolute http(s) URL without a template tag ("{{", "{%"): a placeholder that something
# else (an ESP's merge tags, a preview) fills in later must reach it unchanged.
_WEB: Final = re.compile(r"(?i)https?://(?!.*\{[{%])", re.DOTALL)


def _is_web(url: str) -> bool:
    return _WEB.match(url) is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkRules:
    """Which links may be shortened; build with `rules()`."""

    exclude: tuple[str, ...]  # the patterns (RE2 syntax, case-insensitive)
    short_hosts: frozenset[str]  # lower-case host names, no trailing dot
    # The exclude patterns as one RE2 expression (config.exclude_patterns: linear time).
    _any_excluded: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_any_excluded", exclude_patterns(self.exclude))

    def eligible(self, url: str) -> bool:
        """True for an absolute http/https URL with a host, at most MAX_URL_LENGTH characters,
        without whitespace or control characters (it ends up in a Location header), whose
        host is not a short host and that no exclude pattern matches (raw or percent-decoded)."""
        if len(url) > MAX_URL_LENGTH or _UNSAFE.search(url):
            return False
        try:
            parts = urlsplit(url)
        except ValueError:  # e.g. an unclosed IPv6 bracket
            return False
        try:
            parts.port  # noqa: B018 - raises ValueError for a port out of range
        except ValueError:
            return False
        host = (parts.hostname or "").rstrip(".")
        if parts.scheme.lower() not in ("http", "https") or not host or host in self.short_hosts:
            return False
        if "@" in parts.netloc:  # user:password@: never stored, never in a Location header
            return False
        if self._any_excluded.search(url):
            return False
        return "%" not in url or not self._any_excluded.search(unquote(url))


def rules(exclude: Iterable[str] = (), short_hosts: Iterable[str] = ()) -> LinkRules:
    """LinkRules for DEFAULT_EXCLUDE plus `exclude` (regular expressions, case-insensitive;
    they extend the defaults, never replace them) and `short_hosts` (host names such as
    "sho.rt", compared case-insensitively and exactly, subdomains not included).

    Raises ValueError naming a pattern that is not a valid regular expression or a short host
    that is not a bare host name."""
    patterns = (*DEFAULT_EXCLUDE, *exclude)
    exclude_patterns(patterns)  # ValueError naming a pattern RE2 refuses
    hosts: set[str] = set()
    for host in short_hosts:
        if not _SHORT_HOST.fullmatch(host):
            raise ValueError(f"short host {host!r} must be a bare host name such as 'sho.rt'")
        hosts.add(host.lower().rstrip("."))
    return LinkRules(exclude=patterns, short_hosts=frozenset(hosts))


@dataclass(frozen=True, slots=True, kw_only=True)
class Link:
    """A link found in HTML; `track` is False for a `src` (an image load is not a click).
    `at` is where its value is in the HTML it was found in (for `rewrite_html`)."""

    url: str
    track: bool
    at: _Value | None = field(default=None, compare=False, repr=False)


# --- HTML ----------------------------------------------------------------------------------

_HTML_SPACE: Final = "\t\n\f\r "
_TAG_OPEN: Final = re.compile(r"</?[A-Za-z]")
_TAG_NAME: Final = re.compile(r"[^\t\n\f\r />]*")
_BEFORE_NAME: Final = re.compile(r"[\t\n\f\r /]*")
_ATTR_NAME: Final = re.compile(r"[^\t\n\f\r />][^\t\n\f\r /=>]*")
_SPACES: Final = re.compile(r"[\t\n\f\r ]*")
_UNQUOTED: Final = re.compile(r"[^\t\n\f\r >]*")
_COMMENT_END: Final = re.compile(r"--!?>")
# Elements whose content is text up to their end tag (HTML §13.1.2.1 raw text and escapable
# raw text, plus the legacy xmp/iframe/noembed/noframes, and plaintext, which never ends).
_RAW_END: Final = {
    name: re.compile(rf"(?i)</{name}[\t\n\f\r />]")
    for name in ("script", "style", "textarea", "title", "xmp", "iframe", "noembed", "noframes")
} | {"plaintext": re.compile(r"(?!)")}
# Elements whose `href` is not a link a reader follows: a stylesheet, an icon, the base of
# relative URLs (MJML's output loads its web fonts with <link href>). Redirecting them would
# break them, and count a click at every open. A `src` is rewritten only on <img>: a
# script's, a frame's or a video's source is no link anyone follows.
_NOT_LINKS: Final = frozenset({"link", "base"})
# (An MJML document's links are read before it is compiled: its images are elements too.)
_IMAGES: Final = frozenset({"img", "mj-image", "mj-carousel-image"})
_CHARREF: Final = re.compile(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)")


@dataclass(frozen=True, slots=True)
class _Value:
    name: str  # lower-case attribute name
    start: int  # the raw value is html[start:end], quotes excluded
    end: int
    quote: str  # '"', "'" or "" (unquoted)


def _charref(match: re.Match[str]) -> str:
    # html.unescape, except that (as in an attribute value, HTML §13.2.5.73) a named reference
    # without ";" followed by "=" or an alphanumeric stays literal: "?a=1&copy=2" is not "©=2".
    ref = match.group(1)
    if ref[0] == "#" or ref in _ENTITIES:
        return _html.unescape(match.group(0))
    for cut in range(len(ref) - 1, 1, -1):
        if ref[:cut] in _ENTITIES:
            after = ref[cut]
            if after == "=" or (after.isascii() and after.isalnum()):
                break
            return _ENTITIES[ref[:cut]] + ref[cut:]
    return match.group(0)


def _attribute_text(raw: str) -> str:
    return _CHARREF.sub(_charref, raw)


def _skip(pattern: re.Pattern[str], html: str, pos: int) -> int:
    match = pattern.match(html, pos)
    assert match is not None  # the pattern matches the empty string
    return match.end()


# A tag's attributes and its ">" when they hold nothing unusual: names without quotes, values
# quoted or plain. Atomic groups and possessive quantifiers: no backtracking, one pass in C.
# A tag it does not match (or one that may hold a wanted attribute) is read by _tag_values.
_PLAIN_TAG_REST: Final = re.compile(
    r"(?>[\t\n\f\r /]*+[^\t\n\f\r />\"'=][^\t\n\f\r /=>\"']*+[\t\n\f\r ]*+"
    r"(?>=[\t\n\f\r ]*+(?>\"[^\"]*+\"|'[^']*+'|[^\t\n\f\r >\"'][^\t\n\f\r >]*+))?)*+"
    r"[\t\n\f\r /]*+>"
)


_LINK_ATTRIBUTES: Final = frozenset({"href", "src"})
_S: Final = r"\t\n\f\r "
# A tag's rest up to its ">", quoted values read as _tag_values reads them (a quote counts
# only right after "=" and spaces), with no `h` or `s` that starts "href" or "src" outside
# quotes (any case: such a tag may hold a wanted attribute, and _tag_values reads it).
_TAG_REST: Final = rf"(?:[^>\"'=hs]++|h(?!ref)|s(?!rc)|=[{_S}]*+\"[^\"]*+\"|=[{_S}]*+'[^']*+'|=)*+>"
_RAW_ELEMENTS: Final = "script|style|textarea|title|xmp|iframe|noembed|noframes|plaintext"
# What `_values` passes over when it looks for href/src (an accelerator: each piece is read
# exactly as the loop in `_values` reads it; what it does not match, the loop reads): text,
# comments, CDATA, bogus comments, end tags, and start tags of other than raw-text elements
# without "href" or "src" in them. A typical mail's few links are then all the Python-level
# work left.
_SKIP: Final = re.compile(
    rf"""(?:
      [^<]++
    | <!--(?:-?>|.*?--!?>)
    | <!\[CDATA\[.*?\]\]>
    | <(?:!(?!--|\[CDATA\[)|\?|/(?![a-z]))[^>]*+>
    | </[a-z]{_TAG_REST}
    | <(?!(?:{_RAW_ELEMENTS})(?=[{_S}/>]))[a-z]{_TAG_REST}
    | <(?![a-z!?/])
    )*+""",
    re.S | re.I | re.X,
)


def _tag_values(html: str, pos: int, names: frozenset[str]) -> tuple[int, list[_Value]] | None:
    """The attributes named `names` of the tag whose attributes start at `pos` (first of
    each name only, as HTML keeps), and the index after its ">"; None when the document
    ends inside the tag (HTML drops such a tag)."""
    plain = _PLAIN_TAG_REST.match(html, pos)
    if plain is not None:
        rest = plain.group().lower()
        if not any(name in rest for name in names):
            return plain.end(), []  # most tags: nothing wanted, read at C speed
    found: list[_Value] = []
    seen: set[str] = set()
    size = len(html)
    while True:
        pos = _skip(_BEFORE_NAME, html, pos)
        if pos >= size:
            return None
        if html[pos] == ">":
            return pos + 1, found
        name_match = _ATTR_NAME.match(html, pos)
        assert name_match is not None  # html[pos] is neither space, "/" nor ">"
        name = name_match.group().lower()
        pos = _skip(_SPACES, html, name_match.end())
        if pos >= size:
            return None
        if html[pos] != "=":
            continue
        pos = _skip(_SPACES, html, pos + 1)
        if pos >= size:
            return None
        quote_char = html[pos]
        if quote_char in "\"'":
            start = pos + 1
            end = html.find(quote_char, start)
            if end < 0:
                return None
            pos = end + 1
        else:
            quote_char = ""
            start = pos
            end = pos = _skip(_UNQUOTED, html, pos)
        if name in names and name not in seen:
            seen.add(name)
            found.append(_Value(name, start, end, quote_char))


def _values(html: str, names: frozenset[str]) -> Iterator[_Value]:
    """The `names` attribute values of start tags, in document order, outside comments,
    CDATA, <!…>/<?…> declarations and raw-text elements (HTML §13.2.5, approximately: the
    script data escape states are not modelled)."""
    size = len(html)
    pos = 0
    skip = _SKIP.match if names == _LINK_ATTRIBUTES else None
    while pos < size:
        if skip is not None:
            # Text and the tags, comments … that cannot hold a wanted value, in one match.
            pos = skip(html, pos).end()  # type: ignore[union-attr]  # it matches ""
            if pos >= size:
                return
        lt = html.find("<", pos)
        if lt < 0:
            return
        if html.startswith("<!--", lt):
            if html.startswith(">", lt + 4) or html.startswith("->", lt + 4):  # <!--> <!--->
                pos = html.index(">", lt + 4) + 1
            else:
                close = _COMMENT_END.search(html, lt + 4)
                pos = close.end() if close else size
        elif html.startswith("<![CDATA[", lt):
            close_at = html.find("]]>", lt + 9)
            pos = close_at + 3 if close_at >= 0 else size
        elif _TAG_OPEN.match(html, lt):
            end_tag = html[lt + 1] == "/"
            name_end = _skip(_TAG_NAME, html, lt + 1 + end_tag)
            tag = _tag_values(html, name_end, names)
            if tag is None:
                return
            pos, found = tag
            if not end_tag:
                element = html[lt + 1 : name_end].lower()
                for value in found:
                    if element in _IMAGES if value.name == "src" else element not in _NOT_LINKS:
                        yield value
                raw_end = _RAW_END.get(element)
                if raw_end is not None:
                    close = raw_end.search(html, pos)
                    pos = close.start() if close else size
        elif html[lt + 1 : lt + 2] in ("!", "?", "/"):  # a bogus comment up to ">" ("</>" too)
            close_at = html.find(">", lt + 2)
            pos = close_at + 1 if close_at >= 0 else size
        else:
            pos = lt + 1


def _split(raw: str) -> tuple[str, str, str]:
    """(leading whitespace, URL, trailing whitespace) of a raw attribute value."""
    url = raw.strip(_HTML_SPACE)
    if not url:
        return raw, "", ""
    lead = raw[: len(raw) - len(raw.lstrip(_HTML_SPACE))]
    return lead, _attribute_text(url), raw[len(lead) + len(url) :]


def html_links(html: str, *, attributes: Iterable[str] = ("href", "src")) -> list[Link]:
    """The http(s) URLs `rewrite_html` would offer to its `replace`, in document order: the
    `attributes` values (character references decoded, surrounding whitespace removed) of
    tags outside script/style/textarea/title, comments and CDATA. Eligibility is not applied.
    `track` is True only for `href`."""
    names = frozenset(a.lower() for a in attributes)
    links = []
    for value in _values(html, names):
        url = _split(html[value.start : value.end])[1]
        if _is_web(url):
            links.append(Link(url=url, track=value.name == "href", at=value))
    return links


def rewrite_html(
    html: str,
    replace: Callable[[str], str | None],
    *,
    attributes: Iterable[str] = ("href", "src"),
    links: Iterable[Link] | None = None,
) -> str:
    """`html` with each link `html_links` finds replaced by `replace(url)`; None keeps it.
    `links`: what `html_links(html, attributes=…)` returned for this very `html`, so that
    it is not read twice.

    Only the replaced attribute values change: the new URL keeps the value's quoting and
    surrounding whitespace and is escaped for it (`&` → `&amp;`, the quote → `&quot;` or
    `&#39;`); an unquoted value becomes double-quoted. Every other character is kept."""
    names = frozenset(a.lower() for a in attributes)
    values: Iterable[_Value]
    if links is None:
        values = _values(html, names)
    else:
        values = [link.at for link in links if link.at is not None]
    out: list[str] = []
    done = 0
    for value in values:
        lead, url, trail = _split(html[value.start : value.end])
        new = replace(url) if _is_web(url) else None
        if new is None:
            continue
        quote_char = value.quote or '"'
        escaped = new.replace("&", "&amp;").replace(
            quote_char, "&quot;" if quote_char == '"' else "&#39;"
        )
        if value.quote:
            out += (html[done : value.start], lead, escaped, trail)
        else:
            out += (html[done : value.start], '"', escaped, '"')
        done = value.end
    out.append(html[done:])
    return "".join(out)


# --- plain text ----------------------------------------------------------------------------

# A URL runs to whitespace, "<", ">", '"' or a control character; not inside a word.
_TEXT_URL: Final = re.compile(r"(?i)(?<![\w+.-])https?://[^\s<>\"\x00-\x1f\x7f-\x9f]+")
_TRAILING: Final = frozenset(".,;:!?'\"*")
_CLOSING: Final = {")": "(", "]": "[", "}": "{"}


def _text_spans(text: str) -> Iterator[tuple[int, int]]:
    for match in _TEXT_URL.finditer(text):
        start, end = match.span()
        # RFC 3986 Appendix C: inside <…> the whole bracketed text is the URL.
        angled = text[start - 1 : start] == "<" and text[end : end + 1] == ">"
        if not angled:
            url = match.group()
            counts = {c: url.count(c) - url.count(o) for c, o in _CLOSING.items()}
            while end > start:
                last = text[end - 1]
                if last in _TRAILING or (
                    # non-ASCII punctuation: 。 » ” ） … and the like end a sentence, not a URL
                    not last.isascii() and unicodedata.category(last).startswith("P")
                ):
                    end -= 1
                elif counts.get(last, 0) > 0:  # a closing bracket without its opener
                    counts[last] -= 1
                    end -= 1
                else:
                    break
        if end > text.index("//", start) + 2 and _is_web(text[start:end]):
            yield start, end


def text_links(text: str) -> list[str]:
    """The http(s) URLs `rewrite_text` would offer to its `replace`, in order: bare URLs
    ending at whitespace, `<`, `>`, `"` or a control character, without trailing `.,;:!?'"`
    or closing brackets `)]}` that have no opener inside the URL (`<https://…>` keeps all)."""
    return [text[start:end] for start, end in _text_spans(text)]


def rewrite_text(text: str, replace: Callable[[str], str | None]) -> str:
    """`text` with each URL `text_links` finds replaced by `replace(url)`; None keeps it.
    Linear in the length of `text`."""
    out: list[str] = []
    done = 0
    for start, end in _text_spans(text):
        new = replace(text[start:end])
        if new is not None:
            out += (text[done:start], new)
            done = end
    out.append(text[done:])
    return "".join(out)


# --- UTM -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _utm_pairs(utm: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """(parameter name, "name=encoded value") of each non-empty value, in UTM_KEYS order:
    a step's UTM values are the same for all its messages."""
    given = dict(utm)
    for key in given:
        if key not in UTM_KEYS:
            raise ValueError(f"utm key {key!r} is not one of {', '.join(UTM_KEYS)}")
    return tuple(
        (f"utm_{key}", f"utm_{key}={quote(given[key], safe='')}")
        for key in UTM_KEYS
        if given.get(key)
    )


def with_utm(url: str, utm: Mapping[str, str]) -> str:
    """`url` with `utm_<key>=<value>` appended to its query for each non-empty value of
    `utm` (keys among "source", "medium", "campaign", "content"; values percent-encoded)
    that the query does not already set. The rest of the URL, fragment included, is kept
    byte for byte. Raises ValueError naming an unknown key."""
    pairs = _utm_pairs(tuple(utm.items()))
    if not pairs:
        return url
    base, hash_mark, fragment = url.partition("#")
    path, _, query = base.partition("?")
    present = {name for name, _ in parse_qsl(query, keep_blank_values=True)} if query else ()
    added = [pair for name, pair in pairs if name not in present]
    if not added:
        return url
    joiner = "&" if query and not query.endswith("&") else ""
    return f"{path}?{query}{joiner}{'&'.join(added)}{hash_mark}{fragment}"
