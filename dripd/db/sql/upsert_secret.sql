-- Create or replace a named secret. $1 id (for a new row), $2 tenant, $3 name, $4 blob, $5 now
INSERT INTO dripd.secrets (id, tenant_key, name, value, created_at, updated_at)
VALUES ($1, $2, $3, $4, $5, $5)
ON CONFLICT (tenant_key, name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at
RETURNING (xmax = 0) AS created
