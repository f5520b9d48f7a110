"""`dataops deploy` against a real Prefect server: deployments, schedules, idempotence, and an
alert through the automation when a run fails."""

from __future__ import annotations

import time

import pytest
from conftest import free_port, run_cli


@pytest.fixture
def deploy_config(db, make_db, s3_bucket, write_config, webhook_receiver):
    staging = make_db("stg")
    return write_config(
        {"production": ("production", db), "staging": ("staging", staging),
         "broken": ("development", f"postgresql://app:NotShown123@127.0.0.1:{free_port()}/app")},
        bucket=s3_bucket,
        extra={"alerts": {"kind": "webhook", "webhook_url": webhook_receiver["url"]},
               "schedules": {"timezone": "Europe/Paris"}})


def test_deploy_registers_everything_idempotently(prefect_server, deploy_config):
    from prefect.client.orchestration import get_client

    env = {"PREFECT_API_URL": prefect_server["url"]}
    r = run_cli("--config", str(deploy_config), "deploy", env=env, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "deployment: refresh-staging/nightly-staging-refresh" in r.stdout
    assert "automation: dataops: alert on failed or crashed runs" in r.stdout

    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server["url"]}), get_client(sync_client=True) as client:
        deps = {d.name: d for d in client.read_deployments()}
        pool = client.read_work_pool("dataops-process")
        automations = client.read_automations_by_name("dataops: alert on failed or crashed runs")
    assert pool.type == "process"
    expected = {"nightly-staging-refresh", "nightly-production-backup", "daily-production-validation",
                "production-migration", "restore-backup", "run-transform", "nightly-backup-verification",
                "daily-backup-retention", "revert-transform", "rollback-migration", "downgrade-migration",
                "anonymize-staging", "run-transform-dask"}
    assert expected == set(deps)
    refresh = deps["nightly-staging-refresh"].schedules[0].schedule
    assert (refresh.cron, refresh.timezone) == ("0 2 * * *", "Europe/Paris")
    assert deps["production-migration"].schedules == []
    assert deps["production-migration"].parameters == {"env": "production", "target": "head", "dry_run": False}
    assert deps["nightly-production-backup"].parameters == {"env": "production"}
    assert len(automations) == 1 and automations[0].enabled
    with temporary_settings({PREFECT_API_URL: prefect_server["url"]}), get_client(sync_client=True) as client:
        [client_automation] = client.read_automations_by_name("dataops: roll back crashed production migrations")
    rollback = client_automation.actions[0]
    assert rollback.deployment_id == deps["rollback-migration"].id
    assert set(rollback.parameters) == {"env", "run_id"}
    assert client_automation.trigger.expect == {"prefect.flow-run.Crashed"}
    with temporary_settings({PREFECT_API_URL: prefect_server["url"]}), get_client(sync_client=True) as client:
        [zombie] = client.read_automations_by_name("dataops: mark runs Crashed when their heartbeats stop")
    assert zombie.trigger.posture == "Proactive" and zombie.trigger.within.total_seconds() == 600
    assert zombie.trigger.after == {"prefect.flow-run.heartbeat"} and zombie.actions[0].state == "CRASHED"

    r = run_cli("--config", str(deploy_config), "deploy", env=env, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "changed: nothing (already up to date)" in r.stdout
    with temporary_settings({PREFECT_API_URL: prefect_server["url"]}), get_client(sync_client=True) as client:
        again = {d.name: d.id for d in client.read_deployments()}
        assert len(client.read_automations_by_name("dataops: alert on failed or crashed runs")) == 1
        assert len(client.read_automations_by_name("dataops: roll back crashed production migrations")) == 1
        assert len(client.read_automations_by_name("dataops: mark runs Crashed when their heartbeats stop")) == 1
    assert again == {n: d.id for n, d in deps.items()}


@pytest.mark.extended  # make test-crash (CI runs it after make test): keeps make test under 15 minutes
def test_failed_run_alerts_through_the_automation(prefect_server, deploy_config, webhook_receiver):
    env = {"PREFECT_API_URL": prefect_server["url"]}
    r = run_cli("--config", str(deploy_config), "deploy", env=env, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]

    r = run_cli("--config", str(deploy_config), "backup", "production", env=env)  # a success sends nothing
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("--config", str(deploy_config), "backup", "broken", env=env)
    assert r.returncode == 1 and "cannot connect" in r.stderr
    failed_at = time.monotonic()
    while not webhook_receiver["received"] and time.monotonic() - failed_at < 10:
        time.sleep(0.2)
    assert webhook_receiver["received"], "no alert within 10 s"
    time.sleep(2)  # the successful run had its chance to alert too
    alert = webhook_receiver["received"][0]
    # One alert, about the failed run. Prefect runs an automation's action at least once: the
    # same alert has arrived twice in one CI run on a loaded machine.
    assert all(a == alert for a in webhook_receiver["received"]), webhook_receiver["received"]
    assert alert["subject"].startswith("[dataops] backup-database failed")
    assert "Environment: broken" in alert["text"] and "cannot connect to PostgreSQL" in alert["text"]
    assert "/runs/flow-run/" in alert["text"]
    assert "NotShown123" not in str(alert)


def test_a_window_shorter_than_the_heartbeat_is_refused(prefect_server, deploy_config):
    import yaml

    data = yaml.safe_load(deploy_config.read_text())
    data["prefect"] = {"crash_after_silence_s": 120}
    deploy_config.write_text(yaml.safe_dump(data))
    r = run_cli("--config", str(deploy_config), "deploy", env={"PREFECT_API_URL": prefect_server["url"],
                                                               "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "180"})
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: prefect.crash_after_silence_s (120 s) must be longer than the flow heartbeat interval "
        "(PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 180); raise it or set it to null"]


@pytest.mark.extended  # make test-crash (CI runs it after make test): keeps make test under 15 minutes
def test_a_run_whose_heartbeats_stop_is_marked_crashed(prefect_server):
    """The host-died case: a run that heartbeat once and then went silent is Crashed by the
    server; a run that keeps its heartbeats going stays Running."""
    import uuid
    from datetime import datetime, timezone

    import httpx
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Running

    from dataops.deployments.register import zombie_automation

    url = prefect_server["url"]

    def beat(*runs: str) -> None:
        events = [{"id": str(uuid.uuid4()), "occurred": datetime.now(timezone.utc).isoformat(),
                   "event": "prefect.flow-run.heartbeat", "resource": {"prefect.resource.id": f"prefect.flow-run.{r}"}}
                  for r in runs]
        assert httpx.post(f"{url}/events", json=events).status_code == 204

    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("zombie-check")
        silent, alive = (httpx.post(f"{url}/flow_runs/", json={"flow_id": str(flow_id), "name": name}).json()["id"]
                         for name in ("silent", "alive"))
        for run in (silent, alive):
            client.set_flow_run_state(run, Running(), force=True)
        automation = zombie_automation(10, [silent, alive], name=f"zombie-test-{uuid.uuid4().hex[:6]}").create()
        try:
            time.sleep(1)  # the triggers service loads new automations
            beat(silent, alive)
            deadline = time.monotonic() + 45
            while client.read_flow_run(silent).state.type != StateType.CRASHED and time.monotonic() < deadline:
                beat(alive)
                time.sleep(3)
            state = client.read_flow_run(silent).state
            assert state.type == StateType.CRASHED, state
            assert "no heartbeat for 10 s" in state.message
            assert client.read_flow_run(alive).state.type == StateType.RUNNING
        finally:
            client.delete_automation(automation.id)
