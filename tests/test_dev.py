"""`dripd dev`, the README's first command: it sends the example messages and stops cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import httpx
import pytest
from support import free_port, running_daemon

from dripd.errors import SchemaError


async def _dev(
    tmp_path: Path, *extra: str, probe: Callable[[], Awaitable[None]] | None = None
) -> tuple[int, str, str]:
    """Run `dripd dev` until both demo welcomes are out (then `probe`, if any), then ^C."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRIPD_")}
    env["DRIPD_CONFIG"] = str(tmp_path / "none.toml")
    (tmp_path / "none.toml").write_text("")
    proc = await asyncio.create_subprocess_exec(
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
    assert "Welcome, Ada" in out
    conn = await asyncpg.connect(server_dsn)
    try:
        # Two demo subscribers in each example sequence (welcome, leads).
        assert await conn.fetchval("SELECT count(*) FROM dripd.enrollments") == 4
    finally:
        await conn.close()


async def test_the_daemon_refuses_an_out_of_date_schema(server_dsn: str, tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match=r"migration 0001_init\.sql is not applied"):
        async with running_daemon(server_dsn, tmp_path):
            pass
