"""Prefect tasks: ``generate`` (one description -> files) and the report artifacts."""
