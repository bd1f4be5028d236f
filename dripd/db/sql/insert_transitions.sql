-- $1 version, then one array per column.
INSERT INTO dripd.transitions (version_id, from_step_id, to_step_id, priority, when_expr, position)
SELECT $1, *
FROM unnest($2::uuid[], $3::uuid[], $4::int[], $5::text[], $6::int[])
