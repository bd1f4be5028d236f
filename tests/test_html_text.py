"""The text part made from an email's HTML reads as the HTML does, MJML's layout tables
included, and never fails whatever the input."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dripd.content.mjml import compile_mjml
from dripd.content.text import html_to_text


@pytest.mark.parametrize(
    ("html", "text"),
    [
        ("", ""),
        (" \n\t ", ""),
        ("<!-- only a comment -->", ""),
        (
            "<p>Hello&nbsp;<b>world</b></p><p>Second   para\n  line</p>",
            ("Hello world\n\nSecond para line"),
        ),
        ("<div>a</div><div>b</div>", "a\nb"),
        ("a<br>b<br><br><br><br>c", "a\nb\n\nc"),
        ("<h1>Title</h1>Text<h2>Sub</h2><p>More</p>", "Title\n\nText\n\nSub\n\nMore"),
        ("<ul><li>one</li><li>two</li></ul><p>after</p>", "- one\n- two\n\nafter"),
        ("<p>a &amp; b &lt; c &#233; &eacute;</p>", "a & b < c é é"),
        (
            '<p>Read <a href="https://x.example/guide">the guide</a>.</p>',
            ("Read the guide (https://x.example/guide)."),
        ),
        (
            '<a href="https://x.example">https://x.example</a>, '
            '<a href="mailto:ada@x.example">ada@x.example</a>, '
            '<a href="mailto:ada@x.example">Mail us</a>, '
            '<a href="javascript:alert(1)">js</a>, <a href="/relative">rel</a>, '
            '<a href="https://x.example/home"><img src="logo.png" alt="Acme"></a>, '
            '<a href="https://x.example/bare"></a>',
            "https://x.example, ada@x.example, Mail us (mailto:ada@x.example), js, rel, "
            "Acme (https://x.example/home), https://x.example/bare",
        ),
        ('<p>Logo: <img src="x.png" alt="Acme"><img src="spacer.gif"></p>', "Logo: Acme"),
        (
            "<html><head><title>T</title><style>p { color: red }</style></head><body>"
            "<!--[if mso]><p>Outlook only</p><![endif]--><p>Body</p><script>x()</script>"
            '<div style="display: none">preheader</div><noscript>n</noscript></body></html>',
            "Body",
        ),
        (
            "<table><tr><td>A1</td><td>B1</td></tr><tr><td><table><tr><td>inner</td></tr>"
            "</table></td><td>B2</td></tr></table>",
            "A1\nB1\n\ninner\n\nB2",
        ),
        ("<blockquote>quoted</blockquote>tail", "quoted\n\ntail"),
        ("\x00<p>a\x00b\x07</p>", "ab"),
        ("<p>lone \ud800 surrogate</p>", "lone ? surrogate"),
        ('<?xml version="1.0" encoding="latin-1"?><p>Grüße</p>', "Grüße"),
        ('<meta charset="iso-8859-1"><p>Grüße</p>', "Grüße"),
        ("<p>unclosed <b>bold", "unclosed bold"),
        ("</p></div>>", ">"),
    ],
)
def test_html_reads_as_text(html: str, text: str) -> None:
    assert html_to_text(html) == text


MJML = """\
<mjml>
  <mj-head>
    <mj-title>Welcome</mj-title>
    <mj-preview>Your account is ready</mj-preview>
    <mj-style>.note { color: #ff0000 }</mj-style>
  </mj-head>
  <mj-body>
    <mj-section>
      <mj-column>
        <mj-image src="https://cdn.example.com/logo.png" alt="Acme" />
        <mj-text>Welcome, Ada!</mj-text>
        <mj-text css-class="note">Thanks for joining. Read
          <a href="https://acme.example/guide">the guide</a> first.</mj-text>
        <mj-button href="https://acme.example/start">Get started</mj-button>
        <mj-spacer height="20px" />
      </mj-column>
      <mj-column>
        <mj-text>See you soon &amp; good luck.</mj-text>
      </mj-column>
    </mj-section>
  </mj-body>
</mjml>
"""


def test_mjml_output_reads_in_order() -> None:
    text = html_to_text(compile_mjml(MJML))
    assert text.splitlines() == [
        "Acme",
        "",
        "Welcome, Ada!",
        "",
        "Thanks for joining. Read the guide (https://acme.example/guide) first.",
        "",
        "Get started (https://acme.example/start)",
        "",
        "See you soon & good luck.",
    ]
    assert "<" not in text
    assert "color" not in text  # no CSS
    assert "Welcome\n" not in text  # the title
    assert "ready" not in text  # the preview: hidden


# Pieces of HTML, with tags left open or closed at random, around a style sheet whose text
# (MARKER) must never show.
MARKER = "zzcssmarker"
# ("< ", not "<": "<" then "text" opens an element named "text<style" whose content, the
# CSS, a browser shows too.)
PIECES = st.sampled_from(
    [
        "<p>", "</p>", "<div>", "</div>", "<table>", "<tr>", "<td>", "</td>", "</table>",
        "<br>", "<a href='https://x'>", "</a>", "<img alt='i'>", "<!--", "-->", "<!--[if mso]>",
        "<![endif]-->", "<head>", "</head>", "<body>", "<b>", "<ul><li>", "&amp;", "&nbsp;",
        "&", "< ", ">", "\"", "'", " ", "\n", "text", "é", "\x00", "<script>", "</script>",
        "<title>", "</title>", "<html>", "<?pi?>", "<!DOCTYPE html>", "<p style='display:none'>",
    ]
)  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(html=st.text())
def test_any_text_gives_text(html: str) -> None:
    text = html_to_text(html)
    assert isinstance(text, str)
    assert text == text.strip("\n")
    assert all(line == line.strip() for line in text.splitlines())
    assert "\n\n\n" not in text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(before=st.lists(PIECES, max_size=20), after=st.lists(PIECES, max_size=20))
def test_style_never_shows(before: list[str], after: list[str]) -> None:
    html = "".join(before) + f"<style>p.{MARKER} {{ color: red }}</style>" + "".join(after)
    assert MARKER not in html_to_text(html)
