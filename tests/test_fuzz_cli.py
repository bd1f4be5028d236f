"""Fuzzing the CLI (hypothesis): argument vectors for every command, run in-process
against a migrated database. Every one either works (0) or fails with one line (1, or 2
naming the argument, file, key or field); none prints a traceback or an internal error."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from dripd.api import SUPPRESSION_REASONS
from dripd.channels.credentials import generate_key
from dripd.cli import main
from dripd.model import CHANNELS

FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

SEQUENCE = """
[sequence]
key = "welcome"
entry_events = ["signed_up"]

[[steps]]
key = "hello"
channel = "email"
subject = "Hi {{ first_name }}"
text = "Hello {{ first_name | default: 'you' }}"
"""

# --- what goes into an argument vector ----------------------------------------------------

# What Python makes of argv bytes that are not UTF-8 (PEP 383): lone surrogates.
NOT_UTF8 = st.lists(st.integers(1, 255), min_size=1, max_size=12).map(bytes).map(os.fsdecode)
# Any text an argv element can hold (no NUL), printable or not, up to past every limit.
TEXT = st.one_of(
    st.text(st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]), max_size=30),
    st.text(alphabet="ab-_.@+", min_size=60, max_size=330),
    NOT_UTF8,
    st.sampled_from(["", " ", "-", "--", "-v", "--json", "é", "\u202e", "١٢", "../x", "\n"]),
)
_VALID_ID = st.sampled_from(["welcome", "u1", "hello", "acme", "out", "signed_up"])
ID = st.one_of(_VALID_ID, _VALID_ID, _VALID_ID, TEXT)  # mostly ids that work, to go deeper
UUIDS = st.one_of(st.uuids().map(str), st.uuids().map(str), TEXT)
SECONDS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["-1", "0", "1e400", "86400", "86401", "0.001", "nan", "١"]),
    TEXT,
)

_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.sampled_from(["\x00", "a\x00b", "\ud800", "Europe/Berlin", "Mars/Base", "a@example.com"]),
)
_KEYS = st.one_of(
    st.text(max_size=6),
    st.sampled_from(["email", "phone", "timezone", "first_name", "\x00", "k" * 300]),
)
JSON_VALUE = st.recursive(
    _LEAF,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=3),
    max_leaves=12,
)


def _nested(depth: int) -> str:
    return '{"a": ' + "[" * depth + "]" * depth + "}"


# --data / --config: JSON objects (NUL, lone surrogates, deep nesting, huge numbers) and not.
DATA = st.one_of(
    st.dictionaries(_KEYS, JSON_VALUE, max_size=4).map(json.dumps),
    JSON_VALUE.map(json.dumps),
    st.integers(min_value=0, max_value=3000).map(_nested),
    st.sampled_from(
        [
            '{"n": 1e999}',
            '{"n": NaN}',
            '{"n": 1' + "0" * 5000 + "}",
            '{"n": "' + "x" * 70000 + '"}',
            '{"timezone": "Mars/Base"}',
            '{"path": "/dev/null"}',
            "{",
        ]
    ),
    TEXT,
)
BAD_DSNS = st.sampled_from(
    [
        "",
        "notadsn",
        "postgresql://ann:hunter2@[::1:5432/db",
        "postgres://ann:hunter2@db:x/app",
        "postgresql://ann:hunter2@db/app?sslmode=sometimes",
        "postgresql://ann:hunter2@db/app?bogus",
        "postgresql://ann:hun@ter2@db/app",
        "postgresql://127.0.0.1:1/none?connect_timeout=1",
    ]
)


@dataclass(frozen=True)
class Command:
    """A command: its words, its positional arguments, and its options (None: a flag)."""

    words: tuple[str, ...]
    positionals: tuple[st.SearchStrategy[str], ...] = ()
    options: dict[str, st.SearchStrategy[str] | None] = field(default_factory=dict)
    database: bool = True


# In argument vectors, {tmp} stands for the test's directory and {dsn} for its database.
TENANT: dict[str, st.SearchStrategy[str] | None] = {"--tenant": ID, "--json": None}
PATHS = st.one_of(
    st.sampled_from(
        ["{tmp}/creds.json", "{tmp}/secret", "{tmp}/none", "{tmp}", "/dev/zero", "/dev/null",
         "-", "{tmp}/latin1"]
    ),
    TEXT,
)  # fmt: skip
FILES = st.one_of(st.sampled_from(["{tmp}/welcome.toml", "{tmp}/none.toml"]), TEXT)
CHANNEL = st.one_of(st.sampled_from(sorted(CHANNELS)), TEXT)
ADDRESS = st.one_of(st.sampled_from(["a@example.com", "+1 202 555 0143", "Bob <bob"]), TEXT)

INTAKE = [
    Command(("enroll",), (ID, ID), {**TENANT, "--type": ID, "--data": DATA}),
    Command(("event",), (ID, ID), {**TENANT, "--type": ID, "--data": DATA, "--id": ID}),
    Command(
        ("suppress",),
        (CHANNEL, ADDRESS),
        {**TENANT, "--reason": st.one_of(st.sampled_from(sorted(SUPPRESSION_REASONS)), TEXT)},
    ),
    Command(("preview",), (ID,), {**TENANT, "--data": DATA, "--step": ID, "--type": ID}),
    Command(("replay",), (UUIDS,), TENANT),
]
ADMIN = [
    Command(
        ("adapter", "add"),
        (ID,),
        {
            **TENANT,
            "--channel": CHANNEL,
            "--provider": st.one_of(st.sampled_from(["outbox", "smtp"]), TEXT),
            "--config": DATA,
            "--credentials-file": PATHS,
            "--default": None,
        },
    ),
    Command(("adapter", "list"), (), {**TENANT, "--all-tenants": None}),
    Command(("adapter", "disable"), (ID,), TENANT),
    Command(("secret", "set"), (ID,), {**TENANT, "--from-file": PATHS}),
    Command(("secret", "generate"), (ID,), TENANT),
    Command(("secret", "list"), (), {**TENANT, "--all-tenants": None}),
    Command(("secret", "delete"), (ID,), TENANT),
    Command(("token", "create"), (), {**TENANT, "--name": ID}),
    Command(("token", "list"), (), {**TENANT, "--all-tenants": None}),
    Command(("token", "revoke"), (UUIDS,), {"--json": None}),
]
# Every other command but `dev` and `run` (they start servers) and `uninstall --execute`
# (it would leave nothing to fuzz).
OTHER = [
    Command(
        ("hook", "test"), (ID, ID), {**TENANT, "--data": DATA, "--subscriber": ID, "--type": ID}
    ),
    Command(("rotate-key",), (), {"--json": None}),
    Command(("apply",), (FILES,), {"--json": None}),
    Command(("migrate",), (), {"--allow-newer-server": None, "--json": None}),
    Command(("check-schema",), (), {"--json": None}),
    Command(("uninstall",), (), {"--json": None}),
    Command(("keygen",), (), {"--json": None}, database=False),
    Command(
        ("ctl",),
        (st.one_of(st.sampled_from(["status", "pause", "replay", "resume-adapter"]), TEXT),),
        {"--socket": st.one_of(st.just("{tmp}/none.sock"), TEXT), "--timeout": SECONDS},
        database=False,
    ),
]


@st.composite
def argv_of(draw: st.DrawFn, command: Command) -> list[str]:
    argv = list(command.words) + [draw(s) for s in command.positionals]
    for option, values in command.options.items():
        if draw(st.integers(0, 2)) == 0:
            argv += [option] if values is None else [option, draw(values)]
    if command.words == ("ctl",):
        argv += draw(st.lists(ID, max_size=2))
    if command.database:
        bad = draw(st.integers(0, 5)) == 0
        argv += ["--dsn", draw(BAD_DSNS) if bad else "{dsn}"]
    if draw(st.integers(0, 9)) == 0:
        argv.insert(draw(st.integers(0, len(argv))), draw(TEXT))  # a stray argument anywhere
    return argv


def argvs(commands: list[Command]) -> st.SearchStrategy[list[str]]:
    return st.sampled_from(commands).flatmap(argv_of)


STDIN = st.sampled_from([b"", b"{}", b"\xff\xfe", b"{" * 70000])


# --- running one -------------------------------------------------------------------------


def invoke(argv: list[str], stdin: bytes = b"") -> tuple[int, str, str]:
    """`dripd ARGV…` in-process, with the standard streams a terminal would give it:
    stdout strict UTF-8 (printing a lone surrogate fails), stderr backslash-escaped."""
    out, err = io.BytesIO(), io.BytesIO()
    stdout = io.TextIOWrapper(out, encoding="utf-8", errors="strict", write_through=True)
    stderr = io.TextIOWrapper(err, encoding="utf-8", errors="backslashreplace", write_through=True)
    saved = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code: Any = main(argv)
            except SystemExit as exc:  # argparse: usage errors, --help, --version
                code = exc.code
    finally:
        sys.stdin = saved
    return code, out.getvalue().decode(), err.getvalue().decode()


_ARGPARSE = re.compile(
    r"(?:^|\n)dripd(?: [\w-]+)*: error: (?:argument \S+|the following arguments are required: |"
    r"unrecognized arguments: |ambiguous option: |invalid choice)"
)
# What a message of dripd's own starts with when it names where the input was wrong.
_NAMED = re.compile(
    r"dripd: (?:argument \S+: |--[a-z-]+: |DRIPD_DSN: |ctl [a-z-]+: |[A-Z_]+: |"
    r"[a-z_]+(?:\.\S+|\[\d+\])*: |adapter (?:config|credentials) key |"
    r"\w+ adapter (?:config|credential) `|no database: pass --dsn)"
)


def check(argv: list[str], code: Any, out: str, err: str) -> None:
    """The contract of every run; `argv` only for the failure message."""
    shown = f"argv={argv!r}\nexit={code!r}\nstderr={err[-2000:]!r}"
    assert code in (0, 1, 2), shown
    if not any(a.startswith(("-v", "--ve")) for a in argv):  # -v asks for tracebacks
        assert "Traceback" not in err, shown
    assert "internal error" not in err, shown
    assert "hunter2" not in err + out, shown
    if code == 0:
        event("exit 0")
        return
    if code == 1 and argv[0] == "preview" and not err:
        event("exit 1: preview of a step that cannot render")  # printed on stdout
        assert '"error"' in out or "error: " in out, shown
        return
    err = err[err.find("dripd: ") :] if err.startswith("Traceback") else err
    assert err.startswith(("dripd", "usage: dripd")), shown
    if code == 2:
        # argparse's line follows the usage; dripd's own is the first.
        named = _ARGPARSE.search(err) or _NAMED.match(err) or _names_a_file(err, argv)
        assert named, shown
        event(f"exit 2: {(named.group(0) if isinstance(named, re.Match) else 'file')[:40]}")
    else:
        # One line, or two ("caused by: …"); never a stack. Arguments quoted in it may
        # hold line breaks of their own, so count the lines dripd starts.
        assert err.count("\n  caused by: ") <= 1, shown
        assert err.startswith("dripd: "), shown
        event(f"exit 1: {err[:40]}")


def _names_a_file(line: str, argv: list[str]) -> bool:
    """A message about a file (a sequence file, the config) starts with its path."""
    return any(line.startswith((f"dripd: {a}:", f"dripd: {Path(a)}:")) for a in argv)


# --- the tests -------------------------------------------------------------------------------


@pytest.fixture
def fuzz_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, dsn: str) -> dict[str, str]:
    """A migrated database with the sequence `welcome`, a config without surprises, an
    encryption key, and the files the commands may read: the placeholders' values."""
    monkeypatch.delenv("DRIPD_DSN", raising=False)
    monkeypatch.setenv("DRIPD_ENCRYPTION_KEY", generate_key())
    config = tmp_path / "dripd.toml"
    config.write_text(f'[log]\nlevel = "error"\n[control]\nsocket = "{tmp_path}/none.sock"\n')
    monkeypatch.setenv("DRIPD_CONFIG", str(config))
    (tmp_path / "welcome.toml").write_text(SEQUENCE)
    (tmp_path / "creds.json").write_text('{"username": "u", "password": "hunter2"}')
    (tmp_path / "secret").write_text("hunter2\n")
    (tmp_path / "latin1").write_bytes(b"caf\xe9")
    code, _, err = invoke(["apply", str(tmp_path / "welcome.toml"), "--dsn", dsn])
    assert code == 0, err
    return {"{tmp}": str(tmp_path), "{dsn}": dsn}


