-- Daemon $3 takes the probe of each circuit among $1 that lets one go at $2: open with its
-- retry_at passed, or half-open with its prober's lease ended (that daemon died or hung).
-- The probe is leased until $4. Exactly one daemon wins each row: the row lock serializes
-- them, the loser's recheck finds it half-open with a live lease, and SKIP LOCKED skips a row
-- another daemon is taking right now instead of waiting (and rows lock in id order).
WITH free AS (
    SELECT id
    FROM dripd.channel_adapters
    WHERE id = ANY($1::uuid[])
      AND enabled
      AND ((circuit_state = 'open' AND circuit_retry_at <= $2)
           OR (circuit_state = 'half_open' AND circuit_probe_until <= $2))
    ORDER BY id
    FOR UPDATE SKIP LOCKED
)
UPDATE dripd.channel_adapters AS a
SET circuit_state = 'half_open', circuit_probe_by = $3, circuit_probe_until = $4
FROM free
WHERE a.id = free.id
RETURNING a.id, a.tenant_key, a.name, a.circuit_state, a.circuit_opened_at, a.circuit_retry_at,
          a.circuit_open_for, a.circuit_reason, a.circuit_probe_by, a.circuit_probe_until
