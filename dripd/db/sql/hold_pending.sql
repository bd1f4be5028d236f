-- Pause: hold the pending row (due 'infinity'), keeping its due time for resume. $1 enrollment
UPDATE dripd.step_executions
SET held_due_at = due_at, due_at = 'infinity'
WHERE enrollment_id = $1 AND status = 'scheduled' AND held_due_at IS NULL