def fill(argv: list[str], values: dict[str, str]) -> list[str]:
    for placeholder, value in values.items():
        argv = [a.replace(placeholder, value) for a in argv]
    return argv


@FUZZ
@given(argv=argvs(INTAKE), stdin=STDIN)
def test_fuzz_intake_commands(fuzz_env: dict[str, str], argv: list[str], stdin: bytes) -> None:
    argv = fill(argv, fuzz_env)
    check(argv, *invoke(argv, stdin))


@FUZZ
@given(argv=argvs(ADMIN), stdin=STDIN)
def test_fuzz_adapter_secret_and_token_commands(
    fuzz_env: dict[str, str], argv: list[str], stdin: bytes
) -> None:
    argv = fill(argv, fuzz_env)
    check(argv, *invoke(argv, stdin))


@FUZZ
@given(argv=argvs(OTHER), stdin=STDIN)
def test_fuzz_other_commands(fuzz_env: dict[str, str], argv: list[str], stdin: bytes) -> None:
    argv = fill(argv, fuzz_env)
    check(argv, *invoke(argv, stdin))


WORDS = st.sampled_from(["enroll", "adapter", "secret", "token", "hook", "ctl", "--dsn", "add"])


@FUZZ
@given(argv=st.lists(st.one_of(TEXT, WORDS), max_size=5))
def test_fuzz_any_words(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, argv: list[str]) -> None:
    """Any words at all; without a DSN no database is reached (`dev` and `run`, which
    would start servers, are left out)."""
    assume(not argv or argv[0] not in ("dev", "run"))
    monkeypatch.delenv("DRIPD_DSN", raising=False)
    config = tmp_path / "dripd.toml"
    config.write_text(f'[control]\nsocket = "{tmp_path}/none.sock"\n')
    monkeypatch.setenv("DRIPD_CONFIG", str(config))
    check(argv, *invoke(argv))
