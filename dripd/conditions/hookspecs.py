"""Hook specs: the `[hooks]` table of a sequence file, validated into typed specs.

    [hooks.score]                       an HTTP hook: url, method, headers, body (Liquid
    url = "https://crm.example.com/…"   templates), auth, signing_secret, timeout, retries
    signing_secret = "crm_signing"

    [hooks.plan]                        a Python hook: an `async def fn(enrollment, step)`
    python = "myapp.hooks:plan_for"     of the host application, and a timeout

Every error names `hooks.<name>.<key>`. Running them is `dripd.conditions.hooks`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any, Final, Literal, TypeAlias, TypeVar, assert_never

import msgspec

from dripd.content.liquid import Template, TemplateError, compile_template
from dripd.errors import ConfigError, SequenceFileError
from dripd.model import parse_duration
from dripd.pyload import split_python_path

__all__ = [
    "MAX_TIMEOUT",
    "Auth",
    "BasicAuth",
    "BearerAuth",
    "HeaderAuth",
    "HookSpec",
    "HttpHookSpec",
    "Method",
    "PythonHookSpec",
    "parse_hooks",
    "split_python_path",
]

MAX_TIMEOUT: Final = timedelta(seconds=30)

Method: TypeAlias = Literal["GET", "POST", "PUT", "PATCH", "DELETE"]


@dataclass(frozen=True, slots=True, kw_only=True)
class BearerAuth:
    secret: str


@dataclass(frozen=True, slots=True, kw_only=True)
class BasicAuth:
    username: str
    secret: str


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderAuth:
    name: str
    secret: str


Auth: TypeAlias = BearerAuth | BasicAuth | HeaderAuth


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpHookSpec:
    name: str
    url: Template
    method: Method = "GET"
    headers: Mapping[str, Template]
    body: Template | None = None
    auth: Auth | None = None
    signing_secret: str
    timeout: timedelta = timedelta(seconds=10)
    retries: int = 2


@dataclass(frozen=True, slots=True, kw_only=True)
class PythonHookSpec:
    name: str
    path: str
    timeout: timedelta = timedelta(seconds=5)


HookSpec: TypeAlias = HttpHookSpec | PythonHookSpec


# -- parsing -----------------------------------------------------------------------------------


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class _Bearer(_Strict, tag="bearer", tag_field="type"):
    secret: str


class _Basic(_Strict, tag="basic", tag_field="type"):
    username: str
    secret: str


class _Header(_Strict, tag="header", tag_field="type"):
    name: str
    secret: str


class _HttpWire(_Strict, kw_only=True):
    url: str
    method: Method = "GET"
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    body: str | None = None
    auth: _Bearer | _Basic | _Header | None = None
    signing_secret: str
    timeout: str = "10s"
    retries: Annotated[int, msgspec.Meta(ge=0, le=5)] = 2


class _PythonWire(_Strict, kw_only=True):
    python: str
    timeout: str = "5s"


_W = TypeVar("_W", bound=_Strict)

_NAME = re.compile(r"[a-z][a-z0-9_]*")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP header name (RFC 9110 token)
# Headers dripd sets itself; a sequence file may not override them.
_RESERVED = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
    }
)
_WITHOUT_BODY: Final = frozenset({"GET", "DELETE"})


def parse_hooks(raw: Mapping[str, Any], *, where: str) -> dict[str, HookSpec]:
    """Validate a sequence file's `[hooks]` table; every error names `hooks.<name>.<key>`."""
    if not isinstance(raw, Mapping):
        raise SequenceFileError(f"{where}: hooks: must be a table of hooks")
    hooks: dict[str, HookSpec] = {}
    for name, table in raw.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise SequenceFileError(
                f"{where}: hooks.{name}: a hook name is lowercase letters, digits and '_', "
                "starting with a letter"
            )
        if not isinstance(table, Mapping):
            raise SequenceFileError(f"{where}: hooks.{name}: must be a table")
        has_url, has_python = "url" in table, "python" in table
        if has_url and has_python:
            raise SequenceFileError(
                f"{where}: hooks.{name}: has both `url` and `python`; a hook is one or the other"
            )
        if has_url:
            hooks[name] = _http_spec(name, _convert(table, _HttpWire, name, where), where)
        elif has_python:
            hooks[name] = _python_spec(name, _convert(table, _PythonWire, name, where), where)
        else:
            raise SequenceFileError(
                f"{where}: hooks.{name}: needs `url` (an HTTP hook) or `python` (a Python hook)"
            )
    return hooks


