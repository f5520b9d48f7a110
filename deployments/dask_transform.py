"""run-transform-dask: the run-transform flow with its key ranges on a Dask cluster, as a
deployment any worker of the pool can start.

A deployment cannot choose a flow's task runner, so this flow runs run-transform as a subflow
with prefect-dask's DaskTaskRunner: every range is a task run in a Dask worker process, which
opens its own connection there. The cluster is:
- the one at DATAOPS_DASK_ADDRESS (`tcp://scheduler:8786`) in the environment of the Prefect
  worker that picks the run up: a long-lived cluster on other hosts (infra/workers.md);
- otherwise a local cluster of `workers` processes (one thread each), started inside the flow
  run's process for this run only and stopped with it.

prefect-dask is imported only when a run starts, so `prefect deploy` works on a host without it;
a run on a worker without it fails at once, naming the package, rather than falling back to
threads behind the operator's back.
"""

from __future__ import annotations

import os

from prefect import flow

from dataops.errors import BadInput
from dataops.flows.run_transform import run_transform

ADDRESS_VAR = "DATAOPS_DASK_ADDRESS"


def dask_runner(workers: int):
    """The task runner for one run: the cluster named in the environment, else a local one."""
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise BadInput("run-transform-dask needs prefect-dask on the worker host: "
                       "pip install 'dataops[dask]'") from None
    address = os.environ.get(ADDRESS_VAR, "").strip()
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "processes": True, "threads_per_worker": 1,
                                          "dashboard_address": None})


@flow(name="run-transform-on-dask")
def run_transform_on_dask(env: str, name: str, workers: int = 2, batch_size: int | None = None,
                          max_batch_seconds: float | None = None, throttle_ms: int | None = None,
                          dry_run: bool = False, config: str | None = None) -> dict:
    if workers < 1:
        raise BadInput(f"workers: must be at least 1 (got {workers})")
    on_dask = run_transform.with_options(task_runner=dask_runner(workers))
    return on_dask(env, name, batch_size=batch_size, max_batch_seconds=max_batch_seconds, throttle_ms=throttle_ms,
                   workers=workers, dry_run=dry_run, config=config)
