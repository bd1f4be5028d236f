"""Sending rules: pure decisions fed by facts the claim already loaded."""
