-- An event releases the subscriber's waits for it, in the event's own transaction: the
-- waiting row becomes due now (or, while its enrollment is paused, due at once on resume)
-- and carries the event. A row already claimed (its timeout won the race) is left alone.
-- $1 tenant, $2 subscriber type, $3 subscriber id, $4 event key, $5 event id, $6 now
UPDATE dripd.step_executions AS e
SET event_id = $5,
    due_at = CASE WHEN e.held_due_at IS NULL THEN $6 ELSE e.due_at END,
    held_due_at = CASE WHEN e.held_due_at IS NULL THEN NULL ELSE $6 END
FROM dripd.enrollments AS en
WHERE en.tenant_key IS NOT DISTINCT FROM $1 AND en.subscriber_type = $2
  AND en.subscriber_id = $3 AND en.status IN ('active', 'paused')
  AND e.enrollment_id = en.id AND e.status = 'scheduled' AND e.waiting_for = $4
  AND e.event_id IS NULL
RETURNING e.id
