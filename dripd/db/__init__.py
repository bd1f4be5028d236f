"""The database layer: pool, migrations and the store, the only code that runs SQL."""
