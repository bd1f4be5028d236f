-- Lease slices of shared rate-limit windows: per (bucket, window_start) grant up to `want`
-- tokens, never more than the window has left of `cap` (the bucket's limit), and return what
-- each row granted this time in last_grant. A concurrent upsert of the same row waits for this
-- one's row lock and then sees its total, so the daemons together never pass the limit.
-- Rows are taken in key order: two daemons leasing the same buckets cannot deadlock.
-- The DO UPDATE reads its own request again (EXCLUDED carries no column for the cap);
-- greatest(0, …) keeps a lowered limit from shrinking what was already granted.
INSERT INTO dripd.rate_windows AS w (bucket, window_start, granted, last_grant)
SELECT r.bucket, r.window_start, least(r.want, r.cap), least(r.want, r.cap)
FROM unnest($1::text[], $2::timestamptz[], $3::integer[], $4::integer[])
    AS r (bucket, window_start, want, cap)
ORDER BY r.bucket, r.window_start
ON CONFLICT (bucket, window_start) DO UPDATE
SET (granted, last_grant) = (
    SELECT w.granted + s.amount, s.amount
    FROM (
        SELECT greatest(0, least(r.want, r.cap - w.granted)) AS amount
        FROM unnest($1::text[], $2::timestamptz[], $3::integer[], $4::integer[])
            AS r (bucket, window_start, want, cap)
        WHERE r.bucket = EXCLUDED.bucket AND r.window_start = EXCLUDED.window_start
    ) AS s
)
RETURNING w.bucket, w.window_start, w.last_grant
