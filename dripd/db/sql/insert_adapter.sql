-- $1 id, $2 tenant, $3 name, $4 channel, $5 provider, $6 config, $7 credentials, $8 default, $9 now
INSERT INTO dripd.channel_adapters
    (id, tenant_key, name, channel, provider, config, credentials, is_default, created_at, updated_at)
VALUES ($1, $2, $3, $4, $5, $6::text::jsonb, $7, $8, $9, $9)
RETURNING id, tenant_key, name, channel, provider, config, is_default, enabled, paused_reason, created_at
