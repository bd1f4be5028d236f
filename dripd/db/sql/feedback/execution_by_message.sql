-- The execution a provider's event names by the message id the provider gave at the send
-- (the newest, should a provider reuse one). $1 adapter id, $2 provider message id
SELECT id, tenant_key, enrollment_id, channel, recipient, provider_message_id
FROM dripd.step_executions
WHERE adapter_id = $1::uuid AND provider_message_id = $2::text
ORDER BY created_at DESC
LIMIT 1
