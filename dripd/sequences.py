"""Sequence files: parse the TOML, validate all of it, and turn it into a version to store.

Everything a file holds is checked here, before anything is written: what Postgres could
not store (a NUL or a lone surrogate in any text, a number too large for its column), what
the daemon could not run (a duration past ten years, a template breaking a limit), and
what is too big to handle (README, "Sequence file and template limits"). Every refusal is a
SequenceFileError (exit 2) naming the file, the step and the key.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from pathlib import Path
from typing import Any, Final, Literal

import msgspec

from dripd.addresses import InvalidAddress, recipient
from dripd.conditions.expr import Expr, ExprSyntaxError, parse
from dripd.conditions.hookspecs import parse_hooks
from dripd.config import ShortLinkRules, check_link_rules
from dripd.content.compose import MAX_HEADERS, header_problem
from dripd.content.liquid import (
    HEADER_PREFIX,
    WA_LANGUAGE,
    WA_NAME,
    WA_PARAM,
    TemplateError,
    compile_template,
    is_spun,
)
from dripd.content.mjml import check_mjml_template
from dripd.content.spintax import static_problem
from dripd.db.store import StepRow, TransitionRow, VersionRow
from dripd.errors import ConfigError, SequenceFileError
from dripd.inputs import MAX_LENGTH, NAME, InvalidInput, check_data, text_fault
from dripd.model import (
    CHANNELS,
    DEFAULT_RECIPIENT,
    INT32_MAX,
    MAX_ATTEMPTS,
    SMS_CHANNELS,
    STEP_DELAY,
    SUBSCRIBER_RECIPIENT,
    TEMPLATE_NAMES,
    WAIT_TIMEOUT,
    parse_duration,
)
from dripd.pyload import split_python_path
from dripd.rules.window import parse_window
from dripd.timing import check_cron, parse_at, zone

_CONTENT = {
    "email": ({"subject", "text", "html", "mjml"}, "subject and text, html or mjml"),
    "sms": ({"body"}, "body"),
    "whatsapp": ({"body"}, "body"),
    "chat": ({"body"}, "body"),
    "webhook": ({"body"}, "body"),
    "pubsub": ({"body"}, "body"),
}
# A sequence or step key (the CHECK of dripd.sequences.key and dripd.steps.key). Always
# `fullmatch`: `$` would also match before a trailing newline.

#: The largest sequence file, in bytes.
MAX_FILE_BYTES: Final = 1_048_576
#: The most `[[steps]]` and `[[transitions]]` one sequence may have.
MAX_STEPS: Final = 500
MAX_TRANSITIONS: Final = 2000
#: How deep a file's tables and arrays may nest (`[[steps]]` is level 1, a step's
#: `window` level 3).
MAX_DEPTH: Final = 32
CONDITION_ROOTS = frozenset(
    {
        "data",
        "event",
        "events",
        "clicks",
        "now",
        "hooks",
        "subscriber_id",
        "subscriber_type",
        "tenant_key",
    }
)
_EVENT_STATS = frozenset({"count", "last_at"})
#: What `clicks.<name>` reads: the enrollment's link clicks (dripd's redirect and provider
#: feedback alike), and the step whose message was clicked last.
CLICK_STATS = frozenset({"count", "last_at", "last_step"})


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class SequenceHeader(_Strict):
    key: str
    name: str | None = None
    tenant: str | None = None
    mode: Literal["lifecycle", "outbound"] = "lifecycle"
    timezone: str | None = None
    reenroll: Literal["never", "after_exit", "always"] = "never"
    entry_events: list[str] = msgspec.field(default_factory=list)
    exit_events: list[str] = msgspec.field(default_factory=list)
    on_no_match: Literal["complete", "fail"] = "complete"
    window: dict[str, Any] | None = None
    vars: dict[str, Any] | None = None
    short_links: str | ShortLinkRules | None = None


class WaitFor(_Strict):
    event: str
    timeout: str
    on_timeout: str | None = None


class WhatsAppTemplate(_Strict):
    """An approved WhatsApp template: its name, language code and body parameters (each a
    Liquid template), sent instead of a free-form body (Meta's rule outside the 24-hour
    customer-service window)."""

    name: str
    language: str
    params: list[str] = msgspec.field(default_factory=list)


class StepSpec(_Strict):
    key: str
    channel: str | None = None
    after: str = "0s"
    at: str | None = None
    cron: str | None = None
    timezone: str | None = None
    wait_for: WaitFor | None = None
    when: str | None = None
    window: dict[str, Any] | None = None
    require_verified: bool = False
    max_length: int | None = None
    subject: str | None = None
    text: str | None = None
    html: str | None = None
    mjml: str | None = None
    body: str | None = None
    to: str | None = None
    from_: str | None = msgspec.field(default=None, name="from")
    reply_to: str | None = None
    headers: dict[str, str] | None = None
    whatsapp_template: WhatsAppTemplate | None = None
    adapter: str | None = None
    on_failure: Literal["fail", "continue"] = "fail"
    max_attempts: int | None = None
    spintax: bool = False
    template: str | None = None  # a Python template, "module:function"
    vars: dict[str, Any] | None = None
    short_links: str | ShortLinkRules | None = None


class TransitionSpec(_Strict):
    from_: str = msgspec.field(name="from")
    to: str | None = None
    priority: int = 0
    when: str | None = None


class SequenceFile(_Strict):
    sequence: SequenceHeader
    steps: list[StepSpec] = msgspec.field(default_factory=list)
    transitions: list[TransitionSpec] = msgspec.field(default_factory=list)
    hooks: dict[str, Any] = msgspec.field(default_factory=dict)


def load_file(path: Path) -> VersionRow:
    """Read and fully validate one sequence file (UTF-8, at most MAX_FILE_BYTES); every
    error names file, step and key."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise SequenceFileError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if len(data) > MAX_FILE_BYTES:
        raise SequenceFileError(
            f"{path}: larger than {MAX_FILE_BYTES} bytes (the limit for a sequence file)"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise SequenceFileError(
            f"{path}: line {line}: not UTF-8 (byte 0x{data[exc.start]:02x}); save the file as UTF-8"
        ) from exc
    return load_text(text, source=str(path))


def load_text(text: str, *, source: str) -> VersionRow:
    """Fully validate the text of one sequence file (`source` names it in errors)."""
    if len(text) > MAX_FILE_BYTES:
        raise SequenceFileError(
            f"{source}: larger than {MAX_FILE_BYTES} characters (the limit for a sequence file)"
        )
    raw = _parse_toml(text, source)
    _check_document(raw, source)
    try:
        spec = msgspec.convert(raw, SequenceFile)
    except msgspec.ValidationError as exc:
        raise SequenceFileError(f"{source}: {_where(exc, raw)}") from exc
    if len(spec.steps) > MAX_STEPS:
        raise SequenceFileError(
            f"{source}: key 'steps': {len(spec.steps)} steps; a sequence may have at most "
            f"{MAX_STEPS}"
        )
    if len(spec.transitions) > MAX_TRANSITIONS:
        raise SequenceFileError(
            f"{source}: key 'transitions': {len(spec.transitions)} transitions; a sequence "
            f"may have at most {MAX_TRANSITIONS}"
        )
    return _validate(spec, source)


def _parse_toml(text: str, source: str) -> dict[str, Any]:
    """tomllib's document, or SequenceFileError naming the line. tomllib itself raises
    RecursionError for very deep nesting and ValueError for an integer of more digits
    than Python converts (4300)."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SequenceFileError(f"{source}: not valid TOML: {exc}") from exc
    except RecursionError:
        line, key = _too_deep(text)
        problem = f"tables or arrays nested deeper than {MAX_DEPTH} levels"
    except ValueError:
        line, key = _long_integer(text)
        problem = "an integer with more than 4300 digits"
    where = f"line {line}: key {key!r}: " if key else f"line {line}: " if line else ""
    raise SequenceFileError(f"{source}: {where}{problem}") from None


def _too_deep(text: str) -> tuple[int, str]:
    """The line where brackets and braces (outside strings and comments) first nest
    deeper than MAX_DEPTH, and the key whose value that is; (0, "") if none do."""
    depth, key, quote = 0, "", ""
    for number, line in enumerate(text.split("\n"), start=1):
        i = 0
        while i < len(line):
            char = line[i]
            if quote:
                if char == "\\" and quote.startswith('"'):
                    i += 1
                elif line.startswith(quote, i):
                    i, quote = i + len(quote) - 1, ""
            elif line.startswith(('"""', "'''"), i):
                quote = line[i : i + 3]
                i += 2
            elif char in "\"'":
                quote = char
            elif char == "#":
                break
            elif char == "=" and depth == 0:
                key = line[:i].strip()
            elif char in "[{":
                depth += 1
                if depth > MAX_DEPTH:
                    return number, key
            elif char in "]}":
                depth -= 1
            i += 1
        if quote in ('"', "'"):
            quote = ""  # a one-line string does not continue on the next line
    return 0, ""


def _long_integer(text: str) -> tuple[int, str]:
    """The line of the first run of more than 4300 digits, and the key it is assigned to."""
    for number, line in enumerate(text.split("\n"), start=1):
        if re.search(r"[0-9][0-9_]{4300,}", line):
            key, equals, _ = line.partition("=")
            return number, key.strip() if equals else ""
    return 0, ""


def _check_document(raw: dict[str, Any], source: str) -> None:
    """Refuse what no key may hold: text Postgres cannot store (a NUL, a lone surrogate)
    in any key or string, and nesting deeper than MAX_DEPTH. Iterative, so that no depth
    exhausts the stack."""
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), raw)]
    while stack:
        path, value = stack.pop()
        if len(path) > MAX_DEPTH:
            raise SequenceFileError(
                f"{source}: {_place(path, raw)}: nested deeper than {MAX_DEPTH} levels"
            )
        if isinstance(value, str):
            fault = text_fault(value)
            if fault is not None:
                raise SequenceFileError(f"{source}: {_place(path, raw)}: {fault}")
        elif isinstance(value, dict):
            for name, item in value.items():
                fault = text_fault(name)
                if fault is not None:
                    where = _place((*path, name), raw)
                    raise SequenceFileError(f"{source}: {where}: a key name {fault}")
                stack.append(((*path, name), item))
        elif isinstance(value, list):
            stack.extend(((*path, n), item) for n, item in enumerate(value))


