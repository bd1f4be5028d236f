-- The sequences an event enrolls the subscriber into: per key the tenant's own sequence
-- wins over a global one (as when enrolling by key), then its active version must list the
-- event among its entry events. $1 tenant, $2 event key
SELECT key
FROM (
    SELECT DISTINCT ON (q.key) q.key, v.entry_events
    FROM dripd.sequences AS q
    JOIN dripd.sequence_versions AS v ON v.sequence_id = q.id AND v.state = 'active'
    WHERE q.tenant_key = $1 OR q.tenant_key IS NULL
    ORDER BY q.key, q.tenant_key NULLS LAST
) AS winner
WHERE $2 = ANY (winner.entry_events)
ORDER BY key
