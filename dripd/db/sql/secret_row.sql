-- A secret's row id, for the tenant's own secret else the global one. $1 tenant, $2 name
SELECT id, tenant_key, value
FROM dripd.secrets
WHERE name = $2 AND (tenant_key = $1 OR tenant_key IS NULL)
ORDER BY tenant_key NULLS LAST
LIMIT 1
