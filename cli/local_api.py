"""`dataops local-api status|stop`: the local Prefect API that flow commands start and reuse when
no Prefect server is configured (dataops.local_api, docs/local-api.md)."""

from __future__ import annotations

import typer

from dataops.cli.app import app, echo

local_app = typer.Typer(no_args_is_help=True, help="The local Prefect API that flow commands start once and reuse "
                                                   "when no Prefect server is configured.")
app.add_typer(local_app, name="local-api")


@local_app.command("status")
def status_cmd():
    """Whether it runs: its UI and API address, pid, Prefect version and state folder."""
    from dataops import local_api

    d = local_api.state_dir()
    rec = local_api.read_record(d)
    if rec is None or not local_api.healthy(rec, timeout=2.0):
        echo(f"not running (state folder {d}); the next flow command starts it")
        raise typer.Exit(0 if rec is None else 1)
    echo(f"running: UI {rec.ui_url}, API {rec.url}, pid {rec.pid}, Prefect {rec.prefect_version}, since "
         f"{rec.started_at}, stops after {rec.idle_s:g} s unused; state folder {d}")


@local_app.command("stop")
def stop_cmd():
    """Stop it now (it also stops itself after prefect.local_api_idle_s without use)."""
    from dataops import local_api

    rec = local_api.stop()
    echo(f"stopped the local Prefect API (pid {rec.pid}, port {rec.port})" if rec else "nothing was running")
