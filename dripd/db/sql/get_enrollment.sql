-- One enrollment in a tenant scope, with its sequence key and its pending execution.
-- $1 tenant, $2 enrollment id
SELECT en.*, q.key AS sequence_key, v.version,
       p.id AS pending_execution_id, p.due_at AS pending_due_at, st.key AS pending_step_key
FROM dripd.enrollments AS en
JOIN dripd.sequences AS q ON q.id = en.sequence_id
JOIN dripd.sequence_versions AS v ON v.id = en.version_id
LEFT JOIN LATERAL (
    SELECT e.id, coalesce(e.held_due_at, e.due_at) AS due_at, e.step_id
    FROM dripd.step_executions AS e
    WHERE e.enrollment_id = en.id AND e.status IN ('scheduled', 'claimed') AND e.advance
) AS p ON true
LEFT JOIN dripd.steps AS st ON st.id = p.step_id
WHERE en.id = $2 AND en.tenant_key IS NOT DISTINCT FROM $1
