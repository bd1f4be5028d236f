-- $1 tenant, $2 enrollment, $3 step, $4 due at, $5 the event a wait step waits for, $6 now
INSERT INTO dripd.step_executions
    (tenant_key, enrollment_id, step_id, due_at, waiting_for, created_at, lane)
SELECT $1, $2, s.id, $4, $5, $6, dripd.lane_of($1, s.channel, s.adapter)
FROM dripd.steps AS s
WHERE s.id = $3
RETURNING id
