-- Create the sequence if new and lock it, so concurrent applies of one key serialize.
-- $1 tenant, $2 key
WITH ins AS (
    INSERT INTO dripd.sequences (tenant_key, key) VALUES ($1, $2)
    ON CONFLICT (tenant_key, key) DO NOTHING
    RETURNING id
)
SELECT id FROM ins
UNION ALL
SELECT id FROM dripd.sequences WHERE tenant_key IS NOT DISTINCT FROM $1 AND key = $2
LIMIT 1
