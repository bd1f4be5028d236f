-- Claim a batch of due executions: one statement, one index scan, SKIP LOCKED so that
-- daemons never wait on each other. A claimed row whose lease ran out is due again
-- (claimable_at = lease_until); re-claiming it spends an attempt so a poison row that
-- crashes daemons cannot loop forever.
-- $1 now, $2 limit, $3 claim token, $4 lease until, $5 daemon id
UPDATE dripd.step_executions AS e
SET status = 'claimed',
    attempt = e.attempt + (e.status = 'claimed')::int,
    claim_token = $3,
    lease_until = $4,
    claimed_by = $5
FROM dripd.enrollments AS en
WHERE e.id IN (
        SELECT id
        FROM dripd.step_executions
        WHERE status IN ('scheduled', 'claimed') AND claimable_at <= $1
        ORDER BY claimable_at
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    )
  AND en.id = e.enrollment_id
RETURNING e.id, e.enrollment_id, e.step_id, e.tenant_key, e.due_at, e.created_at, e.attempt,
          e.replay, e.advance, en.status AS enrollment_status, en.subscriber_type,
          en.subscriber_id, en.data, en.timezone,
          -- A wait released by an event carries that event to the step's transitions.
          CASE WHEN e.event_id IS NOT NULL THEN
              (SELECT jsonb_build_object('key', ev.key, 'data', ev.data, 'id', ev.id,
                                         'occurred_at', ev.occurred_at)
               FROM dripd.events AS ev WHERE ev.id = e.event_id)
          END AS event
