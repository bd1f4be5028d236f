-- A pending lead is confirmed: it is active, in the lead sequence.
-- $1 lead id, $2 now, $3 its enrollment in the lead sequence
UPDATE dripd.leads
SET status = 'active', confirmed_at = $2, enrollment_id = $3
WHERE id = $1 AND status = 'pending'
RETURNING *
