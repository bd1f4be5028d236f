-- Lease tokens of sliding-window rate limits: per (bucket, slice length) request, grant up to
-- `want` tokens in the slice starting at `at`, so that no `span` consecutive slices hold more
-- than `cap` (the bucket's limit) together, and return the row with what this lease granted in
-- last_grant. `back` tokens that the requester leased in its earlier slice `back_at` and never
-- spent come off that slice first (a return that rides along with the next lease).
--
-- Offsets count slices from the row's start_at (o: the request's slice, b: the returned one,
-- e: the newest slice after this lease). A lease may take what the slices from o - span + 1
-- on have not granted: exact when o is the newest slice (no window that holds o can hold more),
-- and when a daemon whose clock lags asks for an older slice, the later slices count too (never
-- too little). A slice older than e - span + 1 is no longer known in full: it gets nothing.
-- The row keeps the last 2 * span - 1 slices, which every request within a span of the newest
-- needs.
--
-- A concurrent upsert of the same row waits for this one's row lock, then reads its result
-- (ON CONFLICT evaluates against the newest row version), so the daemons together never pass
-- the limit. Rows are taken in key order: two daemons leasing the same buckets cannot deadlock.
-- The DO UPDATE reads its own request again (EXCLUDED carries only the inserted columns).
INSERT INTO dripd.rate_windows AS w (bucket, slice, start_at, grants, last_grant)
SELECT r.bucket, r.slice, r.at, ARRAY[least(r.want, r.cap)], least(r.want, r.cap)
FROM unnest($1::text[], $2::interval[], $3::timestamptz[], $4::integer[], $5::integer[])
    AS r (bucket, slice, at, want, cap)
ORDER BY r.bucket, r.slice
ON CONFLICT (bucket, slice) DO UPDATE
SET (start_at, grants, last_grant) = (
    SELECT
        w.start_at + k.lo * r.slice,
        array(
            SELECT u.g + CASE WHEN k.lo + u.n - 1 = p.o THEN t.granted ELSE 0 END
            FROM unnest(k.kept) WITH ORDINALITY AS u (g, n)
            ORDER BY u.n
        ),
        t.granted
    FROM unnest(
        $1::text[], $2::interval[], $3::timestamptz[], $4::integer[], $5::integer[],
        $6::integer[], $7::timestamptz[], $8::integer[]
    ) AS r (bucket, slice, at, want, cap, span, back_at, back)
    CROSS JOIN LATERAL (
        SELECT
            round(extract(epoch FROM r.at - w.start_at) / extract(epoch FROM r.slice))::integer
                AS o,
            round(extract(epoch FROM r.back_at - w.start_at) / extract(epoch FROM r.slice))::integer
                AS b
    ) AS p
    CROSS JOIN LATERAL (SELECT greatest(cardinality(w.grants) - 1, p.o) AS e) AS q
    CROSS JOIN LATERAL (
        -- The slices kept (from lo to e), less what came back; a request older than the row
        -- (and not too old) extends it with slices nobody leased.
        SELECT
            l.lo,
            array(
                SELECT greatest(
                    coalesce(w.grants[i + 1], 0) - CASE WHEN i = p.b THEN r.back ELSE 0 END, 0
                )
                FROM generate_series(l.lo, q.e) AS i
                ORDER BY i
            ) AS kept
        FROM (
            SELECT greatest(q.e - 2 * r.span + 2, least(0, greatest(p.o, q.e - r.span + 1)))
                AS lo
        ) AS l
    ) AS k
    CROSS JOIN LATERAL (
        SELECT CASE
            WHEN p.o < q.e - r.span + 1 THEN 0
            ELSE greatest(0, least(r.want, r.cap - (
                SELECT coalesce(sum(x), 0)
                FROM unnest(k.kept[greatest(p.o - r.span + 1 - k.lo, 0) + 1:]) AS x
            )))
        END AS granted
    ) AS t
    WHERE r.bucket = EXCLUDED.bucket AND r.slice = EXCLUDED.slice
)
RETURNING w.bucket, w.slice, w.start_at, w.grants, w.last_grant
