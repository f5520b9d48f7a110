"""The dataops-process work pool served by two workers, as two hosts run them: each its own
`prefect worker start` process with its own HOME, TMPDIR, PREFECT_HOME and working folder, both
polling one real `prefect server start` (this module's own, so that no other test's worker
takes runs from the pool) for the deployments `dataops deploy` registered.

What the team relies on when it adds a host:
- scheduled runs spread over both workers (each worker takes one run at a time, `--limit 1`);
- production-migration stays one at a time across both: its deployment concurrency limit
  (deployments/prefect.yaml: limit 1, CANCEL_NEW) is the server's, whichever worker asks;
- a host lost in the middle of a migration (worker and flow run killed with SIGKILL): the
  heartbeat watch marks the run Crashed, the alert goes out and the rollback runs on the other
  worker, back to the revision before the run;
- run-transform-dask runs the key ranges of a `workers: 2` transform on a Dask cluster of two
  worker processes (the one at DATAOPS_DASK_ADDRESS in the workers' environment).

Slow (a server, a deployment, two workers and minutes of runs): `make test-crash` runs them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import free_port, run_cli, stop_process

pytestmark = [pytest.mark.extended, pytest.mark.timeout(1800)]  # the first test pays for the fixture

REPO = Path(__file__).resolve().parent.parent
WORKERS = ("host-a", "host-b")
HEARTBEAT_S = 30  # Prefect's minimum flow heartbeat interval
CRASH_AFTER_S = 60  # prefect.crash_after_silence_s: its least value, longer than the heartbeat interval
APPLY_PAUSE_S = 20  # each revision stands still this long once committed: the window to kill a host in


# -- the hosts ------------------------------------------------------------------------------

def start_server(home: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": "", "PREFECT_UI_URL": f"http://127.0.0.1:{port}",
           "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}
    log = open(home / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    while True:
        try:
            if urllib.request.urlopen(url + "/health", timeout=1).read() == b"true":
                return proc, url
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc, 10)
            raise RuntimeError(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)


class Host:
    """One worker host: a folder that is its HOME, TMPDIR and PREFECT_HOME, and the worker process
    (in a session of its own, as on its own machine; its log in the folder)."""

    def __init__(self, name: str, api_url: str, config: Path, dask_address: str):
        self.name = name
        self.folder = Path(tempfile.mkdtemp(prefix=f"dowk-{name}-"))
        for sub in ("home", "tmp", "prefect", "run"):
            (self.folder / sub).mkdir(mode=0o700)
        self.log = self.folder / "worker.log"
        self.env = {**os.environ, "HOME": str(self.folder / "home"), "TMPDIR": str(self.folder / "tmp"),
                    "PREFECT_HOME": str(self.folder / "prefect"), "XDG_RUNTIME_DIR": str(self.folder / "run"),
                    "PREFECT_API_URL": api_url, "PREFECT_LOGGING_LEVEL": "INFO",
                    "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5",
                    "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S),
                    "DATAOPS_CONFIG": str(config), "DATAOPS_DASK_ADDRESS": dask_address,
                    # the window in which the kill test loses this host: after a revision commits
                    "DATAOPS_FAILPOINTS": f"migrate.after_revision=pause({APPLY_PAUSE_S})"}
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "prefect", "worker", "start", "--pool", "dataops-process", "--type", "process",
                 "--name", self.name, "--limit", "1"],
                env=self.env, cwd=self.folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_dask(folder: Path, api_url: str) -> tuple[list[subprocess.Popen], str]:
    """A Dask scheduler and one `dask worker` with two processes of one thread each, as on hosts of
    their own (their logs in `folder`). The scheduler picks its own port and names it in its
    scheduler file: a port chosen here first was once taken by another process in between."""
    env = {**os.environ, "PREFECT_API_URL": api_url}
    info = folder / "scheduler.json"
    procs = []
    for args, log in ((["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
                        "--scheduler-file", str(info), "--no-dashboard"], "scheduler.log"),
                      (["distributed.cli.dask_worker", "--scheduler-file", str(info), "--nworkers", "2", "--nthreads",
                        "1", "--no-dashboard"], "dask-worker.log")):
        with open(folder / log, "wb") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", *args], env=env, cwd=folder, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + 120
    while not (info.exists() and info.stat().st_size):
        assert procs[0].poll() is None, (folder / "scheduler.log").read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, "the Dask scheduler wrote no scheduler file in 120 s"
        time.sleep(0.2)
    time.sleep(0.2)  # the file is written whole at once; a moment for the last bytes to land
    return procs, json.loads(info.read_text())["address"]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """The dev stack, its deployments on this module's own Prefect server (heartbeat watch at
    CRASH_AFTER_S, alerts to a local receiver), a Dask cluster of two worker processes, and the
    two worker hosts polling dataops-process."""
    from distributed import Client

    from dataops.dev.alert_receiver import AlertReceiver
    from dataops.dev.stack import dev_down, dev_up

    server, url = start_server(tmp_path_factory.mktemp("prefect-server"))
    root = Path(tempfile.mkdtemp(prefix="do2w-"))
    cfg = root / "dataops.yaml"
    hosts: list[Host] = []
    dask_procs: list[subprocess.Popen] = []
    with AlertReceiver() as rx:
        try:
            stack = dev_up(root, users=300, s3_port=free_port(), config_path=cfg)
            data = yaml.safe_load(cfg.read_text())
            data["migrations"]["approval_poll_s"] = 1
            data["prefect"] = {"crash_after_silence_s": CRASH_AFTER_S}
            data["alerts"] = {"kind": "webhook", "webhook_url": rx.url}
            cfg.write_text("# Written by `dataops dev up` (edited by the test)\n"
                           + yaml.safe_dump(data, sort_keys=False))
            r = run_cli("--config", str(cfg), "deploy", timeout=600,
                        env={"PREFECT_API_URL": url, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)})
            assert r.returncode == 0, r.stderr[-3000:]
            assert "deployment: run-transform-on-dask/run-transform-dask" in r.stdout, r.stdout
            dask_procs, dask_address = start_dask(root, url)
            hosts = [Host(name, url, cfg, dask_address) for name in WORKERS]
            for host in hosts:
                host.start()
            # everything the tests import, imported before the Dask client's thread starts: an import
            # racing that thread's own imports deadlocked on Python's import locks
            import prefect.client.orchestration  # noqa: F401
            import prefect.client.schemas.filters  # noqa: F401
            import prefect.deployments  # noqa: F401

            import dataops.tasks.migration.audit  # noqa: F401
            with Client(dask_address, timeout=120) as dask:
                dask.wait_for_workers(2, timeout=300)
                yield {"url": url, "stack": stack, "hosts": {h.name: h for h in hosts}, "alerts": rx, "dask": dask}
        finally:
            for proc in [*(h.proc for h in hosts if h.proc), *reversed(dask_procs)]:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
            for proc in [*(h.proc for h in hosts if h.proc), *dask_procs]:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            dev_down(root)
            stop_process(server, 15)


@pytest.fixture
def client(pool):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: pool["url"]}), get_client(sync_client=True) as c:
        yield c


# -- helpers ----------------------------------------------------------------------------------

def wait_final(client, run_ids, timeout: float) -> list:
    """The runs once every one is in a final state (polled), in the order given."""
    deadline = time.monotonic() + timeout
    while True:
        runs = [client.read_flow_run(r) for r in run_ids]
        if all(r.state and r.state.is_final() for r in runs):
            return runs
        assert time.monotonic() < deadline, [(r.name, r.state.name if r.state else None) for r in runs]
        time.sleep(1)


def wait_until(condition, what: str, timeout: float, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"waited {timeout:.0f} s for {what}"
        time.sleep(interval)


def worker_of(run) -> str | None:
    """The worker that took the run: Prefect labels every run it submits with the worker's name."""
    return (run.labels or {}).get("prefect.worker.name")


