-- Resume: the held row is due at its original time (at once if that has passed). $1 enrollment
UPDATE dripd.step_executions
SET due_at = held_due_at, held_due_at = NULL
WHERE enrollment_id = $1 AND status = 'scheduled' AND held_due_at IS NOT NULL
RETURNING due_at
