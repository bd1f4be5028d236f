-- The rows an adapter's pause deferred fall due now that it is resumed (they waited for
-- it, not for their time). $1 adapter id, $2 now
UPDATE dripd.step_executions
SET due_at = $2
WHERE adapter_id = $1 AND status = 'scheduled' AND reason = 'adapter_paused' AND due_at > $2
