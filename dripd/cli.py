"""The `dripd` command line: thin wrappers over the daemon, the store and the Python API."""

from __future__ import annotations

import argparse
import asyncio
import base64
import math
import os
import re
import sys
import traceback
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, NoReturn, TypeVar

import msgspec

from dripd import __version__, api, inputs, logs
from dripd import config as config_mod
from dripd.channels import registry
from dripd.channels.credentials import ENV_VAR, Vault, generate_key
from dripd.config import Config
from dripd.control import request as control_request
from dripd.db import intake, store
from dripd.db import migrate as migrate_mod
from dripd.engine.adapters import adapter_aad
from dripd.engine.hookset import secret_aad
from dripd.errors import ConfigError, CredentialsError, DripdError, NotFound
from dripd.model import CHANNELS
from dripd.redaction import REDACTED, Redactor, dsn_secrets
from dripd.sequences import load_file

Handler = Callable[[argparse.Namespace, Config], Awaitable[Any]]

# A row whose encrypted blob `dripd rotate-key` re-encrypts.
_Sealed = TypeVar("_Sealed", store.SealedCredentialsRow, store.SealedSecretRow)


def _print(
    args: argparse.Namespace, result: Any, human: Callable[[Any], str] | None = None
) -> None:
    if getattr(args, "json", False) or human is None:
        sys.stdout.write(msgspec.json.encode(result).decode() + "\n")
    else:
        sys.stdout.write(human(result) + "\n")


def _dsn(args: argparse.Namespace, cfg: Config) -> str:
    dsn = getattr(args, "dsn", None) or os.environ.get("DRIPD_DSN") or cfg.database.dsn
    if not dsn:
        raise ConfigError(
            "no database: pass --dsn, set DRIPD_DSN, or set database.dsn in the config"
        )
    return dsn


def _json_arg(text: str | None, name: str, *, where: str | None = None) -> dict[str, Any]:
    """The JSON object in `text` ({} for None), checked as data every surface takes
    (`dripd.inputs.check_json`, or `check_data` when `where` is "data"); ConfigError
    naming the argument `name` and the path in the value (`--data: data.n: …`)."""
    if text is None:
        return {}
    try:
        value = msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{name}: not valid JSON: {inputs.json_fault(text, exc)}") from None
    except RecursionError:
        raise ConfigError(
            f"{name}: nested deeper than {inputs.MAX_DEPTH} levels (and too deep to read)"
        ) from None
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: must be a JSON object")
    try:
        if where == "data":
            return inputs.check_data(value, where=where)
        inputs.check_json(value, where=where or name.lstrip("-"))
    except inputs.InvalidInput as exc:
        raise ConfigError(f"{name}: {exc.message}") from None
    return value


#: The most a command reads of a file or stdin (credentials, secrets).
MAX_INPUT_BYTES = 65536


