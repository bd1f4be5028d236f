-- Claim due executions lane by lane: for each (lane, limit) given, at most `limit` of its
-- due rows, oldest first, SKIP LOCKED so that daemons never wait on each other. A lane
-- the daemon cannot serve now (its adapter busy, rate-limited, out of quota, its circuit
-- open) is simply not given, and its rows are not touched. A claimed row whose lease ran
-- out (claimable_at = lease_until) is claimable again: its holder died, since a live one
-- renews its leases, and re-claiming it spends an attempt so a poison row that crashes
-- daemons cannot loop forever.
-- $1 lanes, $2 limits, $3 now, $4 claim token, $5 lease until, $6 daemon id
UPDATE dripd.step_executions AS e
SET status = 'claimed',
    attempt = e.attempt + (e.status = 'claimed')::int,
    claim_token = $4,
    lease_until = $5,
    claimed_by = $6
FROM dripd.enrollments AS en
-- `= ANY(ARRAY(…))`, not `IN (…)`: the planner cannot know the budgets, and its guess
-- (a tenth of the table) made it hash-join a sequential scan of both tables (100 ms a batch).
WHERE e.id = ANY (ARRAY(
        SELECT p.id
        FROM unnest($1::text[], $2::int[]) AS l (lane, n)
        CROSS JOIN LATERAL (
            SELECT s.id
            FROM dripd.step_executions AS s
            WHERE s.lane = l.lane AND s.status IN ('scheduled', 'claimed')
              AND s.claimable_at <= $3
            ORDER BY s.claimable_at
            LIMIT l.n
            FOR UPDATE SKIP LOCKED
        ) AS p
        WHERE l.n > 0
    ))
  AND en.id = e.enrollment_id
RETURNING e.id, e.enrollment_id, e.step_id, e.tenant_key, e.lane, e.due_at, e.created_at,
          e.attempt, e.replay, e.advance, en.status AS enrollment_status, en.subscriber_type,
          en.subscriber_id, en.data, en.timezone, e.event_id,
          -- A wait released by an event carries that event to the step's transitions.
          -- (NULL with an event_id when the event committed after this statement began:
          -- store.claim reads those in a statement of their own.)
          CASE WHEN e.event_id IS NOT NULL THEN
              (SELECT jsonb_build_object('key', ev.key, 'data', ev.data, 'id', ev.id,
                                         'occurred_at', ev.occurred_at)
               FROM dripd.events AS ev WHERE ev.id = e.event_id)
          END AS event
