"""Link rewriting changes nothing but the links it replaces, finds every link a browser (lxml,
whose libxml2 2.14 tokenizes as HTML does) finds outside script/style, and never touches an
excluded one."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import lxml.html  # type: ignore[import-untyped]  # lxml ships no type hints
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dripd.content.links import (
    DEFAULT_EXCLUDE,
    Link,
    html_links,
    rewrite_html,
    rewrite_text,
    rules,
    text_links,
    with_utm,
)

RULES = rules(exclude=[r"/private/"], short_hosts=["Sho.rt"])


def upper(url: str) -> str:
    return url.upper()


def marker(calls: list[str]) -> Callable[[str], str]:
    def replace(url: str) -> str:
        calls.append(url)
        return f"https://m.test/{len(calls) - 1}"

    return replace


# --- HTML unit cases -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("html", "expected"),
    [
        ('<a href="https://a.com/x">', '<a href="HTTPS://A.COM/X">'),
        ("<a href='https://a.com/x'>", "<a href='HTTPS://A.COM/X'>"),
        ("<a href=https://a.com/x>", '<a href="HTTPS://A.COM/X">'),
        ("<a href=x>", "<a href=x>"),
        ("<A HREF = 'https://a.com' CLASS=b>", "<A HREF = 'HTTPS://A.COM' CLASS=b>"),
        ('<a href=" https://a.com\n">', '<a href=" HTTPS://A.COM\n">'),
        (
            '<img alt="x > y" src="https://a.com/i.png"/>',
            '<img alt="x > y" src="HTTPS://A.COM/I.PNG"/>',
        ),
        (
            '<a href="https://q.com"src="https://r.com">',
            '<a href="HTTPS://Q.COM"src="https://r.com">',
        ),
        # HTML keeps the first of two attributes with one name; the second is no link.
        (
            '<a href="https://1.com" href="https://2.com">',
            '<a href="HTTPS://1.COM" href="https://2.com">',
        ),
        ('<a href="mailto:a@b.com">', '<a href="mailto:a@b.com">'),
        ('<a href="tel:+15551234">', '<a href="tel:+15551234">'),
        ('<a href="/relative">', '<a href="/relative">'),
        ('<a href="#top">', '<a href="#top">'),
        ('<a href="{{ url }}">', '<a href="{{ url }}">'),
        ('<a href="https://a.com/{{ id }}">', '<a href="https://a.com/{{ id }}">'),
        ('<a href="ftp://a.com">', '<a href="ftp://a.com">'),
        (
            "<script>x='<a href=\"https://a.com\">'</script>",
            "<script>x='<a href=\"https://a.com\">'</script>",
        ),
        (
            "<STYLE>a{}</style ><a href=https://b.com>",
            '<STYLE>a{}</style ><a href="HTTPS://B.COM">',
        ),
        (
            '<textarea><a href="https://a.com"></textarea>',
            '<textarea><a href="https://a.com"></textarea>',
        ),
        ('<title><a href="https://a.com"></title>', '<title><a href="https://a.com"></title>'),
        ('<!-- <a href="https://a.com"> -->', '<!-- <a href="https://a.com"> -->'),
        (
            '<!--[if mso]><v:roundrect href="https://a.com"><![endif]--><a href="https://b.com">',
            '<!--[if mso]><v:roundrect href="https://a.com"><![endif]--><a href="HTTPS://B.COM">',
        ),
        (
            '<![if !mso]><img src="https://a.com/i.png"><![endif]>',
            '<![if !mso]><img src="HTTPS://A.COM/I.PNG"><![endif]>',
        ),
        ('<![CDATA[<a href="https://a.com">]]>', '<![CDATA[<a href="https://a.com">]]>'),
        ('<!DOCTYPE html><?xml x="https://a.com"?>', '<!DOCTYPE html><?xml x="https://a.com"?>'),
        ('</a href="https://a.com">', '</a href="https://a.com">'),
        ('<a href="https://a.com"', '<a href="https://a.com"'),  # a tag the document cuts off
        ("<a href='https://a.com/x\">", "<a href='https://a.com/x\">"),  # an unclosed quote
    ],
)
def test_rewrite_html_cases(html: str, expected: str) -> None:
    assert rewrite_html(html, upper) == expected


def test_entities_round_trip_and_escape_for_the_quote() -> None:
    html = '<a href="https://a.com/?a=1&amp;b=2&#38;c=&copy;&copy=3">'
    assert html_links(html) == [Link(url="https://a.com/?a=1&b=2&c=©&copy=3", track=True)]
    assert rewrite_html(html, lambda url: url) == (
        '<a href="https://a.com/?a=1&amp;b=2&amp;c=©&amp;copy=3">'
    )
    assert rewrite_html(html, lambda url: None) == html
    assert rewrite_html("<a href='https://a.com'>", lambda _: "https://b.com/'\"&") == (
        "<a href='https://b.com/&#39;\"&amp;'>"
    )
    assert rewrite_html("<a href=https://a.com>", lambda _: 'https://b.com/"') == (
        '<a href="https://b.com/&quot;">'
    )


def test_src_links_are_not_tracked_and_attributes_are_configurable() -> None:
    html = (
        '<img src="https://a.com/i.png"><a href="https://a.com/p"><td background="https://a.com/b">'
    )
    assert html_links(html) == [
        Link(url="https://a.com/i.png", track=False),
        Link(url="https://a.com/p", track=True),
    ]
    assert html_links(html, attributes=["BACKGROUND"]) == [Link(url="https://a.com/b", track=False)]
    assert rewrite_html(html, upper, attributes=["background"]).endswith('"HTTPS://A.COM/B">')


# --- plain-text unit cases -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "links"),
    [
        ("Go to https://a.com/x.", ["https://a.com/x"]),
        ("https://a.com/x, https://b.com; https://c.com: https://d.com!?", None),
        ("'https://a.com/x' and \"https://b.com\"", ["https://a.com/x", "https://b.com"]),
        ("(see https://a.com/x)", ["https://a.com/x"]),
        ("[https://a.com/x]. {https://b.com}", ["https://a.com/x", "https://b.com"]),
        ("https://en.wikipedia.org/wiki/Foo_(bar)", ["https://en.wikipedia.org/wiki/Foo_(bar)"]),
        ("(https://en.wikipedia.org/wiki/Foo_(bar)).", ["https://en.wikipedia.org/wiki/Foo_(bar)"]),
        ("<https://a.com/x.>", ["https://a.com/x."]),
        ("a<https://a.com/x>b", ["https://a.com/x"]),
        ("HTTPS://A.COM\thttp://b.com\x00http://c.com\u2028", None),
        ("https:// http:/a.com xhttps://a.com mailto:a@b.com ftp://a.com", []),
        ("https://a.com/?q={{ x }}", []),
    ],
)
def test_text_links_cases(text: str, links: list[str] | None) -> None:
    if links is None:
        links = re.findall(r"(?i)https?://[a-z.]+\.com(?:/x)?", text)
    assert text_links(text) == links
    rewritten = rewrite_text(text, lambda url: "<L>")
    assert rewritten.count("<L>") == len(links)
    assert rewrite_text(text, lambda url: None) == text


def test_punctuation_stays_outside() -> None:
    text = "Read https://a.com/x. Then (https://en.wikipedia.org/wiki/A_(b))! Or https://c.com?"
    assert rewrite_text(text, lambda url: "L") == "Read L. Then (L)! Or L?"
    for sentence, url in [
        ("«https://a.example.com/x»", "https://a.example.com/x"),
        ("（https://a.example.com/x）", "https://a.example.com/x"),
        ("見て https://a.example.com/ü。", "https://a.example.com/ü"),
        ("**https://a.example.com/b**", "https://a.example.com/b"),
        ("“https://a.example.com/q”…", "https://a.example.com/q"),
    ]:
        assert text_links(sentence) == [url]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "text",
    [
        "https://a.com/" + "(" * 2**20,
        "https://a.com/" + ")" * 2**20,
        "https://a.com/" + ".)" * 2**19,
        "https://a.com/ " * 2**16,
        "xhttps://" * 2**17,
    ],
)
def test_text_is_linear(text: str) -> None:
    assert rewrite_text(text, lambda url: None) == text


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "html",
    [
        "<" * 2**20,
        "<a " * 2**18,
        "<!--" * 2**18,
        '<a href="' * 2**17,
        "<a href=https://a.com>" * 2**15,
    ],
)
def test_html_is_linear(html: str) -> None:
    assert rewrite_html(html, lambda url: None) == html


# --- UTM -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "utm", "expected"),
    [
        ("https://a.com", {"source": "dripd"}, "https://a.com?utm_source=dripd"),
        ("https://a.com/p?", {"source": "dripd"}, "https://a.com/p?utm_source=dripd"),
        ("https://a.com/p?x=1&", {"source": "dripd"}, "https://a.com/p?x=1&utm_source=dripd"),
        (
            "https://a.com/p?utm_source=mine&x=%7E#frag?utm=1",
            {"source": "dripd", "medium": "email", "campaign": "welcome", "content": "step-1"},
            "https://a.com/p?utm_source=mine&x=%7E&utm_medium=email&utm_campaign=welcome"
            "&utm_content=step-1#frag?utm=1",
        ),
        (
            "https://a.com/#",
            {"medium": "e mail/&=é"},
            "https://a.com/?utm_medium=e%20mail%2F%26%3D%C3%A9#",
        ),
        (
            "https://a.com/?utm_medium",
            {"medium": "sms", "campaign": ""},
            "https://a.com/?utm_medium",
        ),
        ("https://a.com/é?q=a b", {}, "https://a.com/é?q=a b"),
    ],
)
def test_with_utm(url: str, utm: dict[str, str], expected: str) -> None:
    assert with_utm(url, utm) == expected


def test_with_utm_names_an_unknown_key() -> None:
    with pytest.raises(ValueError, match="'term'"):
        with_utm("https://a.com", {"term": "x"})


# --- eligibility ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "eligible"),
    [
        ("https://a.com/x", True),
        ("HTTP://A.COM", True),
        ("https://a.com/password-reset?id=1", False),
        ("https://a.com/account/reset_password", False),
        ("https://a.com/Unsubscribe", False),
        ("https://a.com/%75nsubscribe", False),
        ("https://a.com/opt-out", False),
        ("https://a.com/privacy", False),
        ("https://a.com/?Token=x", False),
        ("https://a.com/?sig=x", False),
        ("https://a.com/?signature=x", False),
        ("https://go.example/u/abc", False),
        ("https://a.com/private/x", False),  # the configured pattern adds to the defaults
        ("https://sho.rt/x", False),
        ("https://SHO.RT./x", False),
        ("https://www.sho.rt/x", True),
        ("ftp://a.com/x", False),
        ("mailto:a@b.com", False),
        ("https:///x", False),
        ("/relative", False),
        ("https://[::1/x", False),
        ("https://a.com/x\r\nSet-Cookie: a=b", False),
        ("https://a.com/" + "x" * 2034, True),
        ("https://a.com/" + "x" * 2035, False),
    ],
)
def test_eligible(url: str, eligible: bool) -> None:
    assert RULES.eligible(url) is eligible


def test_rules_extend_the_defaults_and_name_bad_input() -> None:
    assert len(RULES.exclude) == len(DEFAULT_EXCLUDE) + 1
    assert not rules(exclude=["nothing"]).eligible("https://a.com/password_reset")
    with pytest.raises(ValueError, match=r"'\(unclosed'"):
        rules(exclude=["(unclosed"])
    with pytest.raises(ValueError, match=r"'https://sho\.rt'"):
        rules(short_hosts=["https://sho.rt"])


# --- generated HTML documents --------------------------------------------------------------

HOSTS = ("a.com", "b.example", "sho.rt", "xn--bcher-kva.example")
PATHS = ("", "/", "/x", "/unsubscribe", "/private/y", "/wiki/A_(b)", "/é", "/a>b", "/u/tok")
QUERY_ARGS = ("a=1", "copy=2", "lt=3", "token=x", "q=%20", "ampx", "utm_source=z")
# How an "&" in a URL may be written in an attribute. A bare "&" stays literal before each of
# QUERY_ARGS, as "=" or a letter follows the entity name it starts ("&copy=2" is not "©=2").
# What RULES must refuse among generated URLs, known from how they are generated.
REFUSED = re.compile(r"unsubscribe|/private/|token=|//sho\.rt\.?(?=[/?#:]|$)|/u/")


def shortenable(url: str) -> bool:
    return url.lower().startswith(("http://", "https://")) and not REFUSED.search(url)


AMPERSANDS = ("&amp;", "&#38;", "&#x26;", "&AMP;", "&")


@st.composite
def urls(draw: st.DrawFn) -> str:
    scheme = draw(st.sampled_from(("https", "http", "HTTPS")))
    url = f"{scheme}://{draw(st.sampled_from(HOSTS))}{draw(st.sampled_from(PATHS))}"
    args = draw(st.lists(st.sampled_from(QUERY_ARGS), max_size=3))
    if args:
        url += "?" + "&".join(args)
    return url


@dataclass(frozen=True)
class Attr:
    """A generated href/src attribute: `before` is name, spaces and "=" as written."""

    before: str
    quote: str
    lead: str
    raw: str  # the value as written, character references and all
    trail: str
    url: str  # what a browser reads in it, surrounding whitespace removed
    linkable: bool = True  # False: a `src` of other than <img>, never rewritten

    def written(self, value: str | None = None) -> str:
        if value is None:
            return f"{self.before}{self.quote}{self.lead}{self.raw}{self.trail}{self.quote}"
        quote = self.quote or '"'
        return f"{self.before}{quote}{self.lead}{value}{self.trail}{quote}"

    @property
    def web(self) -> bool:
        return self.linkable and self.url.lower().startswith(("http://", "https://"))


@st.composite
def attrs(draw: st.DrawFn, name: str) -> Attr:
    quote = draw(st.sampled_from(('"', "'", "")))
    url = draw(
        st.one_of(urls(), urls(), st.sampled_from(("mailto:a@b.com", "#top", "/rel", "{{ u }}")))
    )
    if not quote and ">" in url:
        url = url.replace(">", "")
    raw = "".join(draw(st.sampled_from(AMPERSANDS)) if c == "&" else c for c in url)
    space = st.sampled_from(("", " ", "\n", "\t  "))
    lead, trail = (draw(space), draw(space)) if quote else ("", "")
    written_name = draw(st.sampled_from((name, name.upper(), name.capitalize())))
    before = f" {written_name}{draw(space)}={draw(space)}"
    return Attr(before=before, quote=quote, lead=lead, raw=raw, trail=trail, url=url)


OTHER_ATTRS = (' class="x"', " alt='a > b'", " data-u=https://data.example", " hidden", " /")


@st.composite
def link_tags(draw: st.DrawFn) -> list[str | Attr]:
    tag = draw(st.sampled_from(("a", "A", "img", "area", "span", "div")))
    parts: list[str | Attr] = [f"<{tag}"]
    for name in draw(st.permutations(("href", "src")))[: draw(st.integers(1, 2))]:
        parts.append(draw(st.sampled_from(OTHER_ATTRS)))
        attr = draw(attrs(name))
        if name == "src" and tag != "img":
            attr = dataclasses.replace(attr, linkable=False)
        parts.append(attr)
    # (no "/>": after an unquoted value the "/" would belong to it)
    parts.append(draw(st.sampled_from((">", " >", " />"))) + (f"x</{tag}>" if tag in "aA" else ""))
    return parts


def strings(pieces: list[str], max_size: int = 20) -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(pieces), max_size=max_size).map("".join)


TEXT = strings(
    [*"abc xyz.,;:!?()\n", "é", "&amp;", "&lt;", "&copy;", "&#169;", "https://t.example/x"]
)
HIDDEN = st.sampled_from(
    (
        "<script>var a = '<a href=\"https://script.example/\">'; if (a < b) {}</script>",
        '<SCRIPT type="text/x">document.write("<img src=https://script.example/i>")</SCRIPT >',
        "<style>a { background: url(https://style.example/x) }</style>",
        '<style media="all"><a href="https://style.example/y"></style>',
        '<textarea><a href="https://textarea.example/"></textarea>',
        '<!-- <a href="https://comment.example/"> -->',
        '<!--[if mso]><v:roundrect href="https://mso.example/"><v:fill src="https://mso.example/i"/>'
        "</v:roundrect><![endif]-->",
        '<![CDATA[<a href="https://cdata.example/"]]>',
        '<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN">',
        '<?xml version="1.0"?>',
        '<link rel="stylesheet" href="https://fonts.example/css?family=Ubuntu">',
        '<LINK HREF="https://icons.example/favicon.ico" rel=icon>',
        '<base href="https://base.example/">',
        '</p class="https://endtag.example/">',
        "<br/>",
        "<p>",
        "</p>",
    )
)


@st.composite
def documents(draw: st.DrawFn) -> list[str | Attr]:
    parts: list[str | Attr] = []
    for kind in draw(
        st.lists(st.sampled_from(("text", "link", "hidden")), min_size=1, max_size=12)
    ):
        if kind == "text":
            parts.append(draw(TEXT))
        elif kind == "hidden":
            parts.append(draw(HIDDEN))
        else:
            parts += draw(link_tags())
    return parts


def join(parts: list[str | Attr], mark: Callable[[Attr], bool] = lambda a: False) -> str:
    """The document, with the attributes `mark` picks written as numbered markers."""
    out = []
    count = 0
    for part in parts:
        if isinstance(part, str):
            out.append(part)
        elif mark(part):
            out.append(part.written(f"https://m.test/{count}"))
            count += 1
        else:
            out.append(part.written())
    return "".join(out)


def oracle(html: str) -> Counter[tuple[str, bool]]:
    """The http(s) href/src values lxml finds (it keeps script/style content as text)."""
    root = lxml.html.document_fromstring("<!DOCTYPE html><html><body>" + html)
    found: Counter[tuple[str, bool]] = Counter()
    for element in root.iter():
        for name in ("href", "src"):
            # Not links a reader follows: stylesheets, icons, a script's or a frame's source.
            if element.tag in ("link", "base") if name == "href" else element.tag != "img":
                continue
            value = element.get(name) if isinstance(element.tag, str) else None
            url = (value or "").strip("\t\n\f\r ")
            if re.match(r"(?i)https?://", url) and "{{" not in url:
                found[url, name == "href"] += 1
    return found


@settings(max_examples=75)
@given(documents())
def test_html_rewriting_changes_only_link_values(parts: list[str | Attr]) -> None:
    html = join(parts)
    calls: list[str] = []
    rewritten = rewrite_html(html, marker(calls))
    links = [p for p in parts if isinstance(p, Attr) and p.web]
    assert calls == [a.url for a in links]
    assert rewritten == join(parts, lambda a: a.web)
    for number, attr in enumerate(links):  # and the markers map back to the original bytes
        rewritten = rewritten.replace(attr.written(f"https://m.test/{number}"), attr.written(), 1)
    assert rewritten == html
    assert rewrite_html(html, lambda url: None) == html


@settings(max_examples=75)
@given(documents())
def test_html_links_are_the_ones_lxml_finds(parts: list[str | Attr]) -> None:
    html = join(parts)
    calls: list[str] = []
    rewrite_html(html, marker(calls))
    assert Counter((link.url, link.track) for link in html_links(html)) == oracle(html)
    assert len(calls) == oracle(html).total()


@settings(max_examples=75)
@given(documents())
def test_excluded_html_links_are_never_rewritten(parts: list[str | Attr]) -> None:
    html = join(parts)
    calls: list[str] = []
    replace = marker(calls)
    rewritten = rewrite_html(html, lambda url: replace(url) if RULES.eligible(url) else None)
    assert rewritten == join(parts, lambda a: a.web and shortenable(a.url))
    for attr in parts:
        if isinstance(attr, Attr) and not shortenable(attr.url):
            assert attr.written() in rewritten


@given(strings([*"<>/!-?[]=\"' \nahrefsciptyl", "https://a.com", "&amp;", "CDATA"], max_size=60))
def test_html_rewriting_is_stable_on_any_input(html: str) -> None:
    calls: list[str] = []
    rewritten = rewrite_html(html, marker(calls))
    assert calls == [link.url for link in html_links(html)]
    assert [link.url for link in html_links(rewritten)] == [
        f"https://m.test/{n}" for n in range(len(calls))
    ]
    assert rewrite_html(rewritten, lambda url: calls[int(url.rsplit("/", 1)[1])]) == rewrite_html(
        html, lambda url: url
    )


# --- generated text ------------------------------------------------------------------------


@st.composite
def text_urls(draw: st.DrawFn) -> str:
    url = draw(urls()).replace(">", "")
    tail = draw(st.sampled_from(("", "/", "/p", "_(b)", "/[1]", "/a.b", "/a,b", "#x", "/(x)y")))
    return url + tail


@st.composite
def texts(draw: st.DrawFn) -> list[str | tuple[str, str, str]]:
    """Words and (opening, URL, closing) triples, to be joined with whitespace."""
    parts: list[str | tuple[str, str, str]] = []
    words = st.text(st.sampled_from([*"abcé.,;:!?()[]'\"<>{}"]), min_size=1, max_size=8)
    for kind in draw(st.lists(st.sampled_from(("word", "url")), min_size=1, max_size=12)):
        if kind == "word":
            parts.append(draw(words))
            continue
        url = draw(text_urls())
        opening, closing = draw(
            st.sampled_from((("", ""), ("(", ")"), ("[", "]"), ("{", "}"), ('"', '"'), ("'", "'")))
        )
        closing += draw(st.text(st.sampled_from(".,;:!?'\""), max_size=3))
        parts.append((opening, url, closing) if draw(st.booleans()) else ("<", url + ".", ">"))
    return parts


def join_text(
    parts: list[str | tuple[str, str, str]], separators: list[str], mark: Callable[[str], bool]
) -> str:
    out = []
    count = 0
    for part, separator in zip(parts, separators, strict=False):
        if isinstance(part, str):
            out.append(part)
        else:
            opening, url, closing = part
            if mark(url):
                url = f"https://m.test/{count}"
                count += 1
            out.append(opening + url + closing)
        out.append(separator)
    return "".join(out)


@settings(max_examples=75)
@given(
    texts(), st.lists(st.sampled_from((" ", "\n", "\t", "  ", "\r\n")), min_size=12, max_size=12)
)
def test_text_rewriting_finds_each_url_once_and_changes_nothing_else(
    parts: list[str | tuple[str, str, str]], separators: list[str]
) -> None:
    text = join_text(parts, separators, lambda url: False)
    urls_in_text = [part[1] for part in parts if not isinstance(part, str)]
    assert text_links(text) == urls_in_text
    calls: list[str] = []
    rewritten = rewrite_text(text, marker(calls))
    assert calls == urls_in_text
    assert rewritten == join_text(parts, separators, lambda url: True)
    assert rewrite_text(rewritten, lambda url: calls[int(url.rsplit("/", 1)[1])]) == text
    calls.clear()
    replace = marker(calls)
    kept = rewrite_text(text, lambda url: replace(url) if RULES.eligible(url) else None)
    assert kept == join_text(parts, separators, shortenable)
    for url in urls_in_text:
        if not shortenable(url):
            assert url in kept


@given(st.text())
def test_text_rewriting_round_trips_any_text(text: str) -> None:
    calls: list[str] = []
    rewritten = rewrite_text(text, marker(calls))
    assert calls == text_links(text)
    assert rewrite_text(rewritten, lambda url: calls[int(url.rsplit("/", 1)[1])]) == text
    assert rewrite_text(text, lambda url: None) == text
