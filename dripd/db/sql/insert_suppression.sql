-- $1 tenant, $2 channel, $3 normalized address, $4 reason, $5 source, $6 now
INSERT INTO dripd.suppressions (tenant_key, channel, address, reason, source, created_at)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (channel, address, tenant_key) DO UPDATE SET reason = dripd.suppressions.reason
RETURNING id, tenant_key, channel, address, reason, source, created_at, (xmax = 0) AS created
