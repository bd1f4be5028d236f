"""MJML compiles with mrml, and every error names its line: an unknown, unclosed or
mismatched element, what mrml refuses, and a Liquid template's MJML checked at apply."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mjml import mjml2html

from dripd.content.liquid import OUTPUT_LIMIT, TemplateError, compile_template
from dripd.content.mjml import MjmlError, check_mjml_template, compile_mjml

EMAIL = """\
<mjml>
  <mj-head>
    <mj-title>Welcome</mj-title>
  </mj-head>
  <mj-body>
    <mj-section>
      <mj-column>
        <mj-image src="https://cdn.example.com/logo.png" alt="Acme" />
        <mj-text>Thanks for joining, <b>Ada</b>.</mj-text>
        <mj-button href="https://acme.example/start">Get started</mj-button>
      </mj-column>
      <mj-column>
        <mj-text>Second column</mj-text>
      </mj-column>
    </mj-section>
  </mj-body>
</mjml>
"""


def error(source: str) -> str:
    with pytest.raises(MjmlError) as info:
        compile_mjml(source)
    return str(info.value)


def test_an_email_compiles_to_html() -> None:
    html = compile_mjml(EMAIL)
    assert html.lstrip().lower().startswith("<!doctype html>")
    assert 'href="https://acme.example/start"' in html
    assert "Get started" in html
    assert "Thanks for joining, <b>Ada</b>." in html
    assert 'src="https://cdn.example.com/logo.png"' in html
    assert "<title>Welcome</title>" in html
    assert "Second column" in html
    assert issubclass(MjmlError, TemplateError)  # a permanent failure of its step


def test_text_beyond_ascii_compiles_as_mrml_would() -> None:
    # mrml is given character references; the characters come back, in CSS and attributes too.
    source = EMAIL.replace("Ada", "Zoë 😀").replace(
        "<mj-title>Welcome</mj-title>",
        "<mj-title>Grüße</mj-title><mj-style>.x:after { content: '→' }</mj-style>"
        '<mj-preview>Ça va</mj-preview><mj-attributes><mj-all font-family="Señor" />'
        "</mj-attributes>",
    )
    assert compile_mjml(source) == mjml2html(source)
    # Character references the source writes mean the same after: `&#60;` stays one.
    assert "Zoë &#60; é" in compile_mjml(EMAIL.replace("Ada", "Zoë &#60; &#233;"))


def test_text_that_makes_mrml_panic_compiles() -> None:
    # mrml 1.x panics ("byte index 1 is not a char boundary") on this text.
    inner = "<mjml><mj-body><mj-section><mj-column><mj-text>{}</mj-text></mj-column>"
    source = inner.format('é">') + "</mj-section></mj-body></mjml>"
    assert '<div style="font-family:Ubuntu' in compile_mjml(source)
    assert 'é"></div>' in compile_mjml(source)


def lines(*rows: str) -> str:
    return "\n".join(rows)


BODY_START = ("<mjml>", "  <mj-body>", "    <mj-section>")  # lines 1-3
BODY_END = ("    </mj-section>", "  </mj-body>", "</mjml>")
COLUMN_END = ("</mj-column>", *BODY_END)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        pytest.param(
            (*BODY_START, "<mj-column>", "<mj-text>x</mj-text>", *BODY_END),
            "<mj-column> opened at line 4 is never closed (</mj-section> at line 6 comes first)",
            id="unclosed",
        ),
        pytest.param(
            ("<mjml>", "<mj-body>", "<mj-section>", "<mj-column>", "", "</mj-column>"),
            "<mj-section> opened at line 3 is never closed",
            id="unclosed-at-end",
        ),
        pytest.param(
            (*BODY_START, "<mj-column>", "<mj-text>x", "</mj-column>", *BODY_END),
            "<mj-text> opened at line 5 is never closed (</mj-column> at line 6 comes first)",
            id="unclosed-ending-tag",
        ),
        pytest.param(
            (*BODY_START, "<mj-column></mj-column>", "</mj-column>", *BODY_END),
            "mismatched </mj-column> at line 5: the open element is <mj-section> from line 3",
            id="mismatched",
        ),
        pytest.param(
            (*BODY_START, "<mj-column>", "<mj-colum>", "</mj-colum>", "</mj-column>", *BODY_END),
            "unknown MJML element <mj-colum> at line 5",
            id="unknown",
        ),
        pytest.param(
            (*BODY_START, "<mj-column>", "", "<MJ-TXT />", "</mj-column>", *BODY_END),
            "unknown MJML element <mj-txt> at line 6",
            id="unknown-self-closing",
        ),
        pytest.param(
            (*BODY_START, "<mj-column>", "<mj-text>Hi", "<mj-button>Go</mj-button>"),
            "<mj-button> at line 6 is inside <mj-text> (line 5), whose content is HTML: "
            "is </mj-text> missing?",
            id="mjml-inside-an-ending-tag",
        ),
        pytest.param(
            ("<mjml>", "<mj-body>", '  <mj-include path="header.mjml" />', "</mj-body>"),
            "mj-include is not supported: a template cannot read files (line 3)",
            id="include",
        ),
        pytest.param(
            ("<mjml>", "<mj-head>", "<mj-html-attributes>", "</mj-html-attributes>"),
            "<mj-html-attributes> at line 3 is not supported by mrml, the MJML compiler",
            id="not-in-mrml",
        ),
        pytest.param(
            ("", "<!-- a comment -->", "<html>", "<mjml></mjml>"),
            "an MJML document starts with <mjml> (line 3 has other text)",
            id="not-mjml",
        ),
        pytest.param(
            ("<mjml><mj-body></mj-body></mjml>", "<!-- ok -->", "<p>more</p>"),
            "there is more after </mjml>, at line 3",
            id="after-the-end",
        ),
        pytest.param(("", "  "), "an MJML document starts with <mjml>; this has none", id="empty"),
        pytest.param(
            ("<mjml>", "<mj-body>", "\x00", "</mj-body>", "</mjml>"),
            "the character U+0000 at line 3 is not allowed",
            id="nul",
        ),
        # What mrml refuses: at its position, or without one, where the scanner saw it.
        pytest.param(
            (
                "<mjml>",
                "<mj-head>",
                "<mj-title>Grüße 😀</mj-title>",
                "  <p>no</p>",
                "</mj-head>",
                "</mjml>",
            ),
            "mrml: unexpected element at line 4 ('p')",
            id="mrml-position",
        ),
        pytest.param(
            (*BODY_START, "<mj-column>", "<mj-text>", "<p>open", "</mj-text>", *COLUMN_END),
            "mrml: unexpected end of stream: <p> opened at line 6 is never closed",
            id="html-left-open",
        ),
        pytest.param(
            (*BODY_START, "<mj-column>", "<mj-text>", "1 < 2", "</mj-text>", *COLUMN_END),
            "mrml: unable to parse next template: '<' in text at line 6 (write &lt;)",
            id="less-than",
        ),
        pytest.param(
            (*BODY_START, "<mj-column>", "<mj-text>", "<a href=x>y</a>", "</mj-text>", *COLUMN_END),
            "mrml: unable to parse next template: an unquoted attribute value in <a> at line 6",
            id="unquoted",
        ),
        pytest.param(
            (*BODY_START, '<mj-column width="50%"', "<mj-text>x</mj-text>", *COLUMN_END),
            "mrml: unable to parse next template: a malformed tag at line 4: "
            "'<mj-column width=\"50%\"\\n<mj-text>x</mj-te'",
            id="malformed-tag",
        ),
        pytest.param(
            (
                *BODY_START,
                "<mj-column>",
                "<mj-text>",
                "<!-- never closed",
                "</mj-text>",
                *COLUMN_END,
            ),
            "mrml: unable to parse next template: the comment at line 6 is never closed",
            id="comment",
        ),
        pytest.param(
            # mrml reads the content of a conditional comment as tags.
            (
                *BODY_START,
                "<mj-column>",
                "<mj-raw>",
                "<!--[if mso]><table><tr><![endif]-->",
                "</mj-raw>",
                *COLUMN_END,
            ),
            "mrml: unexpected end of stream: <table> opened at line 6 is never closed",
            id="conditional-comment",
        ),
    ],
)
def test_errors_name_the_line(rows: tuple[str, ...], message: str) -> None:
    assert error(lines(*rows)) == message


def test_mrml_is_never_asked_to_read_a_file() -> None:
    # The include is refused before mrml, which would try to read it (and report only that
    # it could not).
    with pytest.raises(ValueError, match="unable to load included template"):
        mjml2html('<mjml><mj-body><mj-include path="/etc/passwd" /></mj-body></mjml>')
    assert "mj-include is not supported" in error(
        '<mjml><mj-body><mj-include path="/etc/passwd" /></mj-body></mjml>'
    )


def test_comments_and_ending_tag_content_are_not_mjml() -> None:
    source = lines(
        "<!-- <mj-colum> in a comment -->",
        "<mjml>",
        "<mj-head><mj-style>.a > .b { color: red }</mj-style></mj-head>",
        "<mj-body><mj-section><mj-column>",
        "<mj-text><p>One<br>two <img src='x.png' alt=\"x\"> <span>three</span></p></mj-text>",
        "<mj-raw><!--[if mso]><table><tr><td><![endif]--></mj-raw>",
        "<mj-raw><!--[if mso]></td></tr></table><![endif]--></mj-raw>",
        "<mj-raw><!--[if !mso]><!--><p>not Outlook</p><!--<![endif]--></mj-raw>",
        "<mj-table><tr><td>cell</td></tr></mj-table>",
        "</mj-column></mj-section></mj-body>",
        "</mjml>",
    )
    assert "three" in compile_mjml(source)


def test_sources_past_the_limit_are_refused() -> None:
    huge = "<mjml><mj-body><mj-raw>" + "x" * OUTPUT_LIMIT + "</mj-raw></mj-body></mjml>"
    assert error(huge) == (f"the MJML is {len(huge)} characters long; the limit is {OUTPUT_LIMIT}")


# --- Liquid templates writing MJML ------------------------------------------------------------

TEMPLATE = """\
<mjml>
  <mj-head>
    <mj-title>{{ subject }}</mj-title>
  </mj-head>
  <mj-body>
    {% if banner %}
    <mj-section><mj-column>
      <mj-image src="{{ banner }}" alt="{{ brand }}" />
    </mj-column></mj-section>
    {% endif %}
    <mj-section>
      <mj-column>
        <mj-text>Hi {{ first_name }},</mj-text>
        {% for item in items %}
        <mj-text>{{ item.name }}: {{ item.price }}</mj-text>
        {% endfor %}
        {% comment %}<mj-colum>{% endcomment %}
        <mj-button href="{{ url }}">Open{% if urgent %} now{% endif %}</mj-button>
        <mj-image src="{{ img }}"></mj-image>
        {% raw %}<mj-text>{{ shown as written }}</mj-text>{% endraw %}
      </mj-column>
    </mj-section>
  </mj-body>
