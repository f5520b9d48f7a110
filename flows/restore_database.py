"""restore-database: a backup of `env` into environment `target`, checked before and after."""

from __future__ import annotations

from prefect import flow, get_run_logger

import dataops.flows.engine  # noqa: F401  (runs end without a second's wait: see there)
from dataops.settings import load_settings
from dataops.tasks.backup.catalog import get_backup
from dataops.tasks.backup.restore import guard_target, restore_task, verify_checksum_task
from dataops.tasks.backup.storage import open_storage
from dataops.tasks.reporting import markdown_table, publish_markdown


@flow(name="restore-database")
def restore_database(env: str, backup_id: str, target: str, confirm: str | None = None,
                     config: str | None = None) -> dict:
    settings = load_settings(config)
    source, into = settings.env(env), settings.env(target)
    guard_target(into, confirm)  # refuse before reading anything
    manifest = get_backup(open_storage(settings.storage), source.name, backup_id)
    verify_checksum_task(settings, manifest)
    result = restore_task(settings, manifest, into, confirm)
    get_run_logger().info("restored backup %s of %s into %s in %.1f s", manifest.id, env, target, result.seconds)
    publish_markdown(
        f"restore-{target}",
        f"# Restore of backup {manifest.id}\n\n- from: **{env}**\n- into: **{target}** (database `{result.database}`)\n"
        f"- checksum verified before the restore; row counts and schema fingerprint match the manifest\n"
        f"- took {result.seconds:.1f} s\n- {result.privileges}\n" +
        "".join(f"- discarded {name}, left by an interrupted run\n" for name in result.discarded) + "\n" +
        markdown_table([{"table": t, "rows": n} for t, n in result.tables.items()]),
        f"restore of {manifest.id} into {target}",
    )
    return {"backup_id": manifest.id, "target": target, "seconds": result.seconds, "tables": result.tables,
            "discarded": result.discarded, "privileges": result.privileges}
