"""Sequence files and templates are checked where they enter, with errors naming file, step
and key, and a template's render is bounded (README, "Sequence file limits" and "Template
limits"). The examples of issue 12 are kept here as tests."""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest
from liquid import Environment
from support import (
    apply_text,
    executions,
    outbox_adapters,
    outbox_messages,
    running_daemon,
    wait_for,
)

from dripd import api
from dripd.cli import main
from dripd.content.liquid import (
    INLINE_CHARS,
    INLINE_RENDER,
    LOOP_LIMIT,
    MAX_TEMPLATE_CHARS,
    NAMESPACE_LIMIT,
    OUTPUT_LIMIT,
    RENDER_THREADS,
    RENDER_TIMEOUT,
    RenderTimeout,
    TemplateError,
    compile_stored,
    compile_template,
    render_fields,
)
from dripd.errors import SequenceFileError
from dripd.sequences import MAX_FILE_BYTES, MAX_STEPS, MAX_TRANSITIONS, load_file, load_text

NUL = "must not contain NUL (\\u0000)"
SURROGATE = "must be valid Unicode (it holds a lone surrogate: bytes that are not UTF-8?)"
NOT_A_KEY = "must be letters, digits, '_', '.' or '-'"
NUL_KEY = "sequence.na\x00me"


def seq(head: str = "", step: str = "", tail: str = "", *, text: str = '"Hello"') -> str:
    """A valid one-step email sequence with `head` in [sequence], `step` in its step and
    `tail` after it."""
    return (
        f'[sequence]\nkey = "welcome"\n{head}\n'
        f'[[steps]]\nkey = "hello"\nchannel = "email"\nsubject = "Hi"\ntext = {text}\n{step}\n'
        f"{tail}\n"
    )


HOOK = '[hooks.crm]\nurl = "https://crm.example.com/{path}"\nsigning_secret = "crm"\n{extra}'


def refusal(text: str) -> str:
    """The message `load_text` refuses `text` with, without the file name."""
    with pytest.raises(SequenceFileError) as info:
        load_text(text, source="test.toml")
    message = info.value.message
    assert message.startswith("test.toml: "), message
    return message.removeprefix("test.toml: ")


# --- text Postgres cannot store --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (seq('name = "a\\u0000b"'), f"key 'sequence.name': {NUL}"),
        (seq('tenant = "acme\\u0000"'), f"key 'sequence.tenant': {NUL}"),
        (seq('timezone = "UTC\\u0000"'), f"key 'sequence.timezone': {NUL}"),
        (seq('entry_events = ["ok", "go\\u0000"]'), f"key 'sequence.entry_events[1]': {NUL}"),
        (seq('exit_events = ["\\u0000"]'), f"key 'sequence.exit_events[0]': {NUL}"),
        (seq(text='"He\\u0000llo"'), f"step 'hello': key 'text': {NUL}"),
        (seq(step='html = "<p>\\u0000</p>"'), f"step 'hello': key 'html': {NUL}"),
        (seq(step='to = "\\u0000"'), f"step 'hello': key 'to': {NUL}"),
        (seq(step='adapter = "a\\u0000"'), f"step 'hello': key 'adapter': {NUL}"),
        (seq(step='cron = "0 9 * * *\\u0000"'), f"step 'hello': key 'cron': {NUL}"),
        (seq(step='window = { days = "mon\\u0000" }'), f"step 'hello': key 'window.days': {NUL}"),
        (
            seq(tail='[[transitions]]\nfrom = "hello"\nwhen = "data.x == \'\\u0000\'"'),
            f"transition #1 (from 'hello'): key 'when': {NUL}",
        ),
        (
            seq(tail=HOOK.format(path="\\u0000", extra="")),
            f"key 'hooks.crm.url': {NUL}",
        ),
        (
            seq(tail=HOOK.format(path="", extra='headers = { X-Id = "\\u0000" }')),
            f"key 'hooks.crm.headers.X-Id': {NUL}",
        ),
        (seq('"na\\u0000me" = 1'), f"key {NUL_KEY!r}: a key name {NUL}"),
        (seq(text='"\ud800"'), f"step 'hello': key 'text': {SURROGATE}"),
    ],
)
def test_text_postgres_cannot_store_is_refused_naming_where(text: str, message: str) -> None:
    assert refusal(text) == message


