"""Retention: the right set is kept, the newest verified backup always survives."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from conftest import run_cli

from dataops.flows.backup_database import backup_database
from dataops.flows.prune_backups import prune_backups
from dataops.settings import load_settings
from dataops.tasks.backup.catalog import Manifest, Verification, list_backups, mark_verified, retention_plan
from dataops.tasks.backup.storage import open_storage

NOW = datetime(2026, 11, 24, 12, tzinfo=timezone.utc)


def fake(i: int, age_days: float, verified: bool | None = None) -> Manifest:
    t = NOW - timedelta(days=age_days)
    m = Manifest(id=f"b{i:02d}", environment="production", database="app", role="production", server_version="16.2",
                 pg_dump_version="16.2", dump_key="x", compression="zstd", size=1, raw_size=1, sha256="0" * 64,
                 started_at=t, finished_at=t, duration_seconds=1, tables={}, schema_fingerprint="f", tool_version="0")
    if verified is not None:
        m.verification = Verification(ok=verified, verified_at=t, duration_seconds=1)
    return m


def ids(ms):
    return [m.id for m in ms]


def test_keep_last_and_keep_days():
    backups = [fake(i, age) for i, age in enumerate([40, 35, 20, 10, 3, 1])]
    keep, delete, why = retention_plan(backups, keep_last=2, keep_days=15, now=NOW)
    assert ids(keep) == ["b03", "b04", "b05"] and ids(delete) == ["b00", "b01", "b02"]
    assert why["b05"] == "one of the 2 newest" and why["b03"] == "younger than 15 days"


def test_newest_verified_backup_is_never_deleted():
    backups = [fake(0, 50, verified=True), fake(1, 45, verified=True), fake(2, 40, verified=False), fake(3, 39)]
    keep, delete, why = retention_plan(backups, keep_last=1, keep_days=0, now=NOW)
    assert ids(keep) == ["b01", "b03"] and why["b01"] == "newest verified backup"
    assert ids(delete) == ["b00", "b02"]  # a failed verification does not count as verified


def test_keep_last_larger_than_count_keeps_all():
    backups = [fake(i, 100 + i) for i in range(3)]
    keep, delete, _ = retention_plan(backups, keep_last=7, keep_days=0, now=NOW)
    assert len(keep) == 3 and delete == []


def test_prune_flow_deletes_objects_and_dry_run_does_not(prefect_api, db, s3_bucket, s3_client, write_config):
    cfg = write_config({"production": ("production", db)}, bucket=s3_bucket, backups={"keep_last": 2, "keep_days": 0})
    made = [backup_database("production", config=str(cfg))["id"] for _ in range(4)]
    storage = open_storage(load_settings(cfg).storage)
    oldest = list_backups(storage, "production")[0]
    mark_verified(storage, oldest, Verification(ok=True, verified_at=NOW, duration_seconds=1))
    keys_before = {o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket)["Contents"]}

    dry = prune_backups("production", dry_run=True, config=str(cfg))
    assert dry["delete"] == [made[1]] and {o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket)["Contents"]} == keys_before

    r = run_cli("--config", str(cfg), "prune", "production", env={"PREFECT_API_URL": prefect_api})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines() == [f"deleted {made[1]}", "kept 3, deleted 1"]
    left = {o["Key"].split("/")[2] for o in s3_client.list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert left == {made[0], made[2], made[3]}
    assert ids(list_backups(storage, "production")) == [made[0], made[2], made[3]]
