-- The stored first response to a key. $1 token id, $2 key
SELECT method, path, request_hash, status, body, created_at
FROM dripd.idempotency_keys
WHERE token_id = $1 AND key = $2
