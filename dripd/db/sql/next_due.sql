-- When the next pending row becomes claimable (the daemon's timer). Held rows of paused
-- enrollments wait at 'infinity' and never count.
SELECT min(claimable_at) AS at
FROM dripd.step_executions
WHERE status IN ('scheduled', 'claimed') AND claimable_at < 'infinity'
