-- An enrollment's link clicks (for `clicks.*` in conditions): how many, the last one's time
-- and the key of the step whose message it was in. $1 enrollment ids
SELECT e.id AS enrollment_id, count(m.id) AS count, max(m.occurred_at) AS last_at,
       (SELECT s.key
        FROM dripd.message_events AS l
        JOIN dripd.step_executions AS x ON x.id = l.execution_id
        JOIN dripd.steps AS s ON s.id = x.step_id
        WHERE l.enrollment_id = e.id AND l.type = 'clicked'
        ORDER BY l.occurred_at DESC, l.id DESC
        LIMIT 1) AS last_step
FROM unnest($1::uuid[]) AS e(id)
LEFT JOIN dripd.message_events AS m ON m.enrollment_id = e.id AND m.type = 'clicked'
GROUP BY e.id
