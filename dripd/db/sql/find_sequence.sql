-- The active version of a sequence and its first step, for a tenant: the tenant's own
-- sequence first, else the global one. $1 tenant, $2 sequence key
SELECT q.id AS sequence_id, q.tenant_key AS sequence_tenant, q.key AS sequence_key,
       v.id AS version_id, v.reenroll, v.timezone, s.id AS first_step_id,
       s.delay AS first_delay, s.at_time, s.cron, s.timezone AS step_timezone, s.wait_event,
       s.wait_timeout, v.hooks
FROM dripd.sequences AS q
LEFT JOIN dripd.sequence_versions AS v ON v.sequence_id = q.id AND v.state = 'active'
LEFT JOIN LATERAL (
    SELECT id, delay, at_time, cron, timezone, wait_event, wait_timeout
    FROM dripd.steps WHERE version_id = v.id ORDER BY position LIMIT 1
) AS s ON true
WHERE q.key = $2 AND (q.tenant_key = $1 OR q.tenant_key IS NULL)
ORDER BY q.tenant_key NULLS LAST
LIMIT 1
