-- Give unspent tokens back to the slices they were leased in (a daemon stopping), so other
-- daemons can lease them while those slices still count. A slice the row no longer keeps is
-- skipped; a count never goes below zero. Rows are locked in key order like acquire.sql's, and
-- the UPDATE then reads each row's newest version.
WITH u AS (
    SELECT bucket, slice, at, sum(unused)::integer AS unused
    FROM unnest($1::text[], $2::interval[], $3::timestamptz[], $4::integer[])
        AS u (bucket, slice, at, unused)
    GROUP BY bucket, slice, at
),
locked AS (
    SELECT w.bucket, w.slice
    FROM dripd.rate_windows AS w
    WHERE (w.bucket, w.slice) IN (SELECT bucket, slice FROM u)
    ORDER BY w.bucket, w.slice
    FOR UPDATE
)
UPDATE dripd.rate_windows AS w
SET grants = array(
    SELECT greatest(g.granted - coalesce((
        SELECT u.unused FROM u
        WHERE u.bucket = w.bucket AND u.slice = w.slice
            AND u.at = w.start_at + (g.n - 1) * w.slice
    ), 0), 0)
    FROM unnest(w.grants) WITH ORDINALITY AS g (granted, n)
    ORDER BY g.n
)
FROM locked
WHERE w.bucket = locked.bucket AND w.slice = locked.slice