def _place(path: tuple[str | int, ...], raw: dict[str, Any]) -> str:
    """Where `path` (keys and list positions from the document's top) is, as errors say
    it: `step 'hello': key 'window.days'`, `transition #2 (from 'a'): key 'when'`, `key
    'sequence.entry_events[1]'`."""
    label = ""
    if len(path) >= 2 and path[0] in ("steps", "transitions") and isinstance(path[1], int):
        items = raw.get(str(path[0]))
        item = items[path[1]] if isinstance(items, list) and path[1] < len(items) else None
        item = item if isinstance(item, dict) else {}
        if path[0] == "steps":
            key = item.get("key")
            label = f"step {key!r}" if isinstance(key, str) else f"step #{path[1] + 1}"
        else:
            origin = item.get("from")
            label = f"transition #{path[1] + 1}"
            label += f" (from {origin!r})" if isinstance(origin, str) else ""
        path = path[2:]
    rest = ""
    for part in path:
        rest += f"[{part}]" if isinstance(part, int) else f".{part}" if rest else part
    if not rest:
        return label
    return f"{label}: key {rest!r}" if label else f"key {rest!r}"


def _where(exc: msgspec.ValidationError, raw: dict[str, Any]) -> str:
    """A msgspec error (`… - at `$.steps[0].after``) as `step 'hello': key 'after': …`."""
    message = str(exc)
    match = re.search(r" - at `\$(.*)`\Z", message, re.DOTALL)
    path = match.group(1) if match else ""
    text = message[: match.start()] if match else message
    unknown = re.fullmatch(r"Object contains unknown field `(.*)`", text, re.DOTALL)
    if unknown:
        path, text = f"{path}.{unknown.group(1)}", "unknown key"
    missing = re.fullmatch(r"Object missing required field `(.*)`", text, re.DOTALL)
    if missing:
        path, text = f"{path}.{missing.group(1)}", "required key is missing"
    if "[...]" in path:  # msgspec's name for "a value of this table", whichever key
        path, text = path.replace("[...]", ""), f"{text} (in one of its values)"
    parts: list[str | int] = [
        int(index) if index else name
        for name, index in re.findall(r"\.([^.\[]+)|\[([0-9]+)\]", path, re.DOTALL)
    ]
    place = _place(tuple(parts), raw)
    return f"{place}: {text}" if place else text