def test_a_wait_event_with_nul_is_refused() -> None:
    text = (
        '[sequence]\nkey = "w"\n[[steps]]\nkey = "wait"\n'
        'wait_for = { event = "go\\u0000", timeout = "1d" }\n'
    )
    assert refusal(text) == f"step 'wait': key 'wait_for.event': {NUL}"


def test_a_file_that_is_not_utf8_is_refused_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(seq(text='"Gr\xfc\xdfe"').encode("latin-1"))
    with pytest.raises(SequenceFileError) as info:
        load_file(path)
    assert info.value.message == f"{path}: line 8: not UTF-8 (byte 0xfc); save the file as UTF-8"


# --- keys -------------------------------------------------------------------------------------


def test_a_key_with_a_trailing_newline_is_refused() -> None:
    # `$` matches before a final newline: the key pattern is matched whole.
    assert refusal(seq().replace('"welcome"', '"welcome\\n"')) == (
        f"key 'sequence.key': 'welcome\\n' {NOT_A_KEY}"
    )
    assert refusal(seq().replace('"hello"', '"hello\\n"')) == (
        f"step 'hello\\n': key 'key': {NOT_A_KEY}"
    )
    assert load_text(seq(), source="test.toml").key == "welcome"


@pytest.mark.parametrize("adapter", ["ad\\n", "bad name! /", "-x", ""])
def test_an_adapter_name_no_adapter_can_have_is_refused(adapter: str) -> None:
    shown = adapter.replace("\\n", "\n")
    assert refusal(seq(step=f'adapter = "{adapter}"')) == (
        f"step 'hello': key 'adapter': {shown!r} {NOT_A_KEY}"
    )
    assert load_text(seq(step='adapter = "mail.eu-1_b"'), source="t").steps[0].adapter == (
        "mail.eu-1_b"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            seq().replace('"welcome"', f'"{"w" * 129}"'),
            "key 'sequence.key': must be at most 128 characters (it has 129)",
        ),
        (
            seq().replace('"hello"', f'"{"h" * 129}"'),
            f"step {'h' * 129!r}: key 'key': must be at most 128 characters (it has 129)",
        ),
        (
            seq(f'tenant = "{"t" * 129}"'),
            "key 'sequence.tenant': must be at most 128 characters (it has 129)",
        ),
        (
            seq(f'entry_events = ["{"e" * 129}"]'),
            "key 'sequence.entry_events': must be at most 128 characters (it has 129)",
        ),
        (
            seq(step=f'adapter = "{"a" * 129}"'),
            "step 'hello': key 'adapter': must be at most 128 characters (it has 129)",
        ),
        (
            seq('tenant = "  "'),
            "key 'sequence.tenant': must not be empty (leave it out for a global sequence)",
        ),
    ],
)
def test_names_longer_than_the_cli_and_api_take_are_refused(text: str, message: str) -> None:
    assert refusal(text) == message


# --- numbers and durations ---------------------------------------------------------------------


