"""Sequence files: parse the TOML, validate all of it, and turn it into a version to store."""

from __future__ import annotations

import hashlib
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec

from dripd.conditions.expr import Expr, ExprSyntaxError, parse
from dripd.conditions.hookspecs import parse_hooks
from dripd.content.liquid import TemplateError, compile_template
from dripd.db.store import StepRow, TransitionRow, VersionRow
from dripd.errors import ConfigError, SequenceFileError
from dripd.model import (
    CHANNELS,
    DEFAULT_RECIPIENT,
    INT32_MAX,
    MAX_ATTEMPTS,
    SMS_CHANNELS,
    STEP_DELAY,
    WAIT_TIMEOUT,
    parse_duration,
)
from dripd.rules.window import parse_window
from dripd.timing import check_cron, parse_at, zone

_CONTENT = {
    "email": ({"subject", "text", "html"}, "subject and text or html"),
    "sms": ({"body"}, "body"),
    "whatsapp": ({"body"}, "body"),
    "chat": ({"body"}, "body"),
    "webhook": ({"body"}, "body"),
}
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
CONDITION_ROOTS = frozenset(
    {"data", "event", "events", "now", "hooks", "subscriber_id", "subscriber_type", "tenant_key"}
)
_EVENT_STATS = frozenset({"count", "last_at"})


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


class WaitFor(_Strict):
    event: str
    timeout: str
    on_timeout: str | None = None


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
    body: str | None = None
    to: str | None = None
    adapter: str | None = None
    on_failure: Literal["fail", "continue"] = "fail"
    max_attempts: int | None = None


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
    """Read and fully validate one sequence file; every error names file, step and key."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise SequenceFileError(f"{path}: cannot read: {exc.strerror}") from exc
    return load_text(text, source=str(path))


def load_text(text: str, *, source: str) -> VersionRow:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SequenceFileError(f"{source}: not valid TOML: {exc}") from exc
    try:
        spec = msgspec.convert(raw, SequenceFile)
    except msgspec.ValidationError as exc:
        raise SequenceFileError(f"{source}: {_where(exc, raw)}") from exc
    return _validate(spec, source)


def _where(exc: msgspec.ValidationError, raw: dict[str, Any]) -> str:
    message = str(exc)
    match = re.search(r" - at `\$(.*)`$", message)
    path = match.group(1) if match else ""
    text = message[: match.start()] if match else message
    unknown = re.fullmatch(r"Object contains unknown field `(.*)`", text)
    if unknown:
        path, text = f"{path}.{unknown.group(1)}", "unknown key"
    missing = re.fullmatch(r"Object missing required field `(.*)`", text)
    if missing:
        path, text = f"{path}.{missing.group(1)}", "required key is missing"
    step = re.match(r"\.steps\[(\d+)\]", path)
    if step:
        index = int(step.group(1))
        steps = raw.get("steps") or []
        key = (
            steps[index].get("key")
            if index < len(steps) and isinstance(steps[index], dict)
            else None
        )
        label = f"step {key!r}" if isinstance(key, str) else f"step #{index + 1}"
        rest = path[step.end() :].lstrip(".")
        return f"{label}: key {rest!r}: {text}" if rest else f"{label}: {text}"
    transition = re.match(r"\.transitions\[(\d+)\]", path)
    if transition:
        rest = path[transition.end() :].lstrip(".")
        label = f"transition #{int(transition.group(1)) + 1}"
        return f"{label}: key {rest!r}: {text}" if rest else f"{label}: {text}"
    return f"key {path.lstrip('.')!r}: {text}" if path else text


def _validate(spec: SequenceFile, source: str) -> VersionRow:
    head = spec.sequence

    def fail(message: str) -> SequenceFileError:
        return SequenceFileError(f"{source}: {message}")

    if not _KEY.match(head.key):
        raise fail(f"key 'sequence.key': {head.key!r} must be letters, digits, '_', '.' or '-'")
    if head.tenant is not None and not head.tenant:
        raise fail("key 'sequence.tenant': must not be empty (leave it out for a global sequence)")
    if head.timezone is not None:
        _timezone(head.timezone, fail, "key 'sequence.timezone'")
    if head.mode == "outbound":
        raise fail('key \'sequence.mode\': "outbound" is not supported yet; use "lifecycle"')
    for name in ("entry_events", "exit_events"):
        keys = getattr(head, name)
        if any(not k.strip() for k in keys):
            raise fail(f"key 'sequence.{name}': event keys must not be empty")
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
    except ConfigError as exc:
        raise fail(exc.message) from exc
    if not spec.steps:
        raise fail("a sequence needs at least one [[steps]]")

    seen: set[str] = set()
    for step in spec.steps:
        label = f"step {step.key!r}"
        if not _KEY.match(step.key):
            raise fail(f"{label}: key 'key': must be letters, digits, '_', '.' or '-'")
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
    if step.channel is None:
        for name in ("subject", "text", "html", "body", "to", "adapter"):
            if getattr(step, name) is not None:
                raise fail(f"key {name!r}: a step without a channel sends nothing")
    else:
        template = _content(step, fail, hooks)
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
    )


def _content(step: StepSpec, fail: Any, hooks: set[str]) -> dict[str, str]:
    channel = step.channel
    assert channel is not None
    if channel not in CHANNELS:
        raise fail(f"key 'channel': {channel!r} is not one of {', '.join(sorted(CHANNELS))}")
    allowed, needs = _CONTENT[channel]
    template: dict[str, str] = {}
    for name in ("subject", "text", "html", "body", "to"):
        value = getattr(step, name)
        if value is None:
            continue
        if name != "to" and name not in allowed:
            raise fail(f"key {name!r}: not used by channel {channel!r} (it takes {needs})")
        try:
            compiled = compile_template(value, field=name)
        except TemplateError as exc:
            raise fail(f"key {name!r}: {exc}") from exc
        unknown = compiled.hooks() - hooks - {"*"}
        if unknown:
            raise fail(f"key {name!r}: 'hooks.{min(unknown)}' names no declared hook")
        template[name] = value
    if channel == "email":
        if "subject" not in template or not ({"text", "html"} & template.keys()):
            raise fail("an email step needs 'subject' and 'text' or 'html'")
    elif "body" not in template:
        raise fail(f"key 'body': required for channel {channel!r}")
    if channel not in DEFAULT_RECIPIENT and "to" not in template:
        raise fail(f"key 'to': required for channel {channel!r} (no default recipient)")
    return template
