"""`dataops transform ENV list | run NAME | status NAME | revert NAME`: batched data transforms.

run and revert run the run-transform and revert-transform flows; list and status only read.
Exit codes follow the CLI contract: 2 bad input (unknown transform, a column that does not
exist yet, a bad parameter), 1 failed (another run holds the lock, checks failed).
"""

from __future__ import annotations

import json
from typing import Optional

import typer

from dataops.cli.app import EnvGroup, echo
from dataops.cli.app import state as cli_state
from dataops.errors import DataopsError, OperationFailed
from dataops.tasks.reporting import text_table

group = EnvGroup("transform", "Batched data transforms: modules in transforms.path, applied in "
                              "short transactions, resumable, reversible.")
transform_app = group.app


def _name_arg():
    return typer.Argument(..., help="transform: a module name in transforms.path", show_default=False)


def _tuning(default_help: str):
    """The bounds are checked by Overrides, the same as in dataops.yaml."""
    return (typer.Option(None, "--batch-size", help=f"rows in the first batch ({default_help})"),
            typer.Option(None, "--max-batch-seconds", help=f"bound of each batch's transaction ({default_help})"),
            typer.Option(None, "--throttle-ms", help=f"pause between batches ({default_help})"),
            typer.Option(None, "--workers", help=f"key ranges processed at once ({default_help})"))


_BATCH, _SECONDS, _THROTTLE, _WORKERS = _tuning("default: transforms: in dataops.yaml")


