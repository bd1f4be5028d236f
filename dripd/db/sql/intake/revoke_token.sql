-- Revoking twice keeps the first revocation's time. $1 token id, $2 now
UPDATE dripd.api_tokens
SET revoked_at = coalesce(revoked_at, $2)
WHERE id = $1
RETURNING id, tenant_key, name, created_at, revoked_at
