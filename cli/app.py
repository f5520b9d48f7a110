"""The `dataops` command's shared ground: the Typer app, the global options, and how a result
is printed. Each command group lives in its own module beside this one and registers on `app`;
`dataops.cli.main` imports them all and is the entry point.

Contract that scripts and CI steps rely on: results go to stdout, logs to stderr; an
error is one line `error: ...` that says what to fix; exit 2 for bad input, 1 for a
failed operation. Each operation runs as a Prefect flow and fails when the run fails; unless
`prefect.api_url` or PREFECT_API_URL names a server, against the local API that dataops starts
once and reuses (dataops.local_api; read-only commands start nothing).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dataops.redact import redact
from dataops.runtime import prepare_prefect

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Safe backups, restores and data operations for PostgreSQL, run as Prefect flows.")

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


def load_cli_settings(*environments: str, check=None):
    """dataops.yaml, read once for the command, and the environments it names checked: an unknown
    name is bad input (exit 2) before any flow, Prefect API or connection starts. The flow
    resolves the name into its Environment itself (a deployment passes only the name)."""
    from dataops.settings import config_path, load_settings

    settings = load_settings(state.config)
    for name in environments:
        settings.env(name)
    if check is not None:  # the command's own parameters (a revision that does not exist), also before the API
        check(settings)
    state.config = str(config_path(state.config).resolve())
    prepare_prefect(settings.prefect.api_url, state.verbose, local_api=settings.prefect.local_api and runs_flows(),
                    idle_s=settings.prefect.local_api_idle_s)
    return settings


# Commands that only read: they run no flow and start no Prefect API (a test checks that every
# command is in one of these two sets, so a new one is placed on purpose).
READ_ONLY = frozenset({"backups", "migrate status", "migrate plan", "migrate lint", "migrate new", "migrate test",
                       "migrate history", "transform list", "transform status", "refresh-staging --check",
                       "local-api status", "local-api stop", "dev up", "dev down"})
FLOWS = frozenset({"backup", "restore", "verify-backup", "prune", "validate", "migrate up", "migrate down",
                   "transform run", "transform revert", "refresh-staging", "anonymize", "deploy"})
# Commands that bring their own Prefect server (`server`) or API (`demo`: Prefect's temporary one unless
# PREFECT_API_URL is set): the local API would be one too many.
OWN_API = frozenset({"server", "demo"})


def command_key() -> str:
    """The invoked command as `group command` (`migrate status`), `--check` added when given."""
    leaf = ctx = _current_context()
    names = []
    while ctx is not None and ctx.parent is not None:
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    key = " ".join(reversed(names))
    return f"{key} --check" if leaf is not None and leaf.params.get("check") else key


def _current_context():
    """The running command's click context: Typer 0.29 runs a click of its own (typer._click)."""
    try:
        from typer._click.globals import get_current_context
    except ImportError:
        from click import get_current_context
    return get_current_context(silent=True)


def runs_flows() -> bool:
    """Whether this command needs a Prefect API: anything not known to only read does."""
    return command_key() not in READ_ONLY | OWN_API


def env_arg(help_text: str = "environment name from dataops.yaml"):
    return typer.Argument(..., help=help_text, show_default=False)


def echo(text: str = "") -> None:
    typer.echo(redact(text))


class EnvGroup:
    """A command group whose first argument is the environment: `dataops migrate ENV status`.
    The group's callback keeps ENV; `resolved()` reads the settings and resolves it once."""

    def __init__(self, name: str, help_text: str):
        self.app = typer.Typer(no_args_is_help=True, help=help_text)
        self.env = ""
        app.add_typer(self.app, name=name)

        @self.app.callback()
        def _select(env: str = typer.Argument(..., help="environment name from dataops.yaml", metavar="ENV",
                                              show_default=False)):
            self.env = env

    def resolved(self, check=None):
        """(settings, ENV's Environment); an unknown ENV, or what `check(settings)` refuses, is bad
        input (exit 2) before anything runs."""
        settings = load_cli_settings(self.env, check=check)
        return settings, settings.env(self.env)