def test_integers_that_do_not_fit_their_column_are_refused() -> None:
    transition = '[[transitions]]\nfrom = "hello"\npriority = {}\n'
    assert refusal(seq(tail=transition.format(2**31))) == (
        "transition #1 (from 'hello'): key 'priority': must be from -2147483647 to 2147483647"
    )
    assert refusal(seq(tail=transition.format(-(2**70)))) == (
        "transition #1 (from 'hello'): key 'priority': must be from -2147483647 to 2147483647"
    )
    assert refusal(seq(step="max_attempts = 99999999999")) == (
        "step 'hello': key 'max_attempts': must be a positive integer, at most 1000"
    )
    sms = seq().replace('channel = "email"\nsubject = "Hi"\ntext', 'channel = "sms"\nbody')
    assert refusal(sms.replace('body = "Hello"', f'body = "Hello"\nmax_length = {2**31}')) == (
        "step 'hello': key 'max_length': must be a positive number of characters, "
        "at most 2147483647"
    )
    assert refusal(seq(tail=HOOK.format(path="", extra=f"retries = {2**64}"))) == (
        "hooks: hooks.crm.retries: Expected `int` <= 5"
    )


def test_an_integer_python_cannot_convert_is_refused_naming_line_and_key() -> None:
    text = seq(tail='[[transitions]]\nfrom = "hello"\npriority = ' + "9" * 5000)
    line = text[: text.index("priority")].count("\n") + 1
    assert refusal(text) == f"line {line}: key 'priority': an integer with more than 4300 digits"


@pytest.mark.parametrize(
    ("after", "message"),
    [
        ("9999999999w", "'9999999999w' is out of range; use a duration from 0s to 3650d"),
        ("1" + "0" * 40 + "d", f"'1{'0' * 40}d' is out of range; use a duration from 0s to 3650d"),
        (
            "١٢s",
            "'١٢s' is not a duration; use a whole number and a unit (ms, s, m, h, d, w), "
            'e.g. "90s" or "3d"',
        ),
    ],
)
def test_durations_out_of_range_or_in_other_digits_are_refused(after: str, message: str) -> None:
    assert refusal(seq(step=f'after = "{after}"')) == f"step 'hello': key 'after': {message}"


def test_wait_and_hook_durations_out_of_range_are_refused() -> None:
    wait = (
        '[sequence]\nkey = "w"\n[[steps]]\nkey = "wait"\n'
        'wait_for = {{ event = "go", timeout = "{}" }}\n'
    )
    assert refusal(wait.format("9999999999w")) == (
        "step 'wait': key 'wait_for.timeout': '9999999999w' is out of range; use a duration "
        "longer than 0s and at most 3650d"
    )
    assert refusal(seq(tail=HOOK.format(path="", extra='timeout = "9999999999w"'))) == (
        "hooks: hooks.crm.timeout: '9999999999w' is out of range; use a duration from 0s to 3650d"
    )


# --- nesting and size -------------------------------------------------------------------------


def test_nesting_too_deep_for_the_toml_parser_is_refused_naming_line_and_key() -> None:
    text = seq("deep = " + "[" * 5000 + "]" * 5000)
    assert refusal(text) == "line 3: key 'deep': tables or arrays nested deeper than 32 levels"
    inline = seq(tail="[hooks]\ncrm = " + "{a = " * 3000 + "1" + "}" * 3000)
    line = inline[: inline.index("crm = ")].count("\n") + 1
    assert refusal(inline) == (
        f"line {line}: key 'crm': tables or arrays nested deeper than 32 levels"
    )


def test_nesting_deeper_than_the_limit_is_refused_naming_the_key() -> None:
    text = seq("deep = " + "[" * 40 + "]" * 40)
    assert refusal(text) == "key 'sequence.deep" + "[0]" * 31 + "': nested deeper than 32 levels"


def test_a_file_larger_than_the_limit_is_refused_and_one_at_the_limit_loads(
    tmp_path: Path,
) -> None:
    body = seq().encode()
    at_limit = tmp_path / "at_limit.toml"
    at_limit.write_bytes(body + b"#" * (MAX_FILE_BYTES - len(body)))
    assert load_file(at_limit).key == "welcome"
    over = tmp_path / "over.toml"
    over.write_bytes(body + b"#" * (MAX_FILE_BYTES + 1 - len(body)))
    with pytest.raises(SequenceFileError) as info:
        load_file(over)
    assert (
        info.value.message == f"{over}: larger than 1048576 bytes (the limit for a sequence file)"
    )


