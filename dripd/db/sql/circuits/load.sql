-- The circuits that are not closed, of enabled adapters: every daemon's breaker holds these in
-- memory (an adapter missing here is closed). Reloaded on NOTIFY dripd_adapters and every poll.
SELECT id, tenant_key, name, circuit_state, circuit_opened_at, circuit_retry_at,
       circuit_open_for, circuit_reason, circuit_probe_by, circuit_probe_until
FROM dripd.channel_adapters
WHERE circuit_state <> 'closed' AND enabled
