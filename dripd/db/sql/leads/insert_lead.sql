-- $1 tenant, $2 name, $3 email (normalized), $4 phone (E.164), $5 notes, $6 now
INSERT INTO dripd.leads (tenant_key, name, email, phone, notes, created_at)
VALUES ($1, $2, $3, $4, $5, $6)
RETURNING *
