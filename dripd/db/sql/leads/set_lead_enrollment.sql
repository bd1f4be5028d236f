-- $1 lead id, $2 enrollment id
UPDATE dripd.leads SET enrollment_id = $2
WHERE id = $1
RETURNING *
