-- Only one default adapter per tenant and channel: a new default replaces the old one.
-- $1 tenant, $2 channel
UPDATE dripd.channel_adapters SET is_default = false
WHERE tenant_key IS NOT DISTINCT FROM $1 AND channel = $2 AND is_default
