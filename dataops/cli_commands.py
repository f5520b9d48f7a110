"""Imports the modules that add commands to the `dataops` CLI (validate, migrate, transform,
refresh-staging, anonymize, deploy, server). One line per area, so each area owns its file."""
import dataops.cli_deploy  # noqa: F401
import dataops.cli_migrate  # noqa: F401
import dataops.cli_refresh  # noqa: F401
import dataops.cli_transform  # noqa: F401
