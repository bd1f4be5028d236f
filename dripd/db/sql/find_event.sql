-- $1 tenant, $2 subscriber type, $3 subscriber id, $4 idempotency id
SELECT id FROM dripd.events
WHERE tenant_key IS NOT DISTINCT FROM $1 AND subscriber_type = $2 AND subscriber_id = $3
  AND idempotency_id = $4
