-- Refresh the queue table's statistics; one daemon at a time (the others skip).
SELECT pg_try_advisory_xact_lock(7236981365098012001) AS locked
