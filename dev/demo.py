"""`dataops demo`: the whole story on the embedded stack, end to end, with a short report.

Seed production, back it up (listed, verified by restoring it, restored into staging and
compared), migrate it (the approval answered automatically: demo mode), split full_name,
validate, refresh staging with masked data (the leak scan is the proof), then a migration
that fails on purpose: the rollback flow puts production back by itself and alerts a local
receiver. Each step runs the real flow (on Prefect's temporary local API unless
PREFECT_API_URL names a server) against the embedded PostgreSQL and the local S3 endpoint.

The failing migration never touches the product's migrations folder: the demo writes a
copy of it with two extra revisions on top of head under its root, and a config that
differs from the demo's only in migrations.path.
"""

from __future__ import annotations

import shutil
import textwrap
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dataops.dev.alert_receiver import AlertReceiver
from dataops.errors import DataopsError
from dataops.redact import redact
from dataops.settings import Settings, load_settings

ALERT_WAIT_S = 10.0

# The deliberately failing migration: the first revision applies (a nullable column), the
# second adds another column, fills it, then reads a column that does not exist, so its
# transaction rolls back and the run fails with revision 1 applied: the rollback flow has
# real work to do (downgrade revision 1). {head} is the product's head revision.
FAILING_REVISIONS = {
    "demo1_users_nickname": '''
        """users.nickname, nullable (dataops demo: this revision applies)"""
        from alembic import op

        revision = "demo1"
        down_revision = "{head}"
        transactional = True


        def upgrade():
            op.execute("ALTER TABLE public.users ADD COLUMN nickname text")


        def downgrade():
            op.execute("ALTER TABLE public.users DROP COLUMN nickname")
        ''',
    "demo2_users_display_name": '''
        """users.display_name, filled; nickname from users.username (dataops demo: this revision fails)

        Written against a branch where users has a username column; production has none, so
        the second statement fails and the revision's transaction takes the first one back.
        """
        from alembic import op

        revision = "demo2"
        down_revision = "demo1"
        transactional = True


        def upgrade():
            op.execute("ALTER TABLE public.users ADD COLUMN display_name text")
            op.execute("UPDATE public.users SET display_name = full_name")
            op.execute("UPDATE public.users SET nickname = username")


        def downgrade():
            op.execute("ALTER TABLE public.users DROP COLUMN display_name")
        ''',
}


@dataclass
class DemoContext:
    settings: Settings
    config: str
    root: Path
    receiver: AlertReceiver
    out: Callable[[str], None] = print
    facts: dict = field(default_factory=dict)
    runs: list[tuple[str, str]] = field(default_factory=list)  # (what, Prefect flow run id), in order

    def flow(self, what: str, fn, *args, **kwargs):
        """Run a flow, remember its run id for "where to look", return its result (raises if it failed)."""
        state = fn(*args, return_state=True, **kwargs)
        self.runs.append((what, str(state.state_details.flow_run_id)))
        return state.result()


def step_backup(ctx: DemoContext) -> str:
    from dataops.flows.backup_database import backup_database

    m = ctx.flow("backup of production", backup_database, "production", config=ctx.config)
    ctx.facts["backup_id"] = m["id"]
    return f"backup {m['id']}: {m['size'] / 1048576:.1f} MiB, {sum(m['tables'].values()):,} rows in {len(m['tables'])} tables"


def step_list(ctx: DemoContext) -> str:
    from dataops.tasks.backup.catalog import list_backups
    from dataops.tasks.backup.storage import open_storage

    found = list_backups(open_storage(ctx.settings.storage), "production")
    assert found and found[-1].id == ctx.facts["backup_id"], "the new backup is not listed last"
    return f"{len(found)} complete backup(s) of production, newest {found[-1].id}"


def step_verify(ctx: DemoContext) -> str:
    from dataops.flows.verify_backup import verify_backup

    r = ctx.flow("verification of the backup", verify_backup, "production", ctx.facts["backup_id"], config=ctx.config)
    return f"restored into a scratch database and matched the manifest in {r['seconds']:.1f} s"


def step_restore(ctx: DemoContext) -> str:
    from dataops.flows.restore_database import restore_database

    r = ctx.flow("restore into staging", restore_database, "production", ctx.facts["backup_id"], "staging",
                 config=ctx.config)
    return f"staging now holds backup {r['backup_id']} ({sum(r['tables'].values()):,} rows)"


