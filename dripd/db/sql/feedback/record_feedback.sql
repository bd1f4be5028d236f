-- A feedback event (a bounce, an unsubscribe, …) on the message an execution sent, copying
-- what the execution knows of it; nothing when the execution is not in the tenant scope,
-- or, with $6, when the execution already has an event of this type.
-- $1 tenant, $2 execution id, $3 type, $4 reason, $5 now, $6 once
INSERT INTO dripd.message_events
    (tenant_key, execution_id, enrollment_id, type, channel, provider, adapter_id, recipient,
     reason, provider_message_id, occurred_at)
SELECT x.tenant_key, x.id, x.enrollment_id, $3::text, x.channel, x.provider, x.adapter_id,
       x.recipient, $4::text, x.provider_message_id, $5::timestamptz
FROM dripd.step_executions AS x
WHERE x.id = $2::uuid
  AND x.tenant_key IS NOT DISTINCT FROM $1::text
  AND NOT ($6::boolean AND EXISTS (
      SELECT 1 FROM dripd.message_events AS m WHERE m.execution_id = x.id AND m.type = $3::text
  ))
RETURNING id AS event_id, channel, recipient
