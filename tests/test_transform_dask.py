"""run-transform with prefect-dask's DaskTaskRunner: the ranges run in Dask worker processes.

The flow is given the runner the way its docstring tells an operator to
(`run_transform.with_options(task_runner=DaskTaskRunner(address=...))`), against a local
cluster of two worker *processes*: the task arguments (settings, options) must pickle and
every range must open its own connection in another process, as on other machines. The
end state must be the one a run with the default thread runner leaves on an identical
database.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from dataops.dev.sample_app import create_schema, seed
from dataops.tasks import pg
from dataops.tasks.checksums import table_checksum

ROOT = Path(__file__).resolve().parent.parent
TRANSFORM = "users_split_full_name"  # the pandas example: a change() that runs in the worker
RANGES = 4  # more ranges than Dask workers: both workers get some


def config(folder: Path, dsn) -> str:
    folder.mkdir()
    path = folder / "dataops.yaml"
    path.write_text(yaml.safe_dump({
        "environments": {"dev": {"role": "development", "database_url": dsn.secret()}},
        "storage": {"url": (folder / "backups").as_uri()},
        "transforms": {"path": str(ROOT / "transforms"), "batch_size": 50},
    }))
    return str(path)


def app(make_db):
    dsn = make_db("xfd")
    create_schema(dsn)
    seed(dsn, users=600)
    return dsn


def users_checksum(dsn, **kw) -> str:
    with pg.connect(dsn) as conn:
        return table_checksum(conn, "public", "users", **kw).checksum


def test_run_transform_on_a_dask_cluster_of_processes_matches_the_thread_runner(prefect_api, make_db, tmp_path):
    from distributed import Client, LocalCluster
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName
    from prefect_dask import DaskTaskRunner

    from dataops.flows.run_transform import run_transform

    by_threads, by_dask = app(make_db), app(make_db)
    original = users_checksum(by_dask)
    assert users_checksum(by_threads) == original  # identical databases to start from

    threads = run_transform("dev", TRANSFORM, workers=RANGES, config=config(tmp_path / "threads", by_threads),
                            return_state=True)
    assert threads.is_completed(), threads.message

    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        worker_pids = client.run(os.getpid)  # {worker address: pid}
        client.get_task_stream()  # starts the scheduler's record of which worker ran which task
        runner = DaskTaskRunner(address=cluster.scheduler_address)
        state = run_transform.with_options(task_runner=runner)(
            "dev", TRANSFORM, workers=RANGES, config=config(tmp_path / "dask", by_dask), return_state=True)
        stream = client.get_task_stream()

    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["status"] == "completed" and summary["ranges"] == RANGES
    assert summary["changed"] + summary["invalid"] == 600 and summary["changed"] > 500
    counts = ("changed", "deleted", "invalid", "unchanged")
    assert {k: summary[k] for k in counts} == {k: threads.result()[k] for k in counts}

    # the same rows, the same values (updated_at is the trigger's now(): the time of each run)
    assert users_checksum(by_dask) != original
    assert users_checksum(by_dask, exclude=["updated_at"]) == users_checksum(by_threads, exclude=["updated_at"])

    # every range was a task run of its own, completed, in a Dask worker process, on both workers
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as api:
        ranges = api.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                    task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=f"{TRANSFORM}-range-")))
    assert sorted(t.name for t in ranges) == [f"{TRANSFORM}-range-{n}" for n in range(RANGES)]
    assert all(t.state.is_completed() for t in ranges), [(t.name, t.state.name) for t in ranges]

    # only the range tasks are submitted to the runner (prepare and check run in the flow)
    assert sorted(s["key"].split("-")[0] for s in stream) == ["run_range_task"] * RANGES, [s["key"] for s in stream]
    ran_on = {worker_pids[s["worker"]] for s in stream}
    assert os.getpid() not in ran_on and ran_on == set(worker_pids.values()), (os.getpid(), ran_on, worker_pids)
