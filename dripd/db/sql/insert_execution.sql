-- $1 tenant, $2 enrollment, $3 step, $4 due at
INSERT INTO dripd.step_executions (tenant_key, enrollment_id, step_id, due_at)
VALUES ($1, $2, $3, $4)
RETURNING id
