"""Kill a parallel backup (backups.jobs: 2) between two of its parts: nothing new is listed, the
parts it stored and its local folder are left, and the next backup or prune discards them.

The same cell shape as tests/test_crash_matrix.py (whose child runner and invariants it uses):
the backup runs in a child process with the failpoint armed to `exit` (os._exit, as kill -9)."""

from __future__ import annotations

import pytest
from conftest import sampled
from test_crash_matrix import add_blobs, advisory_locks, content, leftovers, run_child, schema, stored

from dataops.dev.sample_app import create_schema, seed
from dataops.failpoints import FAILPOINT_EXIT
from dataops.settings import load_settings

CELLS = ["backup.between_parts"]  # test_failpoints.py holds this against the code


@pytest.fixture
def parallel_world(make_db, write_config, tmp_path, pg_server_dsn, s3_bucket, s3_endpoint):
    """production with a table of incompressible text (one part of several 5 MiB chunks: a
    multipart upload), backed up once in parallel."""
    from dataops.tasks.backup.dump import backup

    prod = make_db("prod")
    create_schema(prod)
    seed(prod, users=40)
    add_blobs(prod, 120000)
    storage = {"url": f"s3://{s3_bucket}/b", "endpoint_url": s3_endpoint, "region": "us-east-1",
               "access_key_id": "testing", "secret_access_key": "testing", "multipart_chunk_mb": 5}
    local = tmp_path / "local"
    cfg = write_config({"production": ("production", prod)}, storage=storage,
                       backups={"jobs": 2, "local_dir": str(local)})
    settings = load_settings(cfg)
    first = backup(settings, settings.env("production"))
    return {"cfg": cfg, "prod": prod, "first": first.id, "content": (content(prod), schema(prod)),
            "server": pg_server_dsn, "local": local}


@pytest.mark.parametrize("recovery", sampled(["backup", "prune"], {"backup"}))
def test_a_parallel_backup_killed_between_parts_lists_nothing_new_and_the_next_run_discards_its_parts(
        parallel_world, recovery):
    w = parallel_world
    killed = run_child("backup", w["cfg"], "backup.between_parts")
    assert killed.returncode == FAILPOINT_EXIT, killed.stderr[-2000:]
    assert "failpoint backup.between_parts: exiting" in killed.stderr
    listed, unfinished, orphans = stored(w)
    assert listed == [w["first"]]  # no manifest: not a backup
    assert len(orphans) == 1  # the parts it stored, in a folder without a manifest
    assert [p.name.split("-")[1] for p in w["local"].iterdir()] == ["pardump"]  # and its local folder
    assert (content(w["prod"]), schema(w["prod"])) == w["content"]

    if recovery == "backup":
        again = run_child("backup", w["cfg"])
        assert again.returncode == 0, again.stderr[-2000:]
        listed, unfinished, orphans = stored(w)
        assert len(listed) == 2 and listed[0] == w["first"] and (unfinished, orphans) == ([], [])
        assert list(w["local"].iterdir()) == []  # the dead backup's local folder went too
        verified = run_child("verify", w["cfg"])  # the new one restores
        assert verified.returncode == 0, verified.stderr[-2000:]
    else:
        from dataops.tasks.backup.dump import discard_backup_leftovers

        settings = load_settings(w["cfg"])
        gone = discard_backup_leftovers(settings, settings.env("production"))
        assert gone and stored(w) == ([w["first"]], [], [])
    assert leftovers(w["server"]) == [] and advisory_locks(w["server"]) == 0
