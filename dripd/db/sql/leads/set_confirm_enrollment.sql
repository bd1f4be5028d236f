-- $1 lead id, $2 the enrollment in the confirmation sequence
UPDATE dripd.leads SET confirm_enrollment_id = $2
WHERE id = $1
RETURNING *
