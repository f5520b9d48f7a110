"""`dataops dev up|down` and `dataops demo`: the embedded stack (the `dataops[dev]` extra)."""

from __future__ import annotations

from pathlib import Path

import typer

from dataops.cli.app import app, echo, state
from dataops.errors import BadInput
from dataops.runtime import prepare_prefect, private_runtime_dir

dev_app = typer.Typer(no_args_is_help=True, help="The embedded local stack: PostgreSQL and an S3-compatible store.")
app.add_typer(dev_app, name="dev")


@dev_app.command("up")
def dev_up_cmd(users: int = typer.Option(10_000, "--users", min=10, help="users to seed into production"),
               root: Path = typer.Option(Path(".dataops"), "--root", help="where the stack keeps its data"),
               s3_port: int = typer.Option(9900, "--s3-port", help="port of the local S3-compatible endpoint"),
               store: str = typer.Option("s3", "--store", help="s3 (local endpoint) or file"),
               reset: bool = typer.Option(False, "--reset", help="drop and re-seed the databases"),
               force: bool = typer.Option(False, "--force", help="overwrite a dataops.yaml not written by dev up")):
    """Start embedded PostgreSQL and a local S3 endpoint, seed production, write dataops.yaml."""
    from dataops.dev.stack import describe, dev_up

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
    """Stop the embedded stack started by `dataops dev up`, and the local Prefect API."""
    from dataops import local_api
    from dataops.dev.stack import dev_down

    stopped = dev_down(root.resolve())
    api = local_api.stop()
    if api is not None:
        stopped.append(f"the local Prefect API (pid {api.pid}, port {api.port})")
    echo("\n".join(f"stopped {s}" for s in stopped) or "nothing was running")


def _refuse_foreign_config(path: Path, force: bool) -> None:
    from dataops.dev.stack import MARKER

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
    from dataops.dev.demo import run_demo

    prepare_prefect(None, state.verbose)
    ok = run_demo(root.resolve(), users=users, s3_port=s3_port, keep=keep, out=echo)
    raise typer.Exit(0 if ok else 1)
