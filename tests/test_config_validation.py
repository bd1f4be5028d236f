"""The configuration is validated completely when it loads: every key in a documented range
or of a documented syntax, every error naming its key (or the file), never a traceback."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from structlog.testing import capture_logs
from support import apply_text, free_port, one_email, running_daemon

from dripd import config
from dripd.cli import main
from dripd.config import INTEGERS, MAX_FILE_BYTES, Config, from_dict, load, parse_listen
from dripd.db import intake
from dripd.errors import ConfigError
from dripd.model import CHANNELS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def shown(text: str) -> str:
    """`text` as a message shows it: quoted, at most about 60 characters."""
    return repr(text) if len(text) <= 60 else repr(text[:57]) + "…"


def refused(raw: dict[str, Any]) -> str:
    """The message of the ConfigError `raw` raises (from_dict's source is "config")."""
    with pytest.raises(ConfigError) as info:
        from_dict(raw)
    return info.value.message


# --- the issue's examples -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"unsubscribe": {"mailto": "a b@c"}},
            "unsubscribe.mailto: 'a b@c' is not an email address",
        ),
        (
            {"worker": {"concurrency": 10_000_000}},
            "worker.concurrency: 10000000 is out of range; use an integer from 1 to 10000",
        ),
        (
            {"worker": {"concurrency": 99999999999999999999}},
            "worker.concurrency: an integer of 19 or more digits is out of range; "
            "use an integer from 1 to 10000",
        ),
        (
            {"control": {"socket": ""}},
            "control.socket: '' is not an absolute file path like \"/run/dripd/control.sock\"",
        ),
        (
            {"http": {"listen": "[::1:47127"}},
            "http.listen: '[::1:47127' is not a \"host:port\" address",
        ),
        (
            {"windows": {"channels": ["email", "fax"]}},
            "windows.channels[1]: 'fax' is not a channel; "
            "use chat, email, pubsub, sms, webhook, whatsapp",
        ),
        (
            {"worker": {"batch_size": 10**12}},
            "worker.batch_size: 1000000000000 is out of range; use an integer from 1 to 10000",
        ),
        (
            {"database": {"pool_max": 10**9}},
            "database.pool_max: 1000000000 is out of range; use an integer from 1 to 1000",
        ),
        (
            {"http": {"max_body_bytes": 10**15}},
            "http.max_body_bytes: 1000000000000000 is out of range; "
            "use an integer from 1 to 16777216",
        ),
        (
            {"email": {"message_id_domain": "-..-"}},
            "email.message_id_domain: '-..-' is not a host name",
        ),
        (
            {"thresholds": {"min_volume": 2**40}},
            "thresholds.min_volume: 1099511627776 is out of range; "
            "use an integer from 1 to 1000000000",
        ),
        (
            {"circuit": {"failures": 2**40}},
            "circuit.failures: 1099511627776 is out of range; use an integer from 1 to 1000",
        ),
        # Already refused before this change; kept so that they stay refused.
        (
            {"unsubscribe": {"token_ttl": "999999999d"}},
            "unsubscribe.token_ttl: '999999999d' is out of range",
        ),
        (
            {"rate_limits": {"adapter": {"mail": "99999999999999999999/1s"}}},
            "rate_limits.adapter.mail: '99999999999999999999/1s': the count must be at most",
        ),
        (
            {"quotas": [{"scope": "global", "limit": 2**63 - 1}]},
            "quotas[0].limit: an integer of 19 or more digits is out of range",
        ),
        (
            {"worker": {"poll_interval": "0s"}},
            "worker.poll_interval: '0s' is out of range; use a duration longer than 0s",
        ),
    ],
)
def test_the_issues_examples_are_refused_naming_the_key(raw: dict[str, Any], message: str) -> None:
    assert refused(raw).startswith(f"config: {message}")


def test_the_defaults_and_the_example_file_load() -> None:
    Config()
    example = Path(__file__).resolve().parents[1] / "config" / "dripd.example.toml"
    cfg = load(example, env={})
    assert msgspec.to_builtins(cfg) == msgspec.to_builtins(Config())


# --- integers -----------------------------------------------------------------------------