def test_reading_an_endless_file_stops_at_the_limit() -> None:
    with pytest.raises(SequenceFileError) as info:
        load_file(Path("/dev/zero"))
    assert info.value.message == (
        "/dev/zero: larger than 1048576 bytes (the limit for a sequence file)"
    )


def _steps(count: int) -> str:
    return '[sequence]\nkey = "many"\n' + "".join(
        f'[[steps]]\nkey = "s{n}"\nchannel = "sms"\nbody = "b"\n' for n in range(count)
    )


def test_steps_and_transitions_are_limited() -> None:
    assert len(load_text(_steps(MAX_STEPS), source="test.toml").steps) == MAX_STEPS
    assert (
        refusal(_steps(MAX_STEPS + 1)) == "key 'steps': 501 steps; a sequence may have at most 500"
    )
    transitions = '[[transitions]]\nfrom = "s0"\nwhen = "data.x == 1"\n' * (MAX_TRANSITIONS + 1)
    assert refusal(_steps(1) + transitions) == (
        "key 'transitions': 2001 transitions; a sequence may have at most 2000"
    )


# --- templates at apply -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (
            "{% include 'footer' %}",
            "text: {% include %} is not supported: dripd has no other templates to include; "
            "write the text into this template (line:column 1:3)",
        ),
        (
            "Hi {% render 'footer' %}",
            "text: {% render %} is not supported: dripd has no other templates to include; "
            "write the text into this template (line:column 1:6)",
        ),
        (
            "{% for i in (1..30000000) %}x{% endfor %}",
            "text: its loops over literal ranges run more than 10000 iterations (the limit per "
            "render)",
        ),
        (
            "{% for i in (1..200) %}{% for j in (1..51) %}{% endfor %}{% endfor %}",
            "text: its loops over literal ranges run more than 10000 iterations (the limit per "
            "render)",
        ),
        (
            "{% liquid\nfor i in (1..20000)\necho i\nendfor %}",
            "text: its loops over literal ranges run more than 10000 iterations (the limit per "
            "render)",
        ),
        (
            "{% for i in (1..5000) %}" + "y" * 300 + "{% endfor %}",
            "text: its loops over literal ranges write more than 1048576 characters (the limit "
            "per template)",
        ),
        (
            "x" * (MAX_TEMPLATE_CHARS + 1),
            "text: the template is 65537 characters long; the limit is 65536",
        ),
        (
            "{% if a %}" * 31 + "{% endif %}" * 31,
            "text: blocks nest more than 30 deep (the limit) (line:column 1:313)",
        ),
    ],
)
def test_templates_that_can_never_render_are_refused_at_apply(template: str, message: str) -> None:
    text = seq(text=f"'''{template}'''")
    assert refusal(text) == f"step 'hello': key 'text': {message}"


def test_a_loop_over_a_literal_range_within_the_limits_applies() -> None:
    text = seq(text="'''{% for i in (1..30000000) limit: 10 offset: 5 %}{{ i }}{% endfor %}'''")
    version = load_text(text, source="test.toml")
    template = compile_template(version.steps[0].template["text"], field="text")
    assert template.render({}) == "6789101112131415"


def test_a_hook_template_that_includes_another_is_refused() -> None:
    assert refusal(seq(tail=HOOK.format(path="{% include 'x' %}", extra=""))) == (
        "hooks: hooks.crm.url: {% include %} is not supported: dripd has no other templates "
        "to include; write the text into this template (line:column 1:27)"
    )


# --- the database never sees a refused file (the first five reached Postgres before) ---------


