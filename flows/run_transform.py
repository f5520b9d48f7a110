"""run-transform: a batched data change, resumable, with progress, checks and a way back.

1. Under the transform's lock (a second run is refused): resume the interrupted run, or
   start one (snapshot of the touched columns first, when the transform asks for it).
2. One task run per key range, side by side through the flow's task runner: threads
   here; the same flow runs across machines with prefect-dask's DaskTaskRunner:

       from prefect_dask import DaskTaskRunner
       run_transform.with_options(task_runner=DaskTaskRunner(address="tcp://scheduler:8786"))(...)

   (each Dask worker needs this repository and the transforms folder at the same path, the
   project's dependencies with prefect-dask, and a route to the database URL in dataops.yaml:
   every range opens its own connection from the worker that runs it).
3. Progress (rows done and left, rate, ETA) in the logs and a progress artifact, read from
   the checkpoints so it covers every worker.
4. After the last batch, the checks; a failure fails the run and the on_failure hook
   starts revert-transform. Hooks run in this process only: a killed run is resumed with
   `run`, never reverted behind the operator's back.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

import dataops.flows.engine  # noqa: F401  (runs end without a second's wait: see there)
from dataops.errors import is_transient
from dataops.settings import load_settings
from dataops.tasks.transform.batches import Options, Overrides
from dataops.tasks.transform.engine import PrefectSteps, transform
from dataops.tasks.transform.plan import plan_task
from dataops.tasks.transform.report import publish_plan


def start_revert(flow, flow_run, state) -> None:
    """on_failure hook: revert the run if its checks failed. Any other failure (lock busy,
    lost connection, a bug in change()) left a resumable run: that is for a person to decide."""
    from prefect.logging.loggers import flow_run_logger

    logger = flow_run_logger(flow_run, flow)
    params = flow_run.parameters or {}
    env, name, config = params.get("env"), params.get("name"), params.get("config")
    if params.get("dry_run"):
        return
    try:
        from dataops.tasks import pg
        from dataops.tasks.transform.state import CHECKS_FAILED, latest_run

        settings = load_settings(config)
        with pg.connect(settings.env(env).database_url, timeout=settings.postgres.connect_timeout) as conn:
            last = latest_run(conn, name)
    except Exception as exc:  # noqa: BLE001 - a hook must not raise; say why nothing was started
        logger.error("cannot look at the state of %s on %s: %s", name, env, exc)
        return
    if last is None or last.action != "run" or last.status != CHECKS_FAILED:
        logger.info("%s on %s failed before its checks; nothing is reverted. Run it again to resume: "
                    "dataops transform %s run %s", name, env, env, name)
        return
    logger.warning("checks failed after run %d of %s on %s; starting revert-transform", last.id, name, env)
    try:
        from dataops.flows.revert_transform import revert_transform

        revert_transform(env=env, name=name, only_if_checks_failed=True, config=config)
    except Exception as exc:  # noqa: BLE001 - the revert run records its own failure
        level = logger.warning if is_transient(exc) else logger.error
        level("revert-transform of %s on %s failed: %s; run dataops transform %s revert %s", name, env, exc, env, name)


@flow(name="run-transform", task_runner=ThreadPoolTaskRunner(max_workers=64), on_failure=[start_revert])
def run_transform(env: str, name: str, batch_size: int | None = None, max_batch_seconds: float | None = None,
                  throttle_ms: int | None = None, workers: int | None = None, dry_run: bool = False,
                  config: str | None = None) -> dict:
    settings = load_settings(config)
    environment = settings.env(env)
    overrides = Overrides(batch_size=batch_size, max_batch_seconds=max_batch_seconds, throttle_ms=throttle_ms,
                          workers=workers)
    if dry_run:
        p = plan_task(settings, environment, name, Options.from_settings(settings.transforms, overrides))
        publish_plan(p)
        get_run_logger().info("dry run of %s on %s: %d row(s) need work, %d invalid, nothing written", name, env,
                              p["needing_work"], p["invalid"])
        return p
    from prefect.runtime import flow_run

    return transform(settings, environment, name, overrides, steps=PrefectSteps, flow_run_id=str(flow_run.id))


if __name__ == "__main__":
    import sys

    run_transform(sys.argv[1], sys.argv[2])
