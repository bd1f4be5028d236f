-- Forget provider event ids older than the retention ($1: the cutoff).
DELETE FROM dripd.provider_events WHERE received_at < $1::timestamptz
