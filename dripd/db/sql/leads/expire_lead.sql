-- $1 lead id
UPDATE dripd.leads
SET status = 'expired'
WHERE id = $1 AND status = 'pending'
RETURNING *