def revision(dsn) -> str:
    from dataops.tasks import pg

    with pg.connect(dsn) as conn:
        return conn.execute("SELECT version_num FROM dataops_migrations.alembic_version").fetchone()[0]


def next_revision(dsn) -> str:
    return f"{int(revision(dsn)) + 1:04d}"


def running_span(client, run_id):
    """(first Running, final state) timestamps of a run, None if it never ran (Prefect stamps a
    start_time on a run cancelled before it started too, so the state history is what tells)."""
    states = client.read_flow_run_states(run_id)
    running = [s.timestamp for s in states if s.type.value == "RUNNING"]
    final = [s.timestamp for s in states if s.is_final()]
    return (min(running), max(final)) if running and final else None


def pid_of_flow_run(run_id) -> int | None:
    """The process running this flow run (the worker's child: its environment names the run)."""
    needle = f"PREFECT__FLOW_RUN_ID={run_id}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    return int(pid)
        except OSError:
            continue
    return None


# -- the tests --------------------------------------------------------------------------------

def test_scheduled_runs_spread_over_both_workers(pool, client):
    """Four nightly runs due at once (backups and the retention's dry run): each worker takes one
    at a time, so both take some; every run completes, started by one worker only."""
    from prefect.deployments import run_deployment

    due = [("backup-database/nightly-production-backup", {})] * 2 + \
          [("prune-backups/daily-backup-retention", {"dry_run": True})] * 2
    ids = [run_deployment(name, parameters=params, timeout=0).id for name, params in due]
    runs = wait_final(client, ids, timeout=600)
    assert all(r.state.is_completed() for r in runs), [(r.name, r.state.name, r.state.message) for r in runs]
    took = {r.name: worker_of(r) for r in runs}
    assert set(took.values()) == set(WORKERS), took
    # both may reach for the same run; the server lets one have it (the other's log says "Aborted
    # submission ... cannot transition to a PENDING state") and only that one starts it
    for run_name, name in took.items():
        other = next(h for h in WORKERS if h != name)
        assert f"Flow run '{run_name}' submitted to infrastructure" in pool["hosts"][name].log_text()
        assert f"Flow run '{run_name}' submitted to infrastructure" not in pool["hosts"][other].log_text()


