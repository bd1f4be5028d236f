"""What every surface checks of its input before dripd stores it: names and ids, and data.

The CLI, the HTTP API, the Python API and the control socket all take tenant keys,
subscriber ids, event keys and subscriber or event data from outside. They check them
here, with the same limits and the same messages, so that one input is refused the same
way wherever it enters (README, "Input limits"):

- a name or id is a non-blank string of at most `MAX_LENGTH[kind]` characters, without
  NUL and in valid Unicode (Postgres text holds neither NUL nor a lone surrogate, which
  is what bytes that are not UTF-8 become in a command-line argument); the name of an
  adapter or a secret is also of the form `NAME` (letters, digits, `_`, `.`, `-`);
- data is a JSON object of at most `MAX_DATA_BYTES` (encoded), nested at most
  `MAX_DEPTH` levels, whose keys are strings of at most `MAX_KEY_LENGTH` characters and
  whose values are JSON values: text as above, finite numbers, integers of at most
  `MAX_INT_DIGITS` digits.

Every refusal is an `InvalidInput` (a ConfigError: exit 2, HTTP 422) whose message starts
with the path of the offending value, e.g. `data.address.city: must not contain NUL
(\\u0000)`, and whose `field` is that path.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

import msgspec

from dripd.errors import ConfigError

#: The longest name or id of each kind, in characters: the HTTP API's `maxLength`s, which
#: the CLI, the Python API and the control socket apply too. They keep every indexed
#: column well inside a btree entry (2704 bytes).
MAX_LENGTH: Final[Mapping[str, int]] = MappingProxyType(
    {
        "tenant": 128,
        "sequence": 128,  # a sequence key
        "step": 128,  # a step key
        "subscriber_id": 200,
        "subscriber_type": 64,
        "key": 128,  # an event key
        "idempotency_id": 200,  # an event's `id` / `--id`
        "channel": 64,
        "address": 320,  # RFC 5321's longest path
        "adapter": 128,  # an adapter's name
        "provider": 64,
        "secret": 128,  # a secret's name
        "token": 128,  # an API token's name
        "hook": 128,  # a hook's name
    }
)

#: How deep data may nest: the object itself is level 1, its values level 2.
MAX_DEPTH: Final = 32
#: The largest subscriber or event data, as JSON.
MAX_DATA_BYTES: Final = 65536
#: The longest key of a JSON object in data.
MAX_KEY_LENGTH: Final = 256
#: The most digits of an integer in data (Python and msgspec convert at most 4300).
MAX_INT_DIGITS: Final = 300
_INT_BOUND: Final = 10**MAX_INT_DIGITS

_NUL = "must not contain NUL (\\u0000)"
_SURROGATE = "must be valid Unicode (it holds a lone surrogate: bytes that are not UTF-8?)"


class InvalidInput(ConfigError):
    """A name, id or data value is invalid; `field` is its path (`data.items[2].sku`)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason


def text_fault(text: str) -> str | None:
    """Why Postgres could not store `text` (a NUL, a lone surrogate), or None if it can."""
    if "\x00" in text:
        return _NUL
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return _SURROGATE
    return None


_UNSTORABLE: Final = re.compile("[\x00\ud800-\udfff]")


def storable(text: str) -> str:
    """`text` as Postgres can store it: each NUL and lone surrogate becomes U+FFFD. For what
    a third party sent (a provider's answer, a webhook), which is kept, not refused."""
    return text if text_fault(text) is None else _UNSTORABLE.sub("\ufffd", text)


