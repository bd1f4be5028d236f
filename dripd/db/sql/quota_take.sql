-- Reserve up to $4 sends at once in every bucket of one reservation (the sends of many
-- senders, gathered): the rows are locked in key order (no deadlock between daemons), the
-- grant is what the fullest bucket still allows, and every bucket is charged that much, so
-- each granted send holds a place in all of them. Returns the grant; no row: nothing left.
-- $1 buckets, $2 period starts, $3 limits, $4 sends wanted
WITH want AS (
    SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::int[]) AS w(bucket, period_start, lim)
), locked AS (
    SELECT q.bucket, q.period_start, q.used, w.lim
    FROM dripd.quota_ledger AS q
    JOIN want AS w USING (bucket, period_start)
    ORDER BY q.bucket
    FOR UPDATE OF q
), granted AS (
    SELECT least($4::int, min(l.lim - l.used)) AS n FROM locked AS l
)
UPDATE dripd.quota_ledger AS q
SET used = q.used + g.n
FROM granted AS g, locked AS l
WHERE q.bucket = l.bucket AND q.period_start = l.period_start AND g.n > 0
RETURNING g.n
