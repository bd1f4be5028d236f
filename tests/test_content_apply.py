"""Content keys in sequence files (issue 14): what `dripd apply` refuses, naming file, step,
key and line, and what it stores."""

from __future__ import annotations

import pytest

from dripd.errors import SequenceFileError
from dripd.sequences import load_text

HEAD = "[sequence]\nkey = 'x'\n"
TEXT = "text = 'Hi'\n"
MJML = """<mjml>
  <mj-body>
    <mj-section>
      <mj-column>
        <mj-text>Hi {{ first_name }}</mj-text>
        <mj-button href="{{ url }}">Go</mj-button>
      </mj-column>
    </mj-section>
  </mj-body>
</mjml>"""


def refused(text: str) -> str:
    with pytest.raises(SequenceFileError) as caught:
        load_text(text, source="seq.toml")
    return caught.value.message


def email(extra: str, *, body: str = "text = 'Hi'\n") -> str:
    return f"{HEAD}[[steps]]\nkey = 'a'\nchannel = 'email'\nsubject = 'S'\n{body}{extra}"


def test_an_mjml_step_is_stored_with_its_source() -> None:
    version = load_text(email("", body=f"mjml = '''{MJML}'''\n"), source="seq.toml")
    assert version.steps[0].template["mjml"] == MJML


def test_a_broken_mjml_template_is_refused_at_apply_with_file_step_and_line() -> None:
    broken = MJML.replace("</mj-column>\n", "")  # <mj-column> opened on line 4, never closed
    message = refused(email("", body=f"mjml = '''{broken}'''\n"))
    assert message.startswith("seq.toml: step 'a': key 'mjml': ")
    assert "line 4" in message


def test_an_unknown_mjml_element_is_refused_with_its_line() -> None:
    typo = MJML.replace("mj-column", "mj-colum")
    message = refused(email("", body=f"mjml = '''{typo}'''\n"))
    assert "mj-colum" in message
    assert "line 4" in message


@pytest.mark.parametrize(
    ("extra", "body", "message"),
    [
        ("", f"html = '<p>x</p>'\nmjml = '''{MJML}'''\n", "keys 'html' and 'mjml'"),
        ("", "mjml = '<mjml><mj-body><mj-include path=\"x\"/></mj-body></mjml>'\n", "mj-include"),
        ("spintax = true\n", "text = '{Hi|Hello} there}'\n", "key 'text': unbalanced spintax"),
        ("vars = { subscriber_id = 'x' }\n", TEXT, "key 'vars.subscriber_id': 'subscriber_id' is"),
        ("vars = { 'a b' = 1 }\n", TEXT, "key 'vars': 'a b' is not a variable name"),
        ("short_links = 'bitly'\n", TEXT, "key 'short_links': 'bitly' is not \"dripd\""),
        (
            "short_links = { utm = { term = 'x' } }\n",
            TEXT,
            "key 'short_links.utm': 'term' is not one",
        ),
        ("short_links = { exclude = ['('] }\n", TEXT, "key 'short_links.exclude[0]': '(' is not a"),
        ("short_links = { provider = 'tinyurl' }\n", TEXT, "short_links.provider"),
    ],
)
def test_bad_content_keys_are_refused_naming_the_key(extra: str, body: str, message: str) -> None:
    assert message in refused(email(extra, body=body))


def test_a_python_template_path_is_checked_and_makes_the_content_alone() -> None:
    step = f"{HEAD}[[steps]]\nkey = 'a'\nchannel = 'email'\n"
    assert "key 'template': 'not a path' is not a Python path" in refused(
        step + "template = 'not a path'\n"
    )
    assert "key 'text': the step's Python template (key 'template') makes its content" in (
        refused(step + "template = 'mod:fn'\ntext = 'x'\n")
    )


def test_a_static_spintax_error_names_the_line_in_the_template() -> None:
    text = "text = '''line one\n{Hi|Hello {{ name }}\nline three'''\nspintax = true\n"
    message = refused(email("", body=text))
    assert "key 'text': unbalanced spintax" in message
    assert "line 2" in message


def test_spintax_braces_inside_liquid_markup_are_not_judged() -> None:
    text = 'text = \'{Hi|Hello} {{ "}" }}{% if a == "{" %}x{% endif %}\'\nspintax = true\n'
    assert load_text(email("", body=text), source="seq.toml").steps[0].spintax


def test_content_keys_need_a_channel() -> None:
    for key in ("spintax = true", "template = 'm:f'", "vars = { a = 1 }", "short_links = 'dripd'"):
        text = f"{HEAD}[[steps]]\nkey = 'w'\nafter = '1d'\n{key}\n"
        assert "a step without a channel sends nothing" in refused(text)


def test_vars_short_links_and_python_templates_are_stored() -> None:
    text = (
        f"{HEAD}vars = {{ brand = 'Acme', colors = ['red'], launch = 2026-05-01 }}\n"
        "short_links = 'dripd'\n"
        "[[steps]]\nkey = 'a'\nchannel = 'email'\ntemplate = 'shop.mail:welcome'\n"
        "vars = { brand = 'Acme EU' }\n"
        "short_links = { utm = { source = 'news' }, on_error = 'send_originals' }\n"
    )
    version = load_text(text, source="seq.toml")
    assert version.vars == {"brand": "Acme", "colors": ["red"], "launch": "2026-05-01"}
    assert version.short_links == {"provider": "dripd"}
    step = version.steps[0]
    assert step.python_template == "shop.mail:welcome"
    assert step.vars == {"brand": "Acme EU"}
    assert step.short_links == {"utm": {"source": "news"}, "on_error": "send_originals"}
    assert step.template == {}


def test_clicks_in_conditions_are_checked() -> None:
    text = f"{HEAD}[[steps]]\nkey = 'a'\nchannel = 'sms'\nbody = 'b'\nwhen = 'clicks.count > 0'\n"
    assert load_text(text, source="seq.toml").steps[0].when == "clicks.count > 0"
    for bad in ("clicks.total > 0", "clicks > 0", "clicks.count.x > 0"):
        message = refused(text.replace("clicks.count > 0", bad))
        assert "use clicks.count, clicks.last_at or clicks.last_step" in message
