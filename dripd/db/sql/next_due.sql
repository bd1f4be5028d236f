-- When the next pending row becomes claimable (the daemon's timer).
SELECT min(claimable_at) AS at
FROM dripd.step_executions
WHERE status IN ('scheduled', 'claimed')