@transform_app.command("list")
def list_cmd(as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """The transforms in transforms.path, with their last run on ENV."""
    from dataops.tasks import pg
    from dataops.tasks.transform.spec import list_transforms, load_transform
    from dataops.tasks.transform.state import latest_run

    settings, env = group.resolved()
    folder = settings.transforms_dir
    rows = []
    with pg.connect(env.database_url, timeout=settings.postgres.connect_timeout) as conn:
        for name in list_transforms(folder):
            try:
                spec = load_transform(folder, name)
            except DataopsError as exc:
                rows.append({"name": name, "kind": "-", "table": "-", "last run": "-", "description": f"error: {exc.message}"})
                continue
            last = latest_run(conn, name)
            rows.append({"name": name, "kind": spec.kind, "table": spec.table,
                         "last run": f"{last.action} {last.id} {last.status}" if last else "never",
                         "description": spec.description})
    if as_json:
        echo(json.dumps(rows, indent=2))
    elif not rows:
        echo(f"no transforms in {folder}; add a module there (see docs/transforms.md)")
    else:

        echo(text_table(rows))


@transform_app.command("run")
def run_cmd(name: str = _name_arg(), batch_size: Optional[int] = _BATCH, max_batch_seconds: Optional[float] = _SECONDS,
            throttle_ms: Optional[int] = _THROTTLE, workers: Optional[int] = _WORKERS,
            dry_run: bool = typer.Option(False, "--dry-run", help="count, check and preview; write nothing"),
            as_json: bool = typer.Option(False, "--json", help="print the result as JSON")):
    """Run NAME on ENV (or resume its interrupted run); a second run at the same time is refused."""
    from dataops.tasks.transform.batches import Overrides

    group.resolved()
    overrides = Overrides(batch_size=batch_size, max_batch_seconds=max_batch_seconds, throttle_ms=throttle_ms,
                          workers=workers)  # refused here, before a flow run starts
    from dataops.flows.run_transform import run_transform

    try:
        result = run_transform(group.env, name, dry_run=dry_run, config=cli_state.config, **overrides.as_params())
    except DataopsError as exc:
        raise _with_revert_outcome(exc, name) from None
    if as_json:
        echo(json.dumps(result, indent=2, default=str))
    elif dry_run:
        _print_plan(result)
    else:
        _print_summary(result)


@transform_app.command("revert")
def revert_cmd(name: str = _name_arg(), batch_size: Optional[int] = _BATCH, max_batch_seconds: Optional[float] = _SECONDS,
               throttle_ms: Optional[int] = _THROTTLE, workers: Optional[int] = _WORKERS,
               as_json: bool = typer.Option(False, "--json", help="print the result as JSON")):
    """Undo the newest run of NAME on ENV: with its REVERT, else from its snapshot."""
    from dataops.tasks.transform.batches import Overrides

    group.resolved()
    overrides = Overrides(batch_size=batch_size, max_batch_seconds=max_batch_seconds, throttle_ms=throttle_ms,
                          workers=workers)
    from dataops.flows.revert_transform import revert_transform

    result = revert_transform(group.env, name, config=cli_state.config, **overrides.as_params())
    if as_json:
        echo(json.dumps(result, indent=2, default=str))
    else:
        _print_summary(result)


@transform_app.command("status")
def status_cmd(name: str = _name_arg(), as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """The newest runs of NAME on ENV, newest first: status, progress, counts."""
    from dataops.tasks.transform.engine import status

    st = status(*group.resolved(), name)
    if as_json:
        echo(json.dumps(st, indent=2, default=str))
        return
    echo(f"{name} ({st['kind']}, {st['table']}): {st['description']}")
    if not st["runs"]:
        echo(f"never run on {group.env}")
    for s in st["runs"]:
        done = f"{s['scanned']:,} of {s['rows']:,} rows"
        echo(f"  {s['action']} {s['run_id']}: {s['status']}, {done}, {_counts(s)}, longest transaction "
             f"{s['longest_tx_s']:.3f} s" + (f" (reverts run {s['reverts']})" if s["reverts"] else ""))
        if s["status"] == "interrupted":
            verb = "revert" if s["action"] == "revert" else "run"
            echo(f"    resume with: dataops transform {group.env} {verb} {name}")


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 'es' if word.endswith('h') else 's'}"


def _counts(s: dict) -> str:
    if s["action"] == "revert":
        return f"{s['changed']:,} rows written back" + (f", {s['inserted']:,} re-inserted" if s["inserted"] else "")
    parts = [f"{s['changed']:,} changed"]
    if s["deleted"]:
        parts.append(f"{s['deleted']:,} deleted")
    if s["inserted"]:
        parts.append(f"{s['inserted']:,} re-inserted")
    invalid = f"{s['invalid']:,} skipped as invalid"
    if s["invalid_examples"]:
        invalid += f" (e.g. keys {', '.join(s['invalid_examples'][:5])})"
    return ", ".join([*parts, invalid, f"{s['unchanged']:,} unchanged"])


def _print_summary(s: dict) -> None:
    what = f"revert of {s['transform']}" if s["action"] == "revert" else s["transform"]
    echo(f"{what} on {s['environment']}: {s['status']} ({s['action']} {s['run_id']})")
    echo(f"  {_counts(s)}")
    echo(f"  {_plural(s['batches'], 'batch')} in {_plural(s['ranges'], 'range')}, longest transaction {s['longest_tx_s']:.3f} s "
         f"(bound {s['max_batch_seconds']:g} s), {s.get('seconds', 0):.1f} s, {s.get('rows_per_s') or 0:,} rows/s")


def _print_plan(p: dict) -> None:
    echo(f"dry run of {p['transform']} on {p['environment']} ({p['kind']}, {p['table']}): nothing written")
    echo(f"  {p['needing_work']:,} of {p['rows']:,} rows need work; {p['invalid']:,} invalid would be skipped"
         + (f" (e.g. keys {', '.join(p['invalid_examples'])})" if p["invalid_examples"] else ""))
    echo(f"  {len(p['ranges'])} range(s); snapshot: {p['snapshot'] or 'none'}; revert: {p['revert']}")
    for r in p["preview"]:
        echo(f"  key {r['key']}: {r['before']} -> {r['after']}")


def _with_revert_outcome(exc: DataopsError, name: str) -> DataopsError:
    """A run whose checks failed was reverted by the flow's hook: say whether that worked."""
    if not exc.message.startswith("checks after "):
        return exc
    from dataops.tasks import pg
    from dataops.tasks.transform.state import COMPLETED, latest_run

    try:
        settings, env = group.resolved()
        with pg.connect(env.database_url, timeout=settings.postgres.connect_timeout) as conn:
            last = latest_run(conn, name)
    except DataopsError:
        last = None
    if last is not None and last.action == "revert" and last.status == COMPLETED:
        return OperationFailed(f"{exc.message.removesuffix('; reverting it')}; reverted (revert run {last.id})")
    return OperationFailed(f"{exc.message.removesuffix('; reverting it')}; the revert did not complete: "
                           f"dataops transform {group.env} revert {name}")