def _integer_keys() -> set[str]:
    """Every integer key of the config (a [[quotas]] table's `limit` as `quotas[].limit`)."""
    keys = {"quotas[].limit"}
    for section, values in msgspec.to_builtins(Config()).items():
        if isinstance(values, dict):
            for key, value in values.items():
                if isinstance(value, int) and not isinstance(value, bool):
                    keys.add(f"{section}.{key}")
    return keys


def test_every_integer_key_has_a_range_in_the_readme() -> None:
    assert set(INTEGERS) == _integer_keys()
    for key, bounds in INTEGERS.items():
        assert f"| `{key}` | {bounds} |" in README, f"{key}'s range is not in the README"


def _with_integer(key: str, value: object) -> dict[str, Any]:
    if key == "quotas[].limit":
        return {"quotas": [{"scope": "global", "limit": value}]}
    section, name = key.split(".")
    raw: dict[str, Any] = {section: {name: value}}
    if key == "database.pool_min" and isinstance(value, int):  # pool_min <= pool_max
        raw[section]["pool_max"] = max(value, 1)
    if key == "database.pool_max":
        raw[section]["pool_min"] = 1
    return raw


@pytest.mark.parametrize("key", sorted(INTEGERS))
def test_each_integer_key_takes_its_range_and_nothing_else(key: str) -> None:
    bounds = INTEGERS[key]
    where = "quotas[0].limit" if key == "quotas[].limit" else key
    from_dict(_with_integer(key, bounds.minimum))
    from_dict(_with_integer(key, bounds.maximum))
    for value in (bounds.minimum - 1, bounds.maximum + 1, 0, -1):
        if bounds.minimum <= value <= bounds.maximum:
            continue
        assert refused(_with_integer(key, value)) == (
            f"config: {where}: {value} is out of range; use an integer {bounds}"
        )
    for huge in (-(2**63), 2**64, 10**30):
        assert refused(_with_integer(key, huge)) == (
            f"config: {where}: an integer of 19 or more digits is out of range; "
            f"use an integer {bounds}"
        )
    for wrong, kind in (("10", "str"), (1.5, "float"), (True, "bool"), (None, "null")):
        assert refused(_with_integer(key, wrong)) == (
            f"config: {where}: Expected `int`, got `{kind}`"
        )


def test_the_pool_minimum_may_not_exceed_its_maximum() -> None:
    raw = {"database": {"pool_min": 5, "pool_max": 4}}
    assert refused(raw) == "config: database.pool_min: must not exceed database.pool_max"


# --- strings ------------------------------------------------------------------------------


def _string_keys() -> list[str]:
    """Every string key of the config's sections whose default is a string."""
    return sorted(
        f"{section}.{key}"
        for section, values in msgspec.to_builtins(Config()).items()
        if isinstance(values, dict)
        for key, value in values.items()
        if isinstance(value, str)
    )


@pytest.mark.parametrize("key", _string_keys())
@pytest.mark.parametrize("bad", ["\x00", "\n", "\x7f", "\ud800"])
def test_no_string_key_takes_a_control_character(key: str, bad: str) -> None:
    section, name = key.split(".")
    value = getattr(getattr(Config(), section), name)
    message = refused({section: {name: value[:3] + bad + value[3:]}})
    assert message.startswith(f"config: {key}: ")


