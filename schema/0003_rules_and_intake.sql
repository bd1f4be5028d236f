-- dripd 0003: sending rules (shared rate-limit windows, quota ledger, adapter pauses) and the
-- HTTP surface (API tokens, idempotency keys, leads). Forward-only; never edit once released.

-- Rate limits: per bucket and fixed window, how many tokens the daemons together were
-- granted. A daemon leases a slice and spends it in memory; the total never exceeds the
-- limit, and what a window granted but nobody spent expires with the window.
CREATE TABLE dripd.rate_windows (
    bucket        text NOT NULL CHECK (length(bucket) > 0),
    window_start  timestamptz NOT NULL,
    granted       integer NOT NULL CHECK (granted >= 0),
    last_grant    integer NOT NULL DEFAULT 0,
    PRIMARY KEY (bucket, window_start)
);

-- Quotas: sends reserved per bucket and period (a day or an hour in a declared zone).
-- Reserved before the send, released when it fails.
CREATE TABLE dripd.quota_ledger (
    bucket        text NOT NULL CHECK (length(bucket) > 0),
    period_start  timestamptz NOT NULL,
    used          integer NOT NULL CHECK (used >= 0),
    PRIMARY KEY (bucket, period_start)
);

-- Send windows (sequence default and per step) and per-step rules.
ALTER TABLE dripd.sequence_versions
    ADD COLUMN send_window jsonb CHECK (send_window IS NULL OR jsonb_typeof(send_window) = 'object');
ALTER TABLE dripd.steps
    ADD COLUMN send_window jsonb CHECK (send_window IS NULL OR jsonb_typeof(send_window) = 'object'),
    ADD COLUMN require_verified boolean NOT NULL DEFAULT false,
    ADD COLUMN max_length integer CHECK (max_length IS NULL OR max_length > 0);

-- Bounce/complaint thresholds pause an adapter until an operator resumes it.
ALTER TABLE dripd.channel_adapters
    ADD COLUMN paused_at     timestamptz,
    ADD COLUMN paused_reason text,
    ADD CONSTRAINT channel_adapters_pause CHECK ((paused_at IS NULL) = (paused_reason IS NULL));

-- Bearer tokens of the HTTP API: only a SHA-256 of the token is stored; scoped to a tenant.
CREATE TABLE dripd.api_tokens (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_key  text CHECK (tenant_key IS NULL OR length(tenant_key) > 0),
    name        text NOT NULL CHECK (length(name) > 0),
    token_hash  bytea NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

-- `Idempotency-Key`: the first response to a key is kept and replayed for its retries.
CREATE TABLE dripd.idempotency_keys (
    token_id      uuid NOT NULL REFERENCES dripd.api_tokens ON DELETE CASCADE,
    key           text NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    method        text NOT NULL,
    path          text NOT NULL,
    request_hash  bytea NOT NULL,
    status        integer NOT NULL,
    body          bytea NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (token_id, key)
);
CREATE INDEX idempotency_keys_created_idx ON dripd.idempotency_keys (created_at);

-- Leads from the lead form and `POST /v1/leads`; one per email and one per phone.
CREATE TABLE dripd.leads (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_key     text CHECK (tenant_key IS NULL OR length(tenant_key) > 0),
    name           text NOT NULL CHECK (length(name) > 0),
    email          text,
    phone          text,
    notes          text,
    enrollment_id  uuid REFERENCES dripd.enrollments ON DELETE SET NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    CHECK (email IS NOT NULL OR phone IS NOT NULL)
);
CREATE UNIQUE INDEX leads_email_uq ON dripd.leads (tenant_key, email) NULLS NOT DISTINCT
    WHERE email IS NOT NULL;
CREATE UNIQUE INDEX leads_phone_uq ON dripd.leads (tenant_key, phone) NULLS NOT DISTINCT
    WHERE phone IS NOT NULL;
