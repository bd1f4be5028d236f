-- Give unspent tokens back to their windows (a daemon stopping), so other daemons can lease
-- them in the same window. Rows go in key order like acquire.sql's.
UPDATE dripd.rate_windows AS w
SET granted = greatest(w.granted - r.unused, 0)
FROM (
    SELECT bucket, window_start, sum(unused)::integer AS unused
    FROM unnest($1::text[], $2::timestamptz[], $3::integer[]) AS u (bucket, window_start, unused)
    GROUP BY bucket, window_start
    ORDER BY bucket, window_start
) AS r
WHERE w.bucket = r.bucket AND w.window_start = r.window_start
