-- Every secret, locked for re-encryption (`dripd rotate-key`).
SELECT id, tenant_key, name, value
FROM dripd.secrets
ORDER BY tenant_key NULLS FIRST, name
FOR UPDATE
