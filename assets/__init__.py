"""Dagster assets, one module per pipeline stage. Each is thin: it calls the domain core
inside a store connection and returns counts as metadata (never values)."""
