"""The throwaway cluster runs a real server as an unprivileged user and leaves nothing behind."""

from __future__ import annotations

import asyncpg
import pytest

from dripd.db.cluster import ThrowawayCluster

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
