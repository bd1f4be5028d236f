-- Every step and transition of the versions that own the given steps (cache misses only).
-- $1 step ids
SELECT s.id, s.version_id, s.key, s.position, s.channel, s.delay, s.template, s.adapter,
       s.on_failure, s.max_attempts, s.at_time, s.cron, s.timezone, s.wait_event,
       s.wait_timeout, s.on_timeout, s.when_expr, s.send_window, s.require_verified,
       s.max_length, s.spintax, s.python_template, s.vars, s.short_links,
       q.key AS sequence_key, v.timezone AS sequence_timezone, v.on_no_match,
       v.hooks, v.send_window AS sequence_window, v.vars AS sequence_vars,
       v.short_links AS sequence_short_links,
       (SELECT coalesce(jsonb_agg(jsonb_build_object(
                   'from', t.from_step_id, 'to', t.to_step_id,
                   'priority', t.priority, 'when', t.when_expr)
                   ORDER BY t.priority, t.position, t.id), '[]')
        FROM dripd.transitions AS t WHERE t.from_step_id = s.id) AS transitions
FROM dripd.steps AS s
JOIN dripd.sequence_versions AS v ON v.id = s.version_id
JOIN dripd.sequences AS q ON q.id = v.sequence_id
WHERE s.version_id IN (SELECT version_id FROM dripd.steps WHERE id = ANY($1::uuid[]))
ORDER BY s.version_id, s.position
