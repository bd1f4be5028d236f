-- Due work not yet claimed, and when the oldest of it fell due. $1 now
SELECT count(*) AS due, min(due_at) AS oldest_due_at
FROM dripd.step_executions
WHERE status = 'scheduled' AND claimable_at <= $1
