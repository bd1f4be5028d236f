-- Give back reservations whose sends failed. $1 buckets, $2 period starts, $3 how many
UPDATE dripd.quota_ledger AS q
SET used = greatest(q.used - $3::int, 0)
FROM unnest($1::text[], $2::timestamptz[]) AS w(bucket, period_start)
WHERE q.bucket = w.bucket AND q.period_start = w.period_start
