"""Faults from outside the process: the S3 server dies in the middle of an upload, and PostgreSQL
ends the connection of a running restore (pg_terminate_backend, as an operator or a failover does).

Neither may leave a half-visible result: the failed operation fails with one line, the target and
the listing are as they were, and the next run (once the fault is gone) succeeds and cleans up.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
from conftest import free_port
from test_crash_matrix import CHILD, add_blobs, content, leftovers, schema

from dataops.dev.sample_app import create_schema, seed
from dataops.settings import load_settings
from dataops.tasks import pg

pytestmark = pytest.mark.extended  # make test-crash (CI runs it after make test)




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
