-- Move an enrollment between states, only from the states allowed. Returns its id.
-- $1 tenant, $2 id, $3 new status, $4 allowed from, $5 reason, $6 now
UPDATE dripd.enrollments
SET status = $3::text, status_reason = $5::text, updated_at = $6::timestamptz,
    ended_at = CASE WHEN $3::text IN ('active', 'paused') THEN NULL ELSE $6::timestamptz END
WHERE id = $2 AND tenant_key IS NOT DISTINCT FROM $1 AND status = ANY($4::text[])
RETURNING id
