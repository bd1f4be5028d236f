-- $1 sequence id
SELECT id FROM dripd.sequences WHERE id = $1 FOR UPDATE
