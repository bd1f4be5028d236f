"""Sequence files: parse the TOML, validate all of it, and turn it into a version to store."""

from __future__ import annotations

import hashlib
import re
import tomllib
import zoneinfo
from pathlib import Path
from typing import Any, Literal

import msgspec

from dripd.conditions.expr import ExprSyntaxError, parse
from dripd.content.liquid import TemplateError, compile_template
from dripd.db.store import StepRow, TransitionRow, VersionRow
from dripd.errors import ConfigError, SequenceFileError
from dripd.model import CHANNELS, DEFAULT_RECIPIENT, parse_duration

_CONTENT = {
    "email": ({"subject", "text", "html"}, "subject and text or html"),
    "sms": ({"body"}, "body"),
    "whatsapp": ({"body"}, "body"),
    "chat": ({"body"}, "body"),
    "webhook": ({"body"}, "body"),
}
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
CONDITION_ROOTS = frozenset({"data", "subscriber_id", "subscriber_type", "tenant_key"})


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


class StepSpec(_Strict):
    key: str
    channel: str | None = None
    after: str = "0s"
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
        if getattr(head, name):
            raise fail(f"key 'sequence.{name}': event triggers are not supported yet")
    if not spec.steps:
        raise fail("a sequence needs at least one [[steps]]")

    seen: set[str] = set()
    steps: list[StepRow] = []
    for position, step in enumerate(spec.steps):
        label = f"step {step.key!r}"
        if not _KEY.match(step.key):
            raise fail(f"{label}: key 'key': must be letters, digits, '_', '.' or '-'")
        if step.key in seen:
            raise fail(f"{label}: key 'key': duplicate step key")
        seen.add(step.key)
        steps.append(_step(step, position, lambda m, lbl=label: fail(f"{lbl}: {m}")))

    transitions: list[TransitionRow] = []
    for n, t in enumerate(spec.transitions, start=1):
        label = f"transition #{n} (from {t.from_!r})"
        if t.from_ not in seen:
            raise fail(f"{label}: key 'from': no step {t.from_!r} in this sequence")
        if t.to is not None and t.to not in seen:
            raise fail(f"{label}: key 'to': no step {t.to!r} in this sequence")
        if t.when is not None:
            try:
                parse(t.when, roots=CONDITION_ROOTS)
            except ExprSyntaxError as exc:
                raise fail(f"{label}: key 'when': {exc.message}") from exc
        transitions.append(
            TransitionRow(from_key=t.from_, to_key=t.to, priority=t.priority, when=t.when)
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
        content_hash=digest,
        source=source_doc,
        steps=steps,
        transitions=transitions,
    )


def _timezone(name: str, fail: Any, where: str) -> None:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise fail(f"{where}: {name!r} is not a known IANA timezone") from exc


def _step(step: StepSpec, position: int, fail: Any) -> StepRow:
    if step.channel is None:
        raise fail("key 'channel': required (waiting steps are not supported yet)")
    if step.channel not in CHANNELS:
        raise fail(f"key 'channel': {step.channel!r} is not one of {', '.join(sorted(CHANNELS))}")
    try:
        delay = parse_duration(step.after, where="key 'after'")
    except ConfigError as exc:
        raise fail(exc.message) from exc
    allowed, needs = _CONTENT[step.channel]
    template: dict[str, str] = {}
    for name in ("subject", "text", "html", "body", "to"):
        value = getattr(step, name)
        if value is None:
            continue
        if name != "to" and name not in allowed:
            raise fail(f"key {name!r}: not used by channel {step.channel!r} (it takes {needs})")
        try:
            compile_template(value, field=name)
        except TemplateError as exc:
            raise fail(f"key {name!r}: {exc}") from exc
        template[name] = value
    if step.channel == "email":
        if "subject" not in template or not ({"text", "html"} & template.keys()):
            raise fail("an email step needs 'subject' and 'text' or 'html'")
    elif "body" not in template:
        raise fail(f"key 'body': required for channel {step.channel!r}")
    if step.channel not in DEFAULT_RECIPIENT and "to" not in template:
        raise fail(f"key 'to': required for channel {step.channel!r} (no default recipient)")
    if step.max_attempts is not None and step.max_attempts <= 0:
        raise fail("key 'max_attempts': must be a positive integer")
    return StepRow(
        key=step.key,
        position=position,
        channel=step.channel,
        delay=delay,
        template=template,
        adapter=step.adapter,
        on_failure=step.on_failure,
        max_attempts=step.max_attempts,
    )
