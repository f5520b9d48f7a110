"""Backup freshness: the scheduled validation fails, and so alerts, when production has no verified
backup younger than backups.max_age_hours; `dataops backups` shows each backup's age and verification.

Backups here are written straight into a folder store (a manifest, a one-byte dump, verified.json):
their times are what is under test, and a real pg_dump cannot be made 50 hours old."""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from conftest import run_cli

from dataops.settings import load_settings
from dataops.tasks.backup.catalog import (
    Manifest,
    Verification,
    age_text,
    check_freshness,
    dump_key,
    freshness,
    mark_verified,
    write_manifest,
)
from dataops.tasks.backup.storage import open_storage
from dataops.tasks.validation.validate import ValidationFailed, artifact_rows, format_report

NOW = datetime(2026, 12, 3, 6, 0, tzinfo=timezone.utc)
LIMIT = "no verified backup of production younger than 26 h"
REDO = "run dataops backup production && dataops verify-backup production"


def manifest(n: int, age_h: float, verified: bool | None = None, now: datetime = NOW,
             problems: tuple[str, ...] = ()) -> Manifest:
    finished = now - timedelta(hours=age_h)
    bid = f"{finished:%Y%m%dT%H%M%SZ}-{n:06x}"
    m = Manifest(id=bid, environment="production", database="app", role="production", server_version="16.2",
                 pg_dump_version="16.2", dump_key=dump_key("production", bid, "zstd"), compression="zstd", size=1,
                 raw_size=1, sha256="0" * 64, started_at=finished - timedelta(minutes=5), finished_at=finished,
                 duration_seconds=300, tables={"users": 1}, schema_fingerprint="f", tool_version="0")
    if verified is not None:
        m.verification = Verification(ok=verified, verified_at=finished + timedelta(hours=2), duration_seconds=9,
                                      problems=list(problems))
    return m


def store(storage, m: Manifest) -> Manifest:
    """What backup-database and verify-backup leave: the dump, then the manifest, then verified.json."""
    storage.put_bytes(m.dump_key, b"x")
    verification, m.verification = m.verification, None
    write_manifest(storage, m)
    if verification is not None:
        mark_verified(storage, m, verification)
    return m


def when(m: Manifest) -> str:
    return f"{m.verification.verified_at:%Y-%m-%d %H:%M}Z"


# -- (a) the plain function ---------------------------------------------------------------------------

def test_a_fresh_verified_backup_passes():
    old, fresh, newest = manifest(1, 50, True), manifest(2, 3, True), manifest(3, 0.5)
    f = freshness([old, fresh, newest], "production", 26, now=NOW)
    assert f.ok and (f.newest_verified, round(f.newest_verified_age_hours)) == (fresh.id, 3)
    assert f.detail == f"newest verified backup of production is {fresh.id}, 3 h old (limit 26 h)"


def test_an_old_verified_backup_fails_naming_it_and_the_remedy():
    old = manifest(1, 50, True)
    f = freshness([old], "production", 26, now=NOW)
    assert not f.ok
    assert f.detail == f"{LIMIT}: the newest verified is {old.id}, 50 h old; {REDO}"
    # just past the limit: the age is not rounded onto the passing side
    edge = manifest(2, 26.3, True)
    assert freshness([edge], "production", 26, now=NOW).detail == \
        f"{LIMIT}: the newest verified is {edge.id}, 26.3 h old; {REDO}"
    assert freshness([manifest(3, 25.9, True)], "production", 26, now=NOW).ok


def test_an_unverified_backup_fails_and_asks_for_its_verification():
    fresh = manifest(1, 3)
    f = freshness([fresh], "production", 26, now=NOW)
    assert not f.ok and f.newest_verified is None
    assert f.detail == (f"{LIMIT}: its only backup, {fresh.id}, is 3 h old and not verified; "
                        f"run dataops verify-backup production {fresh.id}")
    just_made = manifest(2, 0.3)
    assert f"its only backup, {just_made.id}, is 18 min old and not verified" in \
        freshness([just_made], "production", 26, now=NOW).detail
    old = manifest(0, 60, True)
    assert freshness([old, fresh], "production", 26, now=NOW).detail == (
        f"{LIMIT}: the newest verified is {old.id}, 60 h old; the newest backup, {fresh.id}, is 3 h old and "
        f"not verified; run dataops verify-backup production {fresh.id}")


