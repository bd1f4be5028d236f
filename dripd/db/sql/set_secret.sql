-- $1 secret id, $2 new blob, $3 now
UPDATE dripd.secrets SET value = $2, updated_at = $3 WHERE id = $1
