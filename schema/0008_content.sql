-- dripd 0008: content (issue 14). MJML, spintax, Python templates, template variables and
-- short links with dripd's own redirect. Forward-only; never edit once released.

-- A step's content settings beside its templates (`template` holds the Liquid sources,
-- `mjml` among them): spintax on its rendered text, a Python template ("module:function")
-- that makes its fields instead, its `vars`, and its `short_links` table as written.
ALTER TABLE dripd.steps
    ADD COLUMN spintax          boolean NOT NULL DEFAULT false,
    ADD COLUMN python_template  text CHECK (python_template IS NULL OR length(python_template) > 0),
    ADD COLUMN vars             jsonb CHECK (vars IS NULL OR jsonb_typeof(vars) = 'object'),
    ADD COLUMN short_links      jsonb CHECK (short_links IS NULL OR jsonb_typeof(short_links) = 'object');

-- The sequence's defaults for every step of the version.
ALTER TABLE dripd.sequence_versions
    ADD COLUMN vars         jsonb CHECK (vars IS NULL OR jsonb_typeof(vars) = 'object'),
    ADD COLUMN short_links  jsonb CHECK (short_links IS NULL OR jsonb_typeof(short_links) = 'object');

-- The short links of sent messages: one per (execution, provider, destination), so a retry
-- or a replay of the execution sends the links it made before (no second shortener call).
-- `code` is dripd's own (`GET /l/{code}` redirects to `destination`); a link from the
-- `webhook` shortener has none. `track`: a redirect of this link records a `clicked`
-- message event (not for a link from a `src` attribute: a client fetching an image has
-- clicked nothing).
CREATE TABLE dripd.short_links (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    execution_id  uuid NOT NULL REFERENCES dripd.step_executions ON DELETE CASCADE,
    tenant_key    text,
    provider      text NOT NULL CHECK (provider IN ('dripd', 'webhook')),
    destination   text NOT NULL CHECK (length(destination) BETWEEN 1 AND 8192),
    code          text UNIQUE CHECK (code IS NULL OR code ~ '^[A-Za-z0-9]{8,32}$'),
    short_url     text NOT NULL CHECK (length(short_url) BETWEEN 1 AND 2048),
    track         boolean NOT NULL DEFAULT true,
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (execution_id, provider, destination),
    CHECK ((provider = 'dripd') = (code IS NOT NULL))
);

-- `clicks.count` / `clicks.last_at` in conditions: an enrollment's clicks, newest first.
CREATE INDEX message_events_clicks_idx
    ON dripd.message_events (enrollment_id, occurred_at DESC)
    WHERE type = 'clicked';
