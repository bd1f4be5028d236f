"""Deterministic spintax: `{Hi|Hello} there` becomes one of its options, the same one on every
retry of an execution.

Follows DripDrop (reference §4.9: `{a|b|c}`, nested groups resolved innermost first, options
trimmed, a seeded PRNG so retries repeat the text) with three differences: an empty option is
a choice ("nothing", as in `Thanks{|, Ana}!`) rather than silently dropped, a brace pair without
a top-level `|` is literal text (CSS, JSON), and unbalanced braces a template writes literally
are refused at apply (`static_problem`) instead of only being left in place at send time.
"""

from __future__ import annotations

import hashlib
import random
import re
import uuid
from typing import Final

from dripd.content.liquid import TemplateError, literal_text

#: How deeply braces (groups and literal pairs alike) may nest.
MAX_DEPTH: Final = 50

# Splits text into [text, brace-or-pipe, text, brace-or-pipe, …, text]: one C pass, so the
# loop below touches only the special characters.
_TOKENS: Final = re.compile(r"([{|}])")


class SpintaxError(TemplateError):
    """Text whose braces cannot be read as spintax; the message names the brace as
    `line L, column C` (1-based, columns in characters)."""


def spin(text: str, seed: bytes) -> str:
    """`text` with every spintax group replaced by one of its options.

    A group is a balanced `{…}` with a `|` at its own top level; each option (after the
    groups inside it are resolved, innermost first) is trimmed, and may be empty. Other
    braces are kept as written, groups inside them resolved. The options are drawn, in the
    order the groups close, from a PRNG seeded by SHA-256 of `seed` alone (see `seed_for`),
    so the same `(text, seed)` always gives the same result. One pass with an explicit
    stack: linear in `len(text)` (times at most MAX_DEPTH for literal pairs).

    Raises SpintaxError for a `}` that closes nothing, a `{` never closed, or braces nested
    deeper than MAX_DEPTH.
    """
    if "{" not in text and "}" not in text:
        return text
    rng = random.Random(int.from_bytes(hashlib.sha256(seed).digest(), "big"))
    tokens = _TOKENS.split(text)
    # The pair being read: its `{` (a token index), the options before its last top-level
    # `|`, and the pieces of the option after it; `stack` holds the same for the pairs
    # around it, the text itself at the bottom.
    options: list[str] = []
    opened, parts = 0, [tokens[0]]
    stack: list[tuple[int, list[str], list[str]]] = []
    for i in range(1, len(tokens), 2):
        char = tokens[i]
        if char == "{":
            if len(stack) == MAX_DEPTH:
                raise SpintaxError(f"spintax nested deeper than {MAX_DEPTH}: {_brace(tokens, i)}")
            stack.append((opened, options, parts))
            opened, options, parts = i, [], [tokens[i + 1]]
        elif char == "|" and stack:
            options.append("".join(parts))
            parts = [tokens[i + 1]]
        elif char == "|":
            parts += ("|", tokens[i + 1])
        elif stack:
            body = "".join(parts)
            if options:
                options.append(body)
                body = options[rng.randrange(len(options))].strip()
            else:
                body = "{" + body + "}"
            opened, options, parts = stack.pop()
            parts += (body, tokens[i + 1])
        else:
            raise SpintaxError(f"unbalanced spintax: {_brace(tokens, i)} has no matching '{{'")
    if stack:
        first = stack[1][0] if len(stack) > 1 else opened
        raise SpintaxError(f"unbalanced spintax: {_brace(tokens, first)} is never closed")
    return "".join(parts)


def seed_for(execution_id: uuid.UUID, replay: int, field: str) -> bytes:
    """The spin seed of one template `field` (e.g. "subject") of an execution's `replay`
    (>= 0): a retry of the same execution repeats its words, a replay may vary them, and each
    field draws from its own stream (DripDrop seeds per execution and attempt window)."""
    return execution_id.bytes + replay.to_bytes(8, "big") + field.encode()


def static_problem(source: str) -> str | None:
    """Why the braces a Liquid template `source` writes literally are not valid spintax (the
    SpintaxError message, positions in `source`), or None. Markup (`{{ … }}`, `{% … %}`) is
    ignored: braces that come from data are judged only when the rendered text is spun."""
    try:
        spin(literal_text(source), b"")
    except SpintaxError as exc:
        return str(exc)
    return None


def _brace(tokens: list[str], index: int) -> str:
    """`'{' at line L, column C` for the brace `tokens[index]` (computed on error only)."""
    before = "".join(tokens[:index])
    line = before.count("\n") + 1
    column = len(before) - before.rfind("\n")
    return f"'{tokens[index]}' at line {line}, column {column}"
