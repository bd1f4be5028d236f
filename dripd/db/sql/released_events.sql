-- The events that released claimed waits, when the claim could not see them. The claim
-- reads `dripd.events` in its own snapshot, taken before it locked the row: an event whose
-- transaction released the wait and committed in between is the row's newest version
-- (event_id set, seen through the lock) but not in that snapshot. A new statement sees it.
-- $1 event ids
SELECT ev.id, jsonb_build_object('key', ev.key, 'data', ev.data, 'id', ev.id,
                                 'occurred_at', ev.occurred_at) AS event
FROM dripd.events AS ev
WHERE ev.id = ANY ($1::bigint[])
