"""Prefect flows: ``generate_content`` and the ``comfy-pipeline`` CLI."""
