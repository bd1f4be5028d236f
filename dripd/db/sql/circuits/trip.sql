-- Open the circuit of adapter $1 ($2 now) until $3, for $4 (the backoff), because of $5: a
-- closed circuit (opened now), or a half-open one whose probe daemon $6 holds (the probe
-- failed: it stays opened since then, and the caller doubled the backoff). No row when
-- another daemon opened it first or took the probe over: the caller reloads instead.
-- SET reads the row as it was, so the CASE sees the state before this update.
UPDATE dripd.channel_adapters
SET circuit_state = 'open',
    circuit_opened_at = CASE WHEN circuit_state = 'closed' THEN $2 ELSE circuit_opened_at END,
    circuit_retry_at = $3,
    circuit_open_for = $4,
    circuit_reason = $5,
    circuit_probe_by = NULL,
    circuit_probe_until = NULL
WHERE id = $1
  AND enabled
  AND (circuit_state = 'closed' OR (circuit_state = 'half_open' AND circuit_probe_by = $6))
RETURNING id, tenant_key, name, circuit_state, circuit_opened_at, circuit_retry_at,
          circuit_open_for, circuit_reason, circuit_probe_by, circuit_probe_until
