-- The execution a provider's event names by dripd's own id (echoed back in the provider's
-- metadata), if this adapter sent it. $1 adapter id, $2 execution id
SELECT id, tenant_key, enrollment_id, channel, recipient, provider_message_id
FROM dripd.step_executions
WHERE id = $2::uuid AND adapter_id = $1::uuid
