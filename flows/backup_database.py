"""backup-database: pg_dump of one environment streamed into storage, manifest last."""

from __future__ import annotations

from prefect import flow, get_run_logger

import dataops.flows.engine  # noqa: F401  (runs end without a second's wait: see there)
from dataops.settings import load_settings
from dataops.tasks.backup.catalog import Manifest
from dataops.tasks.backup.dump import backup_lock, dump_task, preflight_task, write_manifest_task
from dataops.tasks.reporting import markdown_table, publish_markdown


@flow(name="backup-database", log_prints=False)
def backup_database(env: str, config: str | None = None) -> dict:
    settings = load_settings(config)
    environment = settings.env(env)
    logger = get_run_logger()
    pre = preflight_task(settings, environment)
    with backup_lock(settings, environment) as discarded:
        for what in discarded:
            logger.warning("discarded %s, left by an interrupted backup", what)
        manifest: Manifest = dump_task(settings, environment, pre)
        write_manifest_task(settings, manifest)
    logger.info("backup %s of %s complete: %.1f MiB, %d tables, %d rows", manifest.id, env,
                manifest.size / 1048576, len(manifest.tables), sum(manifest.tables.values()))
    publish_markdown(
        f"backup-{env}",
        f"# Backup {manifest.id}\n\n"
        f"- environment: **{env}** (database `{manifest.database}`, PostgreSQL {manifest.server_version})\n"
        f"- stored: `{manifest.dump_key}`, {manifest.size:,} bytes ({manifest.compression}), "
        f"raw {manifest.raw_size:,} bytes\n- sha256: `{manifest.sha256}`\n" +
        (f"- parallel: pg_dump -Fd -j {manifest.jobs}, {len(manifest.parts)} parts (one object per file), "
         f"local disk peak {(manifest.local_disk_peak or 0) / 1048576:.1f} MiB\n" if manifest.parts else "") +
        f"- took {manifest.duration_seconds:.1f} s\n- schema fingerprint: `{manifest.schema_fingerprint[:16]}`\n\n"
        "## Rows per table\n\n" + markdown_table([{"table": t, "rows": n} for t, n in manifest.tables.items()]),
        f"backup {manifest.id} of {env}",
    )
    return manifest.model_dump(mode="json")


if __name__ == "__main__":
    import sys

    backup_database(sys.argv[1] if len(sys.argv) > 1 else "production")
