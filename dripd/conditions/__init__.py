"""Conditions: the `when` predicate language on transitions (`expr`) and the hooks it reads."""
