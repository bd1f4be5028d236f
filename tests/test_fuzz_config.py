"""Fuzzing the configuration (hypothesis): every input either loads or raises ConfigError
naming the key path (or the file); never another exception."""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dripd.config import DURATIONS, INTEGERS, Config, from_dict, load
from dripd.errors import ConfigError
from dripd.model import CHANNELS

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- the keys and their values ------------------------------------------------------------


def _scalar_keys() -> dict[str, Any]:
    """Every `section.key` of the config with its default (the rate limit scopes too)."""
    keys: dict[str, Any] = {}
    for section, values in msgspec.to_builtins(Config()).items():
        if isinstance(values, dict) and section != "tenants":
            keys.update({f"{section}.{key}": value for key, value in values.items()})
    return keys


KEYS = _scalar_keys()


def _ms(span: timedelta) -> str:
    return f"{span // timedelta(milliseconds=1)}ms"


def _valid(key: str) -> st.SearchStrategy[Any]:
    """Values `key` should take (most of them)."""
    if key in INTEGERS:
        bounds = INTEGERS[key]
        return st.integers(bounds.minimum, bounds.maximum)
    if key in DURATIONS:
        span = DURATIONS[key]
        return st.sampled_from([_ms(span.minimum), _ms(span.maximum), KEYS[key]])
    if key == "windows.channels":
        return st.lists(st.sampled_from(sorted(CHANNELS)), max_size=5)
    if key in ("thresholds.bounce_rate", "thresholds.complaint_rate"):
        return st.floats(min_value=1e-9, max_value=1.0)
    return st.just(KEYS[key])


HUGE = st.sampled_from(
    [2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63), 10**30, 99999999999999999999, -1, 0]
)
ODD = st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "a\x00b",
        "\ud800",
        "\n",
        "\t",
        "\u202e",
        "١٢s",
        "12s\u00a0",
        "[::1:47127",
        "[::1]:8025",
        "::1:8025",
        "999999999d",
        "9999999999w",
        "99999999999999999999/1s",
        "1/99999999999999999999d",
        "0s",
        "x" * 5000,
        "9" * 5000,
        "fax",
        "a b@c",
        "-..-",
        "../../etc/passwd",
        "/" + "s" * 200,
        "https://",
        "https://a b/",
        "mailto:",
        "*",
        "Mars/Base",
        "UTC",
        "0660",
        "0o777",
        "NaN",
    ]
)
SCALARS = st.one_of(
    st.integers(-10, 20_000),
    HUGE,
    st.integers(),
    st.floats(),  # NaN and ±inf included
    st.booleans(),
    st.text(max_size=30),
    ODD,
    st.from_regex(r"\A[0-9]{1,25} ?(ms|s|m|h|d|w)\Z"),
    st.from_regex(r"\A[0-9]{1,22}/[0-9]{0,22}(ms|s|m|h|d|w)\Z"),
    st.none(),
)
NAMES = st.one_of(st.text(max_size=12), ODD, st.sampled_from(["*", "acme", "gmail.com"]))
ANY = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(NAMES, inner, max_size=3),
    max_leaves=8,
)


def _nested(depth: int) -> Any:
    value: Any = "x"
    for n in range(depth):
        value = [value] if n % 2 else {"k": value}
    return value


# Deeper than any key nests (tests below go past the interpreter's recursion limit once).
DEEP = st.integers(9, 100).map(_nested)
VALUES = st.one_of(ANY, DEEP)


def _value(key: str) -> st.SearchStrategy[Any]:
    return st.one_of(_valid(key), _valid(key), VALUES)


def _raw(key: str, value: Any) -> dict[str, Any]:
    section, name = key.split(".")
    return {section: {name: value}}


def _loads_or_names(raw: dict[str, Any], *paths: str) -> Config | None:
    """The Config `raw` makes, or None after checking its ConfigError names one of `paths`
    (any other exception fails the test)."""
    try:
        cfg = from_dict(raw)
    except ConfigError as exc:
        message = exc.message
    else:
        event("loads")
        return cfg
    event("refused")
    assert message.startswith("config: "), message
    assert any(path in message for path in paths), (paths, message)
    return None


# --- one key at a time ------------------------------------------------------------------------


@FAST
@given(data=st.data())
def test_every_key_takes_a_value_or_names_itself(data: st.DataObject) -> None:
    key = data.draw(st.sampled_from(sorted(KEYS)), label="key")
    value = data.draw(_value(key), label="value")
    cfg = _loads_or_names(_raw(key, value), key)
    if cfg is not None:  # what loaded is what was given, and it is in its range
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == value or (
            isinstance(value, float) and math.isnan(value)
        )
        if key in INTEGERS:
            assert INTEGERS[key].minimum <= value <= INTEGERS[key].maximum


TENANT = st.one_of(
    st.fixed_dictionaries(
        {}, optional={"timezone": st.one_of(st.sampled_from(["UTC", "Asia/Tokyo"]), VALUES)}
    ),
    st.dictionaries(NAMES, VALUES, max_size=2),
    VALUES,
)


