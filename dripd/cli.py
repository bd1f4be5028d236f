"""The `dripd` command line: thin wrappers over the daemon, the store and the Python API."""

from __future__ import annotations

import argparse
import asyncio
import base64
import math
import os
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from dripd import __version__, api, logs
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


def _json_arg(text: str | None, name: str) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{name}: not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: must be a JSON object")
    return value


async def _with_conn(
    args: argparse.Namespace, cfg: Config, body: Callable[[store.Connection], Awaitable[Any]]
) -> Any:
    conn = await store.connect(_dsn(args, cfg), timeout=cfg.connect_timeout.total_seconds())
    try:
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


async def cmd_apply(args: argparse.Namespace, cfg: Config) -> None:
    specs = [load_file(Path(p)) for p in args.files]  # all validated before anything is written
    for warning in (w for spec in specs for w in spec.warnings):
        print(f"dripd: warning: {warning}", file=sys.stderr)
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


# --- the Python API, wrapped -------------------------------------------------------------


async def cmd_enroll(args: argparse.Namespace, cfg: Config) -> None:
    data = _json_arg(args.data, "--data")
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
    data = _json_arg(args.data, "--data")
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

    data = _json_arg(args.data, "--data")
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
            body = [f"{k}: {r[k]}" for k in ("subject", "text", "html", "body", "error") if k in r]
            blocks.append("\n".join([head, *body]))
        return "\n\n".join(blocks)

    _print(args, steps, human)
    return 1 if any("error" in r for r in steps) else 0


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
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except OSError as exc:
        raise ConfigError(f"--credentials-file: cannot read {source}: {exc.strerror}") from exc
    try:
        value = msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        # Never echo the content: it is a secret.
        raise ConfigError("--credentials-file: not a JSON object") from exc
    if not isinstance(value, dict):
        raise ConfigError("--credentials-file: not a JSON object")
    return value


async def cmd_adapter_add(args: argparse.Namespace, cfg: Config) -> None:
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
    from dripd.conditions.netguard import NetPolicy
    from dripd.engine.hookset import HookSet

    data = _json_arg(args.data, "--data")

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
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except OSError as exc:
        raise ConfigError(f"--from-file: cannot read {source}: {exc.strerror}") from exc
    value = text.rstrip("\r\n")
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
        payload = {"name": rest[0], "tenant": rest[1] if len(rest) == 2 else None}
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
    return text


