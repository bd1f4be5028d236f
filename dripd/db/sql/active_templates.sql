-- The Python templates ("module:function") of active versions' steps, to import at start.
SELECT DISTINCT s.python_template
FROM dripd.steps AS s
JOIN dripd.sequence_versions AS v ON v.id = s.version_id
WHERE v.state = 'active' AND s.python_template IS NOT NULL
