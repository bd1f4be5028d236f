-- Give back a reservation whose send failed. $1 buckets, $2 period starts
UPDATE dripd.quota_ledger AS q
SET used = q.used - 1
FROM unnest($1::text[], $2::timestamptz[]) AS w(bucket, period_start)
WHERE q.bucket = w.bucket AND q.period_start = w.period_start AND q.used > 0
