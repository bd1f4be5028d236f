-- dripd 0001: the engine's tables. Forward-only; never edit once released
-- (dripd migrate refuses a migration whose checksum changed).

CREATE SCHEMA IF NOT EXISTS dripd;

CREATE TABLE dripd.sequences (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_key  text CHECK (tenant_key IS NULL OR length(tenant_key) > 0),
    key         text NOT NULL CHECK (key ~ '^[A-Za-z0-9][A-Za-z0-9_.-]*$'),
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX sequences_tenant_key_uq ON dripd.sequences (tenant_key, key) NULLS NOT DISTINCT;

CREATE TABLE dripd.sequence_versions (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    sequence_id   uuid NOT NULL REFERENCES dripd.sequences ON DELETE CASCADE,
    version       integer NOT NULL CHECK (version > 0),
    state         text NOT NULL DEFAULT 'active' CHECK (state IN ('draft', 'active', 'archived')),
    name          text,
    mode          text NOT NULL DEFAULT 'lifecycle' CHECK (mode IN ('lifecycle', 'outbound')),
    timezone      text,
    reenroll      text NOT NULL DEFAULT 'never' CHECK (reenroll IN ('never', 'after_exit', 'always')),
    entry_events  text[] NOT NULL DEFAULT '{}',
    exit_events   text[] NOT NULL DEFAULT '{}',
    content_hash  text NOT NULL,
    source        jsonb NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    activated_at  timestamptz,
    UNIQUE (sequence_id, version)
);
-- Exactly one active version per sequence.
CREATE UNIQUE INDEX sequence_versions_one_active ON dripd.sequence_versions (sequence_id)
    WHERE state = 'active';

CREATE TABLE dripd.steps (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    version_id    uuid NOT NULL REFERENCES dripd.sequence_versions ON DELETE CASCADE,
    key           text NOT NULL CHECK (key ~ '^[A-Za-z0-9][A-Za-z0-9_.-]*$'),
    position      integer NOT NULL CHECK (position >= 0),
    channel       text CHECK (channel IS NULL OR channel ~ '^[a-z][a-z0-9_]*$'),
    delay         interval NOT NULL DEFAULT '0s' CHECK (delay >= '0s'),
    template      jsonb NOT NULL DEFAULT '{}',
    adapter       text,
    on_failure    text NOT NULL DEFAULT 'fail' CHECK (on_failure IN ('fail', 'continue')),
    max_attempts  integer CHECK (max_attempts IS NULL OR max_attempts > 0),
    UNIQUE (version_id, key),
    UNIQUE (version_id, position)
);

CREATE TABLE dripd.transitions (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    version_id    uuid NOT NULL REFERENCES dripd.sequence_versions ON DELETE CASCADE,
    from_step_id  uuid NOT NULL REFERENCES dripd.steps ON DELETE CASCADE,
    to_step_id    uuid REFERENCES dripd.steps ON DELETE CASCADE,
    priority      integer NOT NULL DEFAULT 0,
    when_expr     text CHECK (when_expr IS NULL OR length(when_expr) > 0)
);
CREATE INDEX transitions_version_idx ON dripd.transitions (version_id);

CREATE TABLE dripd.enrollments (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_key       text CHECK (tenant_key IS NULL OR length(tenant_key) > 0),
    sequence_id      uuid NOT NULL REFERENCES dripd.sequences ON DELETE CASCADE,
    version_id       uuid NOT NULL REFERENCES dripd.sequence_versions ON DELETE RESTRICT,
    subscriber_type  text NOT NULL DEFAULT 'user' CHECK (length(subscriber_type) > 0),
    subscriber_id    text NOT NULL CHECK (length(subscriber_id) > 0),
    status           text NOT NULL DEFAULT 'active'
                     CHECK (status IN ('active', 'paused', 'completed', 'exited', 'cancelled', 'failed')),
    status_reason    text,
    data             jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(data) = 'object'),
    timezone         text,
    adapter_id       uuid,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    ended_at         timestamptz,
    CHECK ((status IN ('active', 'paused')) = (ended_at IS NULL))
) WITH (fillfactor = 80);
-- One active-or-paused enrollment per subscriber and sequence.
CREATE UNIQUE INDEX enrollments_one_live ON dripd.enrollments
    (tenant_key, sequence_id, subscriber_type, subscriber_id) NULLS NOT DISTINCT
    WHERE status IN ('active', 'paused');
CREATE INDEX enrollments_subscriber_idx ON dripd.enrollments
    (tenant_key, subscriber_type, subscriber_id);

