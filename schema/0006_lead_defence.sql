-- dripd 0006: a public surface that cannot be abused (issue 12). Lead intake gets a shared
-- per-client budget of posts, a mailbox per lead (sub-addresses are one mailbox) that the
-- duplicate check and a daily cap use, and double opt-in (a lead waits, pending, for its
-- confirmation). Idempotency keys also serve the public routes (no token) and keep the
-- response's headers. Forward-only; never edit once released.

-- Lead posts per client (a client address, or an API token), shared by every daemon: the
-- times of the posts taken in the last window, oldest first. A post is taken while fewer
-- than the limit fall in the window ending now, so no window holds more than the limit.
CREATE TABLE dripd.lead_budgets (
    client  text PRIMARY KEY CHECK (length(client) BETWEEN 1 AND 200),
    posts   timestamptz[] NOT NULL,
    taken   boolean NOT NULL
);

-- A lead's mailbox is its email without a `+tag` (dripd.addresses.mailbox); `pending` leads
-- wait for their confirmation (double opt-in) until `confirm_expires_at`, then are
-- `expired`; `active` leads are in the lead sequence.
ALTER TABLE dripd.leads
    ADD COLUMN mailbox text,
    ADD COLUMN status text NOT NULL DEFAULT 'active'
        CHECK (status IN ('pending', 'active', 'expired')),
    ADD COLUMN confirm_expires_at timestamptz,
    ADD COLUMN confirmed_at timestamptz,
    ADD COLUMN confirm_enrollment_id uuid REFERENCES dripd.enrollments ON DELETE SET NULL,
    ADD CONSTRAINT leads_pending_expires CHECK (status <> 'pending' OR confirm_expires_at IS NOT NULL);

-- The mailboxes of the leads stored before: the earliest lead of each mailbox gets it, later
-- ones (the `victim+N@` of a flood) keep none, so the unique index below can be built.
UPDATE dripd.leads AS l
SET mailbox = m.mailbox
FROM (
    SELECT id, mailbox,
           row_number() OVER (PARTITION BY tenant_key, mailbox ORDER BY created_at, id) AS n
    FROM (
        SELECT id, tenant_key, created_at,
               CASE WHEN split_part(local, '+', 1) = '' THEN local
                    ELSE split_part(local, '+', 1) END || '@' || domain AS mailbox
        FROM (
            SELECT id, tenant_key, created_at,
                   substring(email FROM '^(.*)@[^@]*$') AS local,
                   substring(email FROM '@([^@]*)$') AS domain
            FROM dripd.leads
            WHERE email IS NOT NULL
        ) AS parts
        WHERE local IS NOT NULL AND domain IS NOT NULL
    ) AS spelled
) AS m
WHERE l.id = m.id AND m.n = 1;

-- One live (pending or active) lead per email, phone and mailbox in a tenant; an expired
-- lead frees them for a new one.
DROP INDEX dripd.leads_email_uq;
DROP INDEX dripd.leads_phone_uq;
CREATE UNIQUE INDEX leads_email_uq ON dripd.leads (tenant_key, email) NULLS NOT DISTINCT
    WHERE email IS NOT NULL AND status <> 'expired';
CREATE UNIQUE INDEX leads_phone_uq ON dripd.leads (tenant_key, phone) NULLS NOT DISTINCT
    WHERE phone IS NOT NULL AND status <> 'expired';
CREATE UNIQUE INDEX leads_mailbox_uq ON dripd.leads (tenant_key, mailbox) NULLS NOT DISTINCT
    WHERE mailbox IS NOT NULL AND status <> 'expired';
-- The daily cap counts a mailbox's leads of the last 24 hours, expired ones included.
CREATE INDEX leads_mailbox_created_idx ON dripd.leads (tenant_key, mailbox, created_at)
    WHERE mailbox IS NOT NULL;
-- Pending leads past their expiry, found by housekeeping.
CREATE INDEX leads_pending_idx ON dripd.leads (confirm_expires_at) WHERE status = 'pending';

-- `Idempotency-Key` on every POST route: a public route's keys have no token (NULL), and
-- the first response's header fields are kept with it (the rows of 0003 were all JSON).
ALTER TABLE dripd.idempotency_keys DROP CONSTRAINT idempotency_keys_pkey;
ALTER TABLE dripd.idempotency_keys ALTER COLUMN token_id DROP NOT NULL;
-- Key first: a lookup by (token or none, key) reads it with `key = $2`.
CREATE UNIQUE INDEX idempotency_keys_key_owner_uq ON dripd.idempotency_keys (key, token_id)
    NULLS NOT DISTINCT;
ALTER TABLE dripd.idempotency_keys
    ADD COLUMN headers jsonb NOT NULL DEFAULT '{"content-type": "application/json"}'
        CHECK (jsonb_typeof(headers) = 'object');
ALTER TABLE dripd.idempotency_keys ALTER COLUMN headers SET DEFAULT '{}';