def _validate(spec: SequenceFile, source: str) -> VersionRow:
    head = spec.sequence

    def fail(message: str) -> SequenceFileError:
        return SequenceFileError(f"{source}: {message}")

    if not NAME.fullmatch(head.key):
        raise fail(f"key 'sequence.key': {head.key!r} must be letters, digits, '_', '.' or '-'")
    _check_length(head.key, "sequence", fail, "key 'sequence.key'")
    if head.tenant is not None:
        if not head.tenant.strip():
            raise fail(
                "key 'sequence.tenant': must not be empty (leave it out for a global sequence)"
            )
        _check_length(head.tenant, "tenant", fail, "key 'sequence.tenant'")
    if head.timezone is not None:
        _timezone(head.timezone, fail, "key 'sequence.timezone'")
    if head.mode == "outbound":
        raise fail('key \'sequence.mode\': "outbound" is not supported yet; use "lifecycle"')
    for name in ("entry_events", "exit_events"):
        keys = getattr(head, name)
        if any(not k.strip() for k in keys):
            raise fail(f"key 'sequence.{name}': event keys must not be empty")
        for key in keys:
            _check_length(key, "key", fail, f"key 'sequence.{name}'")
        if len(set(keys)) != len(keys):
            raise fail(f"key 'sequence.{name}': lists an event twice")
    both = sorted(set(head.entry_events) & set(head.exit_events))
    if both:
        raise fail(
            f"key 'sequence.exit_events': {both[0]!r} is also an entry event; an event "
            "cannot both start and end an enrollment"
        )
    try:
        hooks = parse_hooks(spec.hooks, where="hooks")
        if head.window is not None:
            parse_window(head.window, where="key 'sequence.window'")
        sequence_vars = _vars(head.vars, "sequence.vars")
        sequence_links = _short_links(head.short_links, "sequence.short_links")
    except ConfigError as exc:
        raise fail(exc.message) from exc
    if not spec.steps:
        raise fail("a sequence needs at least one [[steps]]")

    seen: set[str] = set()
    for step in spec.steps:
        label = f"step {step.key!r}"
        if not NAME.fullmatch(step.key):
            raise fail(f"{label}: key 'key': must be letters, digits, '_', '.' or '-'")
        _check_length(step.key, "step", fail, f"{label}: key 'key'")
        if step.key in seen:
            raise fail(f"{label}: key 'key': duplicate step key")
        seen.add(step.key)
    waits = {s.key for s in spec.steps if s.wait_for is not None}

    def condition(text: str, where: str, *, event: bool) -> None:
        try:
            expr = parse(text, roots=CONDITION_ROOTS)
        except ExprSyntaxError as exc:
            raise fail(f"{where}: key 'when': {exc.message}") from exc
        problem = _names_problem(expr, set(hooks), event=event)
        if problem:
            raise fail(f"{where}: key 'when': {problem}")

    steps: list[StepRow] = []
    for position, step in enumerate(spec.steps):
        label = f"step {step.key!r}"

        def step_fail(message: str, label: str = label) -> SequenceFileError:
            return fail(f"{label}: {message}")

        steps.append(_step(step, position, step_fail, seen, set(hooks)))
        if step.when is not None:
            condition(step.when, label, event=False)

    transitions: list[TransitionRow] = []
    for n, t in enumerate(spec.transitions, start=1):
        label = f"transition #{n} (from {t.from_!r})"
        if t.from_ not in seen:
            raise fail(f"{label}: key 'from': no step {t.from_!r} in this sequence")
        if t.to is not None and t.to not in seen:
            raise fail(f"{label}: key 'to': no step {t.to!r} in this sequence")
        if not -INT32_MAX <= t.priority <= INT32_MAX:
            raise fail(f"{label}: key 'priority': must be from {-INT32_MAX} to {INT32_MAX}")
        if t.when is not None:
            condition(t.when, label, event=t.from_ in waits)
        transitions.append(
            TransitionRow(
                from_key=t.from_, to_key=t.to, priority=t.priority, when=t.when, position=n
            )
        )
    warnings: list[str] = []
    problem = _graph_problem(spec)
    if problem:
        if _graph_problem(spec, legacy_timeouts=True) is not None:
            raise fail(problem)
        # dripd used to send a timed-out wait to the next step by position, skipping its
        # transitions; a file that relied on that still applies, with a warning saying how to
        # keep the old path.
        warnings.append(
            f"{source}: {problem} (a timed-out wait without on_timeout now takes its "
            "transitions with `event` null; set on_timeout to keep the old path)"
        )

    source_doc = msgspec.to_builtins(spec)
    digest = hashlib.sha256(msgspec.json.encode(source_doc, order="sorted")).hexdigest()
    return VersionRow(
        tenant_key=head.tenant,
        key=head.key,
        name=head.name,
        mode=head.mode,
        timezone=head.timezone,
        reenroll=head.reenroll,
        entry_events=head.entry_events,
        exit_events=head.exit_events,
        on_no_match=head.on_no_match,
        hooks=spec.hooks,
        send_window=head.window,
        vars=sequence_vars,
        short_links=sequence_links,
        content_hash=digest,
        source=source_doc,
        steps=steps,
        transitions=transitions,
        warnings=tuple(warnings),
    )


