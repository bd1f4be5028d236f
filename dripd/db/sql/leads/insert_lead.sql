-- $1 tenant, $2 name, $3 email (normalized), $4 phone (E.164), $5 notes, $6 now,
-- $7 mailbox (the email without its +tag), $8 status (pending or active), $9 confirmation
-- expiry (pending only)
INSERT INTO dripd.leads (
    tenant_key, name, email, phone, notes, created_at, mailbox, status, confirm_expires_at
)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
RETURNING *
