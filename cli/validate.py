"""`dataops validate`: integrity checks, and with --against the comparison of two environments."""

from __future__ import annotations

import json
from typing import Optional

import typer

from dataops.cli.app import app, echo, env_arg, load_cli_settings, state
from dataops.errors import BadInput
from dataops.redact import redact


@app.command()
def validate(env: str = env_arg(),
             against: Optional[str] = typer.Option(None, "--against", help="another environment to compare with "
                                                   "(schema diff, row counts, checksums)", show_default=False),
             as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
             backups: bool = typer.Option(
                 False, "--backups",
                 help="also fail when ENV has no verified backup younger than backups.max_age_hours (the "
                      "scheduled daily-production-validation always looks, for the roles in "
                      "backups.freshness_roles)")):
    """Check ENV's integrity (foreign keys, unique keys, sequences, indexes, configured checks);
    with --against, also whether two environments agree; with --backups, whether a recent verified
    backup exists. Exit 0 when all pass, 1 when one fails."""
    load_cli_settings(env, *([against] if against else []))
    if against == env:
        raise BadInput(f"--against must name another environment than {env}")
    from dataops.flows.validate_database import validate_database
    from dataops.tasks.validation.validate import ValidationFailed, format_report

    run = validate_database(env, against=against, config=state.config, check_backups=backups or None, return_state=True)
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
