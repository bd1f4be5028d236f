-- $1 sequence, $2 name, $3 mode, $4 timezone, $5 reenroll, $6 entry events, $7 exit events,
-- $8 content hash, $9 source, $10 now, $11 on_no_match, $12 hooks, $13 send window, $14 vars,
-- $15 short links
INSERT INTO dripd.sequence_versions
    (sequence_id, version, state, name, mode, timezone, reenroll, entry_events, exit_events,
     content_hash, source, created_at, activated_at, on_no_match, hooks, send_window, vars,
     short_links)
SELECT $1, coalesce(max(version), 0) + 1, 'active', $2, $3, $4, $5, $6, $7, $8, $9::text::jsonb,
       $10, $10, $11, $12::text::jsonb, $13::text::jsonb, $14::text::jsonb, $15::text::jsonb
FROM dripd.sequence_versions WHERE sequence_id = $1
RETURNING id, version
