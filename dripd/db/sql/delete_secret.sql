-- $1 tenant, $2 name
DELETE FROM dripd.secrets WHERE tenant_key IS NOT DISTINCT FROM $1 AND name = $2 RETURNING id
