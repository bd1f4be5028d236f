-- $1 adapter id, $2 reason, $3 now
UPDATE dripd.channel_adapters SET paused_at = $3, paused_reason = $2, updated_at = $3
WHERE id = $1 AND paused_at IS NULL
RETURNING id
