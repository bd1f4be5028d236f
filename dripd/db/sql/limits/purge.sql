-- Remove the rows of windows that started before $1 (the caller passes a time at least one
-- window length ago, so only ended windows go: those no longer limit anything).
DELETE FROM dripd.rate_windows WHERE window_start < $1
