-- Every enabled adapter; the daemon decrypts their credentials once and caches them.
SELECT id, tenant_key, name, channel, provider, config, credentials, is_default, paused_reason
FROM dripd.channel_adapters
WHERE enabled
