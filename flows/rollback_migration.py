"""rollback-migration: put a database back where it was before a failed migration run.

Started by migrate-database's on_failure hook (`start_rollback`), or by hand with the failed
run's id. What "before" means is read from that run's audit row: the revision, the schema
fingerprint and the backup taken before anything changed.

1. Downgrade to the recorded revision, under the migration lock. If the run stopped inside a
   `transactional = False` revision (killed, or a statement failed), the statements it committed
   stay without the revision being recorded: that revision's downgrade runs first (it must be
   safe to re-run, as its upgrade must), so an index it built, or an INVALID one an interrupted
   CREATE INDEX CONCURRENTLY left, goes too, instead of ending in a restore.
2. Check: the schema fingerprint equals the one before the run, and the checks pass. Data
   checksums are not compared: the application kept writing during the run, so they differ
   legitimately, and restoring over those writes to make them match would lose data.
3. If the downgrade failed or the check did not pass: restore the pre-migration backup
   (restore-database, confirmed on the operator's behalf: the rollback is authorized by
   design), then check again.
4. If that fails too: a critical alert (alerts.webhook_url), and this run fails.

A rollback that got the database back sends a warning alert through the same channel (the
failed revision, the error, what the rollback did, the run ids): nobody has to act now, but
the migration needs fixing before it is run again. A run that failed before it held the lock
changed nothing (another run may be applying right now): the rollback records that, touches
nothing and sends nothing. Every outcome goes to the audit table.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

import dataops.flows.engine  # noqa: F401  (runs end without a second's wait: see there)
from dataops.errors import BadInput, DataopsError, OperationFailed
from dataops.settings import Environment, Settings, load_settings
from dataops.tasks.alerts import send_alert
from dataops.tasks.migration import migrate
from dataops.tasks.migration.audit import PHASES, AuditRecord, load, save
from dataops.tasks.migration.checks import DatabaseState, check_task
from dataops.tasks.reporting import markdown_table, publish_markdown

LOCK_WAIT_S = 60.0  # a run still letting go of the lock; past this, a person must look


@flow(name="rollback-migration")
def rollback_migration(env: str, run_id: str, config: str | None = None) -> dict:
    settings = load_settings(config)
    environment = settings.env(env)
    dsn = environment.database_url
    logger = get_run_logger()
    parent = load(dsn, run_id)
    if parent is None:
        raise BadInput(f"no migration run {run_id} in the audit table of {env}; pass the failed run's flow run id")
    from prefect.runtime import flow_run

    me = AuditRecord(run_id=str(flow_run.id), action="rollback", environment=env, who=migrate.who_am_i(),
                     parent_run_id=run_id, target=parent.from_revision, backup_id=parent.backup_id,
                     fingerprint_before=parent.fingerprint_before, phase="applying")
    steps: list[str] = []
    alerted: list[bool] = []
    failure = parent.detail or "no error recorded"  # finish() appends the rollback's outcome to it

    def finish(outcome: str, parent_outcome: str | None, detail: str) -> dict:
        me.finish(outcome, detail, "done")
        if parent_outcome:
            parent.outcome = parent_outcome
            parent.detail = f"{parent.detail or 'failed'}; rollback {me.run_id}: {outcome}"
        for record in (parent, me):  # both again: a restore brought back an older audit table
            save(dsn, record)
        _publish(env, me, steps)
        return {"run_id": me.run_id, "parent_run_id": run_id, "outcome": outcome, "detail": detail,
                "revision": me.to_revision, "steps": steps, "alert_sent": alerted[-1] if alerted else None}

    def done(outcome: str, detail: str) -> dict:
        """Back where the run started: record it, and say so through the alert channel (a warning)."""
        alerted.append(_warn(settings, env, run_id, parent, me, steps, failure,
                             _failed_at(settings, environment, parent)))
        return finish(outcome, outcome, detail)

    if PHASES.index(parent.phase) < PHASES.index("applying"):
        steps.append(f"run {run_id} failed in phase '{parent.phase}', before it held the migration lock")
        return finish("nothing-to-undo", None, "the failed run changed nothing; the database was not touched")

    save(dsn, me)
    downgraded, why = _downgrade(settings, environment, parent.from_revision, steps, logger, parent.to_revision)
    state = check_task(settings, environment) if downgraded else None
    problems = _problems(parent, state) if state else [why]
    if downgraded and not problems:
        me.to_revision, me.fingerprint_after = parent.from_revision, state.fingerprint
        steps.append("schema fingerprint equals the one before the run; checks pass")
        undone = next((s for s in steps if s.startswith(f"downgraded {env} ")), "")
        return done("rolled-back", undone or f"downgraded to {parent.from_revision or 'base'}")

    steps.append(f"downgrade did not give back the schema: {'; '.join(problems)}")
    if why.startswith("another migration holds the lock"):
        return _critical(settings, env, run_id, parent, me, steps, finish,
                         f"could not roll back: {why}; restoring a backup now would overwrite that migration")
    if not parent.backup_id:
        return _critical(settings, env, run_id, parent, me, steps, finish, "downgrade failed and the run has no backup")
    try:
        from dataops.flows.restore_database import restore_database

        logger.warning("restoring backup %s into %s: the downgrade did not give back the schema", parent.backup_id, env)
        restore_database(env, parent.backup_id, env, confirm=env, config=config)
        steps.append(f"restored backup {parent.backup_id} into {env}")
    except Exception as exc:  # noqa: BLE001 - any failure here ends in the alert
        msg = exc.message if isinstance(exc, DataopsError) else f"{type(exc).__name__}: {exc}"
        return _critical(settings, env, run_id, parent, me, steps, finish, f"restore of backup {parent.backup_id} failed: {msg}")
    state = check_task(settings, environment)
    problems = _problems(parent, state)
    if problems:
        return _critical(settings, env, run_id, parent, me, steps, finish,
                         f"after restoring backup {parent.backup_id}: {'; '.join(problems)}")
    me.to_revision, me.fingerprint_after = parent.from_revision, state.fingerprint
    steps.append("schema fingerprint equals the one before the run; checks pass")
    return done("restored", f"restored backup {parent.backup_id} (the downgrade did not get back)")


def _downgrade(settings: Settings, env: Environment, revision: str | None, steps: list[str],
               logger, interrupted_target: str | None) -> tuple[bool, str]:
    """(done, why not). Waits a little for the lock: the failed run may still be letting go."""
    try:
        result = migrate.downgrade_task(settings, env, revision or "base", None, f"{migrate.who_am_i()} rollback",
                                        lock_wait_s=LOCK_WAIT_S, interrupted_target=interrupted_target)
    except DataopsError as exc:
        steps.append(f"downgrade to {revision or 'base'} failed: {exc.message}")
        logger.error("downgrade of %s to %s failed: %s", env.name, revision or "base", exc.message)
        return False, exc.message
    undone = ", ".join(f"{s.revision} (unfinished, never recorded)" if s.unfinished else s.revision
                       for s in result.steps) or "nothing (already there)"
    steps.append(f"downgraded {env.name} from {result.from_revision or 'base'} to {result.to_revision or 'base'}: "
                 f"undid {undone}")
    return True, ""


def _problems(parent: AuditRecord, state: DatabaseState) -> list[str]:
    out = list(state.problems)
    if parent.fingerprint_before and state.fingerprint != parent.fingerprint_before:
        out.append(f"schema fingerprint {state.fingerprint[:12]} differs from {parent.fingerprint_before[:12]} "
                   "before the run")
    return out


def _failed_at(settings: Settings, env: Environment, parent: AuditRecord) -> str:
    """Where the migration run failed, in words: the revision it was applying, or its phase."""
    if parent.phase == "validating":
        return "in its post-migration checks"
    if parent.phase != "applying":
        return f"in phase '{parent.phase}'"
    try:
        pending = migrate.upgrade_path(migrate.target_for(settings, env),
                                       parent.applied[-1] if parent.applied else parent.from_revision,
                                       parent.to_revision or "head")
    except Exception:  # noqa: BLE001 - only words for the alert: never fail a rollback that worked over them
        pending = []
    return f"at revision {pending[0].revision}" if pending else "while applying"


def _links(**run_ids: str) -> dict:
    """{name}_url for each run, when the Prefect UI's address is known (PREFECT_UI_URL, or the API's)."""
    from prefect.settings import PREFECT_UI_URL

    ui = PREFECT_UI_URL.value()
    return {f"{k}_url": f"{ui.rstrip('/')}/runs/flow-run/{v}" for k, v in run_ids.items()} if ui else {}


def _warn(settings: Settings, env: str, run_id: str, parent: AuditRecord, me: AuditRecord, steps: list[str],
          failure: str, where: str) -> bool:
    """The warning alert of a rollback that worked; True if it was delivered. `where`: see _failed_at."""
    restored = any(s.startswith("restored backup") for s in steps)
    subject = (f"migration of {env} failed and was rolled back"
               + (f" (backup {parent.backup_id} restored)" if restored else ""))
    body = (f"The migration run {run_id} of {env} failed {where}: {failure}. "
            f"The rollback run {me.run_id} put it back automatically: {'; '.join(steps)}. "
            f"{env} is at revision {parent.from_revision or 'base'} again, with the schema it had before the run "
            f"(backup taken before the run: {parent.backup_id or 'none'}). "
            + (f"Writes made to {env} after that backup were lost with the restore; check whether any matter. "
               if restored else "Nothing needs to be done now; ")
            + "fix the migration before running it again.")
    sent = send_alert(settings, "warning", subject, body, environment=env, run_id=run_id, rollback_run_id=me.run_id,
                      backup_id=parent.backup_id, failed=where, revision=parent.from_revision,
                      **_links(run=run_id, rollback_run=me.run_id))
    steps.append(f"warning alert {'sent' if sent else 'NOT delivered (see the log)'}")
    return sent


def _critical(settings: Settings, env: str, run_id: str, parent: AuditRecord, me: AuditRecord, steps: list[str],
              finish, why: str) -> dict:
    body = (f"The migration run {run_id} of {env} failed and could not be rolled back: {why}. "
            f"Revision before the run: {parent.from_revision or 'base'}; backup: {parent.backup_id or 'none'}. "
            "The database may be in an intermediate state: do not run migrations on it until a person has checked it.")
    sent = send_alert(settings, "critical", f"rollback of the migration of {env} failed", body,
                      environment=env, run_id=run_id, rollback_run_id=me.run_id, backup_id=parent.backup_id,
                      **_links(run=run_id, rollback_run=me.run_id))
    steps.append(f"critical alert {'sent' if sent else 'NOT delivered (see the log)'}")
    finish("failed", "rollback-failed", f"{why}; critical alert {'sent' if sent else 'not delivered'}")
    raise OperationFailed(f"rollback of {env} failed: {why}; a critical alert was "
                          f"{'sent' if sent else 'logged (no alerts.webhook_url, or it did not answer)'}")


def _publish(env: str, me: AuditRecord, steps: list[str]) -> None:
    publish_markdown(
        f"rollback-{env}",
        f"# Rollback of {env}: {me.outcome}\n\n{me.detail or ''}\n\n## Steps\n\n"
        + "\n".join(f"1. {s}" for s in steps) + "\n\n## Audit record\n\n"
        + markdown_table([{"field": k, "value": v} for k, v in me.summary().items()]),
        f"rollback of {env}: {me.outcome}")


def start_rollback(flow, flow_run, state) -> None:
    """on_failure hook of migrate-database: start rollback-migration for the failed run.

    Only a run that got past its backup can have changed anything; earlier failures are left
    alone (the rollback flow itself also checks how far the run got).
    """
    from prefect.logging.loggers import flow_run_logger

    logger = flow_run_logger(flow_run, flow)
    params = flow_run.parameters or {}
    env, config = params.get("env"), params.get("config")
    try:
        settings = load_settings(config)
        record = load(settings.env(env).database_url, str(flow_run.id))
    except Exception as exc:  # noqa: BLE001 - a hook must not raise; say why nothing was started
        logger.error("cannot start a rollback of %s: %s", env, exc)
        return
    if record is None or not record.backup_id:
        logger.info("migration run failed before its backup; nothing was changed, no rollback needed")
        return
    if record.outcome in ("rejected", "timed-out"):
        # Prefect marks a run whose pause expired Failed, but the run stopped on its own, unchanged.
        logger.info("migration run ended %s before applying anything; no rollback needed", record.outcome)
        return
    logger.warning("migration of %s failed after the backup; starting rollback-migration", env)
    try:
        rollback_migration(env=env, run_id=str(flow_run.id), config=config)
    except Exception as exc:  # noqa: BLE001 - the rollback run records and alerts by itself
        logger.error("rollback-migration of %s failed: %s", env, exc)


if __name__ == "__main__":
    import sys

    rollback_migration(sys.argv[1], sys.argv[2])
