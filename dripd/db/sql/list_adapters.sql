-- Adapters in a tenant scope (global ones included); never the credentials. $1 tenant, $2 all tenants
SELECT id, tenant_key, name, channel, provider, config, is_default, enabled, paused_reason, created_at
FROM dripd.channel_adapters
WHERE $2 OR tenant_key IS NOT DISTINCT FROM $1 OR tenant_key IS NULL
ORDER BY tenant_key NULLS FIRST, channel, name