def test_a_backup_that_failed_verification_fails():
    bad = manifest(2, 3, False, problems=("table users: 0 rows, the manifest says 1",))
    f = freshness([manifest(1, 27), bad], "production", 26, now=NOW)
    assert not f.ok
    assert f.detail == (f"{LIMIT}: none of its 2 backups is verified; the newest, {bad.id}, is 3 h old and FAILED "
                        f"verification {when(bad)} (table users: 0 rows, the manifest says 1); {REDO}")


def test_no_backup_at_all_fails():
    assert freshness([], "production", 26, now=NOW).detail == f"{LIMIT}: it has no backups; {REDO}"


def test_ages_as_a_person_reads_them():
    assert [age_text(h) for h in (0.5, 3.2, 47.9, 50, 24 * 9 + 5)] == ["30 min", "3 h", "47 h", "2 d", "9 d"]


def test_through_the_catalog_in_storage(tmp_path):
    """verified.json and manifest.json as the catalog reads them, at today's clock."""
    storage = open_storage(load_settings_for(tmp_path).storage)
    now = datetime.now(timezone.utc)
    old = store(storage, manifest(1, 50, True, now=now))
    f = check_freshness(storage, "production", 26)
    assert not f.ok and f.detail == f"{LIMIT}: the newest verified is {old.id}, 50 h old; {REDO}"
    failed = store(storage, manifest(2, 2, False, now=now))
    assert f"the newest backup, {failed.id}, is 2 h old and FAILED verification" in \
        check_freshness(storage, "production", 26).detail
    fresh = store(storage, manifest(3, 1, True, now=now))
    f = check_freshness(storage, "production", 26)
    assert f.ok and f.newest_verified == fresh.id
    assert not check_freshness(storage, "production", 1).ok  # max_age_hours is the limit applied


def load_settings_for(tmp_path, roles: dict | None = None, backups: dict | None = None):
    """A dataops.yaml with a folder store (only storage is read here)."""
    import yaml

    body = {"environments": {n: {"role": r, "database_url": "postgresql://u@127.0.0.1:1/app"}
                             for n, r in (roles or {"production": "production"}).items()},
            "storage": {"url": (tmp_path / "store").as_uri()}}
    if backups:
        body["backups"] = backups
    path = tmp_path / "dataops.yaml"
    path.write_text(yaml.safe_dump(body))
    return load_settings(path)


def test_settings_defaults_and_bounds(tmp_path):
    from dataops.errors import ConfigError
    from dataops.settings import Role

    s = load_settings_for(tmp_path)
    assert (s.backups.max_age_hours, s.backups.freshness_roles) == (26, [Role.PRODUCTION])
    s = load_settings_for(tmp_path, backups={"max_age_hours": 170, "freshness_roles": ["production", "staging"]})
    assert (s.backups.max_age_hours, s.backups.freshness_roles) == (170, [Role.PRODUCTION, Role.STAGING])
    with pytest.raises(ConfigError, match="backups.max_age_hours: Input should be greater than or equal to 1"):
        load_settings_for(tmp_path, backups={"max_age_hours": 0})
    with pytest.raises(ConfigError, match="backups.freshness_roles.0: Input should be 'production', 'staging' or"):
        load_settings_for(tmp_path, backups={"freshness_roles": ["prod"]})


# -- (b) the flow -----------------------------------------------------------------------------------

@pytest.fixture
def folder_config(db, make_db, tmp_path, write_config):
    """production and staging (empty databases: every integrity check passes) over a folder store."""
    cfg = write_config({"production": ("production", db), "staging": ("staging", make_db("stg"))},
                       storage={"url": (tmp_path / "store").as_uri()})
    return cfg, open_storage(load_settings(cfg).storage)