def _read_input(source: str, name: str) -> str:
    """The UTF-8 text of the file `source`, or of stdin for "-", at most MAX_INPUT_BYTES;
    ConfigError naming the argument `name` and the file otherwise. Never quotes the
    content: it may be a secret."""
    shown = "stdin" if source == "-" else source
    try:
        if source == "-":
            stream = getattr(sys.stdin, "buffer", None)  # a text-only stdin (tests) has none
            data = (
                stream.read(MAX_INPUT_BYTES + 1)
                if stream is not None
                else sys.stdin.read(MAX_INPUT_BYTES + 1).encode("utf-8", "surrogateescape")
            )
        else:
            with Path(source).open("rb") as file:
                data = file.read(MAX_INPUT_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {shown}: {exc.strerror or exc}") from None
    except ValueError:  # a NUL in the path
        raise ConfigError(f"{name}: {source!r} is not a file name") from None
    if len(data) > MAX_INPUT_BYTES:
        raise ConfigError(f"{name}: {shown} is larger than {MAX_INPUT_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: {shown} is not UTF-8 text (byte {exc.start})") from None


# The commands that work on a database without dripd's (current) schema.
_SCHEMA_COMMANDS = frozenset({"migrate", "check-schema", "uninstall"})


async def _with_conn(
    args: argparse.Namespace, cfg: Config, body: Callable[[store.Connection], Awaitable[Any]]
) -> Any:
    """`body` run on a fresh connection, once the schema is current (SchemaError saying what
    to run otherwise: `schema not installed: run `dripd migrate``), except for the
    commands that install or inspect it."""
    conn = await store.connect(_dsn(args, cfg), timeout=cfg.connect_timeout.total_seconds())
    try:
        if getattr(args, "cmd", None) not in _SCHEMA_COMMANDS:
            await migrate_mod.require_current(conn)
        return await body(conn)
    finally:
        await conn.close()


# --- schema ------------------------------------------------------------------------------


async def cmd_migrate(args: argparse.Namespace, cfg: Config) -> None:
    applied = await _with_conn(
        args, cfg, partial(migrate_mod.migrate, allow_newer_server=args.allow_newer_server)
    )
    _print(
        args,
        {"applied": applied},
        lambda r: "\n".join(f"applied {n}" for n in r["applied"]) or "schema is current",
    )


async def cmd_check_schema(args: argparse.Namespace, cfg: Config) -> int:
    status = await _with_conn(args, cfg, migrate_mod.status)
    result = {
        "current": status.current,
        "applied": status.applied,
        "pending": status.pending,
        "edited": status.edited,
        "unknown": status.unknown,
    }

    def human(r: dict[str, Any]) -> str:
        if r["current"]:
            return f"schema is current ({len(r['applied'])} migrations applied)"
        parts = [f"{k}: {', '.join(r[k])}" for k in ("pending", "edited", "unknown") if r[k]]
        return "schema is NOT current: " + "; ".join(parts)

    _print(args, result, human)
    return 0 if status.current else 1


async def cmd_uninstall(args: argparse.Namespace, cfg: Config) -> None:
    sql = migrate_mod.teardown_sql()
    if not args.execute:
        _print(args, {"sql": sql, "executed": False}, lambda r: r["sql"].rstrip())
        return

    async def run(conn: store.Connection) -> None:
        with store.translated():
            await conn.execute(sql)

    await _with_conn(args, cfg, run)
    _print(args, {"sql": sql, "executed": True}, lambda _: "dripd schema dropped")


# --- authoring ---------------------------------------------------------------------------


def _load_files(args: argparse.Namespace) -> list[tuple[str, store.VersionRow | None]]:
    """Every file of `args.files` read and validated (`load_file`), each error and warning
    printed to stderr (`dripd: <file>: <message>`); a file that is invalid pairs with None.
    All files are read, not only up to the first bad one."""
    loaded: list[tuple[str, store.VersionRow | None]] = []
    seen: dict[tuple[str | None, str], str] = {}  # (tenant, key) → the file that has it
    for name in args.files:
        try:
            spec = load_file(Path(name))
            first = seen.setdefault((spec.tenant_key, spec.key), name)
            if first != name:
                # Applied in one go, the second would archive the first at once.
                raise ConfigError(
                    f"{name}: sequence {spec.key!r}"
                    + (f" of tenant {spec.tenant_key!r}" if spec.tenant_key else "")
                    + f" is in {first} too; give each sequence one file"
                )
        except ConfigError as exc:
            if args.verbose:
                traceback.print_exc()
            print(f"dripd: {_chain(exc)}", file=sys.stderr)
            loaded.append((name, None))
            continue
        for warning in spec.warnings:
            print(f"dripd: warning: {warning}", file=sys.stderr)
        loaded.append((name, spec))
    return loaded


async def cmd_apply(args: argparse.Namespace, cfg: Config) -> int:
    loaded = _load_files(args)  # all validated before anything is written
    if args.check:
        return _print_checked(args, loaded)
    specs = [spec for _, spec in loaded if spec is not None]
    if len(specs) < len(loaded):
        return ConfigError.exit_code
    now = datetime.now(UTC)

    async def run(conn: store.Connection) -> list[store.Applied]:
        async with store.transaction(conn) as tx:
            return [await store.apply_version(tx, spec, now=now) for spec in specs]

    applied = await _with_conn(args, cfg, run)
    result = [
        {
            "file": f,
            "key": a.key,
            "tenant": a.tenant_key,
            "version": a.version,
            "created": a.created,
            "warnings": list(spec.warnings),
        }
        for f, a, spec in zip(args.files, applied, specs, strict=True)
    ]
    _print(
        args,
        result,
        lambda rs: "\n".join(
            f"{r['file']}: {r['key']} v{r['version']} "
            + ("created and activated" if r["created"] else "unchanged")
            for r in rs
        ),
    )
    return 0


def _print_checked(
    args: argparse.Namespace, loaded: list[tuple[str, store.VersionRow | None]]
) -> int:
    """`apply --check`: a line per valid file (the errors are printed already); exit 0
    when every file is valid, else 2."""
    result = [
        {"file": name, "valid": False}
        if spec is None
        else {
            "file": name,
            "valid": True,
            "key": spec.key,
            "tenant": spec.tenant_key,
            "steps": len(spec.steps),
            "warnings": list(spec.warnings),
        }
        for name, spec in loaded
    ]

    def human(rows: list[dict[str, Any]]) -> str:
        return "\n".join(
            f"ok  {r['file']}  (sequence {r['key']!r}"
            + (f" of tenant {r['tenant']!r}" if r["tenant"] is not None else "")
            + f", {r['steps']} step{'s' if r['steps'] != 1 else ''})"
            for r in rows
            if r["valid"]
        )

    if getattr(args, "json", False) or any(r["valid"] for r in result):
        _print(args, result, human)
    return 0 if all(r["valid"] for r in result) else ConfigError.exit_code


# --- the Python API, wrapped -------------------------------------------------------------


async def cmd_enroll(args: argparse.Namespace, cfg: Config) -> None:
    data = _json_arg(args.data, "--data", where="data")
    enrollment = await _with_conn(
        args,
        cfg,
        lambda c: api.enroll(
            c,
            tenant=args.tenant,
            sequence_key=args.sequence,
            subscriber_id=args.subscriber,
            subscriber_type=args.type,
            data=data,
            default_timezone=cfg.timezone_of(args.tenant),
        ),
    )
    _print(
        args,
        enrollment.to_dict(),
        lambda r: (
            f"enrollment {r['id']} {r['status']}" + ("" if r["created"] else " (already enrolled)")
        ),
    )


async def cmd_event(args: argparse.Namespace, cfg: Config) -> None:
    data = _json_arg(args.data, "--data", where="data")
    event = await _with_conn(
        args,
        cfg,
        lambda c: api.track_event(
            c,
            tenant=args.tenant,
            subscriber_id=args.subscriber,
            key=args.key,
            subscriber_type=args.type,
            data=data,
            idempotency_id=args.id,
            default_timezone=cfg.timezone_of(args.tenant),
        ),
    )

    def human(r: dict[str, Any]) -> str:
        if not r["created"]:
            return f"event {r['id']} already recorded (same --id); nothing done again"
        lines = [f"event {r['id']} recorded"]
        lines += [f"  enrolled: {i}" for i in r["enrolled"]]
        lines += [f"  not enrolled in {n['sequence']}: {n['reason']}" for n in r["not_enrolled"]]
        lines += [f"  exited: {i}" for i in r["exited"]]
        lines += [f"  released wait: {i}" for i in r["released"]]
        return "\n".join(lines)

    _print(args, event.to_dict(), human)


async def cmd_suppress(args: argparse.Namespace, cfg: Config) -> None:
    result = await _with_conn(
        args,
        cfg,
        lambda c: api.suppress(
            c,
            tenant=args.tenant,
            channel=args.channel,
            address=args.address,
            reason=args.reason,
            source="cli",
            default_region=cfg.recipients.default_region,
        ),
    )
    _print(args, result.to_dict(), lambda r: f"suppressed {r['channel']} {r['address']}")


async def cmd_preview(args: argparse.Namespace, cfg: Config) -> int:
    from dripd.engine.preview import preview

    data = _json_arg(args.data, "--data", where="data")
    if args.timeline:
        return await _preview_timeline(args, cfg, data)
    if args.start is not None:
        raise ConfigError("--start: only with --timeline")
    steps = await _with_conn(
        args,
        cfg,
        lambda c: preview(
            c,
            tenant=args.tenant,
            sequence_key=args.sequence,
            subscriber_id=args.subscriber,
            subscriber_type=args.type,
            data=data,
            step_key=args.step,
        ),
    )

    def human(rows: list[dict[str, Any]]) -> str:
        blocks = []
        for r in rows:
            head = f"== {r['step']} ({r['channel']}, after {r['after']}) to {r['to'] or '-'}"
            blocks.append("\n".join([head, *_message_lines(r)]))
        return "\n\n".join(blocks)

    _print(args, steps, human)
    return 1 if any("error" in r for r in steps) else 0


def _message_lines(entry: Mapping[str, Any], indent: str = "") -> list[str]:
    """The rendered fields of a preview entry (and its error), one `name: value` each."""
    return [
        f"{indent}{k}: {entry[k]}"
        for k in ("subject", "text", "html", "body", "error")
        if k in entry
    ]


async def _preview_timeline(args: argparse.Namespace, cfg: Config, data: dict[str, Any]) -> int:
    """`dripd preview --timeline` (dripd.engine.timeline): exit 1 when a step cannot render."""
    from zoneinfo import ZoneInfo

    from dripd.engine.preview import active_steps
    from dripd.engine.timeline import timeline

    if args.step is not None:
        raise ConfigError("--step: not with --timeline (a timeline follows every step)")
    steps, first = await _with_conn(
        args, cfg, lambda c: active_steps(c, tenant=args.tenant, sequence_key=args.sequence)
    )
    result = await timeline(
        steps,
        first,
        data=data,
        start=args.start or datetime.now(UTC),
        default_zone=ZoneInfo(cfg.timezone_of(args.tenant)),
        window_channels=frozenset(cfg.windows.channels),
        spread=cfg.windows._duration("spread"),
        tenant=args.tenant,
        subscriber_id=args.subscriber,
        subscriber_type=args.type,
    )

    def human(r: dict[str, Any]) -> str:
        lines = [f"start {_stamp(r['start'])}, recipient's timezone {r['timezone']}"]
        _timeline_lines(r, "", lines)
        return "\n".join([*lines, *(f"assumes: {a}" for a in r["assumptions"])])

    _print(args, result, human)
    return 1 if _has_error(result["entries"]) else 0


def _stamp(at: datetime) -> str:
    return at.isoformat(sep=" ").replace("+00:00", "Z")


def _timeline_lines(path: Mapping[str, Any], indent: str, lines: list[str]) -> None:
    """A timeline path as text, into `lines`: an entry per line (its UTC and local times,
    step, channel, what moved it, and why it is skipped) with its message under it, a
    wait's branches indented under the wait, and how the path ends."""
    for e in path["entries"]:
        head = f"{indent}{_stamp(e['due_at'])}  ({e['local'].isoformat(sep=' ')})  {e['step']}"
        if "wait_for" in e:
            head += f": waits for {e['wait_for']['event']!r} up to {e['wait_for']['timeout']}"
        else:
            head += f" ({e['channel'] or 'no channel'})"
            if e["to"]:
                head += f" to {e['to']}"
        if e["moved_by"]:
            head += f"  [moved by {', '.join(e['moved_by'])}]"
        if "skipped" in e:
            head += f"  [skipped: {e['skipped']}]"
        lines.append(head)
        lines.extend(_message_lines(e, indent + "    "))
        lines.extend(f"{indent}    condition: {c}" for c in e.get("condition_errors", ()))
        for kind, branch in e.get("branches", {}).items():
            when = f"{_stamp(branch['at'])} ({branch['local'].isoformat(sep=' ')})"
            if kind == "event":
                lines.append(f"{indent}  on event {branch['event']!r}, arriving at {when}:")
            else:
                lines.append(f"{indent}  on timeout at {when}:")
            _timeline_lines(branch, indent + "    ", lines)
    if path["end"] is not None:
        lines.append(f"{indent}end: {path['end']['status']} ({path['end']['reason']})")


def _has_error(entries: list[dict[str, Any]]) -> bool:
    return any(
        "error" in e or any(_has_error(b["entries"]) for b in e.get("branches", {}).values())
        for e in entries
    )


async def cmd_replay(args: argparse.Namespace, cfg: Config) -> None:
    execution_id = _uuid(args.execution_id, "EXECUTION_ID")
    result = await _with_conn(
        args,
        cfg,
        lambda c: api.replay(
            c,
            tenant=api.ALL_TENANTS if args.tenant is None else args.tenant,
            execution_id=execution_id,
        ),
    )
    _print(
        args,
        result.to_dict(),
        lambda r: f"execution {r['execution_id']} replay {r['replay']} scheduled",
    )


def _uuid(text: str, name: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError as exc:
        raise ConfigError(f"{name}: {text!r} is not a UUID") from exc


# --- adapters ----------------------------------------------------------------------------


def _read_credentials(source: str | None) -> dict[str, Any]:
    if source is None:
        return {}
    text = _read_input(source, "--credentials-file")
    try:
        value = msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        # msgspec's reasons name a position, never the content (a secret).
        raise ConfigError(
            f"--credentials-file: not a JSON object ({inputs.json_fault(text, exc)})"
        ) from None
    except RecursionError:
        raise ConfigError("--credentials-file: not a JSON object (nested too deep)") from None
    if not isinstance(value, dict):
        raise ConfigError("--credentials-file: not a JSON object")
    try:
        inputs.check_json(value, where="credentials")  # names keys only, never values
    except inputs.InvalidInput as exc:
        raise ConfigError(f"--credentials-file: {exc.message}") from None
    return value


async def cmd_adapter_add(args: argparse.Namespace, cfg: Config) -> None:
    try:  # built-in providers, and those installed under the `dripd.providers` entry points
        served = registry.get(args.provider).channels
    except ConfigError as exc:
        raise ConfigError(f"--provider: {exc.message}") from None
    if served is not None and args.channel not in served:
        raise ConfigError(
            f"--channel: provider {args.provider!r} does not serve channel {args.channel!r}; "
            f"it serves: {', '.join(sorted(served))}"
        )
    config = _json_arg(args.config, "--config")
    credentials = _read_credentials(args.credentials_file)
    registry.validate(args.channel, args.provider, config, credentials)
    adapter_id = uuid.uuid4()
    blob = None
    if credentials:
        blob = Vault.from_env().encrypt(credentials, aad=adapter_aad(adapter_id))

    async def run(conn: store.Connection) -> store.AdapterRow:
        async with store.transaction(conn) as tx:
            row = await store.insert_adapter(
                tx,
                adapter_id=adapter_id,
                tenant=args.tenant,
                name=args.name,
                channel=args.channel,
                provider=args.provider,
                config=config,
                credentials=blob,
                is_default=args.default,
                now=datetime.now(UTC),
            )
            await store.notify_adapters(tx)
            return row

    row = await _with_conn(args, cfg, run)
    _print(args, _adapter_dict(row), lambda r: f"adapter {r['name']} added ({r['id']})")


def _adapter_dict(row: store.AdapterRow) -> dict[str, Any]:
    return {
        "id": str(row.id),
        "tenant": row.tenant_key,
        "name": row.name,
        "channel": row.channel,
        "provider": row.provider,
        "config": row.config,
        "default": row.is_default,
        "enabled": row.enabled,
        "paused": row.paused_reason,
    }


async def cmd_adapter_list(args: argparse.Namespace, cfg: Config) -> None:
    rows = await _with_conn(
        args, cfg, lambda c: store.list_adapters(c, args.tenant, all_tenants=args.all_tenants)
    )
    result = [_adapter_dict(r) for r in rows]
    _print(
        args,
        result,
        lambda rs: (
            "\n".join(
                f"{r['name']:<20} {r['channel']:<8} {r['provider']:<8} tenant={r['tenant'] or '-'}"
                f"{' default' if r['default'] else ''}{'' if r['enabled'] else ' disabled'}"
                f"{' paused: ' + r['paused'] if r['paused'] else ''}"
                for r in rs
            )
            or "no adapters"
        ),
    )


async def cmd_adapter_disable(args: argparse.Namespace, cfg: Config) -> None:
    async def run(conn: store.Connection) -> store.AdapterRow:
        async with store.transaction(conn) as tx:
            row = await store.disable_adapter(tx, args.tenant, args.name, datetime.now(UTC))
            if row is None:
                raise NotFound(f"no adapter {args.name!r} for tenant {args.tenant or '(global)'}")
            await store.notify_adapters(tx)
            return row

    row = await _with_conn(args, cfg, run)
    _print(args, _adapter_dict(row), lambda r: f"adapter {r['name']} disabled")


def _merge_patch(current: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """`current` with `patch` applied at the top level, as JSON Merge Patch does (RFC 7396):
    a key set to null is removed, any other value replaces the key's."""
    merged = dict(current)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


async def cmd_adapter_update(args: argparse.Namespace, cfg: Config) -> None:
    config_patch = _json_arg(args.config, "--config") if args.config is not None else None
    credentials_patch = (
        _read_credentials(args.credentials_file) if args.credentials_file is not None else None
    )

    async def run(conn: store.Connection) -> store.AdapterRow:
        async with store.transaction(conn) as tx:
            row = await store.lock_adapter(tx, args.tenant, args.name)
            if row is None:
                raise NotFound(f"no adapter {args.name!r} for tenant {args.tenant or '(global)'}")
            config = _merge_patch(row.config, config_patch or {})
            blob = row.credentials
            if config_patch is not None or credentials_patch is not None:
                # The adapter is checked whole, as `adapter add` checks it: its sealed
                # credentials are opened for that (and sealed again when they change).
                vault = Vault.from_env() if blob is not None or credentials_patch else None
                current = {}
                if vault is not None and blob is not None:
                    current = vault.decrypt(blob, aad=adapter_aad(row.id))
                credentials = _merge_patch(current, credentials_patch or {})
                registry.validate(row.channel, row.provider, config, credentials)
                if credentials_patch is not None:
                    blob = None
                    if vault is not None and credentials:
                        blob = vault.encrypt(credentials, aad=adapter_aad(row.id))
            updated = await store.update_adapter(
                tx,
                row,
                config=config,
                credentials=blob,
                is_default=row.is_default if args.default is None else args.default,
                enabled=row.enabled if args.enabled is None else args.enabled,
                now=datetime.now(UTC),
            )
            await store.notify_adapters(tx)
            return updated

    row = await _with_conn(args, cfg, run)
    _print(args, _adapter_dict(row), lambda r: f"adapter {r['name']} updated")


async def cmd_rotate_key(args: argparse.Namespace, cfg: Config) -> None:
    vault = Vault.from_env()

    def reseal(
        rows: Sequence[_Sealed],
        sealed: Callable[[_Sealed], bytes],
        kind: str,
        aad_of: Callable[[uuid.UUID], bytes],
    ) -> list[tuple[_Sealed, bytes]]:
        """New blobs for the rows not yet under the current key; raises before any write."""
        resealed = []
        for row in rows:
            if vault.is_current(sealed(row)):
                continue
            aad = aad_of(row.id)
            try:
                plain = vault.decrypt(sealed(row), aad=aad)
            except DripdError as exc:
                # Nothing is written: the whole rotation is one transaction.
                raise CredentialsError(
                    f"{kind} {row.name!r} (tenant {row.tenant_key or '-'}): {exc.message}"
                ) from exc
            resealed.append((row, vault.encrypt(plain, aad=aad)))
        return resealed

    async def run(conn: store.Connection) -> dict[str, Any]:
        async with store.transaction(conn) as tx:
            now = datetime.now(UTC)
            rows = await store.lock_credentials(tx)
            adapters = reseal(rows, lambda r: r.credentials, "adapter", adapter_aad)
            secrets = await store.lock_secrets(tx)
            resealed_secrets = reseal(secrets, lambda r: r.value, "secret", secret_aad)
            for row, blob in adapters:
                await store.set_credentials(tx, row.id, blob, now)
            for secret, blob in resealed_secrets:
                await store.set_secret(tx, secret.id, blob, now)
            await store.notify_adapters(tx)
        rotated = [row.name for row, _ in adapters]
        rotated_secrets = [secret.name for secret, _ in resealed_secrets]
        return {
            "key_id": vault.key_id,
            "rotated": rotated,
            "adapters": len(rows),
            "rotated_secrets": rotated_secrets,
            "secrets": len(secrets),
        }

    result = await _with_conn(args, cfg, run)
    _print(
        args,
        result,
        lambda r: (
            f"{len(r['rotated'])} of {r['adapters']} adapters and {len(r['rotated_secrets'])} "
            f"of {r['secrets']} secrets re-encrypted under key {r['key_id']}"
        ),
    )


async def cmd_hook_test(args: argparse.Namespace, cfg: Config) -> None:
    from dripd.conditions.hooks import HookEnrollment, HookStep
    from dripd.conditions.hookspecs import parse_hooks
    from dripd.engine.hookset import HookSet
    from dripd.netguard import NetPolicy

    data = _json_arg(args.data, "--data", where="data")

    async def run(conn: store.Connection) -> Any:
        seq = await store.find_sequence(conn, args.tenant, args.sequence)
        if seq is None or seq.version_id is None:
            raise NotFound(
                f"no active sequence {args.sequence!r} for tenant {args.tenant or '(global)'}"
            )
        specs = parse_hooks(dict(seq.hooks or {}), where="hooks")
        if args.hook not in specs:
            declared = ", ".join(sorted(specs)) or "none"
            raise ConfigError(
                f"HOOK: {args.sequence!r} declares no hook {args.hook!r} (declared: {declared})"
            )
        hooks = HookSet(
            pool=conn,
            vault=Vault.from_env() if os.environ.get(ENV_VAR) else None,
            policy=NetPolicy(
                allow_http=cfg.hooks.allow_http, allowed_networks=cfg.allowed_networks
            ),
        )
        context = {
            **data,
            "subscriber_id": args.subscriber,
            "subscriber_type": args.type,
            "tenant_key": args.tenant,
            "sequence_key": args.sequence,
        }
        try:
            runner = hooks.for_version(seq.version_id, specs, args.tenant)
            result = await runner.run(
                args.hook,
                context=context,
                webhook_id=f"test.{uuid.uuid4()}",
                enrollment=HookEnrollment(
                    id="test",
                    tenant_key=args.tenant,
                    sequence_key=args.sequence,
                    subscriber_type=args.type,
                    subscriber_id=args.subscriber,
                    data=data,
                ),
                step=HookStep(key="test", channel=None),
            )
        finally:
            await hooks.aclose()
        return {"hook": args.hook, "result": result}

    out = await _with_conn(args, cfg, run)
    _print(args, out, lambda r: msgspec.json.encode(r["result"]).decode())


# --- secrets (for hooks) -------------------------------------------------------------------


def _read_secret(source: str) -> str:
    value = _read_input(source, "--from-file").rstrip("\r\n")
    if not value:
        raise ConfigError("--from-file: the secret is empty")
    return value


async def _store_secret(args: argparse.Namespace, cfg: Config, value: str) -> dict[str, Any]:
    vault = Vault.from_env()
    secret_id = uuid.uuid4()

    async def run(conn: store.Connection) -> bool:
        async with store.transaction(conn) as tx:
            existing = await store.secret_row(tx, args.tenant, args.name)
            if existing is not None and existing.tenant_key == args.tenant:
                row_id = existing.id  # a replaced value stays bound to its row
            else:
                row_id = secret_id
            blob = vault.encrypt({"value": value}, aad=secret_aad(row_id))
            return await store.upsert_secret(
                tx, row_id, args.tenant, args.name, blob, datetime.now(UTC)
            )

    created = await _with_conn(args, cfg, run)
    return {"name": args.name, "tenant_key": args.tenant, "created": created}


async def cmd_secret_set(args: argparse.Namespace, cfg: Config) -> None:
    result = await _store_secret(args, cfg, _read_secret(args.from_file))
    _print(
        args,
        result,
        lambda r: f"secret {r['name']} " + ("stored" if r["created"] else "replaced"),
    )


async def cmd_secret_generate(args: argparse.Namespace, cfg: Config) -> None:
    value = "whsec_" + base64.b64encode(os.urandom(32)).decode("ascii")
    result = await _store_secret(args, cfg, value)
    # Shown once, to configure the receiver; dripd keeps only the encrypted copy.
    _print(args, {**result, "value": value}, lambda r: r["value"])


async def cmd_secret_list(args: argparse.Namespace, cfg: Config) -> None:
    rows = await _with_conn(
        args, cfg, lambda c: store.list_secrets(c, args.tenant, every=args.all_tenants)
    )
    result = [
        {
            "tenant_key": r.tenant_key,
            "name": r.name,
            "created_at": r.created_at.isoformat(),
            "updated_at": r.updated_at.isoformat(),
        }
        for r in rows
    ]
    _print(
        args,
        result,
        lambda rs: "\n".join(f"{r['tenant_key'] or '-'}\t{r['name']}" for r in rs) or "no secrets",
    )


async def cmd_secret_delete(args: argparse.Namespace, cfg: Config) -> None:
    deleted = await _with_conn(args, cfg, lambda c: store.delete_secret(c, args.tenant, args.name))
    if not deleted:
        raise NotFound(f"no secret {args.name!r} for tenant {args.tenant or '(global)'}")
    _print(args, {"name": args.name, "deleted": True}, lambda r: f"secret {r['name']} deleted")


async def cmd_keygen(args: argparse.Namespace, cfg: Config) -> None:
    key = generate_key()
    _print(args, {"key": key, "env": ENV_VAR}, lambda r: r["key"])


# --- API tokens ----------------------------------------------------------------------------


async def cmd_token_create(args: argparse.Namespace, cfg: Config) -> None:
    token, row = await _with_conn(
        args,
        cfg,
        lambda c: intake.create_token(c, tenant=args.tenant, name=args.name, now=datetime.now(UTC)),
    )
    # Shown once: dripd keeps only its SHA-256.
    result = {"token": token, "id": str(row.id), "tenant_key": row.tenant_key, "name": row.name}
    _print(args, result, lambda r: r["token"])


async def cmd_token_list(args: argparse.Namespace, cfg: Config) -> None:
    rows = await _with_conn(
        args, cfg, lambda c: intake.list_tokens(c, args.tenant, all_tenants=args.all_tenants)
    )
    _print(
        args,
        [r.to_dict() for r in rows],
        lambda rs: (
            "\n".join(
                f"{r['id']}  {r['tenant_key'] or '-'}\t{r['name']}"
                + (f"  revoked {r['revoked_at']}" if r["revoked_at"] else "")
                for r in rs
            )
            or "no tokens"
        ),
    )


async def cmd_token_revoke(args: argparse.Namespace, cfg: Config) -> None:
    token_id = _uuid(args.token_id, "ID")
    row = await _with_conn(args, cfg, lambda c: intake.revoke_token(c, token_id, datetime.now(UTC)))
    if row is None:
        raise NotFound(f"no API token {token_id}")
    _print(args, row.to_dict(), lambda r: f"token {r['id']} revoked")


# --- the daemon --------------------------------------------------------------------------


async def cmd_run(args: argparse.Namespace, cfg: Config) -> None:
    from dripd.engine.daemon import Daemon

    if args.dsn:
        cfg.database.dsn = args.dsn
    await Daemon(cfg).run()


async def cmd_ctl(args: argparse.Namespace, cfg: Config) -> None:
    socket_path = args.socket or cfg.control.socket
    command, rest = args.command, args.args
    payload: dict[str, Any] = {}
    if command == "replay":
        if len(rest) != 1:
            raise ConfigError("ctl replay: takes exactly one EXECUTION_ID")
        payload = {"execution_id": rest[0]}
    elif command == "resume-adapter":
        if len(rest) not in (1, 2):
            raise ConfigError("ctl resume-adapter: takes NAME and, for a tenant's adapter, TENANT")
        try:
            name = inputs.check_name(rest[0], field="NAME", kind="adapter")
            tenant = inputs.check_optional(
                rest[1] if len(rest) == 2 else None, field="TENANT", kind="tenant"
            )
        except inputs.InvalidInput as exc:
            raise ConfigError(f"ctl resume-adapter: {exc.message}") from None
        payload = {"name": name, "tenant": tenant}
    elif rest:
        raise ConfigError(f"ctl {command}: takes no arguments")
    result = await control_request(socket_path, command, payload, timeout=args.timeout)
    # Always one JSON document, --json or not: operators' scripts parse `ctl status`.
    _print(args, result)


async def cmd_dev(args: argparse.Namespace, cfg: Config) -> None:
    from dripd.dev import run_dev

    await run_dev(args, cfg)


# --- parser ------------------------------------------------------------------------------


def _tenant_arg(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty (leave --tenant out for global)")
    return _text("tenant")(text)


def _text(kind: str, *, name: bool = False) -> Callable[[str], str]:
    """An argparse type: a name or id of `kind`, within the limits every surface applies
    (`dripd.inputs.MAX_LENGTH`), and with `name` of the form the schema takes for the
    name of an adapter or a secret; argparse names the argument in the error (exit 2)."""

    def check(text: str) -> str:
        try:
            if name:
                return inputs.check_name(text, field=kind)
            return inputs.check_text(text, field=kind)
        except inputs.InvalidInput as exc:
            raise argparse.ArgumentTypeError(exc.reason) from None

    check.__name__ = kind  # argparse names the type in some messages
    return check


def _count_arg(maximum: int) -> Callable[[str], int]:
    """An argparse type: a whole number from 0 to `maximum`."""

    def check(text: str) -> int:
        if not (text.isascii() and text.isdigit() and len(text) <= 9) or int(text) > maximum:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 0 to {maximum}")
        return int(text)

    return check


def _file_arg(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _time_arg(text: str) -> datetime:
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        at = None
    if at is None or at.utcoffset() is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 time with a UTC offset, e.g. 2027-03-27T10:00:00+01:00"
        )
    return at


def _listen_arg(text: str) -> str:
    try:
        config_mod.parse_listen(text, where="address")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(exc.message.removeprefix("address: ")) from None
    return text


_MAX_WAIT_SECONDS = 86400.0
_MAX_DEMO_SUBSCRIBERS = 1000
_SUBSCRIBER_TYPE = _text("subscriber_type")
_TYPE_HELP = "subscriber type (default user)"


def _seconds_arg(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= _MAX_WAIT_SECONDS:  # False for nan
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of seconds longer than 0 and at most {_MAX_WAIT_SECONDS:g}"
        )
    return seconds


class _Parser(argparse.ArgumentParser):
    """argparse, except that a usage error never echoes a DSN's password: argparse quotes
    the arguments it could not place (`invalid choice: '…'`) and lists unrecognized ones
    bare, `--dsn`'s value among them, in any of its forms. `argv_secrets` holds the
    passwords of every argument of this run read as a DSN (set by `main`)."""

    argv_secrets: ClassVar[set[str]] = set()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # No abbreviations: `--credentials '{"key": …}'` must not be read as an abbreviated
        # `--credentials-file` whose "path" (the secret) the error then quotes.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        masked = re.sub(r"'[^']*'|\"[^\"]*\"", _masked, message)
        for secret in sorted(self.argv_secrets, key=len, reverse=True):
            masked = masked.replace(secret, REDACTED)
        super().error(masked)


def _masked(quoted: re.Match[str]) -> str:
    """A quoted argument of a usage error with every password it may hold as a DSN masked
    (`dripd.redaction.dsn_secrets`: URI user info, `password=`, as written and decoded)."""
    text = quoted.group(0)
    for secret in sorted(dsn_secrets(text[1:-1]), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def _parser() -> argparse.ArgumentParser:
    config_help = (
        "config file (default: $DRIPD_CONFIG, else /etc/dripd/dripd.toml, else built-in defaults)"
    )
    # `adapter add` owns `--config JSON` (a fixed point of the CLI), so its config file can
    # only be given before the command: `dripd --config PATH adapter add ...`.
    output = _Parser(add_help=False)
    output.add_argument("--json", action="store_true", help="print one JSON document")
    output.add_argument("-v", "--verbose", action="store_true", help="tracebacks on errors")
    output.add_argument("--dsn", help="Postgres DSN (default: $DRIPD_DSN, else database.dsn)")
    common = _Parser(add_help=False)
    common.add_argument(
        "--config", dest="config_path", type=Path, default=argparse.SUPPRESS, help=config_help
    )
    common.add_argument("--json", action="store_true", help="print one JSON document")
    common.add_argument("-v", "--verbose", action="store_true", help="tracebacks on errors")
    db = _Parser(add_help=False, parents=[common])
    db.add_argument("--dsn", help="Postgres DSN (default: $DRIPD_DSN, else database.dsn)")
    tenant = _Parser(add_help=False)
    tenant.add_argument(
        "--tenant", default=None, type=_tenant_arg, help="tenant key (absent: global)"
    )

    p = _Parser(prog="dripd", description="Drip and sequence messaging daemon.")
    p.add_argument("--version", action="version", version=f"dripd {__version__}")
    p.add_argument("--config", dest="config_path", type=Path, default=None, help=config_help)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def add(
        name: str, handler: Handler, help_: str, parents: Sequence[_Parser]
    ) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, parents=list(parents), description=help_)
        sp.set_defaults(handler=handler)
        return sp

    add("run", cmd_run, "run the daemon until SIGTERM/SIGINT", [db])
    dev = add(
        "dev", cmd_dev, "a throwaway Postgres, the examples, outbox adapters and the daemon", [db]
    )
    dev.add_argument("--examples", type=Path, default=None, help="sequence files directory")
    dev.add_argument(
        "--subscribers",
        type=_count_arg(_MAX_DEMO_SUBSCRIBERS),
        default=3,
        help=f"demo subscribers to enroll (0 to {_MAX_DEMO_SUBSCRIBERS})",
    )
    dev.add_argument(
        "--http",
        default=None,
        type=_listen_arg,
        help="HTTP listen address (default 127.0.0.1:8025, or a free port if taken)",
    )
    mi = add("migrate", cmd_migrate, "apply pending schema migrations", [db])
    mi.add_argument(
        "--allow-newer-server",
        action="store_true",
        help=f"migrate a PostgreSQL newer than {migrate_mod.NEWEST_TESTED_SERVER} (untested)",
    )
    add("check-schema", cmd_check_schema, "exit 1 unless the schema is current", [db])
    un = add("uninstall", cmd_uninstall, "print the teardown SQL (run it with --execute)", [db])
    un.add_argument("--execute", action="store_true", help="drop the dripd schema and all its data")
    ap = add("apply", cmd_apply, "create or update sequences from sequence files", [db])
    ap.add_argument("files", nargs="+", metavar="FILE", type=_file_arg)
    ap.add_argument(
        "--check",
        action="store_true",
        help="only validate the files: write nothing, need no database (exit 2 if any is bad)",
    )
    en = add("enroll", cmd_enroll, "enroll a subscriber in a sequence", [db, tenant])
    en.add_argument("sequence", metavar="SEQUENCE_KEY", type=_text("sequence"))
    en.add_argument("subscriber", metavar="SUBSCRIBER_ID", type=_text("subscriber_id"))
    en.add_argument("--type", default="user", type=_SUBSCRIBER_TYPE, help=_TYPE_HELP)
    en.add_argument("--data", help="subscriber data as a JSON object")
    ev = add("event", cmd_event, "record an event of a subscriber", [db, tenant])
    ev.add_argument("subscriber", metavar="SUBSCRIBER_ID", type=_text("subscriber_id"))
    ev.add_argument("key", metavar="EVENT_KEY", type=_text("key"))
    ev.add_argument("--type", default="user", type=_SUBSCRIBER_TYPE, help=_TYPE_HELP)
    ev.add_argument("--data", help="event data as a JSON object")
    ev.add_argument(
        "--id",
        type=_text("idempotency_id"),
        help="idempotency id: the same id twice records one event",
    )
    su = add("suppress", cmd_suppress, "stop all sends to an address on a channel", [db, tenant])
    su.add_argument("channel", metavar="CHANNEL", choices=sorted(CHANNELS))
    su.add_argument("address", metavar="ADDRESS", type=_text("address"))
    su.add_argument(
        "--reason",
        default="manual",
        choices=sorted(api.SUPPRESSION_REASONS),
        help="why (default manual)",
    )
    pv = add(
        "preview",
        cmd_preview,
        "render a sequence's steps for some data; sends nothing",
        [db, tenant],
    )
    pv.add_argument("sequence", metavar="SEQUENCE_KEY", type=_text("sequence"))
    pv.add_argument(
        "subscriber",
        metavar="SUBSCRIBER_ID",
        nargs="?",
        default="preview",
        type=_text("subscriber_id"),
    )
    pv.add_argument("--type", default="user", type=_SUBSCRIBER_TYPE, help=_TYPE_HELP)
    pv.add_argument("--data", help="subscriber data as a JSON object")
    pv.add_argument("--step", type=_text("step"), help="only this step")
    pv.add_argument(
        "--timeline",
        action="store_true",
        help="when each step would run and what it would send, from --start on",
    )
    pv.add_argument(
        "--start",
        type=_time_arg,
        help="with --timeline: when the enrollment starts, ISO 8601 with a UTC offset "
        "(default: now)",
    )
    rp = add("replay", cmd_replay, "send a failed execution again", [db])
    rp.add_argument("execution_id", metavar="EXECUTION_ID")
    rp.add_argument("--tenant", default=None, type=_tenant_arg, help="only within this tenant")

    ad = sub.add_parser("adapter", help="channel adapters: add, update, list, disable")
    ad_sub = ad.add_subparsers(dest="adapter_cmd", required=True, metavar="ACTION")
    aa = ad_sub.add_parser("add", parents=[output, tenant], help="add a channel adapter")
    aa.set_defaults(handler=cmd_adapter_add)
    aa.add_argument("name", metavar="NAME", type=_text("adapter", name=True))
    aa.add_argument("--channel", required=True, choices=sorted(CHANNELS))
    aa.add_argument(
        "--provider",
        required=True,
        type=_text("provider"),
        help=f"built in: {', '.join(registry.names())}; or an installed custom provider",
    )
    aa.add_argument("--default", action="store_true", help="the default for its channel/tenant")
    aa.add_argument("--config", help="adapter config as a JSON object")
    aa.add_argument(
        "--credentials-file",
        metavar="PATH|-",
        help="credentials as a JSON object, from a file or - for stdin",
    )
    au = ad_sub.add_parser(
        "update",
        parents=[output, tenant],
        help="change an adapter's config, credentials, default or enabled state",
    )
    au.set_defaults(handler=cmd_adapter_update)
    au.add_argument("name", metavar="NAME", type=_text("adapter", name=True))
    au.add_argument(
        "--config",
        help="config keys to change, as a JSON object (a key set to null is removed)",
    )
    au.add_argument(
        "--credentials-file",
        metavar="PATH|-",
        help="credentials to change, as a JSON object from a file or - for stdin "
        "(a key set to null is removed)",
    )
    default = au.add_mutually_exclusive_group()
    default.add_argument("--default", dest="default", action="store_true", default=None)
    default.add_argument("--no-default", dest="default", action="store_false")
    enabled = au.add_mutually_exclusive_group()
    enabled.add_argument("--enable", dest="enabled", action="store_true", default=None)
    enabled.add_argument("--disable", dest="enabled", action="store_false")
    al = ad_sub.add_parser("list", parents=[db, tenant], help="list adapters")
    al.set_defaults(handler=cmd_adapter_list)
    al.add_argument("--all-tenants", action="store_true")
    adis = ad_sub.add_parser("disable", parents=[db, tenant], help="disable an adapter")
    adis.set_defaults(handler=cmd_adapter_disable)
    adis.add_argument("name", metavar="NAME", type=_text("adapter", name=True))

    se = sub.add_parser("secret", help="secrets for hooks: set, generate, list, delete")
    se_sub = se.add_subparsers(dest="secret_cmd", required=True, metavar="ACTION")
    ss = se_sub.add_parser("set", parents=[db, tenant], help="store a secret (encrypted)")
    ss.set_defaults(handler=cmd_secret_set)
    ss.add_argument("name", metavar="NAME", type=_text("secret", name=True))
    ss.add_argument(
        "--from-file",
        metavar="PATH|-",
        default="-",
        help="read the value from a file, or - for stdin (default); never from the command line",
    )
    sg = se_sub.add_parser(
        "generate",
        parents=[db, tenant],
        help="create a Standard Webhooks signing secret (whsec_…) and print it once",
    )
    sg.set_defaults(handler=cmd_secret_generate)
    sg.add_argument("name", metavar="NAME", type=_text("secret", name=True))
    sl = se_sub.add_parser("list", parents=[db, tenant], help="list secret names")
    sl.set_defaults(handler=cmd_secret_list)
    sl.add_argument("--all-tenants", action="store_true")
    sd = se_sub.add_parser("delete", parents=[db, tenant], help="delete a secret")
    sd.set_defaults(handler=cmd_secret_delete)
    sd.add_argument("name", metavar="NAME", type=_text("secret", name=True))

    tk = sub.add_parser("token", help="HTTP API tokens: create, list, revoke")
    tk_sub = tk.add_subparsers(dest="token_cmd", required=True, metavar="ACTION")
    tc = tk_sub.add_parser(
        "create", parents=[db, tenant], help="create an API token and print it (only this once)"
    )
    tc.set_defaults(handler=cmd_token_create)
    tc.add_argument(
        "--name", default="api", type=_text("token"), help="what it is for (default api)"
    )
    tl = tk_sub.add_parser("list", parents=[db, tenant], help="list API tokens (never the tokens)")
    tl.set_defaults(handler=cmd_token_list)
    tl.add_argument("--all-tenants", action="store_true")
    tr = tk_sub.add_parser("revoke", parents=[db], help="revoke an API token")
    tr.set_defaults(handler=cmd_token_revoke)
    tr.add_argument("token_id", metavar="ID")

    hk = sub.add_parser("hook", help="hooks: test")
    hk_sub = hk.add_subparsers(dest="hook_cmd", required=True, metavar="ACTION")
    ht = hk_sub.add_parser(
        "test", parents=[db, tenant], help="run one hook of a sequence and print its result"
    )
    ht.set_defaults(handler=cmd_hook_test)
    ht.add_argument("sequence", metavar="SEQUENCE", type=_text("sequence"))
    ht.add_argument("hook", metavar="HOOK", type=_text("hook"))
    ht.add_argument("--data", help="subscriber data as a JSON object")
    ht.add_argument(
        "--subscriber",
        default="hook-test",
        type=_text("subscriber_id"),
        help="subscriber id (default hook-test)",
    )
    ht.add_argument("--type", default="user", type=_SUBSCRIBER_TYPE, help=_TYPE_HELP)

    add(
        "rotate-key",
        cmd_rotate_key,
        f"re-encrypt all adapter credentials and secrets under "
        f"{ENV_VAR} (the old key in DRIPD_ENCRYPTION_KEYS_RETIRED)",
        [db],
    )
    add("keygen", cmd_keygen, f"print a new {ENV_VAR}", [common])
    ctl = add("ctl", cmd_ctl, "talk to a running daemon over its control socket", [common])
    ctl.add_argument("--socket", help="control socket (default: control.socket)")
    ctl.add_argument(
        "--timeout", type=_seconds_arg, default=60.0, help="seconds to wait for an answer"
    )
    ctl.add_argument(
        "command", choices=["status", "pause", "resume", "drain", "replay", "resume-adapter"]
    )
    ctl.add_argument("args", nargs="*")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: exit 0 ok, 1 error, 2 bad configuration or input (the message names
    the argument, file or key). An error prints one or two lines, never a traceback
    unless `-v`: this is the CLI's top, so it turns any exception into such a line."""
    verbose = False
    try:
        parser = _parser()
        given = sys.argv[1:] if argv is None else argv
        _Parser.argv_secrets = {secret for arg in given for secret in dsn_secrets(arg)}
        args = parser.parse_args(argv)
        verbose = getattr(args, "verbose", False)
        _check_arguments(parser, args)
        env = dict(os.environ)
        if getattr(args, "check", False):  # `apply --check` needs no database: any DSN ignored
            env.pop("DRIPD_DSN", None)
        cfg = config_mod.load(args.config_path, env=env)
        logs.configure(cfg.log.level, cfg.log.format)
        result = asyncio.run(args.handler(args, cfg))
    except DripdError as exc:
        if verbose:
            traceback.print_exc()
        print(f"dripd: {_chain(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's top: one line, the traceback with -v
        if verbose:
            traceback.print_exc()
        hint = "" if verbose else " (run again with -v for the traceback)"
        print(f"dripd: internal error: {_one_line(exc)}{hint}", file=sys.stderr)
        return 1
    return int(result) if isinstance(result, int) else 0


def _one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    text = text if len(text) <= 200 else text[:199] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse does not check of every argument: text in UTF-8 (bytes that are not
    arrive as lone surrogates), and the DSN's form. ConfigError naming the argument."""
    names = _argument_names(parser)
    for dest, value in vars(args).items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str | Path) and inputs.text_fault(str(item)) is not None:
                raise ConfigError(
                    f"argument {names.get(dest, dest)}: not valid UTF-8 text (dripd reads "
                    "its arguments as UTF-8)"
                )
    dsn = getattr(args, "dsn", None)
    if dsn is not None and not getattr(args, "check", False):
        config_mod.check_dsn(dsn, where="--dsn")


def _argument_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """How the help names each argument (`--data`, `SUBSCRIBER_ID`), by its `dest`."""
    names: dict[str, str] = {}
    parsers = [parser]
    while parsers:
        for action in parsers.pop()._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
            elif action.option_strings:
                names.setdefault(action.dest, max(action.option_strings, key=len))
            else:
                names.setdefault(action.dest, str(action.metavar or action.dest))
    return names


def _chain(exc: BaseException) -> str:
    """The error and its causes, in one or two readable lines, without a DSN password the
    arguments hold (a file named like a DSN is echoed in its error)."""
    return Redactor(_Parser.argv_secrets)(_causes(exc))


def _causes(exc: BaseException) -> str:
    parts = [str(exc) or type(exc).__name__]
    cause = exc.__cause__
    while cause is not None and len(parts) < 3:
        text = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        if text not in parts[-1]:
            parts.append(text)
        cause = cause.__cause__
    return parts[0] + ("\n  caused by: " + "; ".join(parts[1:]) if len(parts) > 1 else "")


if __name__ == "__main__":
    sys.exit(main())
