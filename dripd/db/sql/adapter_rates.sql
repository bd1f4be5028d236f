-- Per enabled adapter, what it sent and how much of it bounced for good or drew complaints
-- since $1 (a provider's temporary bounce, data.permanent = false, is not counted).
SELECT a.id, a.tenant_key, a.name, a.paused_reason,
       count(*) FILTER (WHERE m.type = 'sent') AS sent,
       count(*) FILTER (WHERE m.type = 'bounced'
                        AND (m.data ->> 'permanent') IS DISTINCT FROM 'false') AS bounced,
       count(*) FILTER (WHERE m.type = 'complained') AS complained
FROM dripd.channel_adapters AS a
LEFT JOIN dripd.message_events AS m ON m.adapter_id = a.id AND m.occurred_at >= $1
WHERE a.enabled
GROUP BY a.id
