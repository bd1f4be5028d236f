-- Names only; values never leave the database unencrypted. $1 tenant, $2 every tenant
SELECT tenant_key, name, created_at, updated_at
FROM dripd.secrets
WHERE $2 OR tenant_key IS NOT DISTINCT FROM $1
ORDER BY tenant_key NULLS FIRST, name
