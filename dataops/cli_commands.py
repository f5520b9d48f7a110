"""Imports the modules that add commands to the `dataops` CLI (validate, migrate, transform,
refresh-staging, anonymize, deploy, server). One line per area, so each area owns its file."""
