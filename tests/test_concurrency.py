"""Retention (prune) while a backup of the same environment runs.

prune does two things: it discards what killed backups left (unfinished multipart uploads, dumps
without a manifest), and it deletes listed backups retention no longer keeps. The first is only
safe while no backup is writing: it runs under the environment's backup lock, which a running
backup holds, so prune leaves it for later and says who holds the lock. The second only ever
touches listed backups, and a backup is listed only once its manifest is written.

And when the running backup lost its lock (its session ended: a server restart, a failover,
pg_terminate_backend), a prune can take the lock and discard the backup's upload: the backup
must then fail, never report a backup that is not there.

Each test runs the real commands in child processes and checks the bucket and the listing with
its own reads.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from conftest import run_cli
from test_crash_matrix import add_blobs, content, leftovers

from dataops.dev.sample_app import create_schema, seed
from dataops.settings import load_settings
from dataops.tasks import pg

pytestmark = pytest.mark.extended  # make test-crash (CI runs it after make test)


def cli(cfg, api: str, *args: str, failpoints: str = "", **kw):
    return run_cli("-v", "--config", str(cfg), *args, env={"PREFECT_API_URL": api, "DATAOPS_FAILPOINTS": failpoints,
                                                        "PREFECT_LOGGING_LEVEL": "INFO"}, **kw)


def start_cli(cfg, api: str, *args: str, failpoints: str = "") -> subprocess.Popen:
    env = {**os.environ, "PREFECT_API_URL": api, "DATAOPS_FAILPOINTS": failpoints, "PREFECT_LOGGING_LEVEL": "INFO"}
    return subprocess.Popen([sys.executable, "-m", "dataops.cli", "-v", "--config", str(cfg), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {what}: {proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return found


def prune(cfg, caplog) -> tuple[dict, str]:
    """The prune-backups flow, run here (on the session's Prefect test server): its result, and
    what dataops logged meanwhile."""
    import logging

    from dataops.flows.prune_backups import prune_backups

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dataops"):
        result = prune_backups("production", config=str(cfg))
    return result, caplog.text


def verify(cfg, backup_id: str) -> bool:
    from dataops.tasks.backup.catalog import get_backup
    from dataops.tasks.backup.restore import verify_and_record
    from dataops.tasks.backup.storage import open_storage

    settings = load_settings(cfg)
    storage = open_storage(settings.storage)
    return verify_and_record(settings, storage, get_backup(storage, "production", backup_id),
                             settings.env("production")).ok


def uploads(client, bucket: str) -> list[str]:
    return [u["UploadId"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def listed(cfg) -> list[str]:
    from dataops.tasks.backup.catalog import list_backups
    from dataops.tasks.backup.storage import open_storage

    return [m.id for m in list_backups(open_storage(load_settings(cfg).storage), "production")]


def end_lock_session(dsn) -> list[int]:
    """pg_terminate_backend of the session that holds the backup lock (not pg_dump's)."""
    with pg.connect(dsn, autocommit=True) as conn:
        return [r[0] for r in conn.execute(  # in the select list: only for the rows found
            "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name LIKE 'dataops-backup production pid %' AND datname = current_database()")]


@pytest.fixture
def world(make_db, write_config, s3_bucket, s3_endpoint, prefect_api, pg_server_dsn):
    """production with two small backups listed, then a table of incompressible text, so that the
    next backup is a multipart upload of several 5 MiB parts; retention keeps only the newest."""
    from dataops.tasks.backup.dump import backup

    prod = make_db("prod")
    create_schema(prod)
    seed(prod, users=30)
    storage = {"url": f"s3://{s3_bucket}/b", "endpoint_url": s3_endpoint, "region": "us-east-1",
               "access_key_id": "testing", "secret_access_key": "testing", "multipart_chunk_mb": 5}
    cfg = write_config({"production": ("production", prod)}, storage=storage,
                       backups={"keep_last": 1, "keep_days": 0})
    settings = load_settings(cfg)
    old = [backup(settings, settings.env("production")).id for _ in range(2)]
    add_blobs(prod, 200000)
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    return {"cfg": cfg, "prod": prod, "old": old, "bucket": s3_bucket, "s3": client, "api": prefect_api,
            "server": pg_server_dsn}


def test_prune_during_a_running_backup_leaves_its_upload_alone_and_names_the_backup(world, caplog):
    """The backup's parts are uploaded side by side and each one then waits 6 s (the failpoint),
    so the whole prune runs while the multipart upload stands unfinished."""
    w = world
    running = start_cli(w["cfg"], w["api"], "backup", "production", failpoints="backup.mid_upload=pause(6)")
    try:
        live = wait_for(lambda: uploads(w["s3"], w["bucket"]), running, "the backup's multipart upload")

        result, said = prune(w["cfg"], caplog)
        assert (result["kept"], result["delete"], result["discarded"]) == ([w["old"][1]], [w["old"][0]], [])
        # the discarding of leftovers waits for the lock, and says whose it is
        assert ("leftovers of interrupted backups of production kept for now: another backup of 'production' is "
                "running (pid ") in said and f"application_name dataops-backup production pid {running.pid} on " \
               in said, said
        assert uploads(w["s3"], w["bucket"]) == live and running.poll() is None  # untouched, still uploading
        assert listed(w["cfg"]) == [w["old"][1]]  # retention deleted the oldest, and saw no half backup

        out, err = running.communicate(timeout=180)
    finally:
        if running.poll() is None:
            running.kill()
            running.wait()
    assert running.returncode == 0, err[-3000:]
    new = out.split()[-1]
    assert listed(w["cfg"]) == [w["old"][1], new] and uploads(w["s3"], w["bucket"]) == []

    assert verify(w["cfg"], new)  # the new one restores
    assert leftovers(w["server"]) == []


def test_a_backup_whose_lock_was_lost_and_whose_upload_a_prune_aborted_dumps_again_under_its_lock(world, caplog):
    """The backup's lock session ends mid-upload; a prune then takes the lock and aborts the
    unfinished upload, as it must for a killed backup. The backup's upload fails (S3 says
    NoSuchUpload, moto a 500): transient, so the dump step is retried, takes the lock again and
    dumps again. One whole backup is listed, nothing unfinished is left, and it restores."""
    w = world
    running = start_cli(w["cfg"], w["api"], "backup", "production", failpoints="backup.mid_upload=pause(6)")
    try:
        first = wait_for(lambda: uploads(w["s3"], w["bucket"]), running, "the backup's multipart upload")
        assert end_lock_session(w["prod"])
        result, _ = prune(w["cfg"], caplog)
        assert [d for d in result["discarded"] if d.startswith("unfinished upload of production/")], result
        assert not set(first) & set(uploads(w["s3"], w["bucket"]))
        out, err = running.communicate(timeout=180)
    finally:
        if running.poll() is None:
            running.kill()
            running.wait()
    assert running.returncode == 0, err[-3000:]
    assert "Retry 1/3 will start" in err and "the backup lock of production was lost" in err, err[-3000:]
    new = out.split()[-1]
    assert listed(w["cfg"]) == [w["old"][1], new] and uploads(w["s3"], w["bucket"]) == []

    assert verify(w["cfg"], new)


def test_a_backup_whose_lock_was_lost_and_whose_dump_a_prune_deleted_fails_instead_of_reporting_it(world, caplog):
    """The dump is whole, its manifest not yet written, when the backup's lock session ends; a
    prune takes the lock and deletes the dump (a dump without a manifest is a killed backup's).
    Before writing the manifest the backup takes its lock again and finds its dump gone: it fails
    with one line, rather than print the id of a backup that cannot be listed or restored."""
    w = world
    running = start_cli(w["cfg"], w["api"], "backup", "production", failpoints="backup.before_manifest=pause(6)")
    try:
        def dumped():
            from dataops.tasks.backup.storage import open_storage

            keys = [o.key for o in open_storage(load_settings(w["cfg"]).storage).list("production/")]
            return [k for k in keys if k.endswith("dump.pgc.zst") and k.split("/")[1] not in w["old"]]

        wait_for(dumped, running, "the whole dump")
        assert end_lock_session(w["prod"])
        result, _ = prune(w["cfg"], caplog)
        assert [d for d in result["discarded"] if d.endswith("without a manifest (1 object(s))")], result
        assert not dumped()
        out, err = running.communicate(timeout=180)
    finally:
        if running.poll() is None:
            running.kill()
            running.wait()
    assert running.returncode == 1, out + err[-3000:]
    assert "backup " not in out
    assert err.splitlines()[-1].startswith("error: the dump of backup ") and \
        "was discarded while the backup lock of 'production' was lost" in err.splitlines()[-1], err[-3000:]
    assert listed(w["cfg"]) == [w["old"][1]]
    from dataops.tasks.backup.storage import open_storage

    assert {o.key.split("/")[1] for o in open_storage(load_settings(w["cfg"]).storage).list("production/")} == \
        {w["old"][1]}  # no manifest of a dump that is not there

    again = cli(w["cfg"], w["api"], "backup", "production")
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(listed(w["cfg"])) == 2
    assert content(w["prod"])  # the source was only read