def _names_problem(expr: Expr, hooks: set[str], *, event: bool) -> str | None:
    """Names a condition may not use: undeclared hooks, malformed event statistics, and
    `event` outside the transitions of a wait (where it would always be null)."""
    for name in sorted(expr.names):
        path = name.split(".")
        root, rest = path[0], path[1:]
        if root == "hooks" and (not rest or rest[0] not in hooks):
            declared = ", ".join(sorted(hooks)) or "none"
            return f"'{'.'.join(path)}' names no declared hook (declared: {declared})"
        if root == "events" and (len(rest) != 2 or rest[1] not in _EVENT_STATS):
            return f"'{'.'.join(path)}': use events.<event key>.count or events.<event key>.last_at"
        if root == "clicks" and (len(rest) != 1 or rest[0] not in CLICK_STATS):
            return f"'{'.'.join(path)}': use clicks.count, clicks.last_at or clicks.last_step"
        if root == "event" and not event:
            return f"'{'.'.join(path)}': `event` is set only in transitions from a wait_for step"
    return None


def _graph_problem(spec: SequenceFile, *, legacy_timeouts: bool = False) -> str | None:
    """Every step reachable from the first, and every reachable step able to complete.

    A timed-out wait goes to its `on_timeout` step, else through its transitions (already
    edges), else to the next step by position. `legacy_timeouts` adds the next step by
    position for every wait without `on_timeout`, as dripd used to.
    """
    keys = [s.key for s in spec.steps]
    after = {k: (keys[i + 1] if i + 1 < len(keys) else None) for i, k in enumerate(keys)}
    outgoing: dict[str, list[TransitionSpec]] = {}
    for t in spec.transitions:
        outgoing.setdefault(t.from_, []).append(t)
    complete_on_no_match = spec.sequence.on_no_match == "complete"
    edges: dict[str, set[str | None]] = {}  # None: the enrollment completes
    for step in spec.steps:
        out: set[str | None] = set()
        ts = outgoing.get(step.key)
        if ts:
            out.update(t.to for t in ts)
            if complete_on_no_match and all(t.when is not None for t in ts):
                out.add(None)
        else:
            out.add(after[step.key])
        if step.wait_for is not None:
            on_timeout = step.wait_for.on_timeout
            if on_timeout is not None:
                out.add(None if on_timeout == "complete" else on_timeout)
            elif legacy_timeouts:
                out.add(after[step.key])
        edges[step.key] = out
    reached: set[str] = set()
    todo = [keys[0]]
    while todo:
        key = todo.pop()
        if key in reached:
            continue
        reached.add(key)
        todo.extend(k for k in edges[key] if k is not None)
    for key in keys:
        if key not in reached:
            return (
                f"step {key!r}: unreachable: no transition leads to it and the step before "
                "it has transitions of its own"
            )
    can_complete = {k for k in keys if None in edges[k]}
    grew = True
    while grew:
        grew = False
        for key in keys:
            if key not in can_complete and edges[key] & can_complete:
                can_complete.add(key)
                grew = True
    for key in keys:
        if key not in can_complete:
            return (
                f"step {key!r}: no path to completion: every way out of it loops back; add a "
                "transition without `to`, or a condition (no match completes the enrollment)"
            )
    return None