@pytest.mark.parametrize(
    "text",
    [
        seq(text='"He\\u0000llo"'),
        seq('name = "\\u0000"'),
        seq('entry_events = ["\\u0000"]'),
        seq().replace('"welcome"', '"welcome\\n"'),
        seq().replace('"hello"', '"hello\\n"'),
        seq(tail='[[transitions]]\nfrom = "hello"\npriority = 2147483648'),
        seq(f'entry_events = ["{"e" * 3000}"]'),
    ],
)
async def test_a_refused_file_writes_nothing(pool: asyncpg.Pool, text: str) -> None:
    with pytest.raises(SequenceFileError):
        await apply_text(pool, text)
    assert await pool.fetchval("SELECT count(*) FROM dripd.sequences") == 0


async def test_the_largest_sequence_applies(pool: asyncpg.Pool) -> None:
    applied = await apply_text(pool, _steps(MAX_STEPS))
    assert (applied.key, applied.version, applied.created) == ("many", 1, True)
    assert await pool.fetchval("SELECT count(*) FROM dripd.steps") == MAX_STEPS


# --- `dripd apply` ----------------------------------------------------------------------------


@pytest.fixture
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DRIPD_DSN", raising=False)
    monkeypatch.setenv("DRIPD_CONFIG", str(tmp_path / "none.toml"))
    (tmp_path / "none.toml").write_text("")


@pytest.mark.usefixtures("_no_ambient_config")
@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            seq().replace('"welcome"', '"welcome\\n"'),
            f"key 'sequence.key': 'welcome\\n' {NOT_A_KEY}",
        ),
        (
            seq(step='after = "9999999999w"'),
            "step 'hello': key 'after': '9999999999w' is out of range; use a duration from 0s "
            "to 3650d",
        ),
        (
            seq(step='after = "١٢s"'),
            "step 'hello': key 'after': '١٢s' is not a duration; use a whole number and a unit "
            '(ms, s, m, h, d, w), e.g. "90s" or "3d"',
        ),
    ],
)
async def test_apply_exits_2_naming_file_step_and_key(
    capsys: pytest.CaptureFixture[str], dsn: str, tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "welcome.toml"
    path.write_text(text)
    code = await asyncio.to_thread(main, ["apply", "--dsn", dsn, str(path)])
    out, err = capsys.readouterr()
    assert (code, out, err) == (2, "", f"dripd: {path}: {message}\n")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("template", "message"),
    [
        ('"He\\u0000llo"', f"step 'hello': key 'text': {NUL}"),
        (
            "'{% for i in (1..30000000) %}x{% endfor %}'",
            "step 'hello': key 'text': text: its loops over literal ranges run more than 10000 "
            "iterations (the limit per render)",
        ),
        (
            "\"{% include 'footer' %}\"",
            "step 'hello': key 'text': text: {% include %} is not supported: dripd has no other "
            "templates to include; write the text into this template (line:column 1:3)",
        ),
    ],
)
async def test_dripd_apply_in_a_subprocess_exits_2_and_writes_nothing(
    dsn: str, pool: asyncpg.Pool, tmp_path: Path, template: str, message: str
) -> None:
    path = tmp_path / "welcome.toml"
    path.write_text(seq(text=template))
    env = {"PATH": "/usr/bin:/bin", "DRIPD_CONFIG": str(tmp_path / "none.toml")}
    (tmp_path / "none.toml").write_text("")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dripd.cli", "apply", "--dsn", dsn, str(path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert (proc.returncode, out.decode(), err.decode()) == (2, "", f"dripd: {path}: {message}\n")
    assert await pool.fetchval("SELECT count(*) FROM dripd.sequences") == 0


# --- templates at send time -------------------------------------------------------------------


def render(source: str, **context: Any) -> str:
    return compile_template(source, field="text").render(context)


def failure(source: str, **context: Any) -> str:
    with pytest.raises(TemplateError) as info:
        render(source, **context)
    return str(info.value)


LOOPS = f"text: more than {LOOP_LIMIT} loop iterations (the limit per render)"
OUTPUT = f"text: output longer than {OUTPUT_LIMIT} characters (the limit)"


