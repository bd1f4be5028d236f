-- Reserve one send in every quota bucket, or in none: the rows are created if new and
-- locked in key order (no deadlock between daemons), and each is charged only while under
-- its limit. The caller commits when every bucket was charged and rolls back otherwise.
-- $1 buckets, $2 period starts, $3 limits
WITH want AS (
    SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::int[]) AS w(bucket, period_start, lim)
), locked AS (
    SELECT q.bucket, q.period_start
    FROM dripd.quota_ledger AS q
    JOIN want AS w USING (bucket, period_start)
    ORDER BY q.bucket
    FOR UPDATE OF q
)
UPDATE dripd.quota_ledger AS q
SET used = q.used + 1
FROM want AS w, locked AS l
WHERE q.bucket = w.bucket AND q.period_start = w.period_start
  AND l.bucket = q.bucket AND l.period_start = q.period_start
  AND q.used < w.lim
RETURNING q.bucket