def test_a_control_character_in_a_table_key_or_list_item_is_refused_naming_it() -> None:
    assert refused({"tenants": {"a\x00b": {}}}) == (
        "config: tenants.'a\\x00b': must not hold a control character or an unpaired "
        "surrogate (found '\\x00' at index 1)"
    )
    assert refused({"rate_limits": {"tenant": {"acme": "1/1s\n"}}}).startswith(
        "config: rate_limits.tenant.acme: must not hold a control character"
    )
    assert refused({"windows": {"channels": ["email", "sms\x00"]}}).startswith(
        "config: windows.channels[1]: must not hold a control character"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8025", ("127.0.0.1", 8025)),
        ("[::1]:8025", ("::1", 8025)),
        ("[fe80::1%eth0]:80", ("fe80::1%eth0", 80)),
        ("localhost:0", ("localhost", 0)),
        ("dripd.internal:65535", ("dripd.internal", 65535)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),  # noqa: S104 - parsed, not bound
    ],
)
def test_listen_addresses_that_parse(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text, where="http.listen") == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[::1:47127", "'[::1:47127' is not a \"host:port\" address"),
        ("::1:8025", "'::1:8025' is not a \"host:port\" address"),
        ("127.0.0.1:65536", "'127.0.0.1:65536' is not a \"host:port\" address"),
        ("127.0.0.1:١٢", "'127.0.0.1:١٢' is not a \"host:port\" address"),  # not ASCII
        ("127.0.0.1", "'127.0.0.1' is not a \"host:port\" address"),
        (":8025", "':8025' is not a \"host:port\" address"),
        ("[::1]:", "'[::1]:' is not a \"host:port\" address"),
        ("[]:8025", "'' is not an IPv6 address"),
        ("[1.2.3.4]:8025", "'1.2.3.4' is not an IPv6 address"),
        ("[::g]:8025", "'::g' is not an IPv6 address"),
        ("999.1.1.1:80", "'999.1.1.1' is neither an IPv4 address nor a host name"),
        ("-bad-:80", "'-bad-' is neither an IPv4 address nor a host name"),
        ("a b:80", "'a b' is neither an IPv4 address nor a host name"),
        ("", "'' is not a \"host:port\" address"),
    ],
)
def test_listen_addresses_that_do_not_parse_name_the_key(text: str, problem: str) -> None:
    message = refused({"http": {"listen": text}})
    assert message.startswith(f"config: http.listen: {problem}")


def test_listen_is_checked_even_with_http_disabled() -> None:
    message = refused({"http": {"enabled": False, "listen": "nowhere"}})
    assert message.startswith("config: http.listen: 'nowhere' is not a \"host:port\" address")


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("", "'' is not an absolute file path"),
        ("control.sock", "'control.sock' is not an absolute file path"),
        ("/run/dripd/", "'/run/dripd/' is not an absolute file path"),
        ("/" + "s" * 107, "the path is 108 bytes long; a Unix socket's path holds at most 107"),
        ("/" + "é" * 60, "the path is 121 bytes long"),  # bytes, not characters
    ],
)
def test_the_control_socket_must_fit_sun_path(path: str, problem: str) -> None:
    assert refused({"control": {"socket": path}}).startswith(f"config: control.socket: {problem}")


def test_a_socket_path_of_107_bytes_is_fine() -> None:
    assert from_dict({"control": {"socket": "/" + "s" * 106}}).control.socket == "/" + "s" * 106


@pytest.mark.parametrize("mode", ["660", "0660", "0600", "0775"])
def test_control_modes_that_are_octal(mode: str) -> None:
    assert from_dict({"control": {"mode": mode}}).control.mode == mode


@pytest.mark.parametrize("mode", ["0666", "0777", "662", "0002"])
def test_a_world_writable_control_socket_is_refused(mode: str) -> None:
    assert refused({"control": {"mode": mode}}) == (
        f"config: control.mode: {mode} lets every local user control the daemon; give the "
        'socket a group instead, e.g. "0660"'
    )


@pytest.mark.parametrize("mode", ["", "0668", "rw-rw----", "00660", "٠٦٦٠"])
def test_control_modes_that_are_not(mode: str) -> None:
    assert refused({"control": {"mode": mode}}).startswith(
        f"config: control.mode: {mode!r} is not an octal file mode"
    )


@pytest.mark.parametrize(
    "domain", ["dripd.local", "localhost", "mail-1.example.com", "a" * 63 + ".example"]
)
def test_message_id_domains_that_are_host_names(domain: str) -> None:
    assert from_dict({"email": {"message_id_domain": domain}}).email.message_id_domain == domain


@pytest.mark.parametrize(
    "domain",
    [
        "-..-",
        "",
        "example..com",
        ".example.com",
        "example.com.",
        "-example.com",
        "example-.com",
        "a" * 64 + ".example",
        ("a" * 62 + ".") * 4 + "example",  # 259 characters
        "ex_ample.com",
        "exämple.com",
        "1.2.3.4",  # the last label is all digits
        "a b.com",
    ],
)
def test_message_id_domains_that_are_not_host_names(domain: str) -> None:
    assert refused({"email": {"message_id_domain": domain}}) == (
        f"config: email.message_id_domain: {shown(domain)} is not a host name (labels of 1 "
        "to 63 letters, digits and inner hyphens, joined by dots)"
    )


