"""The `dataops` entry point: every command group registered on one app, and the error contract
(one line `error: ...`, exit 2 for bad input, 1 for a failed operation)."""

from __future__ import annotations

import importlib
import sys

import typer

from dataops.cli.app import app
from dataops.errors import DataopsError, classify
from dataops.redact import redact

# Each command module registers its commands on `app` when imported, in the order `--help` lists them.
COMMAND_MODULES = ("backup", "validate", "migrate", "transform", "refresh", "deploy", "dev", "local_api")
for _name in COMMAND_MODULES:
    importlib.import_module(f"dataops.cli.{_name}")


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

        known = classify(exc)  # e.g. a row-level-security refusal from a connection not opened by pg.connect
        if isinstance(known, DataopsError):
            typer.echo(f"error: {known.message}", err=True)
            sys.exit(known.exit_code)

        if isinstance(exc, click.exceptions.UsageError):
            typer.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(2)
        if isinstance(exc, click.exceptions.ClickException):
            typer.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        typer.echo(f"error: {type(exc).__name__}: {redact(str(exc)).splitlines()[0] if str(exc) else ''}"
                   " (rerun with -v for the run logs)", err=True)
        sys.exit(1)
