"""revert-transform: undo the newest run of a transform that is not already reverted.

With the transform's own REVERT (SQL, batched like the change) if it has one, else from the
snapshot taken before its first batch, restored in batches too. Resumable like a run: a
killed revert continues where it stopped with `revert`. Started by hand or by
run-transform's failure hook when the checks after a run failed.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

import dataops.flows.engine  # noqa: F401  (runs end without a second's wait: see there)
from dataops.settings import load_settings
from dataops.tasks.transform.batches import Options
from dataops.tasks.transform.engine import (
    finish_revert_task,
    prepare_revert_task,
    run_range_task,
)
from dataops.tasks.transform.progress import PROGRESS_EVERY_S, ProgressMonitor, Session, gather_ranges, summarize
from dataops.tasks.transform.report import ProgressArtifact, publish_summary
from dataops.tasks.transform.state import CHECKS_FAILED, RUNNING, latest_run, transform_lock


@flow(name="revert-transform", task_runner=ThreadPoolTaskRunner(max_workers=64))
def revert_transform(env: str, name: str, batch_size: int | None = None, max_batch_seconds: float | None = None,
                     throttle_ms: int | None = None, workers: int | None = None, only_if_checks_failed: bool = False,
                     config: str | None = None) -> dict:
    """only_if_checks_failed: for automations started by any failed run-transform (a server-side
    path besides the in-process hook): revert only a run whose checks failed, never one that
    was merely interrupted and is waiting to be resumed."""
    settings = load_settings(config)
    environment = settings.env(env)
    opts = Options.from_settings(settings.transforms, batch_size=batch_size, max_batch_seconds=max_batch_seconds,
                                 throttle_ms=throttle_ms, workers=workers)
    logger = get_run_logger()
    from prefect.runtime import flow_run

    t0 = time.monotonic()
    with transform_lock(environment.database_url, name, env, timeout=settings.postgres.connect_timeout) as conn:
        if only_if_checks_failed:
            last = latest_run(conn, name)
            interrupted_revert = last is not None and last.action == "revert" and last.status == RUNNING
            if not interrupted_revert and (last is None or last.status != CHECKS_FAILED):
                logger.info("the newest run of %s on %s did not fail its checks (%s); nothing to revert", name, env,
                            f"{last.action} {last.id} {last.status}" if last else "never run")
                return {"transform": name, "environment": env, "status": "nothing to revert"}
        rev = prepare_revert_task(settings, env, name, opts, str(flow_run.id))
        bar = ProgressArtifact(f"transform-{name}-{env}-revert-progress", f"revert of {name} on {env}")

        def report(percent: float, line: str) -> None:
            logger.info("%s", line)
            bar.update(percent)

        with ProgressMonitor(settings, env, rev, report, PROGRESS_EVERY_S):
            futures = [run_range_task.with_options(task_run_name=f"{name}-revert-range-{r.range_no}").submit(
                settings, env, name, rev.id, r.range_no, opts) for r in rev.pending]
            longest, error = gather_ranges(futures)
        if error is not None:
            raise error
        rev = finish_revert_task(settings, env, name, rev.id)
    summary = summarize(rev, env, Session(time.monotonic() - t0, longest))
    publish_summary(summary)
    logger.info("reverted run %s of %s on %s (%s): %d rows written back, %d re-inserted", rev.reverts, name, env,
                rev.params.get("method"), summary["changed"], summary["inserted"])
    return summary


if __name__ == "__main__":
    import sys

    revert_transform(sys.argv[1], sys.argv[2])