def test_loop_iterations_are_limited_per_render() -> None:
    loop = "{% for i in (1..n) %}{% endfor %}"
    assert render(loop + "done", n=LOOP_LIMIT) == "done"
    assert failure(loop, n=LOOP_LIMIT + 1) == f"{LOOPS} (line:column 1:3)"
    assert failure(loop + loop, n=LOOP_LIMIT // 2 + 1) == f"{LOOPS} (line:column 1:36)"
    assert failure("{% for i in (1..n) reversed %}{% endfor %}", n=10**30) == (
        f"{LOOPS} (line:column 1:3)"
    )
    table = "{% tablerow i in (1..n) %}{% endtablerow %}"
    assert failure(table, n=LOOP_LIMIT + 1) == f"{LOOPS} (line:column 1:3)"
    # A filter walks a range as a loop would.
    assert failure("{% assign r = (1..n) %}{{ r | join: ',' }}", n=10**12) == (
        f"{LOOPS} (line:column 1:23)"
    )


def test_the_output_is_limited() -> None:
    assert len(render("{{ s }}", s="x" * OUTPUT_LIMIT)) == OUTPUT_LIMIT
    assert failure("{{ s }}", s="x" * (OUTPUT_LIMIT + 1)) == f"{OUTPUT} (line:column 1:0)"
    many = "{% for i in (1..n) %}{{ s }}{% endfor %}"
    assert failure(many, n=5000, s="y" * 300) == f"{OUTPUT} (line:column 1:3)"
    capture = "{% capture c %}{% for i in (1..n) %}{{ s }}{% endfor %}{% endcapture %}"
    assert failure(capture, n=5000, s="y" * 300) == f"{OUTPUT} (line:column 1:3)"
    # A line break is kept as it is (python-liquid's own limited stream reads "\r\n" as "\n").
    assert render("{{ s }}", s="a\r\nb") == "a\r\nb"


def test_filters_that_would_grow_past_a_limit_fail_before_they_run() -> None:
    assert failure("{{ s | replace: 'x', big }}", s="x" * 20, big="y" * 60000) == (
        f"{OUTPUT} (line:column 1:0)"
    )
    assert failure("{{ big | split: '' | join: big }}", big="y" * 60000) == (
        f"{OUTPUT} (line:column 1:0)"
    )
    assert failure(
        "{% assign n = 99999999 %}{% for i in (1..20) %}{% assign n = n | times: n %}{% endfor %}"
    ) == ("text: times: the result is larger than 14000 bits (the limit) (line:column 1:65)")
    assert failure("{{ s | split: ',' | size }}", s="," * 100_000) == (
        "text: split: the result has more than 100000 items (the limit) (line:column 1:7)"
    )


def test_assigned_variables_are_limited() -> None:
    names = "".join(f"{{% assign v{n} = s | append: '{n}' %}}" for n in range(20))
    assert failure(names, s="z" * (NAMESPACE_LIMIT // 10)) == (
        f"text: assigned variables hold more than {NAMESPACE_LIMIT} bytes (the limit) "
        "(line:column 1:300)"
    )


def test_a_render_past_its_time_limit_fails() -> None:
    template = compile_template("{% for i in (1..3) %}{{ i }}{% endfor %}", field="text")
    with pytest.raises(RenderTimeout) as info:
        template.render({}, timeout=0.0)
    assert str(info.value) == "text: rendering took longer than 0s (the limit) (line:column 1:3)"
    assert template.render({}) == "123"


def test_uniq_keeps_the_first_of_each_item_as_python_liquid_does() -> None:
    items = [3, "3", 1, 3, "a", "a", 2.0, 2, None, None, True]
    assert render("{{ a | uniq | join: ',' }}", a=items) == "3,3,1,a,2.0,"
    assert Environment().filters["uniq"](items) == [3, "3", 1, "a", 2.0, None]
    rows = [{"k": 1}, {"k": 1}, {"k": 2}, {"j": 1}]
    assert render("{{ a | uniq | size }}", a=rows) == "3"
    assert render("{{ a | uniq: 'k' | map: 'k' | join: ',' }}", a=rows) == "1,2,"
    # Linear: 20 000 distinct items are quick (python-liquid compares every pair).
    assert (
        render("{{ s | split: '' | uniq | size }}", s="".join(map(chr, range(0x4E00, 0x9E20))))
        == "20512"
    )


@pytest.mark.parametrize("reverse", ["", " reversed"])
@pytest.mark.parametrize(
    ("limit", "offset"),
    [
        ("", ""),
        (" limit: 3", ""),
        ("", " offset: 2"),
        (" limit: 2", " offset: 7"),
        (" limit: 0", ""),
        (" limit: 4", " offset: -2"),
    ],
)
@pytest.mark.parametrize("iterable", ["(a..b)", "xs"])
def test_loops_slice_as_python_liquid_does(
    iterable: str, reverse: str, limit: str, offset: str
) -> None:
    source = f"{{% for i in {iterable}{limit}{offset}{reverse} %}}{{{{ i }}}},{{% endfor %}}"
    for a, b in [(1, 5), (3, 9), (0, 0), (5, 1), (-2, 4)]:
        context = {"a": a, "b": b, "xs": list(range(a, b))}
        assert render(source, **context) == Environment().from_string(source).render(**context)


def test_a_limit_that_ends_before_the_offset_gives_no_items() -> None:
    source = "{% for i in xs limit: -1 offset: -3 %}{{ i }}{% endfor %}done"
    assert render(source, xs=[1, 2, 3]) == "done"
    with pytest.raises(ValueError, match="Indices for islice"):
        Environment().from_string(source).render(xs=[1, 2, 3])  # python-liquid's own


def test_a_stored_template_that_breaks_a_new_limit_fails_each_render() -> None:
    template = compile_stored("{% for i in (1..30000000) %}x{% endfor %}", field="text")
    with pytest.raises(TemplateError) as info:
        template.render({})
    assert str(info.value) == (
        "text: its loops over literal ranges run more than 10000 iterations (the limit per "
        "render) (stored by an earlier dripd)"
    )
    assert template.hooks() == frozenset()


class _Probe:
    """Printed by a template: notes the thread, and can wait for the test to let it go."""

    def __init__(self, release: threading.Event | None = None) -> None:
        self.release = release
        self.threads: list[int] = []

    def __str__(self) -> str:
        self.threads.append(threading.get_ident())
        if self.release is not None and not self.release.wait(timeout=30):
            return "never released"
        return "probe"


async def test_a_slow_render_runs_off_the_event_loop() -> None:
    # Joining an array may take long (it grows with the array): never on the event loop.
    template = compile_template("{{ items | join: ',' }} {{ probe }}", field="text")
    release = threading.Event()
    probe = _Probe(release)
    render_task = asyncio.create_task(
        render_fields(
            {"text": template},
            {"items": [1, 2, 3], "probe": probe},
            limiter=anyio_limiter(),
        )
    )
    # The render blocks in the probe until released: only a loop left free can release it.
    await wait_for(lambda: probe.threads)
    release.set()
    assert await render_task == {"text": "1,2,3 probe"}
    assert probe.threads != [threading.get_ident()]


async def test_a_render_that_fails_in_the_thread_says_why() -> None:
    template = compile_template("{% for i in items %}{% endfor %}{{ items | size }}", field="text")
    with pytest.raises(TemplateError) as info:
        await render_fields(
            {"text": template}, {"items": list(range(LOOP_LIMIT + 1))}, limiter=anyio_limiter()
        )
    assert str(info.value) == f"{LOOPS} (line:column 1:3)"


def anyio_limiter() -> anyio.CapacityLimiter:
    return anyio.CapacityLimiter(2)


# --- the engine -------------------------------------------------------------------------------


async def test_a_send_time_limit_fails_the_step_for_good_and_a_slow_template_still_sends(
    dsn: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    outbox = await outbox_adapters(pool, tmp_path / "outbox.jsonl")
    await apply_text(
        pool,
        seq(text="'''{% for i in (1..n) %}.{% endfor %}{{ items | join: \", \" }}'''"),
    )
    big = await api.enroll(
        pool, tenant=None, sequence_key="welcome", subscriber_id="big",
        data={"email": "big@example.com", "n": LOOP_LIMIT + 1, "items": []},
    )  # fmt: skip
    fine = await api.enroll(
        pool, tenant=None, sequence_key="welcome", subscriber_id="fine",
        data={"email": "fine@example.com", "n": 3, "items": ["a", "b"]},
    )  # fmt: skip
    async with running_daemon(dsn, tmp_path):
        await wait_for(lambda: len(outbox_messages(outbox)) == 1)
        await wait_for(_ended(pool, big.id, "failed"))
    [sent] = outbox_messages(outbox)
    assert (sent["to"], sent["text"]) == ("fine@example.com", "...a, b")
    rows = {r["enrollment_id"]: r for r in await executions(pool)}
    failed = rows[big.id]
    assert (failed["status"], failed["attempt"]) == ("failed", 0)
    assert failed["last_error"] == f"template error in step 'hello': {LOOPS} (line:column 1:3)"
    assert rows[fine.id]["status"] == "sent"


async def test_a_template_stored_before_the_limits_fails_its_step_not_the_daemon(
    dsn: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    outbox = await outbox_adapters(pool, tmp_path / "outbox.jsonl")
    await apply_text(pool, seq())
    # As an earlier dripd stored the example (it applied then).
    await pool.execute(
        "UPDATE dripd.steps SET template = jsonb_set(template, '{text}', to_jsonb($1::text))",
        "{% for i in (1..30000000) %}x{% endfor %}",
    )
    e = await api.enroll(
        pool, tenant=None, sequence_key="welcome", subscriber_id="s",
        data={"email": "s@example.com"},
    )  # fmt: skip
    async with running_daemon(dsn, tmp_path):
        await wait_for(_ended(pool, e.id, "failed"))
    [row] = await executions(pool)
    assert row["last_error"] == (
        "template error in step 'hello': text: its loops over literal ranges run more than "
        "10000 iterations (the limit per render) (stored by an earlier dripd)"
    )
    assert outbox_messages(outbox) == []


def _ended(pool: asyncpg.Pool, enrollment_id: Any, status: str) -> Any:
    async def check() -> bool:
        found = await pool.fetchval(
            "SELECT status FROM dripd.enrollments WHERE id = $1", enrollment_id
        )
        return bool(found == status)

    return check


def test_the_readme_states_the_limits_the_code_enforces() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### Sequence file and template limits") :]
    section = section[: section.index("\n## ")]

    def spaced(number: int) -> str:
        return f"{number:,}".replace(",", " ")

    for phrase in [
        f"at most 1 MiB ({spaced(MAX_FILE_BYTES)} bytes)",
        f"at most {MAX_STEPS} `[[steps]]` and {MAX_TRANSITIONS} `[[transitions]]`",
        f"at most {spaced(MAX_TEMPLATE_CHARS)} characters each",
        f"| loop iterations | {spaced(LOOP_LIMIT)}, counted over all",
        f"| output | {spaced(OUTPUT_LIMIT)} characters",
        f"| time | {RENDER_TIMEOUT:g} s;",
        f"at most {INLINE_RENDER * 1000:g} ms",
        f"longer than {INLINE_CHARS} characters",
        f"at most {RENDER_THREADS} at a time",
    ]:
        assert phrase in section, phrase
