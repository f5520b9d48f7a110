"""`dataops demo`: the whole story on the embedded stack, end to end, with a short report.

Each step runs the real flow (on Prefect's temporary local API unless PREFECT_API_URL
names a server) against the embedded PostgreSQL and the local S3 endpoint. Later issues
add their steps to STEPS.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dataops.errors import DataopsError
from dataops.redact import redact
from dataops.settings import Settings, load_settings


@dataclass
class DemoContext:
    settings: Settings
    config: str
    facts: dict = field(default_factory=dict)


def step_backup(ctx: DemoContext) -> str:
    from flows.backup_database import backup_database

    m = backup_database("production", config=ctx.config)
    ctx.facts["backup_id"] = m["id"]
    return f"backup {m['id']}: {m['size'] / 1048576:.1f} MiB, {sum(m['tables'].values()):,} rows in {len(m['tables'])} tables"


def step_list(ctx: DemoContext) -> str:
    from tasks.catalog import list_backups
    from tasks.storage import open_storage

    found = list_backups(open_storage(ctx.settings.storage), "production")
    assert found and found[-1].id == ctx.facts["backup_id"], "the new backup is not listed last"
    return f"{len(found)} complete backup(s) of production, newest {found[-1].id}"


def step_verify(ctx: DemoContext) -> str:
    from flows.verify_backup import verify_backup

    r = verify_backup("production", ctx.facts["backup_id"], config=ctx.config)
    return f"restored into a scratch database and matched the manifest in {r['seconds']:.1f} s"


def step_restore(ctx: DemoContext) -> str:
    from flows.restore_database import restore_database

    r = restore_database("production", ctx.facts["backup_id"], "staging", config=ctx.config)
    return f"staging now holds backup {r['backup_id']} ({sum(r['tables'].values()):,} rows)"


def step_compare(ctx: DemoContext) -> str:
    from tasks.validation import compare_environments

    c = compare_environments(ctx.settings.env("production"), ctx.settings.env("staging"))
    if not c.ok:
        bad = [f"{t.table} ({t.status})" for t in c.tables if not t.ok] + [str(d) for d in c.differences[:3]]
        raise DataopsError(f"{c.summary()} after restore: {'; '.join(bad[:5])}")
    return f"{len(c.tables)} tables: schema, row counts and checksums identical in production and staging"


def step_validate(ctx: DemoContext) -> str:
    from flows.validate_database import validate_database

    r = validate_database("production", config=ctx.config)
    s = r["summary"]
    return (f"{s['passed']} of {s['checks']} checks passed ({s['warnings']} warnings): foreign keys, unique keys, "
            f"sequences, indexes; {r['seconds']:.1f} s")


def step_migrate(ctx: DemoContext) -> str:
    """The example migrations (0003..head) on production: preflight, its own backup, approval
    (automatic: the dev config allows it), apply under the lock, checks, audit."""
    from flows.migrate_database import migrate_database

    r = migrate_database("production", auto_approve=True, config=ctx.config)
    if r["outcome"] != "succeeded":
        raise DataopsError(f"migration of production: {r['outcome']}: {r['detail']}")
    took = sum(s["seconds"] for s in r["steps"])
    return (f"{r['from_revision']} -> {r['to_revision']}: applied {', '.join(r['applied'])} in {took:.1f} s "
            f"after backup {r['backup_id']}")


def step_transform(ctx: DemoContext) -> str:
    """The users.full_name split on production: snapshot, batches, checks, counts."""
    from flows.run_transform import run_transform

    r = run_transform("production", "users_split_full_name", config=ctx.config)
    return (f"{r['changed']:,} users split, {r['invalid']:,} without a first name skipped, "
            f"{r['batches']} batch{'' if r['batches'] == 1 else 'es'}, "
            f"longest transaction {r['longest_tx_s']:.2f} s (bound {r['max_batch_seconds']:g} s)")


def step_refresh(ctx: DemoContext) -> str:
    """Staging replaced by a masked copy of production; the leak scan is the proof."""
    from flows.refresh_staging import refresh_staging

    r = refresh_staging(config=ctx.config)
    return f"{r['rows']:,} rows, {len(r['masked'])} masked columns; {r['leak_scan']['summary']}"


STEPS: list[tuple[str, Callable[[DemoContext], str]]] = [
    ("backup production", step_backup),
    ("list backups", step_list),
    ("verify by restore", step_verify),
    ("restore into staging", step_restore),
    ("compare production and staging", step_compare),
    ("validate production", step_validate),
    ("migrate production", step_migrate),
    ("transform production (split full_name)", step_transform),
    ("refresh staging (masked)", step_refresh),
]


def run_demo(root: Path, *, users: int, s3_port: int, keep: bool, out: Callable[[str], None]) -> bool:
    from dataops.devstack import describe, dev_down, dev_up

    t0 = time.monotonic()
    out(f"Starting the embedded stack in {root} and seeding production with {users:,} users...")
    stack = dev_up(root, users=users, s3_port=s3_port, store="s3", config_path=root / "dataops.yaml", reset=True)
    out(describe(stack))
    ctx = DemoContext(load_settings(stack.config_path), str(stack.config_path))
    results: list[tuple[str, str, float, str]] = []
    ok = True
    try:
        for name, fn in STEPS:
            s0 = time.monotonic()
            out(f"-> {name}")
            try:
                detail, status = fn(ctx), "ok"
            except Exception as exc:  # noqa: BLE001 - the report says which step failed and why
                msg = exc.message if isinstance(exc, DataopsError) else f"{type(exc).__name__}: {exc}"
                detail, status, ok = redact(msg.splitlines()[0] if msg else "failed"), "FAILED", False
                if not isinstance(exc, DataopsError):
                    out(redact(traceback.format_exc(limit=3)))
            results.append((name, status, time.monotonic() - s0, detail))
            if status != "ok":
                break
    finally:
        if not keep:
            dev_down(root)
    out("")
    out("Demo report")
    width = max(len(r[0]) for r in results)
    for name, status, secs, detail in results:
        out(f"  {name.ljust(width)}  {status:6}  {secs:6.1f} s  {detail}")
    out(f"  {'total'.ljust(width)}  {'ok' if ok else 'FAILED':6}  {time.monotonic() - t0:6.1f} s")
    if keep:
        out(f"The stack is still running; config: {stack.config_path}. Stop it with "
            f"`dataops dev down --root {root}`.")
    return ok
