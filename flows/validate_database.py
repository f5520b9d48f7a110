"""validate-database: integrity checks of one environment, and its parity with another.

Runs the built-in and configured checks (`validation:` in dataops.yaml) in one read-only
snapshot; with `against`, also diffs the two schemas and compares row counts and
checksums of the tables whose definition matches. Publishes a table artifact, and ends
Failed (ValidationFailed, carrying the report) when a check fails or the environments
differ, so that an automation on failed runs raises the alert.

The scheduled run is also the watch over backups: a deployment run (daily-production-validation)
of an environment whose role is in `backups.freshness_roles` fails when no verified backup of it
is younger than `backups.max_age_hours`, with one "backup freshness" row in the report. A run
started by hand (`dataops validate`, the demo, a direct call) asks about the database in front
of it and checks backups only when `check_backups` is true; a comparison (`against`) never does.
"""

from __future__ import annotations

from datetime import datetime, timezone

from prefect import flow, get_run_logger

import dataops.flows.engine  # noqa: F401  (runs end without a second's wait: see there)
from dataops.errors import BadInput, DataopsError, first_line
from dataops.settings import Environment, Settings, load_settings
from dataops.tasks.backup.catalog import freshness_task
from dataops.tasks.reporting import publish_table
from dataops.tasks.validation.checks import ERROR, FAIL, PASS, CheckResult
from dataops.tasks.validation.prefect_tasks import compare_environments_task, run_checks_task
from dataops.tasks.validation.validate import ValidationFailed, artifact_rows, build_report


@flow(name="validate-database")
def validate_database(env: str, against: str | None = None, config: str | None = None,
                      check_backups: bool | None = None) -> dict:
    """check_backups: true also fails when ENV has no verified backup younger than
    backups.max_age_hours; false never looks; unset (the default) looks in a deployment run
    without `against` when ENV's role is in backups.freshness_roles."""
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
    also = []
    if _checks_backups(check_backups, settings, target, against):
        also.append(backup_freshness(settings, target))
    report = build_report(checks, comparison, started, also=also)
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


def _checks_backups(asked: bool | None, settings: Settings, target: Environment, against: str | None) -> bool:
    if asked is not None:
        return asked
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    in_deployment = bool(ctx and ctx.flow_run and ctx.flow_run.deployment_id)
    return in_deployment and against is None and target.role in settings.backups.freshness_roles


def backup_freshness(settings: Settings, target: Environment) -> CheckResult:
    """The freshness answer as one row of the report, beside the database's checks. Storage that
    cannot be read is an error row, not a crash: the integrity report is still published."""
    try:
        f = freshness_task(settings, target)
    except DataopsError as exc:
        return CheckResult(name=target.name, kind="backup_freshness", table=None, constraint=None, status=ERROR,
                           detail=f"could not read the backups of {target.name}: {first_line(exc)}")
    return CheckResult(name=f.environment, kind="backup_freshness", table=None, constraint=None,
                       status=PASS if f.ok else FAIL, detail=f.detail)

if __name__ == "__main__":
    import sys

    validate_database(sys.argv[1] if len(sys.argv) > 1 else "production",
                      against=sys.argv[2] if len(sys.argv) > 2 else None)
