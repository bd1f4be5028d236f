"""Secrets out of text: credentials in every encoding dripd sends them in, and URLs cut to
scheme and host.

A `Redactor` is built from the secrets one adapter (or one hook call) holds and is applied
wherever text about it leaves: an error message, `last_error`, a message event, a log field.
It replaces with `[REDACTED]`, for each secret:

- the value as it is, percent-encoded (RFC 3986 and form encoding), JSON-escaped and
  Python-escaped (`repr` of the text or of its UTF-8 bytes);
- the value inside base64 text, in the standard or the URL-safe alphabet, padded or not,
  wherever it sits in the encoded bytes, so that SASL PLAIN's `\\0user\\0pass`, LOGIN's
  separate lines, XOAUTH2's `user=…\\x01auth=Bearer …`, CRAM-MD5's `user digest` and HTTP
  Basic's `user:pass` are all found: the whole base64 run around it is replaced. A value
  sits in base64 at one of three bit offsets; for each, the characters that depend on its
  bytes alone (its "core") are the same in every encoding that contains it, whatever
  surrounds it. Pairs of values are also searched as the exact SASL PLAIN (with and
  without an authorization identity), HTTP Basic and XOAUTH2 strings, so that values too
  short to be found alone are still found there;
- fragments: a server that echoes part of a secret (a truncated token, the first half of a
  line) must not reveal it either. Any run of at least `fragment_length(n)` characters of
  a secret of n characters (8, or half the secret plus one when it is shorter than 14
  characters, never fewer than 4), in any of the text forms above, or the base64 characters
  that encode as many bytes, is replaced.

Values shorter than `MIN_LENGTH` characters are found only where they stand alone (not
inside a longer word or base64 run): searched as substrings they would cut up ordinary text.
Identifiers (an SMTP login, an account id) are found whole in every encoding, and by
fragment only inside base64: in plain text they are often an address whose domain appears
in ordinary messages too.
"""

from __future__ import annotations

import base64
import json
import re
import urllib.parse
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from itertools import permutations
from typing import Any, Final, NoReturn

__all__ = [
    "MIN_LENGTH",
    "REDACTED",
    "Redactor",
    "dsn_secrets",
    "fragment_length",
    "url_for_log",
    "urls_for_log",
]

REDACTED: Final = "[REDACTED]"

#: Secrets shorter than this are found only where they stand alone.
MIN_LENGTH: Final = 4

#: The longest fragment a secret may show (fragments of shorter secrets are shorter).
MAX_FRAGMENT: Final = 8

_B64_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_")
_URLSAFE: Final = str.maketrans("+/", "-_")


