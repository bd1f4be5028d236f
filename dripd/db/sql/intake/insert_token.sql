-- Only the SHA-256 of the token is stored. $1 tenant, $2 name, $3 token hash, $4 now
INSERT INTO dripd.api_tokens (tenant_key, name, token_hash, created_at)
VALUES ($1, $2, $3, $4)
RETURNING id, tenant_key, name, created_at, revoked_at
