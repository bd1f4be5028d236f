-- A goal reached: end the subscriber's live enrollments whose version lists the event as an
-- exit event, and cancel their unclaimed executions, in the event's own transaction. (A row
-- already claimed finishes its send; the record statement sees the enrollment ended and
-- schedules nothing after it.) $1 tenant, $2 subscriber type, $3 subscriber id, $4 event key,
-- $5 now
WITH exited AS (
    UPDATE dripd.enrollments AS en
    SET status = 'exited', status_reason = 'exit_event:' || $4, ended_at = $5, updated_at = $5
    FROM dripd.sequence_versions AS v
    WHERE v.id = en.version_id AND $4 = ANY (v.exit_events)
      AND en.tenant_key IS NOT DISTINCT FROM $1 AND en.subscriber_type = $2
      AND en.subscriber_id = $3 AND en.status IN ('active', 'paused')
    RETURNING en.id
), cancelled AS (
    UPDATE dripd.step_executions AS e
    SET status = 'cancelled', reason = 'exited', finished_at = $5, held_due_at = NULL
    FROM exited AS x
    WHERE e.enrollment_id = x.id AND e.status = 'scheduled'
)
SELECT id FROM exited
