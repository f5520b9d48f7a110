"""prune-backups: apply retention to one environment's backups."""

from __future__ import annotations

from prefect import flow, get_run_logger

import dataops.flows.engine  # noqa: F401  (runs end without a second's wait: see there)
from dataops.settings import load_settings
from dataops.tasks.backup.catalog import delete_task, list_backups, retention_plan
from dataops.tasks.backup.dump import discard_leftovers_task
from dataops.tasks.backup.storage import open_storage
from dataops.tasks.reporting import markdown_table, publish_markdown


@flow(name="prune-backups")
def prune_backups(env: str, dry_run: bool = False, config: str | None = None) -> dict:
    settings = load_settings(config)
    environment = settings.env(env)
    cfg = settings.backups
    discarded = [] if dry_run else discard_leftovers_task(settings, environment)
    manifests = list_backups(open_storage(settings.storage), env)
    keep, delete, reasons = retention_plan(manifests, cfg.keep_last, cfg.keep_days)
    if not dry_run:
        for m in delete:
            delete_task(settings, m)
    verb = "would delete" if dry_run else "deleted"
    get_run_logger().info("%s: kept %d backups, %s %d", env, len(keep), verb, len(delete))
    rows = [{"id": m.id, "action": "keep", "why": reasons[m.id]} for m in keep] + \
           [{"id": m.id, "action": verb, "why": f"older than {cfg.keep_days} days and not among the {cfg.keep_last} newest"}
            for m in delete]
    publish_markdown(f"prune-{env}", f"# Retention for {env}{' (dry run)' if dry_run else ''}\n\n"
                     f"keep_last={cfg.keep_last}, keep_days={cfg.keep_days}\n\n" + markdown_table(rows) +
                     "".join(f"\n- discarded {what}, left by an interrupted backup" for what in discarded),
                     f"prune of {env}")
    return {"kept": [m.id for m in keep], "delete": [m.id for m in delete], "dry_run": dry_run, "discarded": discarded}
