-- $1 tenant, $2 enrollment, $3 step, $4 due at, $5 the event a wait step waits for, $6 now
INSERT INTO dripd.step_executions
    (tenant_key, enrollment_id, step_id, due_at, waiting_for, created_at)
VALUES ($1, $2, $3, $4, $5, $6)
RETURNING id
