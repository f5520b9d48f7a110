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
    from tasks import pg
    from tasks.checksums import table_checksums

    sums = {}
    for env in ("production", "staging"):
        with pg.connect(ctx.settings.env(env).database_url) as conn:
            sums[env] = table_checksums(conn)
    differ = [t for t in sums["production"] if sums["production"][t] != sums["staging"].get(t)]
    if differ:
        raise DataopsError(f"tables differ after restore: {', '.join(differ)}")
    return f"{len(sums['production'])} tables: row counts and checksums identical in production and staging"


STEPS: list[tuple[str, Callable[[DemoContext], str]]] = [
    ("backup production", step_backup),
    ("list backups", step_list),
    ("verify by restore", step_verify),
    ("restore into staging", step_restore),
    ("compare production and staging", step_compare),
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
