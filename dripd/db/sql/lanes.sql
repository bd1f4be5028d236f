-- The lanes with pending work and when each next becomes claimable: a skip scan over
-- step_executions_lane_idx (one index probe per lane, however many rows a lane holds),
-- so the claim can give each lane its own budget and skip a saturated one without
-- reading its rows. Held rows of paused enrollments ('infinity') never count.
WITH RECURSIVE lanes (lane) AS (
    (SELECT lane FROM dripd.step_executions
     WHERE status IN ('scheduled', 'claimed')
     ORDER BY lane LIMIT 1)
    UNION ALL
    SELECT (SELECT e.lane FROM dripd.step_executions AS e
            WHERE e.status IN ('scheduled', 'claimed') AND e.lane > l.lane
            ORDER BY e.lane LIMIT 1)
    FROM lanes AS l
    WHERE l.lane IS NOT NULL
)
SELECT l.lane, n.at
FROM lanes AS l
CROSS JOIN LATERAL (
    SELECT e.claimable_at AS at FROM dripd.step_executions AS e
    WHERE e.status IN ('scheduled', 'claimed') AND e.lane = l.lane
      AND e.claimable_at < 'infinity'
    ORDER BY e.claimable_at LIMIT 1
) AS n
WHERE l.lane IS NOT NULL
