"""migrate-database: apply pending schema revisions to one environment, the safe way round.

1. Preflight: status, plan, lint, the database's checks; any problem stops the run here.
2. Backup (the backup-database flow). No backup, no migration.
3. Production: the run pauses for a person's approval, with the plan published as an
   artifact; rejected, it stops with nothing changed (state Cancelled); unanswered, Prefect
   fails the run when the pause expires (also unchanged, and no rollback is started).
4. Apply under the advisory lock, one transaction per revision, lock_timeout retried.
5. Post-validation: fingerprint recorded, checks run again.
6. Audit row in dataops_migrations.audit, updated at every phase, and the run's artifact.

A failure after the backup starts the rollback-migration flow (on_failure hook). Hooks run in
this process only, so the deployments add a server-side automation on Failed runs as well.
"""

from __future__ import annotations

import logging

from prefect import flow, get_run_logger
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.states import Cancelled
from pydantic import Field

import dataops.flows.engine  # noqa: F401  (runs end without a second's wait: see there)
from dataops.errors import BadInput, DataopsError, OperationFailed
from dataops.flows.rollback_migration import start_rollback
from dataops.settings import Settings, load_settings
from dataops.tasks.migration import migrate
from dataops.tasks.migration.audit import AuditRecord, save
from dataops.tasks.migration.checks import check_task
from dataops.tasks.migration.lint import Finding
from dataops.tasks.migration.preflight import Preflight, preflight_task
from dataops.tasks.reporting import markdown_table, publish_markdown

APPROVAL_KEY = "approve-migration"


class ApprovalInput(RunInput):
    """The Resume form a production approver fills in."""

    approved: bool = Field(description="apply the migration shown in the plan artifact")
    approver: str = Field(min_length=1, description="your name, recorded in the audit table")
    comment: str = Field(default="", description="why (recorded in the audit table)")


@flow(name="migrate-database", on_failure=[start_rollback])
def migrate_database(env: str, target: str = "head", dry_run: bool = False, auto_approve: bool = False,
                     config: str | None = None) -> dict:
    settings = load_settings(config)
    environment = settings.env(env)
    if auto_approve and not settings.migrations.allow_auto_approve:
        raise BadInput("auto_approve is honored only with migrations.allow_auto_approve: true in "
                       f"{settings.source or 'dataops.yaml'} (demo stacks); approve the run in the Prefect UI instead")
    logger = get_run_logger()
    from prefect.runtime import flow_run

    record = AuditRecord(run_id=str(flow_run.id), action="migrate", environment=env, who=migrate.who_am_i(),
                         target=target)
    dsn = environment.database_url

    def audit(**changes) -> None:
        for k, v in changes.items():
            setattr(record, k, v)
        save(dsn, record)

    def finish(outcome: str, detail: str, phase: str | None = None, **changes) -> None:
        record.finish(outcome, detail, phase)
        audit(**changes)

    pre: Preflight = preflight_task(settings, environment, target)
    audit(from_revision=pre.current, to_revision=pre.target, fingerprint_before=pre.state.fingerprint,
          checksums_before=pre.state.checksums)
    try:
        _publish_plan(env, pre, dry_run)
        if not pre.ok:
            raise OperationFailed(f"preflight of {env} failed, nothing was changed: " + "; ".join(pre.problems))
        if not pre.plans:
            finish("nothing-to-do", f"{env} is already at {pre.current or 'base'}")
            return _result(record, [])
        if dry_run:
            finish("dry-run", f"would apply {', '.join(pre.pending)}")
            return _result(record, [])

        audit(phase="backup")
        from dataops.flows.backup_database import backup_database

        manifest = backup_database(env, config=config)
        audit(backup_id=manifest["id"])
        logger.info("backup %s of %s taken before the migration", manifest["id"], env)

        if environment.is_production:
            audit(phase="approval")
            answer = _approval(settings, env, pre, auto_approve)
            if answer is None or not answer.approved:
                outcome = "timed-out" if answer is None else "rejected"
                detail = (f"no answer within {settings.migrations.approval_timeout_s} s" if answer is None
                          else f"rejected by {answer.approver}" + (f": {answer.comment}" if answer.comment else ""))
                finish(outcome, detail + "; nothing was changed", approver=answer.approver if answer else None,
                       comment=(answer.comment or None) if answer else None)
                _publish_result(env, record, [])
                return Cancelled(message=f"migration of {env} {outcome}: {detail}")
            audit(approver=answer.approver, comment=answer.comment or None)

        def started() -> None:
            audit(phase="applying")

        def applied(step: migrate.StepResult) -> None:
            audit(applied=[*record.applied, step.revision])

        result = migrate.upgrade_task(settings, environment, target, pre.current, record.who, on_step=applied,
                                      on_start=started)
        audit(phase="validating", to_revision=result.to_revision)
        post = check_task(settings, environment)
        audit(fingerprint_after=post.fingerprint)
        if not post.ok:
            raise OperationFailed(f"post-migration checks of {env} failed: {'; '.join(post.problems)}")
        finish("succeeded", f"applied {', '.join(result.revisions)} in {result.seconds:.1f} s", phase="done")
        logger.info("migrated %s from %s to %s: %s", env, result.from_revision or "base", result.to_revision,
                    ", ".join(result.revisions))
        _publish_result(env, record, result.steps)
        return _result(record, result.steps)
    except Exception as exc:
        message = exc.message if isinstance(exc, DataopsError) else f"{type(exc).__name__}: {exc}"
        try:
            finish("failed", message)
            _publish_result(env, record, [])
        except Exception:  # noqa: BLE001 - the original failure is what matters
            logging.getLogger("dataops.migrate").exception("could not record the failure in the audit table")
        raise


