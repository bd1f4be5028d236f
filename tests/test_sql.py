"""Every SQL statement prepares against the migrated schema, and the claim is an index scan."""

from __future__ import annotations

import uuid
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
from support import running_daemon, wait_for

from dripd.db import store


async def test_every_statement_prepares(conn: asyncpg.Connection) -> None:
    names = [f.name for f in fields(store.Queries)]
    assert len(names) == len(list(store._SQL_DIR.glob("*.sql")))
    # Every statement file, the store modules' subfolders included.
    for path in sorted(store._SQL_DIR.rglob("*.sql")):
        try:
            await conn.prepare(path.read_text())
        except asyncpg.PostgresError as exc:  # pragma: no cover - the failure message is the point
            where = path.relative_to(store._SQL_DIR)
            raise AssertionError(f"{where} does not prepare: {exc}") from exc


# 100 k executions: 90 % finished (sent), 10 % pending, due times spread over two days.
_SEED = """
WITH q AS (INSERT INTO dripd.sequences (key) VALUES ('s') RETURNING id),
v AS (INSERT INTO dripd.sequence_versions (sequence_id, version, content_hash, source)
      SELECT id, 1, 'h', '{}' FROM q RETURNING id, sequence_id),
st AS (INSERT INTO dripd.steps (version_id, key, position, channel)
       SELECT id, 'a', 0, 'email' FROM v RETURNING id),
en AS (INSERT INTO dripd.enrollments (sequence_id, version_id, subscriber_id)
       SELECT v.sequence_id, v.id, 'u' || n FROM v, generate_series(1, $1) AS n
       RETURNING id, subscriber_id)
INSERT INTO dripd.step_executions (enrollment_id, step_id, due_at, status, finished_at)
SELECT en.id, st.id, now() - interval '1 day' + random() * interval '2 days',
       CASE WHEN done THEN 'sent' ELSE 'scheduled' END,
       CASE WHEN done THEN now() END
FROM en, st, LATERAL (SELECT random() < 0.9 AS done WHERE en.id IS NOT NULL) AS r
"""


async def _claim_plan(conn: asyncpg.Connection) -> str:
    now = datetime.now(UTC)
    lane = await conn.fetchval("SELECT lane FROM dripd.step_executions LIMIT 1")
    rows = await conn.fetch(
        "EXPLAIN " + store.Q.claim, [lane], [500], now, uuid.uuid4(), now, "test"
    )
    return "\n".join(r[0] for r in rows)


async def _lanes_plan(conn: asyncpg.Connection) -> str:
    rows = await conn.fetch("EXPLAIN " + store.Q.lanes)
    return "\n".join(r[0] for r in rows)


async def test_claim_uses_its_index_on_100k_rows(conn: asyncpg.Connection) -> None:
    await conn.execute(_SEED, 100_000)
    await conn.execute("ANALYZE dripd.step_executions")
    for plan in (await _claim_plan(conn), await _lanes_plan(conn)):
        assert "step_executions_lane_idx" in plan, plan
        assert "Seq Scan on step_executions" not in plan, plan


async def test_claim_uses_its_index_before_any_analyze(conn: asyncpg.Connection) -> None:
    # Autovacuum may be off (it is on the bench server): the claim must not depend on stats.
    await conn.execute("ALTER TABLE dripd.step_executions SET (autovacuum_enabled = false)")
    await conn.execute(_SEED, 100_000)
    for plan in (await _claim_plan(conn), await _lanes_plan(conn)):
        assert "step_executions_lane_idx" in plan, plan
        assert "Seq Scan on step_executions" not in plan, plan


async def test_the_daemon_analyzes_a_never_analyzed_queue_and_the_claim_reads_in_order(
    dsn: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    # A backlog: 100 k pending rows, half of them due, never analyzed. The claim's pick per
    # lane reads the lane's index in order with or without statistics (the claim before
    # lanes sorted every due row until the queue was analyzed); the daemon still analyzes.
    await conn.execute("ALTER TABLE dripd.step_executions SET (autovacuum_enabled = false)")
    await conn.execute(_SEED.replace("random() < 0.9", "false"), 100_000)
    await conn.execute("SELECT pg_stat_force_next_flush()")
    plan = await _claim_plan(conn)
    assert "Index Scan using step_executions_lane_idx" in plan, plan
    assert "Sort" not in plan, plan
    # Paused: the test only wants its housekeeping, not its sends.
    async with running_daemon(dsn, tmp_path) as daemon:
        daemon.worker.pause()  # type: ignore[union-attr]
        await wait_for(lambda: _analyzed(conn))
    plan = await _claim_plan(conn)
    assert "Index Scan using step_executions_lane_idx" in plan, plan
    assert "Sort" not in plan, plan


async def _analyzed(conn: asyncpg.Connection) -> bool:
    at = await conn.fetchval(
        "SELECT last_analyze FROM pg_stat_user_tables "
        "WHERE relid = 'dripd.step_executions'::regclass"
    )
    return at is not None
