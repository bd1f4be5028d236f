-- dripd 0002: flow logic. Step timing (a local time of day, cron), steps that wait for an
-- event, step conditions, hooks and the secrets they use. Forward-only; never edit once
-- released.

ALTER TABLE dripd.steps
    -- With `delay`: the first such local time in the recipient's zone at or after it.
    ADD COLUMN at_time      time,
    -- The first occurrence at or after `delay`, in the recipient's zone.
    ADD COLUMN cron         text CHECK (cron IS NULL OR length(cron) > 0),
    -- Fixes the zone of `at_time`/`cron` for this step (else the recipient's).
    ADD COLUMN timezone     text,
    -- A step with no channel that waits for this event, at most `wait_timeout`.
    ADD COLUMN wait_event   text CHECK (wait_event IS NULL OR length(wait_event) > 0),
    ADD COLUMN wait_timeout interval CHECK (wait_timeout > '0s'),
    -- Where a timed-out wait goes: a step key, or 'complete'; NULL: the next step.
    ADD COLUMN on_timeout   text,
    -- A condition checked when the step is due; false skips the step.
    ADD COLUMN when_expr    text CHECK (when_expr IS NULL OR length(when_expr) > 0),
    ADD CONSTRAINT steps_at_or_cron CHECK (at_time IS NULL OR cron IS NULL),
    ADD CONSTRAINT steps_wait_complete CHECK ((wait_event IS NULL) = (wait_timeout IS NULL)),
    ADD CONSTRAINT steps_wait_sends_nothing CHECK (wait_event IS NULL OR channel IS NULL);

ALTER TABLE dripd.sequence_versions
    -- What an enrollment does when transitions exist and none matches.
    ADD COLUMN on_no_match text NOT NULL DEFAULT 'complete'
        CHECK (on_no_match IN ('complete', 'fail')),
    -- The [hooks] table of the sequence file, as validated by `dripd apply`.
    ADD COLUMN hooks jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(hooks) = 'object');

-- Transitions of equal priority are tried in the order of the sequence file.
ALTER TABLE dripd.transitions ADD COLUMN position integer NOT NULL DEFAULT 0;

-- Entry events are looked up per tracked event among active versions only.
CREATE INDEX sequence_versions_entry_idx ON dripd.sequence_versions USING gin (entry_events)
    WHERE state = 'active';

ALTER TABLE dripd.step_executions
    -- A waiting row: the event key that releases it (its due_at is the timeout).
    ADD COLUMN waiting_for text,
    -- The event that released the wait, set in that event's own transaction.
    ADD COLUMN event_id bigint REFERENCES dripd.events ON DELETE SET NULL,
    -- 'done': a step that sends nothing (a wait) finished.
    DROP CONSTRAINT step_executions_status_check,
    ADD CONSTRAINT step_executions_status_check CHECK (status IN
        ('scheduled', 'claimed', 'sent', 'skipped', 'failed', 'cancelled', 'done'));

-- Secrets that hooks use (auth tokens, signing keys): AES-256-GCM like adapter credentials.
CREATE TABLE dripd.secrets (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_key  text CHECK (tenant_key IS NULL OR length(tenant_key) > 0),
    name        text NOT NULL CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]*$'),
    value       bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX secrets_name_uq ON dripd.secrets (tenant_key, name) NULLS NOT DISTINCT;