def _result(record: AuditRecord, steps: list) -> dict:
    return {"run_id": record.run_id, "environment": record.environment, "outcome": record.outcome,
            "from_revision": record.from_revision, "to_revision": record.to_revision, "applied": list(record.applied),
            "backup_id": record.backup_id, "detail": record.detail,
            "steps": [{"revision": s.revision, "seconds": s.seconds, "attempts": s.attempts} for s in steps]}


def _approval(settings: Settings, env: str, pre: Preflight, auto_approve: bool) -> ApprovalInput | None:
    """The approver's answer, or None if none came in time."""
    from prefect.exceptions import FlowPauseTimeout

    logger = get_run_logger()
    if auto_approve:
        logger.warning("APPROVED AUTOMATICALLY (demo mode): migrations.allow_auto_approve is true; "
                       "never set it for a real production database")
        return ApprovalInput(approved=True, approver="auto-approve (demo mode)", comment="")
    form = ApprovalInput.with_initial_data(
        description=f"Approve the migration of **{env}** from {pre.current or 'base'} to {pre.target}?\n\n"
                    + plan_markdown(pre), approved=False, approver="")
    logger.info("waiting up to %d s for approval of the migration of %s (Resume the run in the Prefect UI)",
                settings.migrations.approval_timeout_s, env)
    try:
        return pause_flow_run(wait_for_input=form, timeout=settings.migrations.approval_timeout_s,
                              poll_interval=settings.migrations.approval_poll_s, key=APPROVAL_KEY)
    except FlowPauseTimeout:
        return None


# -- artifacts ----------------------------------------------------------------------------

def _findings_table(findings: list[Finding]) -> str:
    return markdown_table([{"revision": f.revision, "severity": "allowed" if f.allowed else f.severity,
                            "rule": f.rule, "statement": f"`{f.statement}`", "why": f.reason,
                            "instead": f.alternative} for f in findings])


def plan_markdown(pre: Preflight) -> str:
    revs = markdown_table([{"revision": p.revision, "message": p.message,
                            "transaction": "yes" if p.transactional else "no (autocommit)"} for p in pre.plans])
    return (f"## Revisions to apply\n\n{revs}\n\n## Lint\n\n{_findings_table(pre.findings)}\n\n"
            f"## SQL\n\n```sql\n{migrate.plan_text(pre.plans)}\n```\n")


def _publish_plan(env: str, pre: Preflight, dry_run: bool) -> None:
    checks = "\n".join([*(f"- {p}" for p in pre.problems), *(f"- note: {n}" for n in pre.notes)]) or "- all passed"
    publish_markdown(
        f"migration-plan-{env}",
        f"# Migration plan for {env}{' (dry run)' if dry_run else ''}\n\n"
        f"- at revision **{pre.current or 'base'}**, target **{pre.target}**, "
        f"{len(pre.plans)} revision(s) pending\n- schema fingerprint before: `{pre.state.fingerprint[:16]}`\n\n"
        f"## Preflight\n\n{checks}\n\n" + plan_markdown(pre),
        f"plan of the migration of {env} to {pre.target}")


def _publish_result(env: str, record: AuditRecord, steps: list) -> None:
    publish_markdown(
        f"migration-{env}",
        f"# Migration of {env}: {record.outcome}\n\n{record.detail or ''}\n\n## Audit record\n\n"
        + markdown_table([{"field": k, "value": v} for k, v in record.summary().items()])
        + "\n\n## Revisions\n\n"
        + markdown_table([{"revision": s.revision, "seconds": s.seconds, "attempts": s.attempts} for s in steps]),
        f"migration of {env}: {record.outcome}")


if __name__ == "__main__":
    import sys

    migrate_database(sys.argv[1] if len(sys.argv) > 1 else "staging")
