-- When the mailbox's leads of the tenant since $3 were created, newest first; expired leads
-- count too. $1 tenant, $2 mailbox, $3 since
SELECT created_at
FROM dripd.leads
WHERE tenant_key IS NOT DISTINCT FROM $1 AND mailbox = $2 AND created_at > $3
ORDER BY created_at DESC
