"""validate-database: integrity checks of one environment, and its parity with another.

Runs the built-in and configured checks (`validation:` in dataops.yaml) in one read-only
snapshot; with `against`, also diffs the two schemas and compares row counts and
checksums of the tables whose definition matches. Publishes a table artifact, and ends
Failed (ValidationFailed, carrying the report) when a check fails or the environments
differ, so that an automation on failed runs raises the alert.
"""

from __future__ import annotations

from datetime import datetime, timezone

from prefect import flow, get_run_logger

import dataops.flows.engine  # noqa: F401  (runs end without a second's wait: see there)
from dataops.errors import BadInput
from dataops.settings import load_settings
from dataops.tasks.reporting import publish_table
from dataops.tasks.validation.validate import (
    ValidationFailed,
    artifact_rows,
    build_report,
    compare_environments_task,
    run_checks_task,
)


@flow(name="validate-database")
def validate_database(env: str, against: str | None = None, config: str | None = None) -> dict:
    settings = load_settings(config)
    target = settings.env(env)
    other = settings.env(against) if against else None
    if other is not None and other.name == target.name:
        raise BadInput(f"--against must name another environment than {env}")
    started = datetime.now(timezone.utc)
    checks = run_checks_task(target, settings.validation)
    comparison = None
    if other is not None:
        cfg = settings.validation
        comparison = compare_environments_task(target, other, columns=cfg.checksum_columns or None,
                                               exclude=cfg.checksum_exclude or None)
    report = build_report(checks, comparison, started)
    publish_table(f"validate-{env}" + (f"-against-{against}" if against else ""), artifact_rows(report),
                  report["verdict"])
    logger = get_run_logger()
    if not report["ok"]:
        failed = [c for c in report["checks"] if c["status"] in ("fail", "error")]
        for c in failed[:10]:
            logger.error("%s %s %s: %s", c["status"].upper(), c["table"] or "", c["constraint"] or c["name"], c["detail"])
        raise ValidationFailed(report["verdict"], report)
    logger.info(report["verdict"])
    return report


if __name__ == "__main__":
    import sys

    validate_database(sys.argv[1] if len(sys.argv) > 1 else "production",
                      against=sys.argv[2] if len(sys.argv) > 2 else None)