def test_every_channel_may_be_windowed_and_nothing_else() -> None:
    cfg = from_dict({"windows": {"channels": sorted(CHANNELS)}})
    assert cfg.windows.channels == sorted(CHANNELS)
    assert from_dict({"windows": {"channels": []}}).windows.channels == []
    assert refused({"windows": {"channels": ["Email"]}}).startswith(
        "config: windows.channels[0]: 'Email' is not a channel"
    )


@pytest.mark.parametrize(
    "mailto",
    [
        "unsubscribe@example.com",
        "mailto:unsubscribe@example.com",
        "MAILTO:unsubscribe@example.com",
        "mailto:unsubscribe@example.com?subject=unsubscribe",
    ],
)
def test_mailto_addresses_that_fit_a_header(mailto: str) -> None:
    assert from_dict({"unsubscribe": {"mailto": mailto}}).unsubscribe.mailto == mailto


@pytest.mark.parametrize(
    ("mailto", "problem"),
    [
        ("a b@c", "'a b@c' is not an email address"),
        ("mailto:", "must not be empty"),
        ("mailto:nobody", "'nobody' is not an email address"),
        ("Ann <a@example.com>", "'Ann <a@example.com>' cannot go in a List-Unsubscribe header"),
        ('"a b"@example.com', "cannot go in a List-Unsubscribe header"),
        ("a@example.com,b@example.com", "is not an email address"),
        ("a@exämple.com", "cannot go in a List-Unsubscribe header"),
    ],
)
def test_mailto_addresses_that_do_not(mailto: str, problem: str) -> None:
    message = refused({"unsubscribe": {"mailto": mailto}})
    assert message.startswith("config: unsubscribe.mailto: ")
    assert problem in message


@pytest.mark.parametrize(
    "url",
    [
        "https://mail.example.com",
        "https://mail.example.com/",
        "https://mail.example.com:8443/dripd",
        "https://[2001:db8::1]/dripd",
        "https://192.0.2.1",
    ],
)
def test_base_urls_that_fit_a_header(url: str) -> None:
    assert from_dict({"unsubscribe": {"base_url": url}}).unsubscribe.base_url == url


@pytest.mark.parametrize(
    "url",
    [
        "http://mail.example.com",
        "https://",
        "https://a b.example.com",
        "https://mail.example.com/a b",
        "https://mail.example.com/?x=1",
        "https://mail.example.com/#top",
        "https://mail.example.com:0",
        "https://mail.example.com:99999",
        "https://[::g]/",
        "https://mail.example.com/ü",
        "https://mail.example.com/" + "a" * 1000,
    ],
)
def test_base_urls_that_do_not(url: str) -> None:
    assert refused({"unsubscribe": {"base_url": url}}) == (
        f"config: unsubscribe.base_url: {shown(url)} is not an https URL like "
        '"https://mail.example.com" (RFC 8058 requires https; at most 1024 characters, no '
        "query or fragment)"
    )


def test_a_base_url_with_a_password_is_refused_without_echoing_it() -> None:
    message = refused({"unsubscribe": {"base_url": "https://ann:s3cret@mail.example.com/"}})
    assert (
        message == "config: unsubscribe.base_url: must not hold user information (user:password@)"
    )


