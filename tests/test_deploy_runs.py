"""Deployments run by a real worker on the embedded stack, as the team uses them: a deployment
run of every flow completes with its artifact; a production migration pauses for approval,
is approved through the API (as the UI's Resume form does), completes, is downgraded and
rolled back; a migration whose process is killed is rolled back by the server's automation."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from conftest import answer_approval

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


def migration_revision(dsn) -> str:
    from dataops.tasks import pg

    with pg.connect(dsn) as conn:
        return conn.execute("SELECT version_num FROM dataops_migrations.alembic_version").fetchone()[0]


def test_refresh_and_approved_migration_run_on_a_worker(deployed):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from dataops.tasks import pg

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
        answer_approval(client, migration.id, {"approved": True, "approver": "test", "comment": "looks safe"})
        run = wait_for_state(client, migration.id, {"COMPLETED"}, timeout=300)
        assert run.state.is_completed(), run.state.message
    assert migration_revision(stack.pg_dsn_production) == "0003"
    assert_artifacts(deployed, refresh.id, migration.id)

    with temporary_settings({PREFECT_API_URL: deployed["server"]["url"]}), get_client(sync_client=True) as client:
        down = run_deployment("downgrade-database/downgrade-migration", timeout=400, poll_interval=1,
                              parameters={"steps": 1, "confirm": "production"})
        assert down.state.is_completed(), down.state.message
        assert migration_revision(stack.pg_dsn_production) == "0002"
        # by hand, with the run's id, as the UI's Run form asks: back to the revision before it (already there)
        rollback = run_deployment("rollback-migration/rollback-migration", timeout=400, poll_interval=1,
                                  parameters={"run_id": str(migration.id)})
        assert rollback.state.is_completed(), rollback.state.message
    assert migration_revision(stack.pg_dsn_production) == "0002"
    assert audit(stack.pg_dsn_production, rollback.id).outcome == "rolled-back"
    assert_artifacts(deployed, down.id, rollback.id)


def audit(dsn, run_id):
    from dataops.tasks.migration.audit import load

    record = load(dsn, str(run_id))
    assert record is not None, f"no audit row for run {run_id}"
    return record


def assert_artifacts(deployed, *run_ids) -> None:
    """Every run publishes what the UI shows on its page (manifest, plan, report, ...)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: deployed["server"]["url"]}), get_client(sync_client=True) as client:
        for run_id in run_ids:
            found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
            assert found, f"flow run {client.read_flow_run(run_id).name} published no artifact"


@pytest.mark.extended  # make test-crash (CI runs it after make test): keeps make test under 15 minutes
def test_a_deployment_run_of_every_data_flow(deployed):
    """What the schedules and the by-hand deployments start, each on the worker, in the order a
    team would: back up, validate, verify, prune (dry run), restore into staging, transform,
    revert it, anonymize staging in place."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from dataops.tasks import pg

    stack = deployed["stack"]
    with pg.connect(stack.pg_dsn_production) as conn:
        names_before = conn.execute("SELECT sum(hashtext(coalesce(first_name, '') || last_name)) FROM users").fetchone()[0]
    steps = [
        ("backup-database/nightly-production-backup", {}),
        ("verify-backup/nightly-backup-verification", {}),  # before the validation: it checks freshness
        ("validate-database/daily-production-validation", {}),
        ("prune-backups/daily-backup-retention", {"dry_run": True}),
        ("restore-database/restore-backup", {}),
        ("run-transform/run-transform", {}),
        ("revert-transform/revert-transform", {}),
        ("anonymize-database/anonymize-staging", {}),
    ]
    runs = []
    with temporary_settings({PREFECT_API_URL: deployed["server"]["url"]}):
        for name, params in steps:
            run = run_deployment(name, parameters=params, timeout=400, poll_interval=1)
            assert run.state.is_completed(), f"{name}: {run.state.name}: {run.state.message}"
            runs.append(run.id)
    assert_artifacts(deployed, *runs)
    with pg.connect(stack.pg_dsn_production) as conn:  # transformed, then reverted
        assert conn.execute("SELECT sum(hashtext(coalesce(first_name, '') || last_name)) FROM users").fetchone()[0] \
            == names_before
    with pg.connect(stack.pg_dsn_staging) as conn, pg.connect(stack.pg_dsn_production) as prod:
        prod_emails = {r[0] for r in prod.execute("SELECT email FROM users")}
        staging_emails = {r[0] for r in conn.execute("SELECT email FROM users")}
    assert len(staging_emails) == len(prod_emails) and not staging_emails & prod_emails  # restored, then masked


def _pid_of_flow_run(run_id) -> int | None:
    """The worker's child process running this flow run (its environment names the run)."""
    needle = f"PREFECT__FLOW_RUN_ID={run_id}".encode()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        return int(pid)
            except OSError:
                continue
    return None


@pytest.mark.extended  # make test-crash (CI runs it after make test): keeps make test under 15 minutes
def test_killed_migration_is_rolled_back_by_the_server(deployed):
    """kill -9 runs no failure hook: the automation on Crashed starts rollback-migration."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    stack = deployed["stack"]
    revision = migration_revision(stack.pg_dsn_production)
    with temporary_settings({PREFECT_API_URL: deployed["server"]["url"]}), get_client(sync_client=True) as client:
        migration = run_deployment("migrate-database/production-migration", timeout=0)
        run = wait_for_state(client, migration.id, {"Paused", "PAUSED"}, timeout=240)
        assert run.state.is_paused(), run.state
        pid = _pid_of_flow_run(migration.id)
        assert pid, "the flow run's process was not found"
        os.kill(pid, signal.SIGKILL)
        run = wait_for_state(client, migration.id, {"CRASHED"}, timeout=120)
        assert run.state.is_crashed(), run.state

        deadline, rollback = time.monotonic() + 120, None
        while rollback is None and time.monotonic() < deadline:
            started = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(
                any_=["rollback-migration"])), flow_run_filter=FlowRunFilter())
            rollback = next((r for r in started if r.parameters.get("run_id") == str(migration.id)), None)
            time.sleep(1)
        assert rollback is not None, "the automation started no rollback-migration run"
        assert rollback.parameters["env"] == "production"
        rollback = wait_for_state(client, rollback.id, {"COMPLETED"}, timeout=300)
        assert rollback.state.is_completed(), rollback.state.message
    # it stopped at the approval: the rollback finds nothing to undo and touches nothing
    assert audit(stack.pg_dsn_production, rollback.id).outcome == "nothing-to-undo"
    assert migration_revision(stack.pg_dsn_production) == revision
