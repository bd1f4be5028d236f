-- The [hooks] tables of active versions, to import their Python hooks at start.
SELECT hooks FROM dripd.sequence_versions WHERE state = 'active' AND hooks <> '{}'
