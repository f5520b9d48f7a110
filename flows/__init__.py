"""Prefect flows: each composes tasks from `tasks/` and publishes an artifact of what it did."""