def freshness_rows(report: dict) -> list[dict]:
    return [c for c in report["checks"] if c["kind"] == "backup_freshness"]


def test_the_flow_fails_with_the_freshness_row(prefect_api, folder_config):
    from dataops.flows.validate_database import validate_database

    cfg, storage = folder_config
    now = datetime.now(timezone.utc)
    old = store(storage, manifest(1, 50, True, now=now))

    state = validate_database("production", config=str(cfg), check_backups=True, return_state=True)
    assert state.is_failed()
    exc = state.result(raise_on_failure=False)
    assert isinstance(exc, ValidationFailed)
    detail = f"{LIMIT}: the newest verified is {old.id}, 50 h old; {REDO}"
    [row] = freshness_rows(exc.report)
    assert (row["status"], row["name"], row["detail"]) == ("fail", "production", detail)
    assert exc.report["summary"]["failed"] == 1
    # the verdict is the failed run's message, which the alert carries: it names the problem
    assert exc.message == exc.report["verdict"] == \
        f"FAILED: production: 1 of {exc.report['summary']['checks']} checks failed; {detail}"
    assert {"status": "FAIL", "detail": detail}.items() <= artifact_rows(exc.report)[0].items()
    assert format_report(exc.report).splitlines()[-1] == exc.report["verdict"]

    fresh = store(storage, manifest(2, 2, True, now=now))
    report = validate_database("production", config=str(cfg), check_backups=True)
    [row] = freshness_rows(report)
    assert report["ok"] and row["status"] == "pass" and fresh.id in row["detail"]
    assert report["verdict"] == f"OK: production: {report['summary']['checks']} checks passed"


def test_by_hand_and_comparisons_do_not_look_at_backups(prefect_api, folder_config):
    """A direct call is no deployment run: it checks the database only, unless asked; --against never."""
    from dataops.flows.validate_database import validate_database

    cfg, _ = folder_config  # the store is empty: a check would fail
    assert freshness_rows(validate_database("production", config=str(cfg))) == []
    report = validate_database("production", against="staging", config=str(cfg), return_state=True).result(
        raise_on_failure=False)
    report = report.report if isinstance(report, ValidationFailed) else report
    assert freshness_rows(report) == [] and report["comparison"] is not None


def test_a_damaged_catalog_is_an_error_row_not_a_crash(prefect_api, folder_config):
    from dataops.flows.validate_database import validate_database

    cfg, storage = folder_config
    storage.put_bytes("production/20261203T010000Z-000001/manifest.json", b"{not json")
    exc = validate_database("production", config=str(cfg), check_backups=True,
                            return_state=True).result(raise_on_failure=False)
    assert isinstance(exc, ValidationFailed), exc
    [row] = freshness_rows(exc.report)
    assert row["status"] == "error" and row["detail"].startswith(
        "could not read the backups of production: production/20261203T010000Z-000001/manifest.json in file://")
    assert exc.report["summary"]["checks"] > 1  # the integrity checks are still reported


def test_cli_validate_backups_exit_code_and_line(prefect_api, folder_config):
    cfg, storage = folder_config
    unverified = store(storage, manifest(1, 3, now=datetime.now(timezone.utc)))
    r = run_cli("--config", str(cfg), "validate", "production", "--backups", env={"PREFECT_API_URL": prefect_api})
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith(
        f"{LIMIT}: its only backup, {unverified.id}, is 3 h old and not verified; "
        f"run dataops verify-backup production {unverified.id}")
    assert "FAIL    backup_freshness" in r.stdout or "FAIL    backup freshness" in r.stdout


# -- (d) `dataops backups` ----------------------------------------------------------------------------

