"""downgrade-database: undo applied revisions by hand (`dataops migrate ENV down`).

Undoing is dropping, so it goes the same careful way as a migration: a production target
needs its name typed back, a backup comes first, the revisions are undone under the
migration lock one transaction each, the checks run after, and the audit table records it.
No rollback hook: the backup taken first is the way back, restored by a person who decides.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

import dataops.flows.engine  # noqa: F401  (runs end without a second's wait: see there)
from dataops.errors import DataopsError, OperationFailed
from dataops.settings import load_settings
from dataops.tasks.migration import migrate
from dataops.tasks.migration.audit import AuditRecord, save
from dataops.tasks.migration.checks import check_task
from dataops.tasks.reporting import markdown_table, publish_markdown


@flow(name="downgrade-database")
def downgrade_database(env: str, to: str | None = None, steps: int | None = None, confirm: str | None = None,
                       config: str | None = None) -> dict:
    settings = load_settings(config)
    environment = settings.env(env)
    migrate.guard_downgrade(environment, confirm)
    status = migrate.status_task(settings, environment)
    # bad --to/--steps fail here, before the backup
    undo = migrate.downgrade_path(migrate.target_for(settings, environment), status.current, to, steps)
    from prefect.runtime import flow_run

    record = AuditRecord(run_id=str(flow_run.id), action="downgrade", environment=env, who=migrate.who_am_i(),
                         target=to if to is not None else f"-{steps}", from_revision=status.current)
    dsn = environment.database_url
    before = check_task(settings, environment)
    record.fingerprint_before = before.fingerprint
    save(dsn, record)
    try:
        if not undo:
            record.finish("nothing-to-do", f"{env} is already at {status.current or 'base'}", "done")
            save(dsn, record)
            return {"outcome": record.outcome, "revision": status.current, "undone": []}
        from dataops.flows.backup_database import backup_database

        record.phase = "backup"
        record.backup_id = backup_database(env, config=config)["id"]
        record.phase = "applying"
        save(dsn, record)
        result = migrate.downgrade_task(settings, environment, to, steps, record.who)
        record.applied, record.to_revision = result.revisions, result.to_revision
        post = check_task(settings, environment)
        record.fingerprint_after = post.fingerprint
        if not post.ok:
            raise OperationFailed(f"checks after the downgrade of {env} failed: {'; '.join(post.problems)}; "
                                  f"backup {record.backup_id} holds the state before it")
        record.finish("succeeded", f"undid {', '.join(result.revisions)}", "done")
        save(dsn, record)
    except Exception as exc:
        msg = exc.message if isinstance(exc, DataopsError) else f"{type(exc).__name__}: {exc}"
        record.finish("failed", msg)
        save(dsn, record)
        raise
    finally:
        publish_markdown(f"downgrade-{env}", f"# Downgrade of {env}: {record.outcome}\n\n{record.detail or ''}\n\n"
                         + markdown_table([{"field": k, "value": v} for k, v in record.summary().items()]),
                         f"downgrade of {env}: {record.outcome}")
    get_run_logger().info("downgraded %s from %s to %s", env, result.from_revision, result.to_revision or "base")
    return {"outcome": record.outcome, "revision": result.to_revision, "undone": result.revisions,
            "backup_id": record.backup_id}
