-- Remove the rows of buckets whose newest slice ended before $1 (the caller passes a time at
-- least one window length ago, so only rows that no longer limit anything go).
DELETE FROM dripd.rate_windows WHERE start_at + cardinality(grants) * slice < $1
