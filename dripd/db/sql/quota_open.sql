-- The ledger rows of a reservation, created at zero when their period starts.
-- $1 buckets, $2 period starts
INSERT INTO dripd.quota_ledger (bucket, period_start, used)
SELECT w.bucket, w.period_start, 0
FROM unnest($1::text[], $2::timestamptz[]) AS w(bucket, period_start)
ORDER BY w.bucket
ON CONFLICT (bucket, period_start) DO NOTHING
