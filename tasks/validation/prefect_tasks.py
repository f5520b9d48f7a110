"""The validation wing's Prefect tasks: thin wrappers over dataops.tasks.validation.validate, kept
apart so that the plain functions import without Prefect (a refresh checks its new copy with
run_checks; importing Prefect there cost it a second)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from prefect import task

from dataops.tasks.retries import RETRY_TRANSIENT
from dataops.tasks.validation.checks import Check
from dataops.tasks.validation.validate import (
    CheckReport,
    Database,
    EnvironmentComparison,
    compare_environments,
    run_checks,
)
from dataops.validation_settings import ValidationSettings


@task(name="run-checks", **RETRY_TRANSIENT)
def run_checks_task(db: Database, checks: Sequence[Check] | ValidationSettings | None = None) -> CheckReport:
    return run_checks(db, checks)


@task(name="compare-environments", **RETRY_TRANSIENT)
def compare_environments_task(a: Database, b: Database, columns: Mapping[str, Sequence[str]] | None = None,
                              exclude: Mapping[str, Sequence[str]] | None = None) -> EnvironmentComparison:
    return compare_environments(a, b, columns=columns, exclude=exclude)
