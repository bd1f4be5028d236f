-- A click on dripd's short link `code`: its destination, and, when $3 asks for it and the
-- link is tracked, a `clicked` message event on the message that carried it, copying what
-- its execution knows (as feedback/record_feedback.sql does), with data.url the
-- destination. No row: no link has this code.
-- $1 code, $2 now, $3 record
WITH link AS (
    SELECT l.execution_id, l.destination, l.track
    FROM dripd.short_links AS l
    WHERE l.code = $1::text
), clicked AS (
    INSERT INTO dripd.message_events
        (tenant_key, execution_id, enrollment_id, type, channel, provider, adapter_id,
         recipient, provider_message_id, data, occurred_at)
    SELECT x.tenant_key, x.id, x.enrollment_id, 'clicked', x.channel, x.provider,
           x.adapter_id, x.recipient, x.provider_message_id,
           jsonb_build_object('url', link.destination), $2::timestamptz
    FROM link
    JOIN dripd.step_executions AS x ON x.id = link.execution_id
    WHERE $3::boolean AND link.track
    RETURNING id
)
SELECT link.destination, EXISTS (SELECT FROM clicked) AS recorded
FROM link
