-- $1 adapter id, $2 new credentials blob, $3 now
UPDATE dripd.channel_adapters SET credentials = $2, updated_at = $3 WHERE id = $1
