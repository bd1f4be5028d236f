"""Input checked where it enters through the CLI (and the same checks on the other
surfaces): data, names and ids, DSNs, files read, channels, arguments that are not UTF-8,
and never a traceback without -v."""

from __future__ import annotations

import asyncio
import io
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from background import background
from support import apply_text, one_email

from dripd import api, inputs
from dripd.cli import MAX_INPUT_BYTES, _parser, main
from dripd.clock import SystemClock
from dripd.config import check_dsn, from_dict, load
from dripd.db import intake, store
from dripd.errors import ConfigError
from dripd.http.api import EnrollmentRequest, EventRequest, SuppressionRequest, routes
from dripd.http.app import HttpServer, build_app
from dripd.http.bodies import decode_json
from dripd.http.context import HttpContext
from dripd.http.errors import ApiError
from dripd.inputs import MAX_DATA_BYTES, MAX_DEPTH, MAX_LENGTH, InvalidInput
from dripd.metrics import Metrics

NUL_DATA = '{"n": "a\\u0000b"}'
NUL_MESSAGE = "data.n: must not contain NUL (\\u0000)"


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DRIPD_DSN", raising=False)
    monkeypatch.delenv("DRIPD_ENCRYPTION_KEY", raising=False)
    monkeypatch.setenv("DRIPD_CONFIG", str(tmp_path / "none.toml"))
    (tmp_path / "none.toml").write_text("")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`dripd ARGV…` in-process; an argparse refusal counts as its exit code."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