def test_backups_shows_age_and_verification(folder_config):
    cfg, storage = folder_config
    now = datetime.now(timezone.utc)
    old = store(storage, manifest(1, 50, True, now=now))
    failed = store(storage, manifest(2, 27, False, now=now))
    fresh = store(storage, manifest(3, 3.2, now=now))

    r = run_cli("--config", str(cfg), "backups", "production")
    assert r.returncode == 0, r.stderr
    head, *lines = r.stdout.strip().splitlines()
    assert head.split() == ["id", "database", "size_mib", "rows", "tables", "finished_at", "age", "verified"]
    cells = [line.split("  ") for line in lines]
    cells = [[c.strip() for c in row if c.strip()] for row in cells]
    assert [row[0] for row in cells] == [old.id, failed.id, fresh.id]
    assert [row[-2:] for row in cells] == [["2 d", f"yes, {when(old)}"], ["27 h", f"FAILED, {when(failed)}"],
                                           ["3 h", "no"]]

    r = run_cli("--config", str(cfg), "backups", "production", "--json")
    listed = json.loads(r.stdout)
    assert [(m["id"], m["verified"], round(m["age_hours"])) for m in listed] == [
        (old.id, True, 50), (failed.id, False, 27), (fresh.id, False, 3)]
    assert listed[0]["verification"]["ok"] is True and listed[0]["tables"] == {"users": 1}  # the manifest stays


# -- (c) the scheduled run alerts ---------------------------------------------------------------------

@pytest.mark.extended
def test_the_daily_validation_alerts_when_backups_are_stale(deployed, webhook_receiver, tmp_path):
    """daily-production-validation as the schedule starts it, on the worker, over a store whose only
    verified backup is 50 h old: the run fails and the server's automation on failed runs sends the
    alert naming the run and the missing backup. A staging run over the same store passes: its role
    is not in backups.freshness_roles."""
    import yaml
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from dataops.deployments.register import failure_automation
    from dataops.settings import AlertSettings
    from dataops.tasks.alerts import build_notification_block

    data = yaml.safe_load(deployed["config"].read_text())
    data["storage"] = {"url": (tmp_path / "store").as_uri()}  # the stack's own backups stay out of it
    cfg = tmp_path / "dataops.yaml"
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    old = store(open_storage(load_settings(cfg).storage), manifest(1, 50, True, now=datetime.now(timezone.utc)))

    tag = uuid.uuid4().hex[:6]
    with temporary_settings({PREFECT_API_URL: deployed["server"]["url"]}), get_client(sync_client=True) as client:
        block = build_notification_block(AlertSettings(webhook_url=webhook_receiver["url"]))
        block_id = block.save(f"freshness-test-{tag}", overwrite=True)
        automation = failure_automation(str(block_id)).model_copy(update={"name": f"freshness-test-{tag}"}).create()
        try:
            time.sleep(1)  # the triggers service loads new automations
            run = run_deployment("validate-database/daily-production-validation", parameters={"config": str(cfg)},
                                 timeout=120, poll_interval=1)
            assert run.state.is_failed(), f"{run.state.name}: {run.state.message}"
            detail = f"{LIMIT}: the newest verified is {old.id}, 50 h old; {REDO}"
            assert detail in run.state.message

            deadline = time.monotonic() + 20
            mine = []
            while not mine and time.monotonic() < deadline:
                mine = [a for a in webhook_receiver["received"] if f"/runs/flow-run/{run.id}" in a.get("text", "")]
                time.sleep(0.2)
            assert mine, f"no alert naming run {run.id} within 20 s: {webhook_receiver['received']}"
            alert = mine[0]
            assert alert["subject"] == f"[dataops] validate-database failed: {run.name}"
            assert "Environment: production" in alert["text"] and detail in alert["text"]

            staging = run_deployment("validate-database/daily-production-validation", timeout=120, poll_interval=1,
                                     parameters={"config": str(cfg), "env": "staging"})
            assert staging.state.is_completed(), f"{staging.state.name}: {staging.state.message}"
        finally:
            client.delete_automation(automation.id)
            client.delete_block_document(block_id)
