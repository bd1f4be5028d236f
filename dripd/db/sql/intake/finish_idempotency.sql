-- $1 token id, $2 key, $3 status, $4 body
UPDATE dripd.idempotency_keys
SET status = $3, body = $4
WHERE token_id = $1 AND key = $2