async def arun(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`run` in a thread, from an async test (the CLI runs its own event loop)."""
    return await asyncio.to_thread(run, capsys, *argv)


async def count(dsn: str, table: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(f"SELECT count(*) FROM dripd.{table}"))
    finally:
        await conn.close()


def nested(depth: int) -> str:
    """A JSON object whose key `a` holds lists nested so that the innermost is at level
    `depth` (the object itself is level 1)."""
    return '{"a": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}"


# --- data: one validator on every surface ----------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["enroll", "welcome", "u1"],
        ["event", "u1", "signed_up"],
        ["preview", "welcome"],
        ["hook", "test", "welcome", "h"],
    ],
    ids=lambda argv: argv[0],
)
async def test_data_with_a_nul_exits_2_naming_data_n_as_the_http_api_does(
    capsys: pytest.CaptureFixture[str], dsn: str, argv: list[str]
) -> None:
    with pytest.raises(ApiError) as http:
        decode_json(
            b'{"sequence": "welcome", "subscriber_id": "u1", "data": ' + NUL_DATA.encode() + b"}",
            EnrollmentRequest,
        )
    assert (http.value.status, http.value.field, http.value.message) == (422, "data.n", NUL_MESSAGE)

    code, out, err = await arun(capsys, *argv, "--data", NUL_DATA, "--dsn", dsn)

    assert (code, out, err) == (2, "", f"dripd: --data: {NUL_MESSAGE}\n")
    assert await count(dsn, "events") == 0


async def test_the_python_api_refuses_the_same_data_naming_the_same_path(
    pool: asyncpg.Pool,
) -> None:
    await apply_text(pool, one_email("welcome"))
    with pytest.raises(InvalidInput) as info:
        await api.enroll(pool, tenant=None, sequence_key="welcome", subscriber_id="u1",
                         data={"n": "a\x00b"})  # fmt: skip
    assert (info.value.field, info.value.message) == ("data.n", NUL_MESSAGE)
    with pytest.raises(InvalidInput) as info:
        await api.track_event(pool, tenant=None, subscriber_id="u1", key="k",
                              data={"list": [1, {"x": "\ud800"}]})  # fmt: skip
    assert info.value.field == "data.list[1].x"
    assert info.value.reason.startswith("must be valid Unicode")
    assert await pool.fetchval("SELECT count(*) FROM dripd.enrollments") == 0
    assert await pool.fetchval("SELECT count(*) FROM dripd.events") == 0


FINITE = "must be a finite number (JSON has no NaN or Infinity)"


@pytest.mark.parametrize(
    ("data", "field", "reason"),
    [
        ({"n": float("nan")}, "data.n", FINITE),
        ({"n": [float("inf")]}, "data.n[0]", FINITE),
        ({"n": 10**300}, "data.n", "integers may have at most 300 digits"),
        ({1: "x"}, "data", "keys must be strings, not int"),
        ({"k\x00": 1}, "data", "keys must not contain NUL (\\u0000)"),
        ({"k" * 257: 1}, "data", "keys must be at most 256 characters"),
        ({"when": object()}, "data.when",
         "must be a JSON value (a string, number, boolean, null, list or object), not object"),
        ({"big": "x" * MAX_DATA_BYTES}, "data",
         f"must be at most {MAX_DATA_BYTES} bytes as JSON (it has {MAX_DATA_BYTES + 10})"),
    ],
)  # fmt: skip
def test_check_data_names_the_path_and_the_rule(data: Any, field: str, reason: str) -> None:
    with pytest.raises(InvalidInput) as info:
        inputs.check_data(data)
    assert (info.value.field, info.value.reason) == (field, reason)
    assert info.value.message == f"{field}: {reason}"


def test_check_data_takes_what_json_and_postgres_hold() -> None:
    data = {"n": 10**299, "f": -1.5e308, "t": True, "z": None, "s": "Zoë ☃", "l": [[{"": 0}]]}
    assert inputs.check_data(data) == data
    assert inputs.check_data({"a": json.loads(nested(MAX_DEPTH - 1))}) is not None


async def test_deeply_nested_data_exits_2_naming_the_path(
    capsys: pytest.CaptureFixture[str], dsn: str
) -> None:
    code, _, err = await arun(capsys, "enroll", "welcome", "u1", "--data", nested(40), "--dsn", dsn)
    path = "data.a" + "[0]" * (MAX_DEPTH - 1)  # the first value at level 33
    assert (code, err) == (2, f"dripd: --data: {path}: nested deeper than {MAX_DEPTH} levels\n")

    # Deeper than the decoder recurses: named, without a traceback.
    code, _, err = await arun(capsys, "event", "u1", "k", "--data", nested(5000), "--dsn", dsn)
    assert (code, err) == (
        2,
        f"dripd: --data: nested deeper than {MAX_DEPTH} levels (and too deep to read)\n",
    )
    code, _, err = await arun(capsys, "preview", "w", "--data", '{"a": 1e999}', "--dsn", dsn)
    assert code == 2
    assert err.startswith("dripd: --data: not valid JSON: Number out of range")


async def test_data_larger_than_the_limit_exits_2(
    capsys: pytest.CaptureFixture[str], dsn: str
) -> None:
    big = json.dumps({"b": "x" * MAX_DATA_BYTES})
    code, _, err = await arun(capsys, "enroll", "welcome", "u1", "--data", big, "--dsn", dsn)
    assert (code, err) == (
        2,
        f"dripd: --data: data: must be at most {MAX_DATA_BYTES} bytes as JSON "
        f"(it has {len(big.replace(' ', ''))})\n",
    )


def test_adapter_config_is_checked_as_json_too(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "adapter", "add", "a", "--channel", "email", "--provider",
                       "outbox", "--config", '{"path": "/tmp/x\\u0000"}')  # fmt: skip
    assert (code, err) == (2, "dripd: --config: config.path: must not contain NUL (\\u0000)\n")


# --- names and ids: one table of limits -------------------------------------------------


def test_the_http_api_and_the_cli_share_one_table_of_limits() -> None:
    def max_length(struct: type[msgspec.Struct], field: str) -> int:
        (_, components) = msgspec.json.schema_components([struct])
        value: int = components[struct.__name__]["properties"][field]["maxLength"]
        return value

    assert max_length(EnrollmentRequest, "sequence") == MAX_LENGTH["sequence"] == 128
    assert max_length(EnrollmentRequest, "subscriber_id") == MAX_LENGTH["subscriber_id"] == 200
    assert max_length(EnrollmentRequest, "subscriber_type") == MAX_LENGTH["subscriber_type"] == 64
    assert max_length(EventRequest, "key") == MAX_LENGTH["key"] == 128
    assert max_length(SuppressionRequest, "channel") == MAX_LENGTH["channel"] == 64
    assert max_length(SuppressionRequest, "address") == MAX_LENGTH["address"] == 320


LONG = [
    (["enroll", "{}", "u1"], "SEQUENCE_KEY", "sequence"),
    (["enroll", "welcome", "{}"], "SUBSCRIBER_ID", "subscriber_id"),
    (["enroll", "welcome", "u1", "--type", "{}"], "--type", "subscriber_type"),
    (["enroll", "welcome", "u1", "--tenant", "{}"], "--tenant", "tenant"),
    (["event", "u1", "{}"], "EVENT_KEY", "key"),
    (["event", "u1", "k", "--id", "{}"], "--id", "idempotency_id"),
    (["suppress", "email", "{}"], "ADDRESS", "address"),
    (["preview", "welcome", "--step", "{}"], "--step", "step"),
    (["replay", "00000000-0000-0000-0000-000000000000", "--tenant", "{}"], "--tenant", "tenant"),
    (["adapter", "add", "{}", "--channel", "email", "--provider", "outbox"], "NAME", "adapter"),
    (["adapter", "add", "a", "--channel", "email", "--provider", "{}"], "--provider", "provider"),
    (["adapter", "disable", "{}"], "NAME", "adapter"),
    (["adapter", "list", "--tenant", "{}"], "--tenant", "tenant"),
    (["secret", "set", "{}"], "NAME", "secret"),
    (["secret", "generate", "{}"], "NAME", "secret"),
    (["secret", "delete", "{}"], "NAME", "secret"),
    (["token", "create", "--name", "{}"], "--name", "token"),
    (["hook", "test", "welcome", "{}"], "HOOK", "hook"),
    (["hook", "test", "welcome", "h", "--subscriber", "{}"], "--subscriber", "subscriber_id"),
]


@pytest.mark.parametrize(("argv", "name", "kind"), LONG, ids=lambda v: str(v))
def test_ids_longer_than_the_http_api_allows_exit_2_naming_the_argument(
    capsys: pytest.CaptureFixture[str], argv: list[str], name: str, kind: str
) -> None:
    limit = MAX_LENGTH[kind]
    long = "x" * (limit + 1)
    code, out, err = run(capsys, *[long if a == "{}" else a for a in argv])
    assert (code, out) == (2, "")
    assert err.endswith(
        f": error: argument {name}: must be at most {limit} characters (it has {limit + 1})\n"
    )
    # At the limit, the parser takes it (a provider must also be one dripd has).
    if kind != "provider":
        _parser().parse_args(["x" * limit if a == "{}" else a for a in argv])


def test_ctl_resume_adapter_checks_its_arguments_before_connecting(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    socket = str(tmp_path / "none.sock")
    code, _, err = run(capsys, "ctl", "--socket", socket, "resume-adapter", "a" * 129)
    assert (code, err) == (
        2,
        "dripd: ctl resume-adapter: NAME: must be at most 128 characters (it has 129)\n",
    )
    code, _, err = run(capsys, "ctl", "--socket", socket, "resume-adapter", "a", " ")
    assert (code, err) == (2, "dripd: ctl resume-adapter: TENANT: must not be empty\n")


async def test_the_python_api_applies_the_same_limits(pool: asyncpg.Pool) -> None:
    await apply_text(pool, one_email("welcome"))
    cases: list[tuple[str, dict[str, Any]]] = [
        ("subscriber_id", {"subscriber_id": "u" * 201}),
        ("subscriber_type", {"subscriber_type": "t" * 65}),
        ("tenant", {"tenant": "t" * 129}),
        ("sequence_key", {"sequence_key": "s" * 129}),
    ]
    for field, override in cases:
        args: dict[str, Any] = {"tenant": None, "sequence_key": "welcome", "subscriber_id": "u1"}
        with pytest.raises(InvalidInput) as info:
            await api.enroll(pool, **{**args, **override})
        assert info.value.field == field
        assert info.value.reason.startswith("must be at most")
    with pytest.raises(InvalidInput) as info:
        await api.track_event(pool, tenant=None, subscriber_id="u1", key="k",
                              idempotency_id="i" * 201)  # fmt: skip
    assert info.value.message == "idempotency_id: must be at most 200 characters (it has 201)"
    assert await pool.fetchval("SELECT count(*) FROM dripd.enrollments") == 0


# --- channels -------------------------------------------------------------------------------


def test_unknown_channels_exit_2_naming_the_argument(capsys: pytest.CaptureFixture[str]) -> None:
    choices = "(choose from 'chat', 'email', 'pubsub', 'sms', 'webhook', 'whatsapp')"
    code, _, err = run(capsys, "adapter", "add", "a", "--channel", "fax", "--provider", "outbox")
    assert code == 2
    assert err.endswith(f"error: argument --channel: invalid choice: 'fax' {choices}\n")
    code, _, err = run(capsys, "suppress", "fax", "someone")
    assert code == 2
    assert err.endswith(f"error: argument CHANNEL: invalid choice: 'fax' {choices}\n")


async def test_the_python_api_refuses_an_unknown_channel(pool: asyncpg.Pool) -> None:
    with pytest.raises(InvalidInput) as info:
        await api.suppress(pool, tenant=None, channel="fax", address="someone")
    assert info.value.message == (
        "channel: 'fax' is not a channel; channels: chat, email, pubsub, sms, webhook, whatsapp"
    )
    assert await pool.fetchval("SELECT count(*) FROM dripd.suppressions") == 0


@pytest.fixture
async def client(dsn: str) -> AsyncIterator[httpx.AsyncClient]:
    """The HTTP API on loopback, with a global token's Authorization header set."""
    pool = await store.create_pool(dsn, min_size=1, max_size=4)
    ctx = HttpContext(
        pool=pool, config=from_dict({}), clock=SystemClock(), metrics=Metrics(), vault=None
    )
    token, _ = await intake.create_token(pool, tenant=None, name="t", now=ctx.clock.now())
    server = HttpServer(build_app(metrics=ctx.metrics, readiness=_ready, routes=routes(ctx)))
    try:
        async with (
            background(server.serve, "127.0.0.1", 0),
            httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{server.port}",
                headers={"Authorization": f"Bearer {token}"},
            ) as c,
        ):
            yield c
    finally:
        await pool.close()