def _check_length(text: str, kind: str, fail: Any, where: str) -> None:
    """`text` is at most as long as the CLI and the HTTP API take a name of `kind`
    (dripd.inputs.MAX_LENGTH): a longer one could never be enrolled into or sent."""
    limit = MAX_LENGTH[kind]
    if len(text) > limit:
        raise fail(f"{where}: must be at most {limit} characters (it has {len(text)})")


def _timezone(name: str, fail: Any, where: str) -> None:
    try:
        zone(name, where=where)
    except ConfigError as exc:
        raise fail(exc.message) from exc


def _step(step: StepSpec, position: int, fail: Any, steps: set[str], hooks: set[str]) -> StepRow:
    try:
        delay = parse_duration(step.after, where="key 'after'", within=STEP_DELAY)
        at_time = parse_at(step.at, where="key 'at'") if step.at is not None else None
        cron = check_cron(step.cron, where="key 'cron'") if step.cron is not None else None
    except ConfigError as exc:
        raise fail(exc.message) from exc
    if at_time is not None and cron is not None:
        raise fail("keys 'at' and 'cron': use one or the other")
    if step.timezone is not None:
        _timezone(step.timezone, fail, "key 'timezone'")
        if at_time is None and cron is None:
            raise fail("key 'timezone': only used with 'at' or 'cron'")
    wait_event = wait_timeout = on_timeout = None
    if step.wait_for is not None:
        wait = step.wait_for
        if step.channel is not None:
            raise fail("key 'wait_for': a waiting step sends nothing; leave out 'channel'")
        if step.after != "0s" or at_time is not None or cron is not None:
            raise fail("key 'wait_for': a waiting step starts at once; leave out after/at/cron")
        if step.when is not None:
            raise fail(
                "key 'when': a waiting step cannot be skipped; put the condition on the "
                "transition into it"
            )
        if not wait.event.strip():
            raise fail("key 'wait_for.event': must not be empty")
        _check_length(wait.event, "key", fail, "key 'wait_for.event'")
        try:
            wait_timeout = parse_duration(
                wait.timeout, where="key 'wait_for.timeout'", within=WAIT_TIMEOUT
            )
        except ConfigError as exc:
            raise fail(exc.message) from exc
        if wait.on_timeout not in (None, "complete", *steps):
            raise fail(
                f"key 'wait_for.on_timeout': no step {wait.on_timeout!r} in this sequence "
                '(or "complete")'
            )
        wait_event, on_timeout = wait.event, wait.on_timeout
    template: dict[str, str] = {}
    if step.adapter is not None:
        if not NAME.fullmatch(step.adapter):  # what `dripd adapter add` takes as a name
            raise fail(f"key 'adapter': {step.adapter!r} must be letters, digits, '_', '.' or '-'")
        _check_length(step.adapter, "adapter", fail, "key 'adapter'")
    if step.template is not None and split_python_path(step.template) is None:
        raise fail(
            f"key 'template': {step.template[:80]!r} is not a Python path like "
            "'package.module:function'"
        )
    if step.channel is None:
        for name in (*_SENDING_KEYS, "spintax"):
            if getattr(step, name) not in (None, False):
                key = name.rstrip("_")
                raise fail(f"key {key!r}: a step without a channel sends nothing")
    else:
        template = _content(step, fail, hooks)
    try:
        step_vars = _vars(step.vars, "vars")
        short_links = _short_links(step.short_links, "short_links")
    except ConfigError as exc:
        raise fail(exc.message) from exc
    if step.max_attempts is not None and not 0 < step.max_attempts <= MAX_ATTEMPTS:
        raise fail(f"key 'max_attempts': must be a positive integer, at most {MAX_ATTEMPTS}")
    if step.window is not None:
        if step.channel is None:
            raise fail("key 'window': a step without a channel sends nothing to hold back")
        try:
            parse_window(step.window, where="key 'window'")
        except ConfigError as exc:
            raise fail(exc.message) from exc
    if step.max_length is not None:
        if step.channel not in SMS_CHANNELS:
            raise fail(f"key 'max_length': only for {' and '.join(sorted(SMS_CHANNELS))} steps")
        if not 0 < step.max_length <= INT32_MAX:
            raise fail(
                f"key 'max_length': must be a positive number of characters, at most {INT32_MAX}"
            )
    if step.require_verified and step.channel is None:
        raise fail("key 'require_verified': a step without a channel sends nothing")
    return StepRow(
        key=step.key,
        position=position,
        channel=step.channel,
        delay=delay,
        template=template,
        adapter=step.adapter,
        on_failure=step.on_failure,
        max_attempts=step.max_attempts,
        at_time=at_time,
        cron=cron,
        timezone=step.timezone,
        wait_event=wait_event,
        wait_timeout=wait_timeout,
        on_timeout=on_timeout,
        when=step.when,
        send_window=step.window,
        require_verified=step.require_verified,
        max_length=step.max_length,
        spintax=step.spintax,
        python_template=step.template,
        vars=step_vars,
        short_links=short_links,
    )