@pytest.mark.parametrize("rate", [float("nan"), float("inf"), float("-inf"), 0.0, 1.5, -0.1])
@pytest.mark.parametrize("name", ["bounce_rate", "complaint_rate"])
def test_threshold_rates_are_finite_fractions(name: str, rate: float) -> None:
    assert refused({"thresholds": {name: rate}}) == (
        f"config: thresholds.{name}: must be a fraction in (0, 1], e.g. 0.02; got {rate}"
    )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"tenants": {" ": {}}}, "tenants.' ': a name must be 1 to 128 characters, not blank"),
        ({"tenants": {"t" * 129: {}}}, "tenants.'ttttt"),
        ({"tenants": {"acme": {"timezone": "Mars/Base"}}}, "tenants.acme.timezone: 'Mars/Base'"),
        ({"leads": {"tenant": "x" * 129}}, "leads.tenant: a name must be 1 to 128 characters"),
        ({"leads": {"sequence": "lead drip"}}, "leads.sequence: 'lead drip' is not a sequence key"),
        ({"leads": {"sequence": "-drip"}}, "leads.sequence: '-drip' is not a sequence key"),
        ({"leads": {"sequence": "d" * 129}}, "leads.sequence: 'ddd"),
        ({"leads": {"enabled": True}}, "leads.sequence: required when leads.enabled"),
        ({"rate_limits": {"adapter": {"": "1/1s"}}}, "rate_limits.adapter.'': a name must be"),
        (
            {"rate_limits": {"recipient_domain": {"not a domain": "1/1s"}}},
            "rate_limits.recipient_domain.'not a domain': ",
        ),
        ({"quotas": [{"scope": "tenant", "key": "", "limit": 1}]}, "quotas[0].key: a name must"),
        (
            {"quotas": [{"scope": "mailbox", "key": "a b@c", "limit": 1}]},
            "quotas[0].key: 'a b@c' is not an email address",
        ),
        (
            {"quotas": [{"scope": "global", "key": "x", "limit": 1}]},
            "quotas[0].key: a global quota has no key",
        ),
        (
            {"quotas": [{"scope": "sequence", "limit": 1, "timezone": "Nowhere"}]},
            "quotas[0].timezone: 'Nowhere' is not a known IANA timezone",
        ),
        ({"quotas": [{"scope": "galaxy", "limit": 1}]}, "quotas[0].scope: Invalid enum value"),
        ({"log": {"level": "loud"}}, "log.level: Invalid enum value 'loud'"),
        ({"log": {"format": "xml"}}, "log.format: Invalid enum value 'xml'"),
        ({"recipients": {"default_region": "XX"}}, "recipients.default_region: 'XX' is not"),
        ({"recipients": {"default_timezone": "UTC+1"}}, "recipients.default_timezone: 'UTC+1'"),
        (
            {"hooks": {"allowed_networks": ["10.0.0.0/8", "x"]}},
            "hooks.allowed_networks[1]: 'x' is not a network",
        ),
        ({"worker": {"batch_sise": 5}}, "worker.batch_sise: unknown key"),
        ({"http": {"enabled": "yes"}}, "http.enabled: Expected `bool`, got `str`"),
        ({"thresholds": {"bounce_rate": "0.02"}}, "thresholds.bounce_rate: Expected `float`"),
    ],
)
def test_names_keys_and_literals_are_checked(raw: dict[str, Any], message: str) -> None:
    assert refused(raw).startswith(f"config: {message}")


def test_a_long_value_is_shown_shortened() -> None:
    message = refused({"email": {"message_id_domain": "x" * 10_000}})
    assert message == (
        f"config: email.message_id_domain: {'x' * 57!r}… is not a host name (labels of 1 to "
        "63 letters, digits and inner hyphens, joined by dots)"
    )


# --- the file -----------------------------------------------------------------------------


