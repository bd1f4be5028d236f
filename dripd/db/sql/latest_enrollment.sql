-- The newest enrollment of a subscriber in a sequence. $1 tenant, $2 sequence, $3 type, $4 id
SELECT id
FROM dripd.enrollments
WHERE tenant_key IS NOT DISTINCT FROM $1 AND sequence_id = $2
  AND subscriber_type = $3 AND subscriber_id = $4
ORDER BY (status IN ('active', 'paused')) DESC, created_at DESC
LIMIT 1