async def _ready() -> dict[str, Any]:
    return {"ready": True}


async def test_post_suppressions_refuses_an_unknown_channel_with_422(
    client: httpx.AsyncClient, dsn: str
) -> None:
    response = await client.post("/v1/suppressions", json={"channel": "fax", "address": "x"})
    assert response.status_code == 422
    assert response.json() == {
        "error": {
            "code": "invalid_input",
            "message": "channel: 'fax' is not a channel; channels: chat, email, pubsub, sms, "
            "webhook, whatsapp",
            "field": "channel",
        }
    }
    assert await count(dsn, "suppressions") == 0


# --- arguments that are not UTF-8 ---------------------------------------------------------

# What Python makes of the bytes b"u\xff" in argv (PEP 383).
NOT_UTF8 = os.fsdecode(b"u\xff")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["enroll", "welcome", NOT_UTF8], "error: argument SUBSCRIBER_ID: must be valid Unicode"),
        (["event", "u1", "k", "--data", '{"n": "' + NOT_UTF8 + '"}'],
         "dripd: argument --data: not valid UTF-8 text"),
        (["apply", NOT_UTF8 + ".toml"], "dripd: argument FILE: not valid UTF-8 text"),
        (["ctl", "status", "--socket", NOT_UTF8], "dripd: argument --socket: not valid UTF-8 text"),
        (["suppress", "email", NOT_UTF8], "error: argument ADDRESS: must be valid Unicode"),
    ],
)  # fmt: skip
def test_arguments_that_are_not_utf8_exit_2_naming_the_argument(
    capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    code, out, err = run(capsys, *argv)
    assert (code, out) == (2, "")
    assert expected in err
    assert "Traceback" not in err


# --- DSNs -----------------------------------------------------------------------------------

BAD_DSNS = [
    ("postgresql://ann:hunter2@[::1:5432/db",
     "a host in brackets is not an IPv6 address like [::1]"),
    ("postgres://ann:hunter2@db:x/app", "port 'x' is not a port number (1 to 65535)"),
    ("postgres://ann:hunter2@db:99999/app", "port '99999' is not a port number (1 to 65535)"),
    ("ann:hunter2@db/app", "it must start with postgresql:// or postgres://"),
    ("postgresql://ann:hunter2@db/app?sslmode=sometimes",
     "sslmode must be one of allow, disable, prefer, require, verify-ca, verify-full"),
    ("postgresql://ann:hunter2@db/app?hunter2", "its query is not name=value pairs joined by '&'"),
    ("postgresql://ann:hun@ter2@db/app",
     "the user or password holds '@': percent-encode it as %40"),
    ("postgresql://ann:hunter2@db/app ", "it holds whitespace, a control character or bytes that "
     "are not UTF-8 (percent-encode them, e.g. %20 for a space)"),
    ("postgresql://:5432,db/app", "host 1 is empty"),
]  # fmt: skip
FORM = "not a PostgreSQL URI like postgresql://user:password@host:5432/dbname"


@pytest.mark.parametrize(("dsn", "why"), BAD_DSNS)
def test_a_malformed_dsn_exits_2_naming_where_it_came_from_without_the_password(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    dsn: str,
    why: str,
) -> None:
    code, out, err = run(capsys, "adapter", "list", "--dsn", dsn)
    assert (code, out, err) == (2, "", f"dripd: --dsn: {FORM}: {why}\n")

    monkeypatch.setenv("DRIPD_DSN", dsn)
    code, _, err = run(capsys, "token", "list")
    assert (code, err) == (2, f"dripd: DRIPD_DSN: {FORM}: {why}\n")
    monkeypatch.delenv("DRIPD_DSN")

    config = tmp_path / "dripd.toml"
    config.write_text(f"[database]\ndsn = {json.dumps(dsn)}\n")
    monkeypatch.setenv("DRIPD_CONFIG", str(config))
    code, _, err = run(capsys, "secret", "list")
    assert code == 2
    assert err.startswith(f"dripd: {config}: database.dsn: ")
    assert "hunter2" not in err


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://postgres@127.0.0.1:5432/postgres",
        "postgres://u:p%40ss@db.example.com/app?sslmode=verify-full&application_name=dripd",
        "postgresql:///app?host=/run/postgresql",
        "postgresql://%2Frun%2Fpostgresql/app",
        "postgresql://[::1]:5432,[fd00::2]/app?target_session_attrs=primary",
        "postgresql://h1:5432,h2:5433/app",
        "postgresql://h:/app",
        "POSTGRESQL://h/app",
    ],
)
def test_well_formed_dsns_pass(dsn: str) -> None:
    assert check_dsn(dsn, where="--dsn") == dsn
    assert load(env={"DRIPD_DSN": dsn}).database.dsn == dsn


