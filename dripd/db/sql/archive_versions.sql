-- $1 sequence id
UPDATE dripd.sequence_versions SET state = 'archived'
WHERE sequence_id = $1 AND state = 'active'
