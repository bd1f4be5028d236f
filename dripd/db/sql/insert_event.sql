-- $1 tenant, $2 subscriber type, $3 subscriber id, $4 key, $5 data, $6 idempotency id, $7 now
INSERT INTO dripd.events (tenant_key, subscriber_type, subscriber_id, key, data, idempotency_id, occurred_at)
VALUES ($1, $2, $3, $4, $5::text::jsonb, $6, $7)
ON CONFLICT (tenant_key, subscriber_type, subscriber_id, idempotency_id)
    WHERE idempotency_id IS NOT NULL
    DO NOTHING
RETURNING id
