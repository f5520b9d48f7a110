"""revert-transform: undo the newest run of a transform that is not already reverted.

With the transform's own REVERT (SQL, batched like the change) if it has one, else from the
snapshot taken before its first batch, restored in batches too. Resumable like a run: a
killed revert continues where it stopped with `revert`. Started by hand or by
run-transform's failure hook when the checks after a run failed.
"""

from __future__ import annotations

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

import dataops.flows.engine  # noqa: F401  (runs end without a second's wait: see there)
from dataops.settings import load_settings
from dataops.tasks.transform.batches import Overrides
from dataops.tasks.transform.engine import PrefectSteps, revert


@flow(name="revert-transform", task_runner=ThreadPoolTaskRunner(max_workers=64))
def revert_transform(env: str, name: str, batch_size: int | None = None, max_batch_seconds: float | None = None,
                     throttle_ms: int | None = None, workers: int | None = None, only_if_checks_failed: bool = False,
                     config: str | None = None) -> dict:
    """only_if_checks_failed: for automations started by any failed run-transform (a server-side
    path besides the in-process hook): revert only a run whose checks failed, never one that
    was merely interrupted and is waiting to be resumed."""
    settings = load_settings(config)
    environment = settings.env(env)
    overrides = Overrides(batch_size=batch_size, max_batch_seconds=max_batch_seconds, throttle_ms=throttle_ms,
                          workers=workers)
    from prefect.runtime import flow_run

    return revert(settings, environment, name, overrides, steps=PrefectSteps, flow_run_id=str(flow_run.id),
                  only_if_checks_failed=only_if_checks_failed)


if __name__ == "__main__":
    import sys

    revert_transform(sys.argv[1], sys.argv[2])
