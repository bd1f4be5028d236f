-- Every pending lead past its expiry expires (housekeeping). $1 now
UPDATE dripd.leads
SET status = 'expired'
WHERE status = 'pending' AND confirm_expires_at <= $1
RETURNING id, tenant_key, confirm_enrollment_id
