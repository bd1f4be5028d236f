-- $1 token id (NULL: a public route), $2 key, $3 status, $4 body, $5 header fields (JSON)
UPDATE dripd.idempotency_keys
SET status = $3, body = $4, headers = $5::text::jsonb
WHERE token_id IS NOT DISTINCT FROM $1 AND key = $2
