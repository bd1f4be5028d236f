-- How stale the planner's statistics of the queue table are. The claim's plan depends on
-- them: without any, Postgres bitmap-scans every due row and sorts it instead of reading
-- the first n in index order.
SELECT greatest(last_analyze, last_autoanalyze) AS analyzed_at,
       n_live_tup AS live,
       n_mod_since_analyze AS modified
FROM pg_stat_user_tables
WHERE relid = 'dripd.step_executions'::regclass
