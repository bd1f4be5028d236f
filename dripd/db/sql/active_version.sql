-- $1 sequence id
SELECT id, version, content_hash FROM dripd.sequence_versions
WHERE sequence_id = $1 AND state = 'active'
