"""Intake: data contracts, their rules, ingest, validation (SQL pass and Great Expectations)."""
