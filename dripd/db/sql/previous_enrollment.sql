-- The status of a subscriber's newest earlier enrollment in a sequence (for the reenroll
-- policy). $1 tenant, $2 sequence, $3 type, $4 id, $5 the enrollment just created
SELECT status
FROM dripd.enrollments
WHERE tenant_key IS NOT DISTINCT FROM $1 AND sequence_id = $2
  AND subscriber_type = $3 AND subscriber_id = $4 AND id <> $5
ORDER BY created_at DESC
LIMIT 1
