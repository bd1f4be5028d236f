"""`dripd dev`: a throwaway Postgres, the example sequences, outbox adapters and the real daemon."""

from __future__ import annotations

import argparse
import importlib.resources
import os
import shutil
import socket
import sys
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import msgspec

from dripd import api, logs
from dripd.config import Config
from dripd.db import migrate, store
from dripd.db.cluster import ThrowawayCluster, find_binaries
from dripd.engine.daemon import Daemon
from dripd.errors import ConfigError, DripdError
from dripd.sequences import load_file

_DEMO = [
    {"first_name": "Ada", "plan": "pro"},
    {"first_name": "Grace", "plan": "free"},
    {"first_name": "Linus"},
]


def examples_dir() -> Path:
    packaged = importlib.resources.files("dripd") / "_examples"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[1] / "examples"


async def run_dev(args: argparse.Namespace, cfg: Config) -> None:
    """Set everything up, run the daemon, print each message as it is sent, clean up on Ctrl-C."""
    workdir = Path(tempfile.mkdtemp(prefix="dripd-dev-"))
    cluster: ThrowawayCluster | None = None
    dsn = args.dsn or os.environ.get("DRIPD_DSN") or ""
    logs.configure(cfg.log.level, "console")
    try:
        if not dsn:
            binaries = await anyio.to_thread.run_sync(find_binaries)
            described = await anyio.to_thread.run_sync(binaries.describe)
            _say(f"starting a throwaway Postgres cluster: {described}…")
            cluster = ThrowawayCluster(binaries=binaries)
            dsn = await cluster.start()
            _say(
                f"Postgres ready at {dsn} (data in {cluster.dir}"
                + (f", running as {cluster.run_as})" if cluster.run_as else ")")
            )
        outbox = workdir / "outbox.jsonl"
        outbox.touch()
        sequences = await _prepare(dsn, args, outbox)
        cfg.database.dsn = dsn
        cfg.control.socket = str(workdir / "control.sock")
        cfg.http.listen = args.http or _dev_listen(8025)
        if cfg.http.admin_listen:  # "": the configuration wants no admin listener
            cfg.http.admin_listen = _dev_listen(8026, besides=cfg.http.listen)
        cfg.worker.poll_interval = "5s"
        if "leads" in sequences:
            cfg.leads.enabled, cfg.leads.sequence = True, "leads"
        daemon = Daemon(cfg)
        admin = f"http://{cfg.http.admin_listen}/metrics" if cfg.http.admin_listen else "none"
        _say(
            f"control socket {cfg.control.socket}; public http://{cfg.http.listen}/; "
            f"admin {admin}; outbox {outbox}"
        )
        if cfg.leads.enabled:
            _say(f"lead form: http://{cfg.http.listen}/leads/new")
        _say("sending (Ctrl-C stops and removes everything)…")
        failed: DripdError | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(_tail, outbox)
            try:
                await daemon.run()
            except DripdError as exc:
                failed = exc  # raised below, outside the task group, so not in a group
            finally:
                tg.cancel_scope.cancel()  # the tail ends with the daemon
        if failed is not None:
            raise failed
    finally:
        if cluster is not None:
            _say("stopping the throwaway cluster")
            await cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def _prepare(dsn: str, args: argparse.Namespace, outbox: Path) -> set[str]:
    """Migrate, apply the examples, add outbox adapters, enroll the demo subscribers;
    returns the keys of the sequences applied."""
    folder = args.examples or examples_dir()
    files = sorted(folder.glob("*.toml"))
    if not files:
        raise ConfigError(f"--examples: no *.toml sequence files in {folder}")
    specs = [load_file(f) for f in files]
    conn = await store.connect(dsn)
    now = datetime.now(UTC)
    try:
        for name in await migrate.migrate(conn, allow_newer_server=True):
            _say(f"applied migration {name}")
        async with store.transaction(conn) as tx:
            for spec in specs:
                for warning in spec.warnings:
                    _say(f"warning: {warning}")
                applied = await store.apply_version(tx, spec, now=now)
                _say(f"sequence {applied.key} v{applied.version}")
            existing = {r.name for r in await store.list_adapters(tx, None, all_tenants=True)}
            for channel in ("email", "sms", "whatsapp", "chat", "webhook"):
                name = f"dev-{channel}"
                if name in existing:
                    continue
                await store.insert_adapter(
                    tx,
                    adapter_id=uuid.uuid4(),
                    tenant=None,
                    name=name,
                    channel=channel,
                    provider="outbox",
                    config={"path": str(outbox), "from": "dev@dripd.local"},
                    credentials=None,
                    is_default=True,
                    now=now,
                )
        for n in range(args.subscribers):
            data: dict[str, Any] = dict(_DEMO[n % len(_DEMO)])
            data["email"] = f"demo{n + 1}@example.com"
            data["phone"] = f"+1555010{n + 1:04d}"[:12]
            for spec in specs:
                enrollment = await api.enroll(
                    conn,
                    tenant=spec.tenant_key,
                    sequence_key=spec.key,
                    subscriber_id=f"demo-{n + 1}",
                    data=data,
                )
                _say(f"enrolled demo-{n + 1} in {spec.key} ({enrollment.id})")
    finally:
        await conn.close()
    return {spec.key for spec in specs}


async def _tail(path: Path) -> None:
    with path.open("rb") as handle:
        while True:
            line = handle.readline()
            if not line:
                await anyio.sleep(0.2)
                continue
            try:
                msg = msgspec.json.decode(line)
            except msgspec.DecodeError:
                continue
            what = msg.get("subject") or msg.get("body") or ""
            sys.stdout.write(f"→ {msg.get('channel')} to {msg.get('to')}: {what}\n")
            sys.stdout.flush()


def _dev_listen(port: int, *, besides: str = "") -> str:
    """127.0.0.1:`port` when it is free (and not `besides`), else any free port: the demo
    must start anyway."""
    with socket.socket() as probe:
        try:
            if f"127.0.0.1:{port}" == besides:
                raise OSError("taken by the other listener")
            probe.bind(("127.0.0.1", port))
        except OSError:
            probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def _say(text: str) -> None:
    sys.stderr.write(f"dripd dev: {text}\n")
    sys.stderr.flush()
