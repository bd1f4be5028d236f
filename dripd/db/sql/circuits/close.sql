-- Close the circuit of adapter $1: daemon $2's probe went through. Only the holder of the
-- probe closes it (a daemon whose lease ran out and was taken over changes nothing). The
-- backoff starts over at the next opening.
UPDATE dripd.channel_adapters
SET circuit_state = 'closed',
    circuit_opened_at = NULL,
    circuit_retry_at = NULL,
    circuit_open_for = NULL,
    circuit_reason = NULL,
    circuit_probe_by = NULL,
    circuit_probe_until = NULL
WHERE id = $1 AND circuit_state = 'half_open' AND circuit_probe_by = $2
RETURNING id, tenant_key, name, circuit_state, circuit_opened_at, circuit_retry_at,
          circuit_open_for, circuit_reason, circuit_probe_by, circuit_probe_until
