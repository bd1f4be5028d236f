-- The token of a bearer credential, revoked or not. $1 token hash
SELECT id, tenant_key, name, created_at, revoked_at
FROM dripd.api_tokens
WHERE token_hash = $1
