"""`dataops migrate ENV ...`: schema migrations from the command line (the CI/CD steps).

status, plan, lint, new and test only read (test works on a scratch database); up and down
run the migrate-database and downgrade-database flows, with their backup, approval, lock,
checks and audit. Exit codes follow the CLI contract: 2 bad input, 1 failed (lint errors,
a failed round trip, a failed or rejected migration).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from dataops.cli.app import EnvGroup, echo
from dataops.cli.app import state as cli_state
from dataops.errors import BadInput, DataopsError, OperationFailed

group = EnvGroup("migrate", "Schema migrations: Alembic revisions in migrations.path, "
                            "planned, linted, approved and applied under a lock.")
migrate_app = group.app


def _to_option(help_text: str = "target revision (default: head)"):
    return typer.Option("head", "--to", help=help_text)


@migrate_app.command("status")
def status_cmd(as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """Where ENV is: current revision, head, applied and pending revisions."""
    from dataops.tasks.migration import migrate

    st = migrate.status(migrate.target_for(*group.resolved()))
    if as_json:
        echo(json.dumps({"environment": group.env, "current": st.current, "head": st.head,
                         "heads": [st.head], "applied": [r.revision for r in st.applied],
                         "pending": [r.revision for r in st.pending]}, indent=2))
        return
    echo(f"{group.env}: at {st.current or 'base (no revision applied)'}, head {st.head}, "
         f"{len(st.pending)} pending")
    for title, revs in (("applied", st.applied), ("pending", st.pending)):
        if revs:
            echo(f"{title}:")
            for r in revs:
                echo(f"  {r.revision}  {r.message}{'' if r.transactional else '  [not transactional]'}")


@migrate_app.command("plan")
def plan_cmd(to: str = _to_option()):
    """Print the SQL that `up` would run, rendered offline: the database is only read for its revision."""
    from dataops.tasks.migration import migrate

    echo(migrate.plan_text(migrate.plan(migrate.target_for(*group.resolved()), to)))


@migrate_app.command("lint")
def lint_cmd(to: str = _to_option(), as_json: bool = typer.Option(False, "--json", help="print JSON findings"),
             sql: Optional[Path] = typer.Option(None, "--sql", help="lint this SQL file instead, as run outside "
                                                "dataops (no lock_timeout set for it)", show_default=False)):
    """Check the pending revisions for locking and breaking changes; exit 1 on errors.

    Read only: the database is asked for its revision and for the size of the tables findings
    are about. Rules and their safe rewrites: docs/lint-rules.md."""
    from dataops.tasks import pg
    from dataops.tasks.migration import migrate
    from dataops.tasks.migration.lint import LiveDatabase, errors_sentence, heads_finding, lint, lint_sql, lint_text

    mt = migrate.target_for(*group.resolved())
    if sql is not None:
        try:
            text = sql.read_text()
        except OSError as exc:
            raise BadInput(f"cannot read {sql}: {exc.strerror}; give --sql an SQL file") from None
    heads = None if sql is not None else heads_finding(mt.path)
    if heads is not None:
        plans, findings = [], [heads]
    else:
        plans = [] if sql is not None else migrate.plan(mt, to)
        with pg.connect(mt.dsn, autocommit=True, timeout=mt.connect_timeout) as conn:
            live, small = LiveDatabase(conn), mt.options.lint_small_table_rows
            findings = (lint_sql(text, name=sql.name, live=live, small_table_rows=small) if sql is not None
                        else lint(plans, live=live, small_table_rows=small))
    head = f"{sql}" if sql is not None else f"{len(plans)} pending revision(s)"
    echo(json.dumps([f.as_dict() for f in findings], indent=2) if as_json else f"{head}\n" + lint_text(findings))
    errors = errors_sentence(findings)
    if errors:
        raise OperationFailed(f"lint found {errors}")


@migrate_app.command("up")
def up_cmd(to: str = _to_option(),
           dry_run: bool = typer.Option(False, "--dry-run", help="preflight and publish the plan, change nothing"),
           auto_approve: bool = typer.Option(False, "--auto-approve",
                                             help="skip the approval pause (only with migrations.allow_auto_approve)")):
    """Run the migrate-database flow: preflight, backup, approval (production), apply, checks, audit."""
    from dataops.tasks.migration import migrate

    settings, environment = group.resolved(check=lambda s: migrate.resolve(s.migrations_dir, to))
    if environment.is_production and not dry_run and not auto_approve:
        typer.echo(f"{group.env} has role production: the run pauses for approval (Resume it in the Prefect UI) "
                   f"for up to {settings.migrations.approval_timeout_s} s", err=True)
    from dataops.flows.migrate_database import migrate_database

    final = migrate_database(group.env, target=to, dry_run=dry_run, auto_approve=auto_approve,
                             config=cli_state.config, return_state=True)
    run_id = str(final.state_details.flow_run_id)
    if final.is_cancelled():
        raise OperationFailed(f"migration of {group.env} not applied: {final.message}")
    if not final.is_completed():
        _explain_failure(environment, run_id)
        final.result()  # raises the run's own error
        raise OperationFailed(f"migration of {group.env} ended {final.name}: {final.message}")
    r = final.result()
    if r["outcome"] == "succeeded":
        for s in r["steps"]:
            echo(f"applied {s['revision']} in {s['seconds']:.2f} s" + (f" ({s['attempts']} attempts)" if s["attempts"] > 1 else ""))
    echo(f"{group.env}: {r['outcome']}: {r['detail']} (now at {r['to_revision'] if r['outcome'] == 'succeeded' else r['from_revision'] or 'base'}"
         + (f", backup {r['backup_id']}" if r.get("backup_id") else "") + ")")


def _explain_failure(environment, run_id: str) -> None:
    """After a failed run: what the rollback did, from the audit table (stderr)."""
    from dataops.tasks.migration.audit import load

    try:
        record = load(environment.database_url, run_id)
    except DataopsError:
        return
    if record is not None and record.outcome in ("rolled-back", "restored", "rollback-failed"):
        typer.echo(f"rollback: {record.outcome} ({record.detail})", err=True)


@migrate_app.command("down")
def down_cmd(to: Optional[str] = typer.Option(None, "--to", help="revision to go down to (or base)", show_default=False),
             steps: Optional[int] = typer.Option(None, "--steps", help="how many revisions to undo", show_default=False),
             confirm: Optional[str] = typer.Option(None, "--confirm", help="ENV's name; required when its role is production",
                                                   show_default=False)):
    """Undo revisions (after a backup, under the lock): --to REV or --steps N."""
    from dataops.tasks.migration import migrate

    _, environment = group.resolved(check=lambda s: migrate.resolve(s.migrations_dir, to) if to else None)
    if (to is None) == (steps is None):
        raise BadInput("say where to go down to: --to REV (or base) or --steps N")
    from dataops.flows.downgrade_database import downgrade_database
    from dataops.tasks.migration.migrate import guard_downgrade

    guard_downgrade(environment, confirm)
    r = downgrade_database(group.env, to=to, steps=steps, confirm=confirm, config=cli_state.config)
    echo(f"{group.env}: {r['outcome']}; undid {', '.join(r['undone']) or 'nothing'}; now at {r['revision'] or 'base'}"
         + (f" (backup {r['backup_id']})" if r.get("backup_id") else ""))


@migrate_app.command("new")
def new_cmd(message: str = typer.Argument(..., help="what the revision does", show_default=False)):
    """Write a new revision file (upgrade and downgrade) after the head; prints its path."""
    from dataops.tasks.migration.migrate import new_revision

    settings, _ = group.resolved()
    echo(str(new_revision(settings.migrations_dir, message)))


@migrate_app.command("test")
def test_cmd():
    """Round trip on a scratch database: each revision up, checked, down (schema must be as before), up."""
    from dataops.tasks.migration import migrate
    from dataops.tasks.scratch import discard_leftovers, owned_scratch

    settings, env = group.resolved()
    server = settings.backups.scratch_database_url or env.database_url
    discard_leftovers(server)
    with owned_scratch(server, env.database_url.database, "mtest") as name:
        mt = replace(migrate.target_for(settings, env), dsn=server.with_database(name),
                     label=f"scratch database {name}")
        results = migrate.round_trip(mt)
    for r in results:
        echo(f"{r.revision}  {'ok' if r.ok else 'FAILED':6}  {r.seconds:5.2f} s  {r.message}")
        for p in r.problems:
            echo(f"    {p}")
    bad = [r for r in results if not r.ok]
    if bad:
        raise OperationFailed(f"round trip failed at revision {bad[0].revision}: {bad[0].problems[0]}")
    echo(f"{len(results)} revision(s): up, check, down, same schema, up again: ok")


@migrate_app.command("history")
def history_cmd(limit: int = typer.Option(20, "--limit", min=1, help="how many runs")):
    """The audit table: recent migration, downgrade and rollback runs, newest first."""
    from dataops.tasks.migration.audit import history

    rows = history(group.resolved()[1].database_url, limit)
    if not rows:
        echo(f"no migration runs recorded in {group.env} yet")
        return
    for r in rows:
        echo(f"{r.started_at:%Y-%m-%d %H:%M:%S}  {r.action:9}  {r.outcome:14}  {r.from_revision or 'base'} -> "
             f"{r.to_revision or '-'}  {r.who}{'  approved by ' + r.approver if r.approver else ''}  {r.run_id}")