@FAST
@given(tenants=st.one_of(st.dictionaries(NAMES, TENANT, max_size=3), VALUES))
def test_tenants_load_or_name_the_key(tenants: Any) -> None:
    _loads_or_names({"tenants": tenants}, "tenants")


QUOTA = st.one_of(
    st.fixed_dictionaries(
        {
            "scope": st.sampled_from(["adapter", "mailbox", "tenant", "sequence", "global"]),
            "limit": st.one_of(st.integers(1, 10**9), VALUES),
        },
        optional={
            "key": st.one_of(st.sampled_from(["*", "ann@example.com", "acme"]), NAMES),
            "period": st.one_of(st.sampled_from(["day", "hour"]), VALUES),
            "timezone": st.one_of(st.sampled_from(["UTC", "Europe/Berlin"]), VALUES),
        },
    ),
    st.dictionaries(NAMES, VALUES, max_size=3),
    VALUES,
)


@FAST
@given(quotas=st.one_of(st.lists(QUOTA, max_size=3), VALUES))
def test_quotas_load_or_name_the_key(quotas: Any) -> None:
    _loads_or_names({"quotas": quotas}, "quotas")


@FAST
@given(
    scope=st.sampled_from(
        ["adapter", "provider", "sending_domain", "recipient_domain", "tenant", "sequence"]
    ),
    limits=st.dictionaries(
        NAMES,
        st.one_of(
            st.sampled_from(["100/1m", "1/1s", "5/h", f"{10**9}/366d"]),
            st.from_regex(r"\A[0-9]{1,12}/[0-9]{0,4}(s|m|h|d)\Z"),
            VALUES,
        ),
        max_size=3,
    ),
)
def test_rate_limits_load_or_name_the_key(scope: str, limits: dict[str, Any]) -> None:
    _loads_or_names({"rate_limits": {scope: limits}}, f"rate_limits.{scope}")


# --- many keys at once, and unknown ones ------------------------------------------------------


@FAST
@given(data=st.data())
def test_many_keys_at_once_load_or_name_a_key_given(data: st.DataObject) -> None:
    keys = data.draw(st.lists(st.sampled_from(sorted(KEYS)), min_size=2, max_size=6, unique=True))
    raw: dict[str, Any] = {}
    for key in keys:
        section, name = key.split(".")
        raw.setdefault(section, {})[name] = data.draw(_value(key), label=key)
    _loads_or_names(raw, *(key.split(".")[0] + "." for key in keys))


@FAST
@given(section=NAMES, key=NAMES, value=VALUES)
def test_unknown_keys_and_sections_are_named(section: str, key: str, value: Any) -> None:
    known = msgspec.to_builtins(Config())
    if section in known:
        return
    _loads_or_names({section: {key: value}}, "unknown key", "must not hold", "nested too deeply")


# --- files ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as name:
        yield Path(name) / "dripd.toml"


def _file_loads_or_names(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    message = f"{path}: "
    try:
        load(path, env={})
    except ConfigError as exc:
        message = exc.message
    # A key's error names the file and the key; the file's own names the file.
    assert message.startswith(f"{path}: "), message


@FAST
@given(text=st.text(max_size=200))
def test_random_text_loads_or_names_the_file(scratch: Path, text: str) -> None:
    _file_loads_or_names(scratch, text.encode("utf-8", "surrogatepass"))


@FAST
@given(data=st.binary(max_size=200))
def test_random_bytes_load_or_name_the_file(scratch: Path, data: bytes) -> None:
    _file_loads_or_names(scratch, data)


def _toml(value: Any) -> str:
    """`value` in TOML, as near as it goes (JSON's strings and numbers are TOML's too,
    mostly; what is not makes a TOML error, which is fine here)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if value is None:
        return '""'
    return json.dumps(value) if isinstance(value, str) else str(value)


@FAST
@given(data=st.data())
def test_toml_files_of_generated_keys_load_or_name_the_file_and_key(
    scratch: Path, data: st.DataObject
) -> None:
    keys = data.draw(st.lists(st.sampled_from(sorted(KEYS)), min_size=1, max_size=4, unique=True))
    sections: dict[str, list[str]] = {}
    for key in keys:
        section, name = key.split(".")
        value = data.draw(st.one_of(_valid(key), ANY), label=key)
        sections.setdefault(section, []).append(f"{name} = {_toml(value)}")
    text = "".join(f"[{s}]\n" + "\n".join(lines) + "\n" for s, lines in sections.items())
    _file_loads_or_names(scratch, text.encode("utf-8", "surrogatepass"))


@pytest.mark.parametrize("key", ["worker.batch_size", "windows.channels", "tenants.acme"])
def test_a_value_nested_past_the_recursion_limit_names_its_key(key: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(_raw(key, _nested(5000)))
    assert info.value.message.startswith(f"config: {key}"), info.value.message
    assert info.value.message.endswith(": nested too deeply")


def test_a_deeply_nested_file_names_the_file(scratch: Path) -> None:
    for text in ("x = " + "[" * 3000 + "]" * 3000, "[worker]\nbatch_size = " + "{a=" * 3000):
        scratch.write_text(text)
        with pytest.raises(ConfigError) as info:
            load(scratch, env={})
        assert info.value.message.startswith(f"{scratch}: not valid TOML: ")
