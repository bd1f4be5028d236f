-- End an enrollment's pending (unclaimed) work with a reason, and say so in message_events.
-- $1 enrollment, $2 reason, $3 now
WITH skipped AS (
    UPDATE dripd.step_executions
    SET status = 'skipped', reason = $2, finished_at = $3, held_due_at = NULL
    WHERE enrollment_id = $1 AND status = 'scheduled'
    RETURNING id, tenant_key, enrollment_id
)
INSERT INTO dripd.message_events (tenant_key, execution_id, enrollment_id, type, reason, occurred_at)
SELECT tenant_key, id, enrollment_id, 'skipped', $2, $3 FROM skipped
