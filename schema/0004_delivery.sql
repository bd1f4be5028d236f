-- dripd 0004: delivery under stress. Lanes (where a pending row will be sent from, so the
-- claim can take work per lane and skip a saturated one), sliding-window rate limits, and
-- the per-adapter circuit breaker shared by every daemon. Forward-only; never edit once
-- released.

-- A pending row's lane: its tenant, channel and the step's adapter name (null: the
-- channel's default), as a JSON array text (dripd.lane_of). It depends on nothing that can
-- change after the row exists (a step is immutable), so it is set once, on insert, and the
-- daemon maps it to an adapter in memory. dripd's own inserts compute it in the statement;
-- the trigger fills it for any other insert (only then: its WHEN skips the call otherwise).
ALTER TABLE dripd.step_executions ADD COLUMN lane text;

CREATE FUNCTION dripd.lane_of(tenant_key text, channel text, adapter text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN jsonb_build_array(tenant_key, channel, adapter)::text;

CREATE FUNCTION dripd.execution_lane() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    SELECT dripd.lane_of(NEW.tenant_key, s.channel, s.adapter)
    INTO NEW.lane
    FROM dripd.steps AS s
    WHERE s.id = NEW.step_id;
    RETURN NEW;
END
$$;

CREATE TRIGGER step_executions_lane BEFORE INSERT ON dripd.step_executions
    FOR EACH ROW WHEN (NEW.lane IS NULL) EXECUTE FUNCTION dripd.execution_lane();

UPDATE dripd.step_executions AS e
SET lane = dripd.lane_of(e.tenant_key, s.channel, s.adapter)
FROM dripd.steps AS s
WHERE s.id = e.step_id;

ALTER TABLE dripd.step_executions ALTER COLUMN lane SET NOT NULL;

-- The claim's pick per lane, oldest first, over pending rows only; and the skip scan that
-- finds the lanes with pending work (one probe per lane, not per row). It replaces the
-- claim index of 0001: one index less to maintain on every insert and claim, and no plan
-- can read another lane's backlog to find this lane's rows.
CREATE INDEX step_executions_lane_idx ON dripd.step_executions (lane, claimable_at)
    WHERE status IN ('scheduled', 'claimed');
DROP INDEX dripd.step_executions_claim_idx;

-- Circuit breaker per adapter (dripd/rules/breaker.py), shared by every daemon. Provider-wide
-- failures (connection refused, timeouts, SMTP 421, HTTP 5xx/429) open it: the adapter's
-- executions defer without spending attempts until `circuit_retry_at`, when exactly one daemon
-- claims the probe (an atomic UPDATE: `circuit_probe_by`, leased until `circuit_probe_until`,
-- so a dead prober does not block the others). The probe's success closes the circuit; its
-- failure opens it again with `circuit_open_for` doubled. `circuit_reason` is the provider
-- error's text (never a credential). A closed circuit keeps none of these columns set.
ALTER TABLE dripd.channel_adapters
    ADD COLUMN circuit_state text NOT NULL DEFAULT 'closed'
        CONSTRAINT channel_adapters_circuit_state
        CHECK (circuit_state IN ('closed', 'open', 'half_open')),
    ADD COLUMN circuit_opened_at timestamptz,
    ADD COLUMN circuit_retry_at timestamptz,
    ADD COLUMN circuit_open_for interval
        CONSTRAINT channel_adapters_circuit_open_for CHECK (circuit_open_for > interval '0'),
    ADD COLUMN circuit_reason text,
    ADD COLUMN circuit_probe_by text,
    ADD COLUMN circuit_probe_until timestamptz,
    ADD CONSTRAINT channel_adapters_circuit CHECK (
        CASE circuit_state
            WHEN 'closed' THEN num_nonnulls(
                circuit_opened_at, circuit_retry_at, circuit_open_for, circuit_reason,
                circuit_probe_by, circuit_probe_until) = 0
            WHEN 'open' THEN num_nulls(
                circuit_opened_at, circuit_retry_at, circuit_open_for, circuit_reason) = 0
                AND num_nonnulls(circuit_probe_by, circuit_probe_until) = 0
            ELSE num_nulls(
                circuit_opened_at, circuit_retry_at, circuit_open_for, circuit_reason,
                circuit_probe_by, circuit_probe_until) = 0
        END
    );

-- Rate limits: sliding windows (dripd/rules/limiter.py). A bucket's budget is counted per
-- slice of its window (a twentieth): one row per bucket and slice length holds the tokens
-- granted in each recent slice, `grants[1]` counting the slice that starts at `start_at` and
-- each next element the slice after. A lease reads and writes only its bucket's row, so that
-- row's lock serializes the daemons and one statement decides; `last_grant` is what the
-- latest lease granted (its answer). The fixed epoch-aligned windows of 0003 go: their rows
-- mean nothing to sliding windows, and a budget refills within one window anyway.
DROP TABLE dripd.rate_windows;

CREATE TABLE dripd.rate_windows (
    bucket      text NOT NULL CHECK (length(bucket) > 0),
    slice       interval NOT NULL CHECK (slice > interval '0'),
    start_at    timestamptz NOT NULL,
    grants      integer[] NOT NULL CHECK (cardinality(grants) > 0 AND 0 <= ALL (grants)),
    last_grant  integer NOT NULL DEFAULT 0,
    PRIMARY KEY (bucket, slice)
);
