"""Reusable building blocks: plain functions that do the work, thin Prefect task wrappers at the edge."""
