-- Pending leads of the tenant past their expiry that hold this mailbox, email or phone
-- expire, and so free them for a new lead. $1 tenant, $2 mailbox, $3 email, $4 phone, $5 now
UPDATE dripd.leads
SET status = 'expired'
WHERE tenant_key IS NOT DISTINCT FROM $1
  AND status = 'pending'
  AND confirm_expires_at <= $5
  AND (mailbox = $2 OR email = $3 OR phone = $4)
RETURNING id, tenant_key, confirm_enrollment_id
