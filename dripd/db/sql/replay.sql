-- Re-send a failed execution: a new replay window (so a new idempotency key and Message-ID),
-- attempts reset, due at once. It advances the flow only if its failure ended the enrollment,
-- which this statement reactivates. $1 tenant (NULL with $3 = true: any), $2 id, $3 any tenant, $4 now
WITH target AS (
    SELECT e.id, e.enrollment_id, e.created_at, en.status AS enrollment_status
    FROM dripd.step_executions AS e
    JOIN dripd.enrollments AS en ON en.id = e.enrollment_id
    WHERE e.id = $2 AND e.status = 'failed' AND ($3 OR e.tenant_key IS NOT DISTINCT FROM $1)
    FOR UPDATE OF e, en
), revived AS (
    UPDATE dripd.enrollments AS en
    SET status = 'active', status_reason = NULL, ended_at = NULL, updated_at = $4
    FROM target AS t
    WHERE en.id = t.enrollment_id AND t.enrollment_status = 'failed'
      AND NOT EXISTS (SELECT 1 FROM dripd.step_executions AS x
                      WHERE x.enrollment_id = t.enrollment_id AND x.created_at > t.created_at)
    RETURNING en.id
)
UPDATE dripd.step_executions AS e
SET status = 'scheduled', replay = e.replay + 1, attempt = 0, due_at = $4,
    finished_at = NULL, reason = 'replay',
    advance = EXISTS (SELECT 1 FROM revived)
FROM target AS t
WHERE e.id = t.id
RETURNING e.id, e.replay, e.advance, e.enrollment_id
