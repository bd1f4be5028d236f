-- $1 execution id
SELECT id, status, tenant_key FROM dripd.step_executions WHERE id = $1
