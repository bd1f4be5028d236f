-- Give claimed rows back untouched (shutdown): due again at once, no attempt spent.
-- $1 ids, $2 claim token
UPDATE dripd.step_executions
SET status = 'scheduled', claim_token = NULL, lease_until = NULL, claimed_by = NULL
WHERE id = ANY($1::uuid[]) AND claim_token = $2 AND status = 'claimed'
