-- The stored first response to a key. $1 token id (NULL: a public route), $2 key
SELECT method, path, request_hash, status, body, headers::text AS headers, created_at
FROM dripd.idempotency_keys
WHERE token_id IS NOT DISTINCT FROM $1 AND key = $2
