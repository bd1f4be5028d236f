-- New short links of executions, and the short URL stored for every (execution, destination)
-- given: the one made now, or the one made before (by an earlier attempt, or by a concurrent
-- one). A link made by a transaction that commits while this statement runs is invisible to
-- its snapshot, so `DO NOTHING` would leave that destination out of the answer; the no-op
-- `DO UPDATE` waits for it and returns it instead (it writes only in that race: rows already
-- visible are not inserted again). Rows go in (execution, destination) order, so that two
-- statements never wait for each other's rows crosswise. A code taken by another link is a
-- unique violation of `short_links_code_key`, for the caller to retry with new codes.
-- $1 execution ids, $2 tenants, $3 provider, $4 destinations (distinct per execution),
-- $5 codes (NULL for a `webhook` link), $6 short URLs, $7 track
WITH given AS (
    SELECT g.execution_id, g.tenant_key, g.destination, g.code, g.short_url, g.track
    FROM unnest($1::uuid[], $2::text[], $4::text[], $5::text[], $6::text[], $7::boolean[])
        AS g(execution_id, tenant_key, destination, code, short_url, track)
), old AS (
    SELECT l.execution_id, l.destination, l.short_url
    FROM dripd.short_links AS l
    JOIN given AS g ON l.execution_id = g.execution_id AND l.destination = g.destination
    WHERE l.provider = $3::text
), new AS (
    INSERT INTO dripd.short_links
        (execution_id, tenant_key, provider, destination, code, short_url, track)
    SELECT g.execution_id, g.tenant_key, $3::text, g.destination, g.code, g.short_url, g.track
    FROM given AS g
    WHERE NOT EXISTS (
        SELECT FROM old WHERE old.execution_id = g.execution_id
                          AND old.destination = g.destination
    )
    ORDER BY g.execution_id, g.destination
    ON CONFLICT (execution_id, provider, destination)
        DO UPDATE SET track = dripd.short_links.track
    RETURNING execution_id, destination, short_url
)
SELECT execution_id, destination, short_url FROM old
UNION ALL
SELECT execution_id, destination, short_url FROM new
