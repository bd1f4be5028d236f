-- New short links of an execution, and the short URL stored for every destination given:
-- the one made now, or the one made before (by an earlier attempt, or by a concurrent one).
-- A link made by a transaction that commits while this statement runs is invisible to its
-- snapshot, so `DO NOTHING` would leave that destination out of the answer; the no-op
-- `DO UPDATE` waits for it and returns it instead (it writes only in that race: rows
-- already visible are not inserted again). A code taken by another link is a unique
-- violation of `short_links_code_key`, for the caller to retry with new codes.
-- $1 execution id, $2 tenant, $3 provider, $4 destinations (distinct), $5 codes (NULL for
-- a `webhook` link), $6 short URLs, $7 track
WITH given AS (
    SELECT g.destination, g.code, g.short_url, g.track
    FROM unnest($4::text[], $5::text[], $6::text[], $7::boolean[])
        AS g(destination, code, short_url, track)
), old AS (
    SELECT l.destination, l.short_url
    FROM dripd.short_links AS l
    WHERE l.execution_id = $1::uuid
      AND l.provider = $3::text
      AND l.destination = ANY ($4::text[])
), new AS (
    INSERT INTO dripd.short_links
        (execution_id, tenant_key, provider, destination, code, short_url, track)
    SELECT $1::uuid, $2::text, $3::text, g.destination, g.code, g.short_url, g.track
    FROM given AS g
    WHERE NOT EXISTS (SELECT FROM old WHERE old.destination = g.destination)
    ON CONFLICT (execution_id, provider, destination)
        DO UPDATE SET track = dripd.short_links.track
    RETURNING destination, short_url
)
SELECT destination, short_url FROM old
UNION ALL
SELECT destination, short_url FROM new
