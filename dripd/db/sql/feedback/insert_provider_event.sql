-- A message event from a provider's feedback.
-- $1 tenant, $2 execution id, $3 enrollment id, $4 type, $5 channel, $6 provider,
-- $7 adapter id, $8 recipient, $9 reason, $10 provider message id, $11 data (JSON text),
-- $12 occurred at, $13 provider event id
INSERT INTO dripd.message_events
    (tenant_key, execution_id, enrollment_id, type, channel, provider, adapter_id, recipient,
     reason, provider_message_id, data, occurred_at, provider_event_id)
VALUES ($1::text, $2::uuid, $3::uuid, $4::text, $5::text, $6::text, $7::uuid, $8::text,
        $9::text, $10::text, $11::text::jsonb, $12::timestamptz, $13::text)
RETURNING id