def _name_arg(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


_MAX_WAIT_SECONDS = 86400.0


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


def _parser() -> argparse.ArgumentParser:
    config_help = (
        "config file (default: $DRIPD_CONFIG, else /etc/dripd/dripd.toml, else built-in defaults)"
    )
    # `adapter add` owns `--config JSON` (a fixed point of the CLI), so its config file can
    # only be given before the command: `dripd --config PATH adapter add ...`.
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", help="print one JSON document")
    output.add_argument("-v", "--verbose", action="store_true", help="tracebacks on errors")
    output.add_argument("--dsn", help="Postgres DSN (default: $DRIPD_DSN, else database.dsn)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", dest="config_path", type=Path, default=argparse.SUPPRESS, help=config_help
    )
    common.add_argument("--json", action="store_true", help="print one JSON document")
    common.add_argument("-v", "--verbose", action="store_true", help="tracebacks on errors")
    db = argparse.ArgumentParser(add_help=False, parents=[common])
    db.add_argument("--dsn", help="Postgres DSN (default: $DRIPD_DSN, else database.dsn)")
    tenant = argparse.ArgumentParser(add_help=False)
    tenant.add_argument(
        "--tenant", default=None, type=_tenant_arg, help="tenant key (absent: global)"
    )

    p = argparse.ArgumentParser(prog="dripd", description="Drip and sequence messaging daemon.")
    p.add_argument("--version", action="version", version=f"dripd {__version__}")
    p.add_argument("--config", dest="config_path", type=Path, default=None, help=config_help)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def add(
        name: str, handler: Handler, help_: str, parents: Sequence[argparse.ArgumentParser]
    ) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, parents=list(parents), description=help_)
        sp.set_defaults(handler=handler)
        return sp

    add("run", cmd_run, "run the daemon until SIGTERM/SIGINT", [db])
    dev = add(
        "dev", cmd_dev, "a throwaway Postgres, the examples, outbox adapters and the daemon", [db]
    )
    dev.add_argument("--examples", type=Path, default=None, help="sequence files directory")
    dev.add_argument("--subscribers", type=int, default=3, help="demo subscribers to enroll")
    dev.add_argument(
        "--http",
        default=None,
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
    ap.add_argument("files", nargs="+", metavar="FILE")
    en = add("enroll", cmd_enroll, "enroll a subscriber in a sequence", [db, tenant])
    en.add_argument("sequence", metavar="SEQUENCE_KEY")
    en.add_argument("subscriber", metavar="SUBSCRIBER_ID")
    en.add_argument("--type", default="user", help="subscriber type (default user)")
    en.add_argument("--data", help="subscriber data as a JSON object")
    ev = add("event", cmd_event, "record an event of a subscriber", [db, tenant])
    ev.add_argument("subscriber", metavar="SUBSCRIBER_ID")
    ev.add_argument("key", metavar="EVENT_KEY")
    ev.add_argument("--type", default="user", help="subscriber type (default user)")
    ev.add_argument("--data", help="event data as a JSON object")
    ev.add_argument("--id", help="idempotency id: the same id twice records one event")
    su = add("suppress", cmd_suppress, "stop all sends to an address on a channel", [db, tenant])
    su.add_argument("channel", metavar="CHANNEL")
    su.add_argument("address", metavar="ADDRESS")
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
    pv.add_argument("sequence", metavar="SEQUENCE_KEY")
    pv.add_argument("subscriber", metavar="SUBSCRIBER_ID", nargs="?", default="preview")
    pv.add_argument("--type", default="user", help="subscriber type (default user)")
    pv.add_argument("--data", help="subscriber data as a JSON object")
    pv.add_argument("--step", help="only this step")
    rp = add("replay", cmd_replay, "send a failed execution again", [db])
    rp.add_argument("execution_id", metavar="EXECUTION_ID")
    rp.add_argument("--tenant", default=None, type=_tenant_arg, help="only within this tenant")

    ad = sub.add_parser("adapter", help="channel adapters: add, list, disable")
    ad_sub = ad.add_subparsers(dest="adapter_cmd", required=True, metavar="ACTION")
    aa = ad_sub.add_parser("add", parents=[output, tenant], help="add a channel adapter")
    aa.set_defaults(handler=cmd_adapter_add)
    aa.add_argument("name", metavar="NAME")
    aa.add_argument("--channel", required=True)
    aa.add_argument("--provider", required=True)
    aa.add_argument("--default", action="store_true", help="the default for its channel/tenant")
    aa.add_argument("--config", help="adapter config as a JSON object")
    aa.add_argument(
        "--credentials-file",
        metavar="PATH|-",
        help="credentials as a JSON object, from a file or - for stdin",
    )
    al = ad_sub.add_parser("list", parents=[db, tenant], help="list adapters")
    al.set_defaults(handler=cmd_adapter_list)
    al.add_argument("--all-tenants", action="store_true")
    adis = ad_sub.add_parser("disable", parents=[db, tenant], help="disable an adapter")
    adis.set_defaults(handler=cmd_adapter_disable)
    adis.add_argument("name", metavar="NAME")

    se = sub.add_parser("secret", help="secrets for hooks: set, generate, list, delete")
    se_sub = se.add_subparsers(dest="secret_cmd", required=True, metavar="ACTION")
    ss = se_sub.add_parser("set", parents=[db, tenant], help="store a secret (encrypted)")
    ss.set_defaults(handler=cmd_secret_set)
    ss.add_argument("name", metavar="NAME")
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
    sg.add_argument("name", metavar="NAME")
    sl = se_sub.add_parser("list", parents=[db, tenant], help="list secret names")
    sl.set_defaults(handler=cmd_secret_list)
    sl.add_argument("--all-tenants", action="store_true")
    sd = se_sub.add_parser("delete", parents=[db, tenant], help="delete a secret")
    sd.set_defaults(handler=cmd_secret_delete)
    sd.add_argument("name", metavar="NAME")

    tk = sub.add_parser("token", help="HTTP API tokens: create, list, revoke")
    tk_sub = tk.add_subparsers(dest="token_cmd", required=True, metavar="ACTION")
    tc = tk_sub.add_parser(
        "create", parents=[db, tenant], help="create an API token and print it (only this once)"
    )
    tc.set_defaults(handler=cmd_token_create)
    tc.add_argument("--name", default="api", type=_name_arg, help="what it is for (default api)")
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
    ht.add_argument("sequence", metavar="SEQUENCE")
    ht.add_argument("hook", metavar="HOOK")
    ht.add_argument("--data", help="subscriber data as a JSON object")
    ht.add_argument("--subscriber", default="hook-test", help="subscriber id (default hook-test)")
    ht.add_argument("--type", default="user", help="subscriber type (default user)")

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
    """Entry point: exit 0 ok, 1 error, 2 bad configuration or input."""
    parser = _parser()
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", False)
    try:
        cfg = config_mod.load(args.config_path)
        logs.configure(cfg.log.level, cfg.log.format)
        result = asyncio.run(args.handler(args, cfg))
    except DripdError as exc:
        if verbose:
            import traceback

            traceback.print_exc()
        print(f"dripd: {_chain(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return int(result) if isinstance(result, int) else 0


def _chain(exc: BaseException) -> str:
    """The error and its causes, in one or two readable lines."""
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
