-- One adapter with its sealed credentials, locked for `dripd adapter update`.
-- $1 tenant, $2 name
SELECT id, tenant_key, name, channel, provider, config, credentials, is_default, enabled
FROM dripd.channel_adapters
WHERE tenant_key IS NOT DISTINCT FROM $1 AND name = $2
FOR UPDATE
