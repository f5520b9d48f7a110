"""What a migration checks before it starts, after it ends and after a rollback.

One place between the migration flows and the validation wing (`tasks/validation/validate.py`):
the schema fingerprint, the table checksums and the integrity checks (foreign keys, unique
keys, sequences, invalid indexes, NOT VALID constraints with violating rows, plus whatever
the `validation:` section configures), all read in one REPEATABLE READ, READ ONLY snapshot,
so they describe one moment of the database.
"""

from __future__ import annotations

from prefect import task

from dataops.dsn import Dsn
from dataops.settings import Environment, Settings
from dataops.tasks.retries import RETRY_TRANSIENT
from dataops.tasks.validation.validate import DatabaseState, database_state
from dataops.validation_settings import ValidationSettings

__all__ = ["DatabaseState", "check_task", "database_problems", "inspect_database"]


def inspect_database(target: Environment | Dsn, *, checks: ValidationSettings | None = None, checksums: bool = True,
                     timeout: int = 10) -> DatabaseState:
    """Fingerprint, checksums (if asked) and check results of one moment. Checksums leave out
    the columns `validation.checksum_exclude` names, as every other comparison does."""
    exclude = checks.checksum_exclude if checks is not None else None
    return database_state(target, checks=checks, checksums=checksums, exclude=exclude, connect_timeout=timeout)


def database_problems(dsn: Dsn) -> list[str]:
    """The failed checks of a database, one line each (the round trip's check after each upgrade)."""
    return database_state(dsn, checksums=False).problems


# -- Prefect tasks ---------------------------------------------------------------------------------

@task(name="check-database", **RETRY_TRANSIENT)
def check_task(settings: Settings, env: Environment, checksums: bool = False) -> DatabaseState:
    """The migration flows' check before and after they change the schema, with the
    `validation:` section's checks."""
    return inspect_database(env, checks=settings.validation, checksums=checksums,
                            timeout=settings.postgres.connect_timeout)
