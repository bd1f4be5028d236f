-- Keys older than the retention (24 h). $1 before
DELETE FROM dripd.idempotency_keys
WHERE created_at < $1