# The keys of a step that only a step with a channel may have.
_SENDING_KEYS: Final = (
    "subject",
    "text",
    "html",
    "mjml",
    "body",
    "to",
    "adapter",
    "from_",
    "reply_to",
    "headers",
    "whatsapp_template",
    "template",
    "vars",
    "short_links",
)
#: A template variable's name: what Liquid can write as `{{ name }}`.
_VAR_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")


def _vars(raw: dict[str, Any] | None, where: str) -> dict[str, Any] | None:
    """`vars` of a sequence or a step as JSON to store; ConfigError naming the key of a name
    Liquid cannot read, one of dripd's own names (which would hide it), or a value Postgres
    could not store (TOML dates become ISO 8601 text)."""
    if raw is None:
        return None
    for name in raw:
        if not _VAR_NAME.fullmatch(name):
            raise ConfigError(
                f"key '{where}': {name[:80]!r} is not a variable name (a letter or '_', then "
                "letters, digits, '_' or '-'; at most 64)"
            )
        if name in TEMPLATE_NAMES:
            raise ConfigError(
                f"key '{where}.{name}': {name!r} is one of dripd's own template names, which "
                "win over vars; choose another name"
            )
    try:
        return check_data(msgspec.to_builtins(raw), where=f"key '{where}'")
    except InvalidInput as exc:
        raise ConfigError(exc.message) from None