def test_production_migration_stays_one_at_a_time_across_both_workers(pool, client):
    """Two production-migration runs submitted at once land on the two workers (one run each at a
    time); the deployment's concurrency limit lets one run and cancels the other before it
    starts; the run that ran never overlapped another migration run."""
    from prefect.deployments import run_deployment

    prod = pool["stack"].pg_dsn_production
    target = next_revision(prod)
    params = {"target": target, "auto_approve": True}  # the dev stack allows it: no pause in between
    ids = [run_deployment("migrate-database/production-migration", parameters=params, timeout=0).id
           for _ in range(2)]
    runs = wait_final(client, ids, timeout=600)
    by_state = sorted(runs, key=lambda r: r.state.type.value)
    assert [r.state.type.value for r in by_state] == ["CANCELLED", "COMPLETED"], \
        [(r.name, r.state.name, r.state.message) for r in runs]
    cancelled, completed = by_state
    assert "concurrency limit" in (cancelled.state.message or ""), cancelled.state.message
    # asked for by the other worker (each takes one run at a time, and the one that ran held its worker
    # throughout): the server refused it there
    other = next(h for h in WORKERS if h != worker_of(completed))
    assert f"Worker '{other}' submitting flow run '{cancelled.id}'" in pool["hosts"][other].log_text()
    assert revision(prod) == target

    # by the runs' own state history: the cancelled one was never Running; no two migration runs overlap
    assert running_span(client, cancelled.id) is None, client.read_flow_run_states(cancelled.id)
    spans = sorted(filter(None, (running_span(client, r.id) for r in client.read_flow_runs()
                                 if r.deployment_id == completed.deployment_id)))
    assert spans and all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:])), spans
    assert (completed.end_time - completed.start_time).total_seconds() >= APPLY_PAUSE_S  # it ran long enough


