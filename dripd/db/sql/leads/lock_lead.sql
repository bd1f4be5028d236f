-- A lead of the tenant, locked until the caller's transaction ends. $1 lead id, $2 tenant
SELECT *
FROM dripd.leads
WHERE id = $1 AND tenant_key IS NOT DISTINCT FROM $2
FOR UPDATE
