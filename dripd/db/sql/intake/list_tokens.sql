-- Never the hash. $1 tenant, $2 every tenant
SELECT id, tenant_key, name, created_at, revoked_at
FROM dripd.api_tokens
WHERE $2 OR tenant_key IS NOT DISTINCT FROM $1
ORDER BY tenant_key NULLS FIRST, created_at, id
