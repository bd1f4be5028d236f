-- How often, and when last, subscribers had the given events (for `events.<key>.*` in
-- conditions). One subscriber per array index. $1 tenants, $2 types, $3 ids, $4 event keys
SELECT s.n, st.key, st.count, st.last_at
FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY
     AS s(tenant_key, subscriber_type, subscriber_id, n)
CROSS JOIN LATERAL (
    SELECT ev.key, count(*) AS count, max(ev.occurred_at) AS last_at
    FROM dripd.events AS ev
    WHERE ev.subscriber_type = s.subscriber_type AND ev.subscriber_id = s.subscriber_id
      AND ev.key = ANY ($4::text[])
      AND (ev.tenant_key = s.tenant_key OR (s.tenant_key IS NULL AND ev.tenant_key IS NULL))
    GROUP BY ev.key
) AS st
