"""The daemon: claim due executions, run them through the pipeline, record the outcomes."""