def storable_json(value: Any) -> Any:
    """`value` (decoded JSON) with every string and key made `storable`."""
    if isinstance(value, str):
        return storable(value)
    if isinstance(value, dict):
        return {storable(str(k)): storable_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [storable_json(v) for v in value]
    return value


def check_text(value: Any, *, field: str, kind: str | None = None) -> str:
    """`value`, once it is a non-blank string of at most `MAX_LENGTH[kind or field]`
    characters that Postgres can store; InvalidInput naming `field` otherwise."""
    limit = MAX_LENGTH[kind or field]
    if not isinstance(value, str):
        raise InvalidInput(field, "must be a string")
    if not value.strip():
        raise InvalidInput(field, "must not be empty")
    if len(value) > limit:
        raise InvalidInput(field, f"must be at most {limit} characters (it has {len(value)})")
    fault = text_fault(value)
    if fault is not None:
        raise InvalidInput(field, fault)
    return value


#: What the schema's CHECKs take as the name of an adapter, a secret, a sequence or a step.
NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*", re.ASCII)


def check_name(value: Any, *, field: str, kind: str | None = None) -> str:
    """`check_text`, and the form the schema takes for a name (`NAME`)."""
    check_text(value, field=field, kind=kind)
    if NAME.fullmatch(value) is None:
        raise InvalidInput(
            field, "must be a name: a letter or digit, then letters, digits, '_', '.' or '-'"
        )
    return str(value)


def check_optional(value: Any, *, field: str, kind: str | None = None) -> str | None:
    """`check_text` for a value that may be None."""
    return None if value is None else check_text(value, field=field, kind=kind)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def check_json(value: Any, *, where: str, level: int = 1) -> None:
    """Raise InvalidInput naming the path (from `where`) of the first value that is not
    JSON dripd can store: see the module docstring. `value` is at nesting level `level`
    (a request body is level 0: its fields are level 1). Iterative, so that nesting far
    past `MAX_DEPTH` fails cleanly instead of exhausting the stack; msgspec Structs
    (decoded request bodies) are walked like objects."""
    stack: list[tuple[str, Any, int]] = [(where, value, level)]
    while stack:
        path, item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise InvalidInput(path, f"nested deeper than {MAX_DEPTH} levels")
        if item is None or isinstance(item, bool):
            continue
        if isinstance(item, str):
            fault = text_fault(item)
            if fault is not None:
                raise InvalidInput(path, fault)
        elif isinstance(item, int):
            if not -_INT_BOUND < item < _INT_BOUND:
                raise InvalidInput(path, f"integers may have at most {MAX_INT_DIGITS} digits")
        elif isinstance(item, float):
            if item != item or item in (float("inf"), float("-inf")):
                raise InvalidInput(path, "must be a finite number (JSON has no NaN or Infinity)")
        elif isinstance(item, dict):
            for key, sub in item.items():
                _check_key(path, key)
                stack.append((_join(path, key), sub, depth + 1))
        elif isinstance(item, list | tuple):
            stack.extend((f"{path}[{i}]", sub, depth + 1) for i, sub in enumerate(item))
        elif isinstance(item, msgspec.Struct):
            stack.extend(
                (_join(path, name), getattr(item, name), depth + 1)
                for name in item.__struct_fields__
            )
        else:
            raise InvalidInput(
                path,
                "must be a JSON value (a string, number, boolean, null, list or object), "
                f"not {type(item).__name__}",
            )


def _check_key(path: str, key: Any) -> None:
    if not isinstance(key, str):
        raise InvalidInput(path, f"keys must be strings, not {type(key).__name__}")
    if "\x00" in key:
        raise InvalidInput(path, "keys " + _NUL)
    if text_fault(key) is not None:
        raise InvalidInput(path, "keys " + _SURROGATE)
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidInput(path, f"keys must be at most {MAX_KEY_LENGTH} characters")


def check_data(value: Any, *, where: str = "data") -> dict[str, Any]:
    """Subscriber or event data, checked (see the module docstring): a dict, or
    InvalidInput naming the path of the first offending value."""
    if not isinstance(value, Mapping):
        raise InvalidInput(where, "must be a JSON object")
    data = dict(value)
    check_json(data, where=where)
    size = len(msgspec.json.encode(data))
    if size > MAX_DATA_BYTES:
        raise InvalidInput(where, f"must be at most {MAX_DATA_BYTES} bytes as JSON (it has {size})")
    return data


def json_fault(raw: str | bytes, error: msgspec.DecodeError) -> str:
    """Why msgspec could not decode `raw`, in words that name the fault: msgspec reports a
    `\\u` escape of a lone UTF-16 surrogate (`"\\ud800"`, which no text can hold) as
    "Input data was truncated"; RFC 8259 section 8.2 leaves such escapes to the reader."""
    if str(error) != "Input data was truncated":
        return str(error)
    try:
        json.loads(raw)  # takes the escape, and fails on input that is truncated indeed
    except (ValueError, RecursionError):
        return str(error)
    return "a \\u escape names a lone UTF-16 surrogate, which is not a character"