def step_compare(ctx: DemoContext) -> str:
    from dataops.tasks.validation.validate import compare_environments

    c = compare_environments(ctx.settings.env("production"), ctx.settings.env("staging"))
    if not c.ok:
        bad = [f"{t.table} ({t.status})" for t in c.tables if not t.ok] + [str(d) for d in c.differences[:3]]
        raise DataopsError(f"{c.summary()} after restore: {'; '.join(bad[:5])}")
    return f"{len(c.tables)} tables: schema, row counts and checksums identical in production and staging"


def step_migrate(ctx: DemoContext) -> str:
    """The example migrations (0003..head) on production: preflight, its own backup, approval
    (answered automatically: demo mode), apply under the lock, checks, audit."""
    from dataops.flows.migrate_database import migrate_database
    from dataops.tasks.migration.audit import load

    r = ctx.flow("migration of production", migrate_database, "production", auto_approve=True, config=ctx.config)
    if r["outcome"] != "succeeded":
        raise DataopsError(f"migration of production: {r['outcome']}: {r['detail']}")
    record = load(ctx.settings.env("production").database_url, r["run_id"])
    ctx.out(f"   approval answered automatically by \"{record.approver if record else 'auto-approve'}\": this is demo "
            "mode (migrations.allow_auto_approve: true in the demo's config); a real production migration waits "
            "for a person to approve it in the Prefect UI")
    took = sum(s["seconds"] for s in r["steps"])
    return (f"{r['from_revision']} -> {r['to_revision']}: applied {', '.join(r['applied'])} in {took:.1f} s "
            f"after backup {r['backup_id']}; approved automatically (demo mode)")


def step_transform(ctx: DemoContext) -> str:
    """The users.full_name split on production: snapshot, batches, checks, counts."""
    from dataops.flows.run_transform import run_transform

    r = ctx.flow("transform of production", run_transform, "production", "users_split_full_name", config=ctx.config)
    return (f"{r['changed']:,} users split, {r['invalid']:,} without a first name skipped, "
            f"{r['batches']} batch{'' if r['batches'] == 1 else 'es'}, "
            f"longest transaction {r['longest_tx_s']:.2f} s (bound {r['max_batch_seconds']:g} s)")


def step_validate(ctx: DemoContext) -> str:
    from dataops.flows.validate_database import validate_database

    r = ctx.flow("validation of production", validate_database, "production", config=ctx.config)
    s = r["summary"]
    return (f"{s['passed']} of {s['checks']} checks passed ({s['warnings']} warnings): foreign keys, unique keys, "
            f"sequences, indexes; {r['seconds']:.1f} s")


def step_refresh(ctx: DemoContext) -> str:
    """Staging replaced by a masked copy of production."""
    from dataops.flows.refresh_staging import refresh_staging

    r = ctx.flow("refresh of staging", refresh_staging, config=ctx.config)
    ctx.facts["leak_scan"] = r["leak_scan"]
    return f"{r['rows']:,} rows, {len(r['masked'])} masked columns, switched in after its checks"


def step_leak_scan(ctx: DemoContext) -> str:
    """The refresh's proof that masking happened: no source value of a masked column in staging."""
    scan = ctx.facts.get("leak_scan")
    if not scan:
        raise DataopsError("the refresh reported no leak scan")
    if scan["leaked"]:
        raise DataopsError(scan["summary"])
    return f"{scan['summary']} (run by the refresh before the switch)"


def write_failing_migration(ctx: DemoContext) -> tuple[str, Path]:
    """The product's migrations plus FAILING_REVISIONS under the demo's root, and a config
    that differs from the demo's only in migrations.path. Returns (head before, config path)."""
    import yaml

    from dataops.tasks.migration.migrate import resolve

    source = ctx.settings.migrations.path
    head = resolve(Path(source), "head")
    folder = ctx.root / "failing-migration"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(source, folder / "migrations", ignore=shutil.ignore_patterns("__pycache__"))
    for name, text in FAILING_REVISIONS.items():
        (folder / "migrations" / "versions" / f"{name}.py").write_text(
            textwrap.dedent(text).lstrip().replace("{head}", head))
    data = yaml.safe_load(Path(ctx.config).read_text())
    data["migrations"]["path"] = str(folder / "migrations")
    config = folder / "dataops.yaml"
    config.write_text("# Written by `dataops demo`: the demo's config with migrations.path pointing at a copy of the\n"
                      f"# example migrations plus two revisions on top of {head}, the second of which fails.\n"
                      + yaml.safe_dump(data, sort_keys=False))
    load_settings(config)  # still a valid config
    return head, config


