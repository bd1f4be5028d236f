-- $1 tenant, $2 sequence, $3 version, $4 subscriber type, $5 subscriber id, $6 data (json text),
-- $7 timezone, $8 now
INSERT INTO dripd.enrollments
    (tenant_key, sequence_id, version_id, subscriber_type, subscriber_id, data, timezone,
     created_at, updated_at)
VALUES ($1, $2, $3, $4, $5, $6::text::jsonb, $7, $8, $8)
ON CONFLICT (tenant_key, sequence_id, subscriber_type, subscriber_id)
    WHERE status IN ('active', 'paused')
    DO NOTHING
RETURNING id
