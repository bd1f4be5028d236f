-- Which (tenant, channel, address) triples are suppressed; tenant and global lists both apply.
-- $1 tenants (NULL = global), $2 channels, $3 normalized addresses
SELECT i.n
FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS i(tenant_key, channel, address, n)
WHERE EXISTS (
    SELECT 1 FROM dripd.suppressions AS s
    WHERE s.channel = i.channel AND s.address = i.address
      AND (s.tenant_key IS NULL OR s.tenant_key = i.tenant_key)
)
