"""The `dataops` command: a thin layer over the flows and plain functions.

Contract that scripts and CI steps rely on: results go to stdout, logs to stderr; an
error is one line `error: ...` that says what to fix; exit 2 for bad input, 1 for a
failed operation. Each operation runs as a Prefect flow (a temporary local API unless
`prefect.api_url` or PREFECT_API_URL names a server) and fails when the run fails.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from dataops.errors import BadInput, DataopsError
from dataops.redact import redact
from dataops.runtime import prepare_prefect, private_runtime_dir

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Safe backups, restores and data operations for PostgreSQL, run as Prefect flows.")
dev_app = typer.Typer(no_args_is_help=True, help="The embedded local stack: PostgreSQL and an S3-compatible store.")
app.add_typer(dev_app, name="dev")

CONFIG_HELP = "dataops.yaml to use (default: $DATAOPS_CONFIG, else ./dataops.yaml)"


class State:
    config: Optional[str] = None
    verbose: bool = False


state = State()


@app.callback()
def _main(config: Optional[Path] = typer.Option(None, "--config", "-c", help=CONFIG_HELP, show_default=False),
          verbose: bool = typer.Option(False, "--verbose", "-v", help="show Prefect's run logs on stderr")):
    state.config = str(config) if config else None
    state.verbose = verbose


def load_cli_settings():
    from dataops.settings import config_path, load_settings

    settings = load_settings(state.config)
    state.config = str(config_path(state.config).resolve())
    prepare_prefect(settings.prefect.api_url, state.verbose)
    return settings


def _env_arg(help_text: str = "environment name from dataops.yaml"):
    return typer.Argument(..., help=help_text, show_default=False)


def echo(text: str = "") -> None:
    typer.echo(redact(text))


# -- backups --------------------------------------------------------------------------

@app.command()
def backup(env: str = _env_arg()):
    """Back up ENV to storage; prints the new backup's id as the last word."""
    settings = load_cli_settings()
    settings.env(env)
    from flows.backup_database import backup_database

    m = backup_database(env, config=state.config)
    echo(f"{m['size'] / 1048576:.1f} MiB, {len(m['tables'])} tables, {sum(m['tables'].values()):,} rows, "
         f"sha256 {m['sha256'][:16]}")
    echo(f"backup {m['id']}")


@app.command("backups")
def list_backups_cmd(env: str = _env_arg(),
                     as_json: bool = typer.Option(False, "--json", help="print a JSON list of manifests")):
    """List the complete backups of ENV, newest last."""
    settings = load_cli_settings()
    settings.env(env)
    from tasks.catalog import list_backups
    from tasks.storage import open_storage

    manifests = list_backups(open_storage(settings.storage), env)
    if as_json:
        echo(json.dumps([m.model_dump(mode="json") for m in manifests], indent=2))
        return
    if not manifests:
        echo(f"no backups of {env} yet; run `dataops backup {env}`")
        return
    rows = [m.summary() for m in manifests]
    echo(_text_table(rows))


@app.command()
def restore(env: str = _env_arg("environment the backup was taken from"),
            backup_id: str = typer.Argument(..., help="backup id (or 'latest')", show_default=False),
            into: str = typer.Option(..., "--into", help="environment to restore into", show_default=False),
            confirm: Optional[str] = typer.Option(None, "--confirm", help="the target's name; required when its role is production",
                                                  show_default=False)):
    """Restore BACKUP_ID of ENV into another environment, verified before and after."""
    settings = load_cli_settings()
    settings.env(env)
    from tasks.restore import guard_target

    guard_target(settings.env(into), confirm)
    from flows.restore_database import restore_database

    r = restore_database(env, backup_id, into, confirm=confirm, config=state.config)
    echo(f"restored {r['backup_id']} into {into}: {len(r['tables'])} tables, {sum(r['tables'].values()):,} rows, "
         f"{r['seconds']:.1f} s")


@app.command("verify-backup")
def verify_backup_cmd(env: str = _env_arg(),
                      backup_id: str = typer.Argument("latest", help="backup id (default: the newest)")):
    """Prove a backup restores: restore into a scratch database, compare with its manifest, drop it."""
    settings = load_cli_settings()
    settings.env(env)
    from flows.verify_backup import verify_backup

    r = verify_backup(env, backup_id, config=state.config)
    echo(f"backup {r['backup_id']} verified in {r['seconds']:.1f} s")


@app.command()
def prune(env: str = _env_arg(),
          dry_run: bool = typer.Option(False, "--dry-run", help="only say what would be deleted")):
    """Apply retention (backups.keep_last, keep_days); never deletes the newest verified backup."""
    settings = load_cli_settings()
    settings.env(env)
    from flows.prune_backups import prune_backups

    r = prune_backups(env, dry_run=dry_run, config=state.config)
    verb = "would delete" if dry_run else "deleted"
    for bid in r["delete"]:
        echo(f"{verb} {bid}")
    echo(f"kept {len(r['kept'])}, {verb} {len(r['delete'])}")


# -- validation -------------------------------------------------------------------------

