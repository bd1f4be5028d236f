-- $1 tenant, $2 name, $3 now
UPDATE dripd.channel_adapters SET enabled = false, is_default = false, updated_at = $3
WHERE tenant_key IS NOT DISTINCT FROM $1 AND name = $2
RETURNING id, tenant_key, name, channel, provider, config, is_default, enabled, paused_reason, created_at