def step_failing_migration(ctx: DemoContext) -> str:
    """A migration that fails halfway: the on_failure hook starts rollback-migration, which
    downgrades production to the revision before, records it and alerts the local receiver.
    Ok only if all of that happened; the failure itself is expected."""
    from dataops.flows.migrate_database import migrate_database
    from dataops.tasks.migration.audit import history, load
    from dataops.tasks.migration.checks import inspect_database
    from dataops.tasks.migration.migrate import read_current

    dsn = ctx.settings.env("production").database_url
    head, config = write_failing_migration(ctx)
    if read_current(dsn) != head:
        raise DataopsError(f"production is at {read_current(dsn)}, not at the example head {head}")
    before = inspect_database(dsn, checksums=False).fingerprint
    ctx.out(f"   migrations: {config.parent / 'migrations'} (the examples + demo1, demo2); demo2 fails on purpose")

    state = migrate_database("production", auto_approve=True, config=str(config), return_state=True)
    run_id = str(state.state_details.flow_run_id)
    ctx.runs.append(("failing migration of production", run_id))
    if not state.is_failed():
        raise DataopsError(f"the migration meant to fail ended {state.type.value}; production may be at "
                           f"{read_current(dsn)} now")
    exc = state.result(raise_on_failure=False)
    error = exc.message if isinstance(exc, DataopsError) else str(state.message or exc)
    ctx.out(f"   migration run {run_id} failed as intended: {redact(error)}")

    rollback = next((r for r in history(dsn) if r.action == "rollback" and r.parent_run_id == run_id), None)
    if rollback is None:
        raise DataopsError(f"no rollback of migration run {run_id} in the audit table: the on_failure hook did not "
                           "start rollback-migration")
    ctx.runs.append(("rollback of the failing migration", rollback.run_id))
    ctx.out(f"   rollback run {rollback.run_id} {rollback.outcome} it automatically: {rollback.detail}")

    migration = load(dsn, run_id)
    now, after = read_current(dsn), inspect_database(dsn, checksums=False).fingerprint
    problems = []
    if now != head:
        problems.append(f"production is at {now}, not back at {head}")
    if after != before:
        problems.append(f"schema fingerprint {after[:12]} differs from {before[:12]} before the migration")
    if rollback.outcome not in ("rolled-back", "restored"):
        problems.append(f"the rollback ended {rollback.outcome}: {rollback.detail}")
    if migration is None or migration.outcome != rollback.outcome or not migration.detail:
        problems.append(f"the audit row of run {run_id} says {migration.outcome if migration else 'nothing'}, "
                        f"not failed and {rollback.outcome}")
    alert = ctx.receiver.wait_for(lambda a: a.get("run_id") == run_id, timeout=ALERT_WAIT_S)
    if alert is None:
        problems.append(f"no alert reached the local receiver within {ALERT_WAIT_S:g} s")
    else:
        ctx.out(f"   alert received by the local receiver ({alert.get('severity')}): {alert.get('subject')}")
        if alert.get("severity") != "warning":
            problems.append(f"the alert is {alert.get('severity')}, not a warning")
    if problems:
        raise DataopsError("; ".join(problems))
    return (f"demo2 failed, rollback undid {', '.join(migration.applied) or 'nothing'}: production at {head} again, "
            f"schema fingerprint unchanged; audit: failed, then {rollback.outcome}; warning alert received")


STEPS: list[tuple[str, Callable[[DemoContext], str]]] = [
    ("backup production", step_backup),
    ("list backups", step_list),
    ("verify by restore", step_verify),
    ("restore into staging", step_restore),
    ("compare production and staging", step_compare),
    ("migrate production", step_migrate),
    ("transform production (split full_name)", step_transform),
    ("validate production", step_validate),
    ("refresh staging (masked)", step_refresh),
    ("leak scan of staging", step_leak_scan),
    ("failing migration, rolled back", step_failing_migration),
]


