"""Deployments run by a real worker on the embedded stack, as the team uses them: the nightly
refresh completes; a production migration pauses for approval, is approved through the API
(as the UI's Resume form does) and completes."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import free_port, run_cli

REPO = Path(__file__).resolve().parent.parent


def wait_for_state(client, run_id, names: set[str], timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.read_flow_run(run_id)
        if run.state and (run.state.name in names or run.state.type.value in names):
            return run
        if run.state and run.state.is_final():
            return run
        time.sleep(0.5)
    return client.read_flow_run(run_id)


@pytest.fixture(scope="module")
def deployed(prefect_server):
    """The embedded stack, its deployments on the real server, and a worker polling the pool."""
    from dataops.devstack import dev_down, dev_up

    root = Path(tempfile.mkdtemp(prefix="dodep-"))
    cfg = root / "dataops.yaml"
    stack = dev_up(root, users=150, s3_port=free_port(), config_path=cfg)
    data = yaml.safe_load(cfg.read_text())
    data["migrations"]["approval_poll_s"] = 1
    cfg.write_text("# Written by `dataops dev up` (edited by the test)\n" + yaml.safe_dump(data, sort_keys=False))
    env = {"PREFECT_API_URL": prefect_server["url"]}
    worker = None
    try:
        r = run_cli("--config", str(cfg), "deploy", env=env, timeout=400)
        assert r.returncode == 0, r.stderr[-3000:]
        worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", "dataops-process", "--type", "process"],
            env={**os.environ, **env, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5",
                 "DATAOPS_CONFIG": str(cfg)},
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        yield {"stack": stack, "config": cfg, "server": prefect_server}
    finally:
        if worker:
            worker.terminate()
            worker.wait(20)
        dev_down(root)


def migration_revision(dsn) -> str:
    from tasks import pg

    with pg.connect(dsn) as conn:
        return conn.execute("SELECT version_num FROM dataops_migrations.alembic_version").fetchone()[0]


def test_refresh_and_approved_migration_run_on_a_worker(deployed):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.flow_runs import resume_flow_run
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks import pg

    stack = deployed["stack"]
    with temporary_settings({PREFECT_API_URL: deployed["server"]["url"]}), get_client(sync_client=True) as client:
        refresh = run_deployment("refresh-staging/nightly-staging-refresh", timeout=400, poll_interval=1)
        assert refresh.state.is_completed(), refresh.state.message
        with pg.connect(stack.pg_dsn_staging) as conn:
            assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 150

        migration = run_deployment("migrate-database/production-migration", timeout=0,
                                   parameters={"target": "0003"})
        run = wait_for_state(client, migration.id, {"Paused", "PAUSED"}, timeout=240)
        assert run.state.is_paused(), run.state
        resume_flow_run(migration.id, run_input={"approved": True, "approver": "test", "comment": "looks safe"})
        run = wait_for_state(client, migration.id, {"COMPLETED"}, timeout=300)
        assert run.state.is_completed(), run.state.message
    assert migration_revision(stack.pg_dsn_production) == "0003"
