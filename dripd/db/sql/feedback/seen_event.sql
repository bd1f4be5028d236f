-- Remember a provider event; nothing (no row) when it was recorded before: a redelivery.
-- $1 adapter id, $2 the provider's event id, $3 now
INSERT INTO dripd.provider_events (adapter_id, event_id, received_at)
VALUES ($1::uuid, $2::text, $3::timestamptz)
ON CONFLICT DO NOTHING
RETURNING 1
