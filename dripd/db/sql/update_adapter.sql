-- $1 id, $2 config, $3 credentials, $4 default, $5 enabled, $6 now
UPDATE dripd.channel_adapters
SET config = $2::text::jsonb, credentials = $3, is_default = $4, enabled = $5, updated_at = $6
WHERE id = $1
RETURNING id, tenant_key, name, channel, provider, config, is_default, enabled, paused_reason, created_at
