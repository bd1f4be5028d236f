-- Renew the leases of every row this daemon holds, in one statement: a row is renewed
-- only while it still carries the holder's claim token; the ids returned are the rows
-- still held, and any other the holder drops (never sends it again).
-- $1 ids, $2 claim tokens (pairwise), $3 lease until
UPDATE dripd.step_executions AS e
SET lease_until = $3
FROM unnest($1::uuid[], $2::uuid[]) AS h (id, token)
WHERE e.id = h.id AND e.claim_token = h.token
RETURNING e.id
