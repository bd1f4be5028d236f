-- Every adapter with credentials, locked for re-encryption (`dripd rotate-key`).
SELECT id, tenant_key, name, credentials
FROM dripd.channel_adapters
WHERE credentials IS NOT NULL
ORDER BY tenant_key NULLS FIRST, name
FOR UPDATE