def _short_links(raw: str | ShortLinkRules | None, where: str) -> dict[str, Any] | None:
    """`short_links` of a sequence or a step ("dripd", "webhook", "none" or a table) as the
    table to store; ConfigError naming the key."""
    if raw is None:
        return None
    if isinstance(raw, str):
        if raw not in ("dripd", "webhook", "none"):
            raise ConfigError(
                f'key \'{where}\': {raw[:80]!r} is not "dripd", "webhook", "none" or a table '
                'like { provider = "dripd", utm = true }'
            )
        raw = ShortLinkRules(provider=raw)  # type: ignore[arg-type]  # checked just above
    try:
        check_link_rules(raw, where)
    except ConfigError as exc:  # "short_links.utm: …" → "key 'short_links.utm': …"
        key, _, reason = exc.message.partition(": ")
        raise ConfigError(f"key {key!r}: {reason}") from None
    return msgspec.to_builtins(raw)  # type: ignore[no-any-return]


#: WhatsApp template names: lower-case letters, digits and `_` (Meta's rule), and language
#: codes such as `en` or `en_US`; at most 60 parameters.
_WA_TEMPLATE_NAME: Final = re.compile(r"[a-z0-9_]{1,512}")
_WA_LANGUAGE: Final = re.compile(r"[a-z]{2,3}(?:_[A-Za-z0-9]{2,8})?")
MAX_WA_PARAMS: Final = 60


def _whatsapp_fields(step: StepSpec, fail: Any) -> list[tuple[str, str | None]]:
    """A `whatsapp_template` as template fields: name and language fixed (checked here),
    each parameter a template."""
    spec = step.whatsapp_template
    if spec is None:
        return []
    if step.channel != "whatsapp":
        raise fail("key 'whatsapp_template': only whatsapp steps take it")
    if not _WA_TEMPLATE_NAME.fullmatch(spec.name):
        raise fail(
            f"key 'whatsapp_template.name': {spec.name[:80]!r} is not a WhatsApp template "
            "name (lower-case letters, digits and '_')"
        )
    if not _WA_LANGUAGE.fullmatch(spec.language):
        raise fail(
            f"key 'whatsapp_template.language': {spec.language[:80]!r} is not a language "
            "code like 'en' or 'en_US'"
        )
    if len(spec.params) > MAX_WA_PARAMS:
        raise fail(f"key 'whatsapp_template.params': at most {MAX_WA_PARAMS} parameters")
    return [
        (WA_NAME, spec.name),
        (WA_LANGUAGE, spec.language),
        *((f"{WA_PARAM}{n}", param) for n, param in enumerate(spec.params)),
    ]


