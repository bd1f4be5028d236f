-- $1 version, then one array per column.
INSERT INTO dripd.steps (version_id, key, position, channel, delay, template, adapter, on_failure, max_attempts)
SELECT $1, *
FROM unnest($2::text[], $3::int[], $4::text[], $5::interval[], $6::text[]::jsonb[], $7::text[],
            $8::text[], $9::int[])
RETURNING id, key
