-- Lift a threshold pause (idempotent). $1 tenant, $2 adapter name, $3 now
WITH target AS (
    SELECT id, paused_reason FROM dripd.channel_adapters
    WHERE tenant_key IS NOT DISTINCT FROM $1 AND name = $2
    FOR UPDATE
)
UPDATE dripd.channel_adapters AS a
SET paused_at = NULL, paused_reason = NULL,
    updated_at = CASE WHEN t.paused_reason IS NULL THEN a.updated_at ELSE $3 END
FROM target AS t
WHERE a.id = t.id
RETURNING a.id, a.name, a.tenant_key, t.paused_reason AS was_paused