def test_transform_ranges_run_on_a_dask_cluster_of_two_processes(pool, client):
    """run-transform-dask with workers: 2, started from its deployment by whichever worker takes
    it: both key ranges are task runs executed in the two Dask worker processes, and the rows
    are split."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
        TaskRunFilter,
        TaskRunFilterName,
    )
    from prefect.deployments import run_deployment

    from dataops.tasks import pg

    prod = pool["stack"].pg_dsn_production
    todo = "SELECT count(*) FROM users WHERE first_name IS NULL AND last_name IS NULL AND btrim(full_name) LIKE '% %'"
    with pg.connect(prod) as conn:
        assert conn.execute(todo).fetchone()[0] > 0
    dask = pool["dask"]
    dask_pids = dask.run(os.getpid)  # {Dask worker address: pid}
    dask.get_task_stream()  # from here on the scheduler records which worker ran which task

    run = run_deployment("run-transform-on-dask/run-transform-dask", parameters={"workers": 2}, timeout=600,
                         poll_interval=1)
    assert run.state.is_completed(), run.state.message
    assert worker_of(run) in WORKERS
    stream = dask.get_task_stream()

    with pg.connect(prod) as conn:
        assert conn.execute(todo).fetchone()[0] == 0
    [inner] = client.read_flow_runs(flow_run_filter=FlowRunFilter(
        parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))
    ranges = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[inner.id])),
                                   task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="users_split_full_name-range-")))
    assert sorted(t.name for t in ranges) == ["users_split_full_name-range-0", "users_split_full_name-range-1"]
    assert all(t.state.is_completed() for t in ranges), [(t.name, t.state.name) for t in ranges]
    on_dask = [s for s in stream if s["key"].startswith("run_range_task")]
    assert len(on_dask) == 2, [s["key"] for s in stream]
    assert {s["worker"] for s in on_dask} == set(dask_pids), (on_dask, dask_pids)  # one range in each process


def test_a_host_lost_mid_migration_is_crashed_alerted_and_rolled_back_on_the_other(pool, client):
    """SIGKILL to a worker and to the flow run it started, once a revision has committed (the
    host is gone: no hook, no final state). The heartbeat watch marks the run Crashed once its
    heartbeats stop, the alert automation posts it, and the rollback automation's run, taken by
    the other worker, brings production back to the revision before the run."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.deployments import run_deployment

    from dataops.tasks.migration.audit import load

    prod = pool["stack"].pg_dsn_production
    before = revision(prod)
    target = next_revision(prod)
    migration = run_deployment("migrate-database/production-migration",
                               parameters={"target": target, "auto_approve": True}, timeout=0)
    wait_until(lambda: revision(prod) == target, f"revision {target} to commit", timeout=300)
    run = client.read_flow_run(migration.id)
    lost, survivor = worker_of(run), next(h for h in WORKERS if h != worker_of(run))
    assert lost in WORKERS and run.state.is_running(), (lost, run.state)
    flow_pid = pid_of_flow_run(migration.id)
    assert flow_pid, "the flow run's process was not found"
    os.kill(pool["hosts"][lost].proc.pid, signal.SIGKILL)
    os.kill(flow_pid, signal.SIGKILL)
    killed_at = time.monotonic()

    run = wait_until(lambda: (r := client.read_flow_run(migration.id)).state.is_final() and r,
                     "the heartbeat watch to end the run", timeout=CRASH_AFTER_S + 180, interval=1)
    assert run.state.is_crashed() and "no heartbeat" in (run.state.message or ""), (run.state.name, run.state.message)
    assert time.monotonic() - killed_at >= CRASH_AFTER_S - HEARTBEAT_S  # the watch waited for the silence

    alert = pool["alerts"].wait_for(lambda a: run.name in a.get("subject", "") and "crashed" in a["subject"],
                                    timeout=60)
    assert alert is not None, pool["alerts"].received

    def rollback_run():
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
            name=DeploymentFilterName(any_=["rollback-migration"])))
        return next((r for r in runs if r.parameters.get("run_id") == str(migration.id)), None)

    rollback = wait_until(rollback_run, "the automation's rollback-migration run", timeout=120, interval=1)
    [rollback] = wait_final(client, [rollback.id], timeout=400)
    assert rollback.state.is_completed(), rollback.state.message
    assert worker_of(rollback) == survivor
    assert revision(prod) == before
    assert load(prod, str(rollback.id)).outcome == "rolled-back"
