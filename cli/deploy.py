"""`dataops deploy` and `dataops server`."""

from __future__ import annotations

import typer

from dataops.cli.app import app, echo, load_cli_settings, state


@app.command()
def deploy():
    """Register the work pool, deployments, notification block and alert automation (idempotent)."""
    from dataops.deployments.register import deploy as run_deploy

    settings = load_cli_settings()
    for line in run_deploy(settings, state.config).lines():
        echo(line)


@app.command()
def server(host: str = typer.Option("127.0.0.1", "--host", help="address for the Prefect API and UI"),
           port: int = typer.Option(4200, "--port", help="port for the Prefect API and UI"),
           no_deploy: bool = typer.Option(False, "--no-deploy", help="do not register deployments on start")):
    """Start a local Prefect server (UI at http://127.0.0.1:4200) and a worker for the dataops pool.

    Ctrl-C, SIGTERM (systemd, docker stop) or SIGHUP stops both, frees the port and exits 0."""
    import os

    from dataops.deployments.register import serve

    settings = load_cli_settings()
    os.environ.pop("PREFECT_API_URL", None)  # this command is the server
    code = serve(host, port, state.config, echo, None if no_deploy else settings)
    raise typer.Exit(code)
