-- Take a key for this request: the row (status 0 until `finish_idempotency`) belongs to the
-- caller's transaction, so a concurrent request with the same key waits here on the unique
-- index until that transaction ends. No row returned: the key was taken before. A public
-- route's keys have no token (NULL: one namespace, NULLS NOT DISTINCT).
-- $1 token id (NULL: a public route), $2 key, $3 method, $4 path, $5 request hash, $6 now
INSERT INTO dripd.idempotency_keys (token_id, key, method, path, request_hash, status, body, created_at)
VALUES ($1, $2, $3, $4, $5, 0, '', $6)
ON CONFLICT (token_id, key) DO NOTHING
RETURNING created_at