</mjml>
"""


def test_liquid_in_mjml_passes_the_check() -> None:
    assert check_mjml_template(TEMPLATE) is None
    # …and what it renders compiles, values escaped.
    rendered = compile_template(TEMPLATE, field="mjml").render(
        {
            "subject": "Hi",
            "banner": "https://cdn.example.com/b.png",
            "brand": 'A "brand" <b>',
            "first_name": "</mj-text><mj-colum>",
            "items": [{"name": "Tea", "price": "3 < 4"}],
            "url": "https://acme.example/?a=1&b=2",
            "urgent": True,
            "img": "https://cdn.example.com/i.png",
        }
    )
    html = compile_mjml(rendered)
    assert "&lt;/mj-text&gt;&lt;mj-colum&gt;" in html
    assert "Open now" in html


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ("</mj-column>\n    </mj-section>\n  </mj-body>", "</mj-section></mj-body>"),
            (
                "<mj-column> opened at line 12 is never closed (</mj-section> at line 21 comes "
                "first)"
            ),
        ),
        (("<mj-button", "<mj-buton"), "unknown MJML element <mj-buton> at line 18"),
        (
            ("{% endcomment %}", "{% endcomment %}<mj-text>"),
            (
                "<mj-button> at line 18 is inside <mj-text> (line 17), whose content is HTML: is "
                "</mj-text> missing?"
            ),
        ),
        (
            ("{{ first_name }},", "{{ first_name }}, 1 < 2"),
            ("mrml: unable to parse next template: '<' in text at line 13 (write &lt;)"),
        ),
    ],
)
def test_a_broken_template_fails_naming_its_line(change: tuple[str, str], message: str) -> None:
    assert check_mjml_template(TEMPLATE.replace(*change)) == message


def test_an_include_in_a_template_is_refused() -> None:
    template = TEMPLATE.replace("<mj-body>", '<mj-body>\n<mj-include path="{{ p }}" />')
    assert check_mjml_template(template) == (
        "mj-include is not supported: a template cannot read files (line 6)"
    )


# --- any input -------------------------------------------------------------------------------

PIECES = st.sampled_from(
    [
        "<mjml>", "</mjml>", "<mj-head>", "</mj-head>", "<mj-body>", "</mj-body>",
        "<mj-section>", "</mj-section>", "<mj-column>", "</mj-column>", "<mj-text>",
        "</mj-text>", '<mj-button href="x">', "</mj-button>", '<mj-image src="x" />',
        "<mj-raw>", "</mj-raw>", "<mj-title>", "</mj-title>", "<mj-colum>", "<mj-include />",
        "<p>", "</p>", "<br>", "<!--", "-->", "<!--[if mso]>", "<![endif]-->", "<", ">", "&",
        '"', "=", "\n", " ", "text", "é", 'é">', "😀", "\x00", "<a href=x>",
    ]
)  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pieces=st.lists(PIECES, max_size=30), text=st.text(max_size=50))
def test_any_source_compiles_or_fails_with_mjml_error(pieces: list[str], text: str) -> None:
    for source in ("".join(pieces), f"<mjml><mj-body>{''.join(pieces)}</mj-body></mjml>", text):
        try:
            html = compile_mjml(source)
        except MjmlError as exc:
            html = str(exc)  # a message, never an empty one
        assert html
