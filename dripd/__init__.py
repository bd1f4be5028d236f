"""dripd: a drip and sequence messaging daemon with all state in PostgreSQL."""

__version__ = "0.1.0"