CREATE TABLE dripd.step_executions (
    id                   uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_key           text CHECK (tenant_key IS NULL OR length(tenant_key) > 0),
    enrollment_id        uuid NOT NULL REFERENCES dripd.enrollments ON DELETE CASCADE,
    step_id              uuid NOT NULL REFERENCES dripd.steps ON DELETE RESTRICT,
    status               text NOT NULL DEFAULT 'scheduled'
                         CHECK (status IN ('scheduled', 'claimed', 'sent', 'skipped', 'failed', 'cancelled')),
    -- When the step is due. A defer or a retry moves it; a claim does not.
    due_at               timestamptz NOT NULL,
    -- While claimed: when the lease runs out and the row becomes claimable again.
    lease_until          timestamptz,
    claim_token          uuid,
    claimed_by           text,
    -- Attempts spent (a retry spends one, a defer does not) and the replay window.
    attempt              integer NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    replay               integer NOT NULL DEFAULT 0 CHECK (replay >= 0),
    -- A replay of an execution whose enrollment moved on sends once and does not advance.
    advance              boolean NOT NULL DEFAULT true,
    -- A paused enrollment's pending row is held: due_at becomes 'infinity' and the
    -- original due time waits here until resume.
    held_due_at          timestamptz,
    channel              text,
    provider             text,
    adapter_id           uuid,
    recipient            text,
    reason               text,
    last_error           text,
    provider_message_id  text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    finished_at          timestamptz,
    -- The one column the claim orders and filters on: due time, or lease end while claimed.
    claimable_at         timestamptz GENERATED ALWAYS AS
                         (CASE WHEN status = 'claimed' THEN lease_until ELSE due_at END) STORED,
    CHECK ((status = 'claimed') = (claim_token IS NOT NULL AND lease_until IS NOT NULL)),
    CHECK ((status IN ('scheduled', 'claimed')) = (finished_at IS NULL))
) WITH (fillfactor = 70);
-- At most one pending execution per enrollment (a non-advancing replay stands aside).
CREATE UNIQUE INDEX step_executions_one_pending ON dripd.step_executions (enrollment_id)
    WHERE status IN ('scheduled', 'claimed') AND advance;
-- The claim: an index scan in claimable_at order over pending rows only.
CREATE INDEX step_executions_claim_idx ON dripd.step_executions (claimable_at)
    WHERE status IN ('scheduled', 'claimed');
CREATE INDEX step_executions_enrollment_idx ON dripd.step_executions (enrollment_id);

CREATE TABLE dripd.events (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_key       text CHECK (tenant_key IS NULL OR length(tenant_key) > 0),
    subscriber_type  text NOT NULL DEFAULT 'user',
    subscriber_id    text NOT NULL CHECK (length(subscriber_id) > 0),
    key              text NOT NULL CHECK (length(key) > 0),
    data             jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(data) = 'object'),
    idempotency_id   text,
    occurred_at      timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX events_idempotency_uq ON dripd.events
    (tenant_key, subscriber_type, subscriber_id, idempotency_id) NULLS NOT DISTINCT
    WHERE idempotency_id IS NOT NULL;
CREATE INDEX events_subscriber_idx ON dripd.events
    (tenant_key, subscriber_type, subscriber_id, key, occurred_at);

CREATE TABLE dripd.message_events (
    id                   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_key           text,
    execution_id         uuid REFERENCES dripd.step_executions ON DELETE SET NULL,
    enrollment_id        uuid,
    type                 text NOT NULL CHECK (type IN ('sent', 'delivered', 'bounced', 'complained',
                         'opened', 'clicked', 'replied', 'unsubscribed', 'deferred', 'skipped', 'failed')),
    channel              text,
    provider             text,
    adapter_id           uuid,
    recipient            text,
    reason               text,
    provider_message_id  text,
    data                 jsonb NOT NULL DEFAULT '{}',
    occurred_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX message_events_execution_idx ON dripd.message_events (execution_id);
CREATE INDEX message_events_adapter_idx ON dripd.message_events (adapter_id, occurred_at);

CREATE TABLE dripd.suppressions (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_key  text CHECK (tenant_key IS NULL OR length(tenant_key) > 0),
    channel     text NOT NULL CHECK (length(channel) > 0),
    address     text NOT NULL CHECK (length(address) > 0),
    reason      text NOT NULL DEFAULT 'manual'
                CHECK (reason IN ('manual', 'unsubscribe', 'bounce', 'complaint', 'provider_block')),
    source      text,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX suppressions_uq ON dripd.suppressions (channel, address, tenant_key) NULLS NOT DISTINCT;

CREATE TABLE dripd.channel_adapters (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_key   text CHECK (tenant_key IS NULL OR length(tenant_key) > 0),
    name         text NOT NULL CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]*$'),
    channel      text NOT NULL CHECK (channel ~ '^[a-z][a-z0-9_]*$'),
    provider     text NOT NULL CHECK (provider ~ '^[a-z][a-z0-9_]*$'),
    config       jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(config) = 'object'),
    -- AES-256-GCM: version byte, key id, nonce, ciphertext+tag. Never plaintext.
    credentials  bytea,
    is_default   boolean NOT NULL DEFAULT false,
    enabled      boolean NOT NULL DEFAULT true,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX channel_adapters_name_uq ON dripd.channel_adapters (tenant_key, name) NULLS NOT DISTINCT;
CREATE UNIQUE INDEX channel_adapters_one_default ON dripd.channel_adapters (tenant_key, channel)
    NULLS NOT DISTINCT WHERE is_default AND enabled;