async def test_a_dsn_the_driver_refuses_is_a_config_error_without_the_password() -> None:
    with pytest.raises(ConfigError) as info:
        await store.connect("postgresql://ann:hunter2@db/app?hunter2")
    assert info.value.message == "the database DSN is invalid: bad query field: '[REDACTED]'"


# --- files and stdin are read within a limit ---------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["adapter", "add", "a", "--channel", "email", "--provider", "outbox", "--credentials-file"],
        ["secret", "set", "s", "--from-file"],
    ],
    ids=["credentials", "secret"],
)
def test_every_file_read_is_bounded_and_named(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    argv: list[str],
) -> None:
    option = argv[-1]
    code, _, err = run(capsys, *argv, "/dev/zero")
    assert (code, err) == (
        2,
        f"dripd: {option}: /dev/zero is larger than {MAX_INPUT_BYTES} bytes\n",
    )

    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"{" * (MAX_INPUT_BYTES + 1))))
    code, _, err = run(capsys, *argv, "-")
    assert (code, err) == (2, f"dripd: {option}: stdin is larger than {MAX_INPUT_BYTES} bytes\n")

    latin1 = tmp_path / "latin1"
    latin1.write_bytes(b'{"password": "caf\xe9"}')
    code, _, err = run(capsys, *argv, str(latin1))
    assert (code, err) == (2, f"dripd: {option}: {latin1} is not UTF-8 text (byte 17)\n")

    code, _, err = run(capsys, *argv, str(tmp_path))
    assert (code, err) == (2, f"dripd: {option}: cannot read {tmp_path}: Is a directory\n")