def fragment_length(n: int) -> int:
    """The shortest run of a secret of `n` characters that is redacted on its own."""
    return min(MAX_FRAGMENT, max(MIN_LENGTH, n // 2 + 1))


def _text_forms(secret: str) -> set[str]:
    """The spellings of `secret` in text: raw, percent-, JSON- and Python-escaped."""
    return {
        secret,
        urllib.parse.quote(secret, safe=""),
        urllib.parse.quote(secret),
        urllib.parse.quote_plus(secret),
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        repr(secret)[1:-1],
        repr(secret.encode())[2:-1],
    }


def _cores(data: bytes) -> Iterator[str]:
    """The base64 characters that depend on `data` alone, for each of the three offsets at
    which it can start in the encoded bytes, in both alphabets."""
    for offset in range(3):
        encoded = base64.b64encode(bytes(offset) + data).decode("ascii")
        # Character i holds bits 6i…6i+5 of the encoded bytes; keep those inside `data`.
        start = -(-8 * offset // 6)
        end = (8 * offset + 8 * len(data)) // 6
        core = encoded[start:end]
        if core:
            yield core
            yield core.translate(_URLSAFE)


def _encodings(data: bytes) -> Iterator[str]:
    """`data` in base64 exactly, both alphabets, padding left off (it is swallowed later)."""
    standard = base64.b64encode(data).decode("ascii").rstrip("=")
    yield standard
    yield standard.translate(_URLSAFE)


def _combined(first: str, second: str) -> Iterator[bytes]:
    """The strings that carry a login and a secret together: SASL PLAIN (RFC 4616, with an
    empty or the same authorization identity), HTTP Basic (RFC 7617) and XOAUTH2."""
    one, two = first.encode(), second.encode()
    yield b"\0" + one + b"\0" + two
    yield one + b"\0" + one + b"\0" + two
    yield one + b":" + two
    yield b"user=" + one + b"\x01auth=Bearer " + two + b"\x01\x01"


def _strings(value: Any) -> Iterator[str]:
    """Every text value in a credentials value: strings, numbers, and those in lists and maps."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield str(value)
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


class Redactor:
    """Replaces secrets and identifiers in text with `[REDACTED]`, as the module says.

    Calling it is cheap for the short texts it is meant for (error messages): a few
    substring searches per secret. An empty redactor returns text unchanged.
    """

    __slots__ = ("_b64_bare", "_b64_runs", "_bare", "_count", "_fragments", "_runs")

    def __init__(self, secrets: Iterable[str] = (), *, identifiers: Iterable[str] = ()) -> None:
        secret_set = {s for s in secrets if s}
        identifier_set = {s for s in identifiers if s} - secret_set
        self._count = len(secret_set | identifier_set)
        # Text found anywhere; text found only standing alone; base64 found anywhere (the
        # run around it is replaced); base64 found only as a whole run.
        runs: set[str] = set()
        bare: set[str] = set()
        b64_runs: set[str] = set()
        b64_bare: set[str] = set()
        # Fragment length -> the runs of that length that are redacted; and whether they are
        # base64 (the run around them is replaced too).
        fragments: dict[tuple[int, bool], set[str]] = {}
        for value in secret_set | identifier_set:
            forms = _text_forms(value)
            data = value.encode()
            if len(value) >= MIN_LENGTH:
                runs |= forms
                b64_runs.update(_cores(data))
            else:
                bare |= forms
            b64_bare.update(_encodings(data))
            if len(value) > MIN_LENGTH:
                width = fragment_length(len(value))
                if value in secret_set:
                    text_grams = fragments.setdefault((width, False), set())
                    for form in forms:
                        text_grams.update(_grams(form, width))
                b64_width = -(-width * 4 // 3)
                b64_grams = fragments.setdefault((b64_width, True), set())
                for core in _cores(data):
                    b64_grams.update(_grams(core, b64_width))
        for first, second in permutations(sorted(secret_set | identifier_set), 2):
            for data in _combined(first, second):
                b64_bare.update(_encodings(data))
        self._runs = sorted(runs, key=len, reverse=True)
        self._bare = sorted(bare, key=len, reverse=True)
        self._b64_runs = sorted(b64_runs, key=len, reverse=True)
        self._b64_bare = sorted(b64_bare, key=len, reverse=True)
        self._fragments = {key: frozenset(grams) for key, grams in fragments.items() if grams}

    @classmethod
    def from_credentials(
        cls, credentials: Mapping[str, Any], *, identifiers: Collection[str] = ()
    ) -> Redactor:
        """A redactor for an adapter's decrypted credentials: every text (or number) in
        them is a secret, except the values of the keys named in `identifiers` (logins),
        which are identifiers (no fragments of them are searched in plain text)."""
        secrets: list[str] = []
        names: list[str] = []
        for key, value in credentials.items():
            (names if key in identifiers else secrets).extend(_strings(value))
        return cls(secrets, identifiers=names)

    def __bool__(self) -> bool:
        return self._count > 0

    def __repr__(self) -> str:
        return f"Redactor({self._count} secrets)"

    def __reduce__(self) -> NoReturn:
        # Pickling would write the secrets somewhere we do not control.
        raise TypeError("a Redactor cannot be pickled")

    def __call__(self, text: str) -> str:
        """`text` with every secret found replaced by `[REDACTED]`."""
        if not self._count or not text:
            return text
        spans: list[tuple[int, int]] = []
        for needle in self._runs:
            spans.extend(_found(text, needle))
        for needle in self._bare:
            spans.extend(s for s in _found(text, needle) if _alone(text, s, str.isalnum))
        for needle in self._b64_runs:
            spans.extend(_b64_run(text, s) for s in _found(text, needle))
        for needle in self._b64_bare:
            found = (_b64_run(text, s) for s in _found(text, needle))
            spans.extend(s for s in found if text[s[0] : s[1]].rstrip("=") == needle)
        for (width, is_b64), grams in self._fragments.items():
            for start in range(len(text) - width + 1):
                if text[start : start + width] in grams:
                    span = (start, start + width)
                    spans.append(_b64_run(text, span) if is_b64 else span)
        return _replace(text, spans)

    def __or__(self, other: Redactor) -> Redactor:
        """A redactor that finds what either finds."""
        merged = Redactor()
        merged._count = self._count + other._count
        merged._runs = sorted({*self._runs, *other._runs}, key=len, reverse=True)
        merged._bare = sorted({*self._bare, *other._bare}, key=len, reverse=True)
        merged._b64_runs = sorted({*self._b64_runs, *other._b64_runs}, key=len, reverse=True)
        merged._b64_bare = sorted({*self._b64_bare, *other._b64_bare}, key=len, reverse=True)
        fragments = dict(self._fragments)
        for key, grams in other._fragments.items():
            fragments[key] = fragments.get(key, frozenset()) | grams
        merged._fragments = fragments
        return merged


def _grams(text: str, width: int) -> Iterator[str]:
    for start in range(len(text) - width + 1):
        yield text[start : start + width]


def _found(text: str, needle: str) -> Iterator[tuple[int, int]]:
    start = text.find(needle)
    while start != -1:
        yield start, start + len(needle)
        start = text.find(needle, start + 1)


def _alone(text: str, span: tuple[int, int], inside: Callable[[str], bool]) -> bool:
    """Whether `span` stands alone: neither character beside it is `inside` a word."""
    start, end = span
    before = text[start - 1] if start > 0 else " "
    after = text[end] if end < len(text) else " "
    return not inside(before) and not inside(after)


def _b64_run(text: str, span: tuple[int, int]) -> tuple[int, int]:
    """`span` widened to the base64 run around it, with its padding."""
    start, end = span
    while start > 0 and text[start - 1] in _B64_CHARS:
        start -= 1
    while end < len(text) and text[end] in _B64_CHARS:
        end += 1
    while end < len(text) and text[end] == "=":
        end += 1
    return start, end


def _replace(text: str, spans: list[tuple[int, int]]) -> str:
    if not spans:
        return text
    parts: list[str] = []
    position = 0
    for start, end in _merged(spans):
        parts += [text[position:start], REDACTED]
        position = end
    parts.append(text[position:])
    return "".join(parts)


def _merged(spans: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    spans.sort()
    current_start, current_end = spans[0]
    for start, end in spans[1:]:
        if start <= current_end:
            current_end = max(current_end, end)
        else:
            yield current_start, current_end
            current_start, current_end = start, end
    yield current_start, current_end


_URL: Final = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>]*")


def url_for_log(url: str) -> str:
    """`url` as logs and errors may show it: scheme, host and port, then `/…` where it had
    a path. No user information, path, query or fragment: a rendered hook URL carries
    subscriber data in its path as readily as in its query (`/score/{{ email }}`), and an
    API's URL its key."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<url>"
    host = parts.netloc.rpartition("@")[2]
    rest = "/…" if parts.path.strip("/") or parts.query or parts.fragment else ""
    return f"{parts.scheme}://{host}{rest}" if parts.scheme else "<url>"


def urls_for_log(text: str) -> str:
    """`text` with every URL in it cut down by `url_for_log`."""
    return _URL.sub(lambda m: url_for_log(m.group(0)), text)


_DSN_PASSWORD: Final = re.compile(r"(?:^|[?&\s])password=('(?:[^'\\]|\\.)*'|[^&\s]*)")


def dsn_secrets(dsn: str) -> set[str]:
    """The passwords a Postgres DSN may hold, however it is read: the URI's user
    information (up to the first or the last `@` of its host part), its `password=`
    parameters (URI query or key=value form), each as written and percent-decoded.

    A password holding an unencoded `/`, `?` or `#` ends the URI's host part early, so a
    parser reads its start as a port (`u:S3cret/x@host` gives port `S3cret`): when the
    "port" is not a number and an `@` follows, the text up to that `@` counts as the
    password too, and so does each of its pieces between those characters."""
    found: set[str] = set()
    _, sep, rest = dsn.partition("://")
    if sep:
        netloc = re.split(r"[/?#]", rest, maxsplit=1)[0]
        if "@" in netloc:
            for userinfo in (netloc.partition("@")[0], netloc.rpartition("@")[0]):
                found.add(userinfo.partition(":")[2])
        elif "@" in rest and not re.fullmatch(r"[\d,]*", netloc.partition(":")[2]):
            password = rest.partition("@")[0].partition(":")[2]
            found.add(password)
            found.update(re.split(r"[/?#]", password))
    for match in _DSN_PASSWORD.finditer(dsn):
        value = match.group(1)
        found.add(value[1:-1] if value.startswith("'") else value)
    found |= {urllib.parse.unquote(value) for value in found}
    return {value for value in found if value}