def add_alerts(config: Path, url: str) -> str:
    """Point the demo config's alerts at the local receiver; returns the text before."""
    text = config.read_text()
    config.write_text(text.rstrip("\n") + f"""

alerts:
  # `dataops demo`'s local receiver on 127.0.0.1; it stops when the demo ends
  kind: webhook
  webhook_url: "{url}"
""")
    return text


def prefect_server_url() -> str | None:
    """The API URL of a Prefect server that answers, or None (Prefect's temporary local API)."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return None
    try:
        return url if httpx.get(url.rstrip("/") + "/health", timeout=2).json() is True else None
    except Exception:  # noqa: BLE001 - not reachable is all that matters here
        return None


def where_to_look(api_url: str | None, runs: list[tuple[str, str]], out: Callable[[str], None]) -> None:
    out("")
    out("Where to look")
    if api_url:
        from prefect.settings import PREFECT_UI_URL

        ui = (PREFECT_UI_URL.value() or api_url.removesuffix("/").removesuffix("/api")).rstrip("/")
        out(f"  Prefect UI: {ui}  (all runs: {ui}/runs; artifacts with the plans, audit rows and reports: "
            f"{ui}/artifacts)")
        width = max((len(what) for what, _ in runs), default=0)
        for what, run_id in runs:
            out(f"  {what.ljust(width)}  {ui}/runs/flow-run/{run_id}")
    else:
        out("  These runs went to Prefect's temporary local API, which stopped with the demo.")
        out("  To see them in the UI, start a server in another terminal: `dataops dev up && dataops server`")
        out("  (UI at http://127.0.0.1:4200), then run `PREFECT_API_URL=http://127.0.0.1:4200/api dataops demo`.")


def run_demo(root: Path, *, users: int, s3_port: int, keep: bool, out: Callable[[str], None]) -> bool:
    from dataops.dev.stack import describe, dev_down, dev_up

    t0 = time.monotonic()
    api_url = prefect_server_url()
    results: list[tuple[str, str, float, str]] = []
    runs: list[tuple[str, str]] = []
    ok = True
    receiver = AlertReceiver().start()
    original_config: str | None = None
    out(f"Starting the embedded stack in {root} and seeding production with {users:,} users...")
    try:
        try:
            stack = dev_up(root, users=users, s3_port=s3_port, store="s3", config_path=root / "dataops.yaml",
                           reset=True)
        except Exception as exc:  # noqa: BLE001 - reported like any step
            msg = exc.message if isinstance(exc, DataopsError) else f"{type(exc).__name__}: {exc}"
            results.append(("seed production", "FAILED", time.monotonic() - t0, redact(msg.splitlines()[0])))
            _report(results, t0, False, out)
            return False
        out(describe(stack))
        out(f"Alerts go to a local receiver at {receiver.url}")
        c = stack.counts
        results.append(("seed production", "ok", time.monotonic() - t0,
                        f"{c.get('users', 0):,} users, {sum(c.values()):,} rows in {len(c)} tables; staging empty"))
        original_config = add_alerts(stack.config_path, receiver.url)
        ctx = DemoContext(load_settings(stack.config_path), str(stack.config_path), root, receiver, out, runs=runs)
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
        receiver.stop()
        if keep and original_config is not None:  # the receiver is gone: don't leave the config pointing at it
            (root / "dataops.yaml").write_text(original_config)
        if not keep:
            dev_down(root)
    _report(results, t0, ok, out)
    where_to_look(api_url, runs, out)
    if keep:
        out(f"The stack is still running; config: {stack.config_path}. Stop it with "
            f"`dataops dev down --root {root}`.")
    return ok


def _report(results: list[tuple[str, str, float, str]], t0: float, ok: bool, out: Callable[[str], None]) -> None:
    out("")
    out("Demo report")
    width = max(len(r[0]) for r in results)
    out(f"  {'step'.ljust(width)}  {'status':6}  {'seconds':>8}  detail")
    for name, status, secs, detail in results:
        out(f"  {name.ljust(width)}  {status:6}  {secs:8.1f}  {detail}")
    out(f"  {'total'.ljust(width)}  {'ok' if ok else 'FAILED':6}  {time.monotonic() - t0:8.1f}")
