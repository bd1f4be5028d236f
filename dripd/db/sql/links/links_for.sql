-- The short links an execution made before with `provider`, of the destinations given.
-- $1 execution id, $2 provider, $3 destinations
SELECT l.destination, l.short_url
FROM dripd.short_links AS l
WHERE l.execution_id = $1::uuid
  AND l.provider = $2::text
  AND l.destination = ANY ($3::text[])
