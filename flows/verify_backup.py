"""verify-backup: prove a backup restores, and mark it verified."""

from __future__ import annotations

from prefect import flow, get_run_logger

import dataops.flows.engine  # noqa: F401  (runs end without a second's wait: see there)
from dataops.errors import OperationFailed
from dataops.settings import load_settings
from dataops.tasks.backup.catalog import get_backup
from dataops.tasks.backup.restore import verify_task
from dataops.tasks.backup.storage import open_storage
from dataops.tasks.reporting import publish_markdown


@flow(name="verify-backup")
def verify_backup(env: str, backup_id: str = "latest", config: str | None = None) -> dict:
    settings = load_settings(config)
    environment = settings.env(env)
    manifest = get_backup(open_storage(settings.storage), environment.name, backup_id)
    result = verify_task(settings, manifest, environment)
    verdict = "VERIFIED" if result.ok else "FAILED"
    problems = "".join(f"- {p}\n" for p in result.problems) or "- none\n"
    publish_markdown(
        f"verify-{env}",
        f"# Backup {manifest.id}: {verdict}\n\nRestored into a scratch database, compared with the manifest "
        f"({len(manifest.tables)} tables, {sum(manifest.tables.values()):,} rows), scratch dropped, "
        f"in {result.duration_seconds:.1f} s.\n\n## Problems\n\n{problems}",
        f"verification of {manifest.id}",
    )
    if not result.ok:
        raise OperationFailed(f"backup {manifest.id} of {env} failed verification: {'; '.join(result.problems[:3])}")
    get_run_logger().info("backup %s verified in %.1f s", manifest.id, result.duration_seconds)
    return {"backup_id": manifest.id, "ok": result.ok, "seconds": result.duration_seconds}
