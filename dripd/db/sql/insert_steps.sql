-- $1 version, then one array per column.
INSERT INTO dripd.steps (version_id, key, position, channel, delay, template, adapter, on_failure,
                         max_attempts, at_time, cron, timezone, wait_event, wait_timeout,
                         on_timeout, when_expr, send_window, require_verified, max_length,
                         spintax, python_template, vars, short_links)
SELECT $1, *
FROM unnest($2::text[], $3::int[], $4::text[], $5::interval[], $6::text[]::jsonb[], $7::text[],
            $8::text[], $9::int[], $10::time[], $11::text[], $12::text[], $13::text[],
            $14::interval[], $15::text[], $16::text[], $17::text[]::jsonb[], $18::boolean[],
            $19::int[], $20::boolean[], $21::text[], $22::text[]::jsonb[], $23::text[]::jsonb[])
RETURNING id, key
