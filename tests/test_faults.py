"""Faults from outside the process: the S3 server dies in the middle of an upload, and PostgreSQL
ends the connection of a running restore, backup (pg_dump), transform (a batch connection) or
migration (pg_terminate_backend, as an operator, a pooler or a failover does).

None may leave a half-visible result. A step whose retry is safe rides through (the README's
promise: transient faults are retried with backoff): the backup's dump, a transform's range, a
restore. Otherwise the operation fails with one line, the target and the listing are as they were
(a failed migration is rolled back to whole revisions), and the next run succeeds and cleans up.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
from conftest import free_port, run_cli
from test_crash_matrix import CHILD, add_blobs, advisory_locks, content, leftovers, schema
from test_crash_migrate import world  # noqa: F401  (a fixture)

from dataops.dev.sample_app import create_schema, seed
from dataops.settings import load_settings
from dataops.tasks import pg

pytestmark = pytest.mark.extended  # make test-crash (CI runs it after make test)

RETRIED = "Retry 1/3 will start"  # Prefect's log line when a task run is retried (PREFECT_LOGGING_LEVEL=INFO)


def cli(cfg, api: str, *args: str, failpoints: str = ""):
    return run_cli("-v", "--config", str(cfg), *args, timeout=300,
                   env={"PREFECT_API_URL": api, "DATAOPS_FAILPOINTS": failpoints, "PREFECT_LOGGING_LEVEL": "INFO"})


def terminate_when(server, where: str, timeout: float = 90, dbname: str | None = "postgres") -> threading.Thread:
    """In the background: pg_terminate_backend of the first sessions matching `where` (a
    condition on pg_stat_activity, run in `dbname`, else in the Dsn's database), once; their pids
    end up in the thread's `.ended`."""
    def watch() -> None:
        with pg.connect(server, autocommit=True, dbname=dbname) as conn:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and not thread.ended:
                thread.ended.extend(r[0] for r in conn.execute(  # in the select list: only for the rows found
                    f"SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity WHERE ({where}) "
                    "AND pid <> pg_backend_pid()"))
                time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.ended = []
    thread.start()
    return thread


@pytest.fixture
def own_s3():
    """An S3 endpoint of this test's own, so that stopping it hurts no other test. moto keeps its
    buckets in this process, so a server started again on the same port finds them."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    client.create_bucket(Bucket="faults")
    state = {"server": server, "endpoint": endpoint, "port": port, "client": client}
    yield state
    state["server"].stop()


def test_s3_dying_mid_upload_fails_the_backup_cleanly_and_the_next_one_cleans_up(own_s3, make_db, write_config):
    from dataops.tasks.backup.catalog import list_backups
    from dataops.tasks.backup.storage import open_storage

    prod = make_db("prod")
    create_schema(prod)
    seed(prod, users=30)
    add_blobs(prod, 250000)
    cfg = write_config({"production": ("production", prod)},
                       storage={"url": "s3://faults/b", "endpoint_url": own_s3["endpoint"], "region": "us-east-1",
                                "access_key_id": "testing", "secret_access_key": "testing", "multipart_chunk_mb": 5})
    env = {**os.environ, "DATAOPS_FAILPOINTS": "backup.mid_upload=pause(3)"}  # each stored part waits 3 s
    child = subprocess.Popen([sys.executable, "-c", CHILD["backup"].format(cfg=str(cfg))], env=env,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not own_s3["client"].list_multipart_uploads(Bucket="faults").get("Uploads"):
        assert time.monotonic() < deadline and child.poll() is None, "the upload never started"
        time.sleep(0.1)
    time.sleep(1)  # the first part is stored, its failpoint waits
    own_s3["server"].stop()  # the store goes away mid-transfer
    try:
        rc = child.wait(180)
    finally:
        from moto.server import ThreadedMotoServer

        own_s3["server"] = ThreadedMotoServer(ip_address="127.0.0.1", port=own_s3["port"], verbose=False)
        own_s3["server"].start()
    err = child.stderr.read()
    assert rc == 1, err[-2000:]
    assert "error" in err.lower() or "could not" in err.lower()
    storage = open_storage(load_settings(cfg).storage)
    assert list_backups(storage, "production") == []  # nothing half-visible
    assert storage.incomplete("production/")  # the dead store could not be told to abort

    again = subprocess.run([sys.executable, "-c", CHILD["backup"].format(cfg=str(cfg))], capture_output=True,
                           text=True, timeout=180)
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(list_backups(storage, "production")) == 1 and storage.incomplete("production/") == []


def test_a_restore_whose_connection_is_ended_leaves_the_target_and_retries_cleanly(make_db, write_config, tmp_path,
                                                                                 pg_server_dsn):
    from dataops.tasks.backup.dump import backup

    prod, stg = make_db("prod"), make_db("stg")
    create_schema(prod)
    seed(prod, users=40)
    add_blobs(prod, 400000)
    create_schema(stg)
    seed(stg, users=20, seed=3)
    cfg = write_config({"production": ("production", prod), "staging": ("staging", stg)},
                       storage={"url": f"file://{tmp_path}/store"})
    settings = load_settings(cfg)
    backup(settings, settings.env("production"))
    old = (content(stg), schema(stg))

    ended: list[int] = []

    def end_pg_restore() -> None:
        with pg.connect(pg_server_dsn, autocommit=True, dbname="postgres") as conn:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not ended:
                ended.extend(r[0] for r in conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'pg_restore' "
                    "AND strpos(datname, '__dataops_restore_') > 0 AND state = 'active'"))
                time.sleep(0.05)

    watcher = threading.Thread(target=end_pg_restore)
    watcher.start()
    r = subprocess.run([sys.executable, "-c", CHILD["restore"].format(cfg=str(cfg))], capture_output=True, text=True,
                       timeout=300)
    watcher.join()
    assert ended, "pg_restore was never seen running"
    assert r.returncode == 1 and "pg_restore failed" in r.stderr, r.stderr[-2000:]
    assert (content(stg), schema(stg)) == old and leftovers(pg_server_dsn) == []

    again = subprocess.run([sys.executable, "-c", CHILD["restore"].format(cfg=str(cfg))], capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (content(stg), schema(stg)) == (content(prod), schema(prod)) and leftovers(pg_server_dsn) == []


def test_a_backup_whose_pg_dump_session_is_ended_is_retried_and_lists_one_whole_backup(
        make_db, write_config, tmp_path, pg_server_dsn, prefect_api):
    """pg_dump's session ends mid-COPY: its failure is a lost connection, so the dump step is
    retried (a new snapshot, a new dump, the unfinished upload discarded under the lock)."""
    from dataops.tasks.backup.catalog import list_backups
    from dataops.tasks.backup.storage import open_storage

    prod = make_db("prod")
    create_schema(prod)
    seed(prod, users=30)
    add_blobs(prod, 100000)
    cfg = write_config({"production": ("production", prod)}, storage={"url": f"file://{tmp_path}/store"})
    before = (content(prod), schema(prod))

    watcher = terminate_when(pg_server_dsn, f"application_name = 'pg_dump' AND datname = '{prod.database}' "
                                            "AND query LIKE 'COPY%'")
    r = cli(cfg, prefect_api, "backup", "production", failpoints="backup.mid_upload=pause(1)")
    watcher.join(60)
    assert watcher.ended, "pg_dump was never seen copying"
    assert r.returncode == 0, r.stderr[-3000:]
    assert RETRIED in r.stderr and "pg_dump failed (exit 1), its connection lost" in r.stderr, r.stderr[-3000:]
    storage = open_storage(load_settings(cfg).storage)
    listed = list_backups(storage, "production")
    assert [m.id for m in listed] == [r.stdout.split()[-1]] and storage.incomplete("production/") == []
    assert {o.key.split("/")[1] for o in storage.list("production/")} == {listed[0].id}
    assert (content(prod), schema(prod)) == before

    v = run_cli("--config", str(cfg), "verify-backup", "production", env={"PREFECT_API_URL": prefect_api})
    assert v.returncode == 0, v.stderr[-3000:]
    assert leftovers(pg_server_dsn) == [] and advisory_locks(pg_server_dsn) == 0


def test_a_transform_whose_batch_connection_is_ended_retries_the_range_from_its_checkpoint(
        make_db, tmp_path, pg_server_dsn, prefect_api):
    """One range's connection ends (between or inside a batch): the batch in flight rolls back
    with its checkpoint, the range's task is retried from the checkpoint, and every row is changed
    exactly once."""
    from test_crash_transform import BUMP, ITEMS, NAME, half_done_run, rows, runs
    from test_transform_engine import write_settings, write_transform

    dsn = make_db("xft")
    with pg.connect(dsn) as conn:
        conn.execute(ITEMS)
        conn.commit()
    write_transform(tmp_path / "transforms", NAME, BUMP["sql"])
    cfg = write_settings(tmp_path, dsn, tmp_path / "transforms").source
    original = rows(dsn)

    watcher = terminate_when(pg_server_dsn, f"application_name = 'dataops-transform:{NAME}:r1' "
                                            f"AND datname = '{dsn.database}' AND backend_start < now() - interval '1 s'")
    r = cli(cfg, prefect_api, "transform", "dev", "run", NAME, "--batch-size", "10", "--workers", "2",
            failpoints="transform.after_checkpoint=pause(0.5)")
    watcher.join(60)
    assert watcher.ended, "the batch connection of range 1 was never seen"
    assert r.returncode == 0, r.stderr[-3000:]
    assert RETRIED in r.stderr, r.stderr[-3000:]
    assert half_done_run(dsn, original) == set(original)  # every row changed, none twice
    assert [x[1:] for x in runs(dsn)] == [("run", "completed")]
    assert advisory_locks(pg_server_dsn) == 0


def test_a_migration_whose_session_is_ended_mid_revision_is_rolled_back_to_whole_revisions_and_up_recovers(world):  # noqa: F811
    """The migration's session ends between the two statements of the non-transactional 0002 (its
    first index built and committed). The run fails with the revision named, the flow's failure
    hook runs the rollback (0002's downgrade first, since part of it ran), the database is at
    0001 exactly, no lock is left; `up` then applies 0002 whole."""
    from test_crash_migrate import locks_gone, recover, state

    from dataops.tasks.migration.audit import history
    from dataops.tasks.migration.migrate import MigrationTarget, upgrade

    w = world
    upgrade(MigrationTarget(w["db"], w["path"]), "0001")
    watcher = terminate_when(w["db"], "application_name LIKE 'dataops-migrate %' AND datname = current_database() "
                                      "AND state = 'idle' AND EXISTS (SELECT 1 FROM pg_indexes "
                                      "WHERE indexname = 'items_a_idx')", dbname=None)
    env = {**os.environ, "PREFECT_API_URL": w["api"], "DATAOPS_FAILPOINTS": "migrate.inside_revision=pause(2)"}
    proc = subprocess.run([sys.executable, "-c", f"from dataops.flows.migrate_database import migrate_database; "
                           f"migrate_database('app', config={str(w['cfg'])!r})"], env=env, capture_output=True,
                          text=True, timeout=300)
    watcher.join(60)
    assert watcher.ended, "the migration's session was never seen"
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "upgrade of revision 0002 on app failed" in proc.stderr, proc.stderr[-3000:]
    assert locks_gone(w["server"])
    assert state(w) == ("S1", "0001", [])  # rolled back: 0002's half undone by its downgrade
    records = history(w["db"])
    migrated = next(r for r in records if r.action == "migrate")
    assert migrated.outcome == "rolled-back" and migrated.detail.startswith(
        "upgrade of revision 0002 on app failed: terminating connection due to administrator command"), migrated
    assert [r.outcome for r in records if r.action == "rollback"] == ["rolled-back"], records
    recover(w, "up", migrated.run_id, "0001")