@app.command()
def validate(env: str = _env_arg(),
             against: Optional[str] = typer.Option(None, "--against", help="another environment to compare with "
                                                   "(schema diff, row counts, checksums)", show_default=False),
             as_json: bool = typer.Option(False, "--json", help="print the report as JSON")):
    """Check ENV's integrity (foreign keys, unique keys, sequences, indexes, configured checks);
    with --against, also whether two environments agree. Exit 0 when all pass, 1 when one fails."""
    settings = load_cli_settings()
    settings.env(env)
    if against is not None:
        settings.env(against)
        if against == env:
            raise BadInput(f"--against must name another environment than {env}")
    from flows.validate_database import validate_database
    from tasks.validation import ValidationFailed, format_report

    run = validate_database(env, against=against, config=state.config, return_state=True)
    outcome = run.result(raise_on_failure=False)
    if isinstance(outcome, ValidationFailed) and outcome.report:
        report = outcome.report
    elif isinstance(outcome, BaseException):
        raise outcome
    else:
        report = outcome
    echo(json.dumps(report, indent=2) if as_json else format_report(report))
    if not report["ok"]:
        typer.echo(f"error: {redact(report['verdict'].removeprefix('FAILED: '))}", err=True)
        raise typer.Exit(1)


# -- embedded stack and demo -------------------------------------------------------------

@dev_app.command("up")
def dev_up_cmd(users: int = typer.Option(10_000, "--users", min=10, help="users to seed into production"),
               root: Path = typer.Option(Path(".dataops"), "--root", help="where the stack keeps its data"),
               s3_port: int = typer.Option(9900, "--s3-port", help="port of the local S3-compatible endpoint"),
               store: str = typer.Option("s3", "--store", help="s3 (local endpoint) or file"),
               reset: bool = typer.Option(False, "--reset", help="drop and re-seed the databases"),
               force: bool = typer.Option(False, "--force", help="overwrite a dataops.yaml not written by dev up")):
    """Start embedded PostgreSQL and a local S3 endpoint, seed production, write dataops.yaml."""
    from dataops.devstack import describe, dev_up

    private_runtime_dir()
    if store not in ("s3", "file"):
        raise BadInput(f"--store must be s3 or file, not {store!r}")
    target = Path(state.config) if state.config else Path("dataops.yaml")
    _refuse_foreign_config(target, force)
    stack = dev_up(root.resolve(), users=users, s3_port=s3_port, store=store, config_path=target.resolve(), reset=reset,
                   force=force)
    echo(describe(stack))


@dev_app.command("down")
def dev_down_cmd(root: Path = typer.Option(Path(".dataops"), "--root", help="where the stack keeps its data")):
    """Stop the embedded stack started by `dataops dev up`."""
    from dataops.devstack import dev_down

    stopped = dev_down(root.resolve())
    echo("\n".join(f"stopped {s}" for s in stopped) or "nothing was running")


def _refuse_foreign_config(path: Path, force: bool) -> None:
    from dataops.devstack import MARKER

    if path.exists() and not force and MARKER not in path.read_text():
        raise BadInput(f"{path} exists and was not written by `dataops dev up`; pass --force to overwrite it "
                       "or --config to write elsewhere")


@app.command()
def demo(users: int = typer.Option(10_000, "--users", min=10, help="users to seed into production"),
         root: Path = typer.Option(Path(".dataops/demo"), "--root", help="where the demo stack keeps its data"),
         s3_port: int = typer.Option(9901, "--s3-port", help="port of the local S3-compatible endpoint"),
         keep: bool = typer.Option(False, "--keep", help="leave the stack running afterwards")):
    """The whole story on a fresh embedded stack: backup, migrate, transform, validate, refresh staging,
    and a failing migration rolled back with an alert; ends with a report and where to look."""
    from dataops.demo import run_demo

    prepare_prefect(None, state.verbose)
    ok = run_demo(root.resolve(), users=users, s3_port=s3_port, keep=keep, out=echo)
    raise typer.Exit(0 if ok else 1)


def _text_table(rows: list[dict]) -> str:
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    line = lambda r: "  ".join(str(r[c]).ljust(widths[c]) for c in cols).rstrip()  # noqa: E731
    return "\n".join([line({c: c for c in cols}), *(line(r) for r in rows)])


# Commands of later areas live in their own modules and register on `app` when imported.
# Each module does `from dataops.cli import app, load_cli_settings, state, echo`.
import dataops.cli_commands  # noqa: E402,F401


def main() -> None:
    try:
        rc = app(standalone_mode=False)
        sys.exit(rc if isinstance(rc, int) else 0)
    except DataopsError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        sys.exit(1)
    except Exception as exc:  # click usage errors and anything unexpected
        import click

        if isinstance(exc, click.exceptions.UsageError):
            typer.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(2)
        if isinstance(exc, click.exceptions.ClickException):
            typer.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        typer.echo(f"error: {type(exc).__name__}: {redact(str(exc)).splitlines()[0] if str(exc) else ''}"
                   " (rerun with -v for the run logs)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    # Run as `python -m dataops.cli` this file is `__main__`, a second copy of the module;
    # command modules register on `dataops.cli.app`, so start that one.
    from dataops.cli import main as _main

    _main()