def _convert(table: Mapping[str, Any], wire: type[_W], name: str, where: str) -> _W:
    try:
        return msgspec.convert(dict(table), wire)
    except msgspec.ValidationError as exc:
        message = str(exc)
        match = re.search(r" - at `\$\.?(.*)`$", message)
        key = match.group(1).replace("[...]", "") if match else ""  # `[...]`: a table's value
        text = message[: match.start()] if match else message
        if unknown := re.fullmatch(r"Object contains unknown field `(.*)`", text):
            key, text = f"{key}.{unknown.group(1)}".lstrip("."), "unknown key"
        elif missing := re.fullmatch(r"Object missing required field `(.*)`", text):
            key, text = f"{key}.{missing.group(1)}".lstrip("."), "required key is missing"
        raise SequenceFileError(f"{where}: {_key(name, key)}: {text}") from exc


def _key(name: str, key: str) -> str:
    return f"hooks.{name}.{key}" if key else f"hooks.{name}"


def _http_spec(name: str, wire: _HttpWire, where: str) -> HttpHookSpec:
    def fail(key: str, text: str) -> SequenceFileError:
        return SequenceFileError(f"{where}: {_key(name, key)}: {text}")

    if wire.body is not None and wire.method in _WITHOUT_BODY:
        raise fail("body", f"a {wire.method} request has no body; use POST, PUT or PATCH")
    reserved = set(_RESERVED)
    if isinstance(wire.auth, _Bearer | _Basic):
        reserved.add("authorization")
    if isinstance(wire.auth, _Basic) and ":" in wire.auth.username:
        raise fail("auth.username", "must not contain ':'")
    if isinstance(wire.auth, _Header):
        if not _TOKEN.fullmatch(wire.auth.name) or wire.auth.name.lower() in reserved:
            raise fail("auth.name", f"{wire.auth.name!r} is not a header name dripd can send")
        reserved.add(wire.auth.name.lower())
    seen: set[str] = set()
    for header in wire.headers:
        if not _TOKEN.fullmatch(header):
            raise fail(f"headers.{header}", "is not a valid header name")
        if header.lower() in reserved:
            raise fail(f"headers.{header}", "is set by dripd (or by `auth`) and cannot be given")
        if header.lower() in seen:
            raise fail(f"headers.{header}", "is given twice (header names ignore case)")
        seen.add(header.lower())
    return HttpHookSpec(
        name=name,
        url=_template(wire.url, _key(name, "url"), where),
        method=wire.method,
        headers={
            header: _template(value, _key(name, f"headers.{header}"), where)
            for header, value in wire.headers.items()
        },
        body=None if wire.body is None else _template(wire.body, _key(name, "body"), where),
        auth=_auth(wire.auth),
        signing_secret=wire.signing_secret,
        timeout=_timeout(wire.timeout, _key(name, "timeout"), where),
        retries=wire.retries,
    )


def _python_spec(name: str, wire: _PythonWire, where: str) -> PythonHookSpec:
    if split_python_path(wire.python) is None:
        raise SequenceFileError(
            f"{where}: {_key(name, 'python')}: {wire.python!r} is not a Python path; "
            'use "package.module:function" or "package.module.function"'
        )
    return PythonHookSpec(
        name=name, path=wire.python, timeout=_timeout(wire.timeout, _key(name, "timeout"), where)
    )


def _auth(wire: _Bearer | _Basic | _Header | None) -> Auth | None:
    if wire is None:
        return None
    if isinstance(wire, _Bearer):
        return BearerAuth(secret=wire.secret)
    if isinstance(wire, _Basic):
        return BasicAuth(username=wire.username, secret=wire.secret)
    if isinstance(wire, _Header):
        return HeaderAuth(name=wire.name, secret=wire.secret)
    assert_never(wire)


def _template(source: str, field: str, where: str) -> Template:
    try:
        return compile_template(source, field=field)
    except TemplateError as exc:
        raise SequenceFileError(f"{where}: {exc}") from exc


def _timeout(text: str, field: str, where: str) -> timedelta:
    try:
        value = parse_duration(text, where=field)
    except ConfigError as exc:
        raise SequenceFileError(f"{where}: {exc.message}") from exc
    if not timedelta(0) < value <= MAX_TIMEOUT:
        raise SequenceFileError(f"{where}: {field}: must be more than 0s and at most 30s")
    return value