def _load_refused(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load(path, env={})
    return info.value.message


def test_a_file_over_one_mebibyte_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "big.toml"
    path.write_text("# " + "x" * MAX_FILE_BYTES + "\n")
    assert _load_refused(path) == f"{path}: larger than 1048576 bytes; not a config file"
    path.write_text("# " + "x" * (MAX_FILE_BYTES - 3) + "\n")  # exactly the limit
    assert load(path, env={}).worker.batch_size == 500


def test_an_endless_file_is_read_only_up_to_the_limit() -> None:
    assert _load_refused(Path("/dev/zero")) == (
        "/dev/zero: larger than 1048576 bytes; not a config file"
    )


def test_a_file_that_is_not_utf8_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('[email]\nmessage_id_domain = "café.example"\n'.encode("latin-1"))
    assert _load_refused(path) == f"{path}: not UTF-8 text (byte 32)"


@pytest.mark.parametrize(
    "text",
    ["x = " + "[" * 5000 + "]" * 5000, "x = " + "{a = " * 5000 + "1" + "}" * 5000],
)
def test_deeply_nested_toml_is_refused_naming_the_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "deep.toml"
    path.write_text(text)
    assert _load_refused(path) == f"{path}: not valid TOML: nested too deeply"


def test_an_integer_too_long_to_read_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "digits.toml"
    path.write_text("[worker]\nbatch_size = " + "9" * 5000 + "\n")
    assert _load_refused(path).startswith(f"{path}: not valid TOML: Exceeds the limit")


def test_unreadable_and_missing_files_are_named(tmp_path: Path) -> None:
    assert _load_refused(tmp_path) == f"{tmp_path}: cannot read: Is a directory"
    missing = tmp_path / "missing.toml"
    assert _load_refused(missing) == f"{missing}: config file does not exist"
    assert _load_refused(Path("a\x00b")) == "'a\\x00b': not a file name"
    broken = tmp_path / "broken.toml"
    broken.write_text("[worker\n")
    assert _load_refused(broken).startswith(f"{broken}: not valid TOML: ")


def test_without_a_file_the_defaults_apply(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "absent.toml")
    assert msgspec.to_builtins(load(None, env={})) == msgspec.to_builtins(Config())


def test_the_cli_reports_a_bad_file_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[http]\nlisten = "[::1:47127"\n[worker]\nconcurrency = 10000000\n')
    assert main(["--config", str(path), "keygen"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"dripd: {path}: worker.concurrency: 10000000 is out of range; "
        "use an integer from 1 to 10000\n"
    )


@pytest.mark.slow
def test_dripd_run_with_a_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[database]\ndsn = "postgresql://nowhere.invalid/x"\n[control]\nsocket = ""\n')
    done = subprocess.run(
        [sys.executable, "-m", "dripd.cli", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == (
        f"dripd: {path}: control.socket: '' is not an absolute file path like "
        '"/run/dripd/control.sock"\n'
    )


# --- leads.sequence naming no sequence -------------------------------------------------------


@pytest.mark.slow
async def test_a_missing_lead_sequence_is_said_at_start_and_leads_are_not_lost(
    dsn: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    port = free_port()
    sections = {
        "http": {"enabled": True, "listen": f"127.0.0.1:{port}"},
        "leads": {"enabled": True, "sequence": "lead-drip"},
    }
    token, _ = await intake.create_token(pool, tenant=None, name="t", now=datetime.now(UTC))
    with capture_logs() as logs:
        async with running_daemon(dsn, tmp_path, sections=sections):
            (said,) = [e for e in logs if e.get("key") == "leads.sequence"]
            assert said["log_level"] == "error"
            assert said["sequence"] == "lead-drip"
            assert said["problem"] == "no such sequence"
            assert said["event"].startswith("leads.sequence names no sequence")
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                lead = {"name": "Ada Lovelace", "email": "ada@example.com"}
                form = await client.post("/leads/new", data=lead)
                assert form.status_code == 503
                assert "Please try again later." in form.text
                assert 'value="Ada Lovelace"' in form.text  # the form keeps what was typed
                assert 'value="ada@example.com"' in form.text
                auth = {"authorization": f"Bearer {token}"}
                answer = await client.post("/v1/leads", json=lead, headers=auth)
                assert answer.status_code == 503
                assert answer.headers["retry-after"] == "60"
                assert answer.json()["error"]["code"] == "unavailable"
                assert await pool.fetchval("SELECT count(*) FROM dripd.leads") == 0
                # Once `dripd apply` adds the sequence, the lead sent again is taken.
                await apply_text(pool, one_email("lead-drip"))
                answer = await client.post("/v1/leads", json=lead, headers=auth)
                assert answer.status_code == 201
    assert await pool.fetchval("SELECT count(*) FROM dripd.leads") == 1


async def test_an_existing_lead_sequence_is_not_warned_about(
    dsn: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    await apply_text(pool, one_email("lead-drip"))
    sections = {
        "http": {"enabled": True, "listen": f"127.0.0.1:{free_port()}"},
        "leads": {"enabled": True, "sequence": "lead-drip"},
    }
    with capture_logs() as logs:
        async with running_daemon(dsn, tmp_path, sections=sections):
            await asyncio.sleep(0)
    assert [e for e in logs if e.get("key") == "leads.sequence"] == []
    assert [e["event"] for e in logs if e["event"] == "dripd running"] == ["dripd running"]


def test_the_readme_says_what_a_missing_lead_sequence_does() -> None:
    assert re.search(r"`leads.sequence` names no sequence.*?`Retry-After: 60`", README, re.S)
