-- The database's clock: the one clock for claims, leases and due times.
SELECT clock_timestamp() AS now
