"""`dataops backup`, `backups`, `restore`, `verify-backup` and `prune`: the backup wing's commands."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Optional

import typer

from dataops.cli.app import app, echo, env_arg, load_cli_settings, state
from dataops.tasks.reporting import text_table


@app.command()
def backup(env: str = env_arg()):
    """Back up ENV to storage; prints the new backup's id as the last word."""
    load_cli_settings(env)
    from dataops.flows.backup_database import backup_database

    m = backup_database(env, config=state.config)
    echo(f"{m['size'] / 1048576:.1f} MiB, {len(m['tables'])} tables, {sum(m['tables'].values()):,} rows, "
         f"sha256 {m['sha256'][:16]}")
    echo(f"backup {m['id']}")


@app.command("backups")
def list_backups_cmd(env: str = env_arg(),
                     as_json: bool = typer.Option(False, "--json", help="print a JSON list of manifests")):
    """List the complete backups of ENV, newest last, with each one's age and verification."""
    settings = load_cli_settings(env)
    from dataops.tasks.backup.catalog import age_hours, age_text, list_backups
    from dataops.tasks.backup.storage import open_storage

    manifests = list_backups(open_storage(settings.storage), env)
    now = datetime.now(timezone.utc)
    if as_json:
        echo(json.dumps([{**m.model_dump(mode="json"), "age_hours": round(age_hours(m, now), 2),
                          "verified": m.verified} for m in manifests], indent=2))
        return
    if not manifests:
        echo(f"no backups of {env} yet; run `dataops backup {env}`")
        return
    echo(text_table([_row(m, age_text(age_hours(m, now))) for m in manifests]))


def _row(m, age: str) -> dict:
    """A manifest's summary, its age after finished_at, and when it was verified: "yes, 2026-12-03 04:10Z",
    "FAILED, ..." or "no"."""
    row = {**m.summary(), "age": age}
    v = m.verification
    if v is not None:
        when = f"{v.verified_at.astimezone(timezone.utc):%Y-%m-%d %H:%M}Z"
        row["verified"] = f"{row['verified']}, {when}"
    return {k: row[k] for k in ("id", "database", "size_mib", "rows", "tables", "finished_at", "age", "verified")}


@app.command()
def restore(env: str = env_arg("environment the backup was taken from"),
            backup_id: str = typer.Argument(..., help="backup id (or 'latest')", show_default=False),
            into: str = typer.Option(..., "--into", help="environment to restore into", show_default=False),
            confirm: Optional[str] = typer.Option(None, "--confirm", help="the target's name; required when its role is production",
                                                  show_default=False)):
    """Restore BACKUP_ID of ENV into another environment, verified before and after."""
    settings = load_cli_settings(env)
    from dataops.tasks.backup.restore import guard_target

    guard_target(settings.env(into), confirm)
    from dataops.flows.restore_database import restore_database

    r = restore_database(env, backup_id, into, confirm=confirm, config=state.config)
    echo(f"restored {r['backup_id']} into {into}: {len(r['tables'])} tables, {sum(r['tables'].values()):,} rows, "
         f"{r['seconds']:.1f} s; {r['privileges']}")


@app.command("verify-backup")
def verify_backup_cmd(env: str = env_arg(),
                      backup_id: str = typer.Argument("latest", help="backup id (default: the newest)")):
    """Prove a backup restores: restore into a scratch database, compare with its manifest, drop it."""
    load_cli_settings(env)
    from dataops.flows.verify_backup import verify_backup

    r = verify_backup(env, backup_id, config=state.config)
    echo(f"backup {r['backup_id']} verified in {r['seconds']:.1f} s")


@app.command()
def prune(env: str = env_arg(),
          dry_run: bool = typer.Option(False, "--dry-run", help="only say what would be deleted")):
    """Apply retention (backups.keep_last, keep_days); never deletes the newest verified backup."""
    load_cli_settings(env)
    from dataops.flows.prune_backups import prune_backups

    r = prune_backups(env, dry_run=dry_run, config=state.config)
    verb = "would delete" if dry_run else "deleted"
    for bid in r["delete"]:
        echo(f"{verb} {bid}")
    echo(f"kept {len(r['kept'])}, {verb} {len(r['delete'])}")