def test_credentials_are_checked_without_echoing_them(capsys: pytest.CaptureFixture[str],
                                                      tmp_path: Path) -> None:  # fmt: skip
    path = tmp_path / "creds.json"
    path.write_text('{"password": "hunter2\\u0000"}')
    code, _, err = run(capsys, "adapter", "add", "a", "--channel", "email", "--provider", "smtp",
                       "--credentials-file", str(path))  # fmt: skip
    assert (code, err) == (
        2,
        "dripd: --credentials-file: credentials.password: must not contain NUL (\\u0000)\n",
    )
    path.write_text('{"password": "hunter2\\ud800"}')
    code, _, err = run(capsys, "adapter", "add", "a", "--channel", "email", "--provider", "smtp",
                       "--credentials-file", str(path))  # fmt: skip
    assert (code, err) == (
        2,
        "dripd: --credentials-file: not a JSON object (a \\u escape names a lone UTF-16 "
        "surrogate, which is not a character)\n",
    )
    path.write_text('{"password": "hunter2')
    code, _, err = run(capsys, "adapter", "add", "a", "--channel", "email", "--provider", "smtp",
                       "--credentials-file", str(path))  # fmt: skip
    assert code == 2
    assert "hunter2" not in err


# --- other arguments -----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "86401", "1e400", "x"])
def test_ctl_timeout_out_of_range_exits_2(capsys: pytest.CaptureFixture[str], value: str) -> None:
    code, _, err = run(capsys, "ctl", f"--timeout={value}", "status")
    assert code == 2
    assert err.endswith(
        f"error: argument --timeout: {value!r} is not a number of seconds longer than 0 and "
        "at most 86400\n"
    )


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["dev", "--subscribers", "100000000"],
         "argument --subscribers: '100000000' is not a whole number from 0 to 1000"),
        (["dev", "--subscribers", "-1"],
         "argument --subscribers: '-1' is not a whole number from 0 to 1000"),
        (["dev", "--http", "[::1:8025"],
         "argument --http: '[::1:8025' is not a \"host:port\" address"),
    ],
)  # fmt: skip
def test_dev_arguments_are_checked(
    capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert expected in err


# --- no traceback without -v -------------------------------------------------------------


def test_an_unexpected_error_is_one_line_and_a_traceback_only_with_v(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> str:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr("dripd.cli.generate_key", broken)
    code, out, err = run(capsys, "keygen")
    assert (code, out) == (1, "")
    assert (
        err == "dripd: internal error: RuntimeError: boom (run again with -v for the traceback)\n"
    )

    code, _, err = run(capsys, "keygen", "-v")
    assert code == 1
    assert err.startswith("Traceback (most recent call last):\n")
    assert err.endswith("dripd: internal error: RuntimeError: boom\n")


async def test_a_tenant_in_a_query_has_the_same_limit(client: httpx.AsyncClient) -> None:
    path = "/v1/enrollments/00000000-0000-0000-0000-000000000001"
    response = await client.get(path, params={"tenant": "t" * 129})
    assert response.status_code == 422
    assert response.json()["error"] == {
        "code": "invalid_input",
        "message": "tenant: must be at most 128 characters",
        "field": "tenant",
    }
    response = await client.get(path, params={"tenant": "t" * 128})
    assert response.status_code == 404


@pytest.mark.parametrize(
    ("dsn", "password"),
    [
        ("postgresql://user:s3cret/pw@host/db", "s3cret/pw"),  # '/': read as a port
        ("postgresql://user:s3cret#pw@host/db", "s3cret#pw"),
        ("postgresql://user:p%40ssword@host/db", "p%40ssword"),
        ("host=localhost password=s3cretpw", "s3cretpw"),
        ("host=localhost password='s3 cret pw'", "s3 cret pw"),
    ],
)
def test_a_usage_error_never_echoes_a_dsn_password(
    capsys: pytest.CaptureFixture[str], dsn: str, password: str
) -> None:
    # `--dsn` before the command: argparse takes the DSN for the command and quotes it.
    code, _, err = run(capsys, "--dsn", dsn, "adapter", "list")
    assert code == 2
    assert "invalid choice: " in err
    assert "[REDACTED]" in err
    for piece in {password, *password.split("/"), *password.split("#"), *password.split()}:
        assert piece not in err.split("(choose from")[0], piece


@pytest.mark.parametrize(
    "argv",
    [
        ["adapter", "list", "--dsn", "", "postgresql://ann:hunter2@[::1:5432/db"],
        ["rotate-key", "--", "--dsn", "postgresql://ann:hunter2@db/x"],
        ["adapter", "list", "host=db password=hunter2", "--json"],
    ],
)
def test_unrecognized_arguments_never_echo_a_dsn_password(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    # argparse lists the arguments it could not place bare, not quoted (found by the fuzzer).
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert "unrecognized arguments" in err
    assert "hunter2" not in err
    assert "[REDACTED]" in err


def test_a_lone_surrogate_escape_in_data_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "enroll", "welcome", "u1", "--data", '{"n": "\\ud800"}')
    assert code == 2
    assert err == (
        "dripd: --data: not valid JSON: a \\u escape names a lone UTF-16 surrogate, which is "
        "not a character\n"
    )
    # Truncated indeed, with or without such an escape: msgspec's words stand.
    for text in ['{"n": "\\ud800', '{"n": "x']:
        code, _, err = run(capsys, "enroll", "welcome", "u1", "--data", text)
        assert (code, err) == (2, "dripd: --data: not valid JSON: Input data was truncated\n")