def _field_key(name: str) -> str:
    """The sequence-file key a template field came from."""
    if name.startswith(HEADER_PREFIX):
        return f"headers.{name.removeprefix(HEADER_PREFIX)}"
    if name.startswith(WA_PARAM):
        return f"whatsapp_template.params[{name.removeprefix(WA_PARAM)}]"
    if name.startswith("wa:"):
        return f"whatsapp_template.{name.removeprefix('wa:')}"
    return name


# What a step's Python template makes instead of Liquid templates.
_MADE_BY_PYTHON: Final = frozenset({"subject", "text", "html", "mjml", "body", WA_NAME})


def _check_header(name: str, fail: Any) -> None:
    """A step's extra header name: an RFC 5322 field name that dripd does not set itself."""
    problem = header_problem(name)
    if problem is not None:
        where = f"headers.{name}" if problem.startswith("dripd sets") else "headers"
        raise fail(f"key {where!r}: {problem}")


def _content(step: StepSpec, fail: Any, hooks: set[str]) -> dict[str, str]:
    channel = step.channel
    assert channel is not None
    if channel not in CHANNELS:
        raise fail(f"key 'channel': {channel!r} is not one of {', '.join(sorted(CHANNELS))}")
    allowed, needs = _CONTENT[channel]
    template: dict[str, str] = {}
    fields: list[tuple[str, str | None]] = [
        (name, getattr(step, name)) for name in ("subject", "text", "html", "mjml", "body", "to")
    ]
    fields += [("from", step.from_), ("reply_to", step.reply_to)]
    fields += [(f"{HEADER_PREFIX}{name}", value) for name, value in (step.headers or {}).items()]
    fields += _whatsapp_fields(step, fail)
    if channel != "email":
        for key, given in (("from", step.from_), ("reply_to", step.reply_to)):
            if given is not None:
                raise fail(f"key {key!r}: only email steps take it")
        if step.headers is not None:
            raise fail("key 'headers': only email steps take extra headers")
    if step.html is not None and step.mjml is not None:
        raise fail("keys 'html' and 'mjml': use one or the other (mjml compiles to the html)")
    for name, value in fields:
        if value is None:
            continue
        key = _field_key(name)
        if name in _MADE_BY_PYTHON and step.template is not None:
            raise fail(
                f"key {key!r}: the step's Python template (key 'template') makes its content; "
                "leave this key out"
            )
        if name in ("subject", "text", "html", "mjml", "body") and name not in allowed:
            raise fail(f"key {name!r}: not used by channel {channel!r} (it takes {needs})")
        if name.startswith(HEADER_PREFIX):
            _check_header(name.removeprefix(HEADER_PREFIX), fail)
        try:
            compiled = compile_template(value, field=name)
        except TemplateError as exc:
            raise fail(f"key {key!r}: {exc}") from exc
        unknown = compiled.hooks() - hooks - {"*"}
        if unknown:
            raise fail(f"key {key!r}: 'hooks.{min(unknown)}' names no declared hook")
        problem = check_mjml_template(value) if name == "mjml" else None
        if problem is None and step.spintax and is_spun(name):
            problem = static_problem(value)
        if problem is not None:  # its lines are the value's, not the file's
            raise fail(f"key {key!r}: {problem} (a line of the key's value)")
        if name in ("from", "reply_to") and "{" not in value:
            # A fixed address is checked now; a rendered one when the step sends.
            try:
                recipient("email", value, field=f"key {name!r}")
            except InvalidAddress as exc:
                raise fail(exc.message) from None
        template[name] = value
    if step.headers is not None and len(step.headers) > MAX_HEADERS:
        raise fail(f"key 'headers': at most {MAX_HEADERS} headers")
    if step.template is not None:
        pass  # the Python template's fields are checked when it makes them
    elif channel == "email":
        if "subject" not in template or not ({"text", "html", "mjml"} & template.keys()):
            raise fail("an email step needs 'subject' and 'text', 'html' or 'mjml'")
    elif "body" not in template and WA_NAME not in template:
        raise fail(f"key 'body': required for channel {channel!r}")
    if (
        channel not in DEFAULT_RECIPIENT
        and channel not in SUBSCRIBER_RECIPIENT
        and ("to" not in template)
    ):
        raise fail(f"key 'to': required for channel {channel!r} (no default recipient)")
    return template
