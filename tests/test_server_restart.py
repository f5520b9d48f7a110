"""PostgreSQL restarted under a running operation (`pg_ctl restart -m immediate`, as a crash, an
OOM kill of the postmaster or a failover does): every session ends at once, pg_dump and
pg_restore included.

Each test starts a server of its own (pgserver's binaries, a data folder of its own), so the
restart hurts no other test. Each runs the real command (`dataops ...`, its flow on the
session's Prefect test server), restarts the server while the operation is surely in the middle
(a client of ours seen active in pg_stat_activity), and checks with this file's own queries:
- the retry the README promises for transient faults rides through the restart: the command
  exits 0 and its log shows the retry; a staging refresh, whose copy step is not retried (its
  readers share a snapshot that goes with the server), fails with one line instead and the next
  one succeeds;
- the target holds the new content (rows hashed per table, pg_dump --schema-only), never a mix
  (after a failed refresh: the old content);
- no half-visible backup is listed, and the new one restores; no scratch database, previous
  copy, unfinished upload or advisory lock is left.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import run_cli
from test_crash_matrix import add_blobs, content, leftovers, schema
from test_faults import REFRESH_ANON, copying, fill_refresh_pair, one_error_line, refreshed_from

from dataops.dev.sample_app import create_schema, seed
from dataops.dsn import Dsn
from dataops.settings import load_settings
from dataops.tasks import pg

pytestmark = pytest.mark.extended  # make test-crash (CI runs it after make test)

RETRIED = "Retry 1/3 will start"  # Prefect's log line when a task run is retried (PREFECT_LOGGING_LEVEL=INFO)


class OwnServer:
    """A PostgreSQL of one test: started in a short temporary folder (the unix socket's path is
    limited to ~100 bytes), restarted on demand, stopped and deleted at the end."""

    def __init__(self):
        import pgserver

        self.pgdata = Path(tempfile.mkdtemp(prefix="dors-"))
        self.srv = pgserver.get_server(self.pgdata, cleanup_mode="delete")
        self.dsn = Dsn(self.srv.get_uri("postgres"))
        self.restarts = 0

    def pg_ctl(self, *args: str) -> None:
        from pgserver._commands import pg_ctl

        pg_ctl(["-w", *args], pgdata=self.pgdata, user=self.srv.system_user, timeout=60)

    def restart(self) -> float:
        """Immediate shutdown (no checkpoint: crash recovery at start), then start; returns the
        seconds the server was away."""
        t0 = time.monotonic()
        self.pg_ctl("-m", "immediate", "-l", str(self.pgdata / "log"), "restart")
        self.restarts += 1
        return time.monotonic() - t0

    def checkpoint(self) -> None:
        """After a test's setup: the crash recovery at the restart then replays only what the
        operation under test wrote (a few seconds at most on a busy 2-core machine)."""
        with pg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("CHECKPOINT")

    def database(self, prefix: str) -> Dsn:
        import uuid

        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        pg.create_database(self.dsn, name)
        return self.dsn.with_database(name)

    def stop(self) -> None:
        try:
            self.pg_ctl("-m", "fast", "stop")
        except Exception:  # noqa: BLE001 - already stopped
            pass
        shutil.rmtree(self.pgdata, ignore_errors=True)


@pytest.fixture
def own_server():
    server = OwnServer()
    yield server
    server.stop()


def advisory_locks(server: Dsn) -> int:
    with pg.connect(server, autocommit=True, dbname="postgres") as conn:
        return conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                            "AND pid <> pg_backend_pid()").fetchone()[0]


def restart_when(server: OwnServer, sql: str, deadline_s: float = 90) -> threading.Thread:
    """In the background: wait until `sql` (run on the server's maintenance database) returns a
    row, then restart the server. The thread records what it saw in `.seen` / `.away`."""
    def watch() -> None:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            try:
                with pg.connect(server.dsn, autocommit=True, dbname="postgres", timeout=2) as conn:
                    while time.monotonic() < deadline:
                        row = conn.execute(sql).fetchone()
                        if row:
                            thread.seen = row
                            thread.away = server.restart()
                            return
                        time.sleep(0.05)
            except Exception:  # noqa: BLE001 - the server is starting; look again
                time.sleep(0.1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.seen, thread.away = None, None
    thread.start()
    return thread


def cli(cfg: Path, api: str, *args: str, failpoints: str = ""):
    return run_cli("-v", "--config", str(cfg), *args, env={"PREFECT_API_URL": api, "DATAOPS_FAILPOINTS": failpoints,
                                                        "PREFECT_LOGGING_LEVEL": "INFO"},
                   timeout=300)


# -- backup ------------------------------------------------------------------------------------------

def test_a_backup_rides_through_a_restart_mid_dump(own_server, prefect_api, write_config, tmp_path):
    """pg_dump loses its server in the middle of the dump (the upload stands at its first part,
    pg_dump blocked on its pipe): the dump step fails as transient, its retry takes the backup
    lock again (its session died with the server), discards the unfinished upload and dumps
    again. One backup is listed, whole, and it restores."""
    from dataops.tasks.backup.catalog import list_backups
    from dataops.tasks.backup.storage import open_storage

    prod = own_server.database("prod")
    create_schema(prod)
    seed(prod, users=40)
    add_blobs(prod, 100000)
    cfg = write_config({"production": ("production", prod)}, storage={"url": f"file://{tmp_path}/store"})
    before = (content(prod), schema(prod))
    own_server.checkpoint()

    watcher = restart_when(own_server, "SELECT pid FROM pg_stat_activity WHERE application_name = 'pg_dump' "
                                       "AND query LIKE 'COPY%'")
    r = cli(cfg, prefect_api, "backup", "production", failpoints="backup.mid_upload=pause(2)")
    watcher.join(60)
    assert watcher.seen, "pg_dump was never seen copying"
    assert r.returncode == 0, r.stderr[-3000:]
    assert RETRIED in r.stderr and "pg_dump failed" in r.stderr, r.stderr[-3000:]
    assert "the backup lock of production was lost" in r.stderr, r.stderr[-3000:]

    storage = open_storage(load_settings(cfg).storage)
    listed = list_backups(storage, "production")
    assert [m.id for m in listed] == [r.stdout.split()[-1]]
    assert storage.incomplete("production/") == []
    assert {o.key.split("/")[1] for o in storage.list("production/")} == {listed[0].id}  # nothing else left
    assert (content(prod), schema(prod)) == before
    assert advisory_locks(own_server.dsn) == 0

    v = cli(cfg, prefect_api, "verify-backup", "production")  # the backup restores and matches its manifest
    assert v.returncode == 0, v.stderr[-3000:]
    assert leftovers(own_server.dsn) == []


# -- restore and verify-backup -----------------------------------------------------------------------

@pytest.fixture
def restore_world(own_server, write_config, tmp_path, prefect_api):
    """production backed up (a restore of it takes a few seconds), staging to be replaced by it."""
    from dataops.tasks.backup.dump import backup

    prod, stg = own_server.database("prod"), own_server.database("stg")
    create_schema(prod)
    seed(prod, users=60)
    add_blobs(prod, 200000)
    create_schema(stg)
    seed(stg, users=20, seed=5)
    cfg = write_config({"production": ("production", prod), "staging": ("staging", stg)},
                       storage={"url": f"file://{tmp_path}/store"})
    settings = load_settings(cfg)
    manifest = backup(settings, settings.env("production"))
    own_server.checkpoint()
    return {"cfg": cfg, "prod": prod, "stg": stg, "server": own_server, "api": prefect_api, "id": manifest.id,
            "old": (content(stg), schema(stg)), "new": (content(prod), schema(prod))}


LOADING = ("SELECT pid FROM pg_stat_activity WHERE application_name = 'pg_restore' "
           "AND strpos(datname, '__dataops_{purpose}_') > 0 AND state = 'active'")


def test_a_restore_rides_through_a_restart_mid_pg_restore(restore_world):
    """The scratch copy was being loaded when the server went: the target was never touched. The
    restore step's retry discards the dead attempt's scratch database and restores again."""
    w = restore_world
    watcher = restart_when(w["server"], LOADING.format(purpose="restore"))
    r = cli(w["cfg"], w["api"], "restore", "production", "latest", "--into", "staging")
    watcher.join(60)
    assert watcher.seen, "pg_restore was never seen loading"
    assert r.returncode == 0, r.stderr[-3000:]
    assert RETRIED in r.stderr and "TransientError" in r.stderr, r.stderr[-3000:]
    assert (content(w["stg"]), schema(w["stg"])) == w["new"]
    assert leftovers(w["server"].dsn) == [] and advisory_locks(w["server"].dsn) == 0


def test_a_verification_cut_by_a_restart_is_retried_and_never_marks_the_backup_failed(restore_world):
    """A restart says nothing about the backup: the verification is retried and marks it verified
    (before, the lost pg_restore was recorded as a FAILED verification of a good backup)."""
    from dataops.tasks.backup.catalog import get_backup
    from dataops.tasks.backup.storage import open_storage

    w = restore_world
    watcher = restart_when(w["server"], LOADING.format(purpose="verify"))
    r = cli(w["cfg"], w["api"], "verify-backup", "production")
    watcher.join(60)
    assert watcher.seen, "pg_restore was never seen loading"
    assert r.returncode == 0, r.stderr[-3000:]
    assert RETRIED in r.stderr, r.stderr[-3000:]
    backup = get_backup(open_storage(load_settings(w["cfg"]).storage), "production", w["id"])
    assert backup.verified and backup.verification.problems == []
    assert (content(w["prod"]), schema(w["prod"])) == w["new"]  # the source is only read
    assert leftovers(w["server"].dsn) == [] and advisory_locks(w["server"].dsn) == 0


# -- a transform -------------------------------------------------------------------------------------

def test_a_transform_rides_through_a_restart_mid_run_and_changes_every_row_once(own_server, prefect_api, tmp_path):
    """Every session of the run ends with the server: its batch connections (a batch in flight rolls
    back with its checkpoint), its lock, its progress monitor. Each range's task is retried and
    resumes after its checkpoint, so the run completes with every row changed exactly once (the
    transform is not idempotent: a batch applied twice would show in `bumps`)."""
    from test_crash_transform import NAME, half_done_run, items_transform, runs

    dsn = own_server.database("xf")
    cfg, original = items_transform(dsn, tmp_path)
    own_server.checkpoint()

    watcher = restart_when(own_server, "SELECT pid FROM pg_stat_activity WHERE application_name LIKE "
                                        f"'dataops-transform:{NAME}:r%' AND backend_start < now() - interval '1 s'")
    r = cli(cfg, prefect_api, "transform", "dev", "run", NAME, "--batch-size", "10", "--workers", "2",
            failpoints="transform.after_checkpoint=pause(0.7)")
    watcher.join(60)
    assert watcher.seen, "no batch connection was seen"
    assert r.returncode == 0, r.stderr[-3000:]
    assert RETRIED in r.stderr, r.stderr[-3000:]
    assert half_done_run(dsn, original) == set(original)  # every row changed, none twice
    assert [x[1:] for x in runs(dsn)] == [("run", "completed")]
    assert advisory_locks(own_server.dsn) == 0


# -- refresh-staging ---------------------------------------------------------------------------------

def test_a_refresh_cut_by_a_restart_leaves_staging_and_the_next_one_succeeds(own_server, prefect_api, write_config):
    """production and staging on the restarted server: the refresh's snapshot, its lock and its copy
    connections all end. The copy step does not run twice (its readers share the snapshot that
    went with the server), so the refresh fails with one line and staging is as it was; a new copy
    the server was not back to drop is discarded by the next refresh, which succeeds."""
    from dataops.tasks.refresh.steps import SCRATCH_TAG

    prod, stg = own_server.database("prod"), own_server.database("stg")
    fill_refresh_pair(prod, stg)
    cfg = write_config({"production": ("production", prod), "staging": ("staging", stg)},
                       extra={"anonymize": REFRESH_ANON})
    old = (content(stg), schema(stg))
    own_server.checkpoint()

    watcher = restart_when(own_server, f"SELECT pid FROM pg_stat_activity WHERE {copying('load', 'events')}")
    r = cli(cfg, prefect_api, "refresh-staging")
    watcher.join(60)
    assert watcher.seen, "the refresh was never seen loading its copy"
    assert r.returncode == 1, r.stderr[-3000:]
    assert one_error_line(r.stderr).startswith("error: copying the data failed: "), r.stderr[-3000:]
    assert (content(stg), schema(stg)) == old
    left = leftovers(own_server.dsn)
    assert left == [] or (len(left) == 1 and SCRATCH_TAG in left[0]), left
    assert advisory_locks(own_server.dsn) == 0

    again = cli(cfg, prefect_api, "refresh-staging")
    assert again.returncode == 0, again.stderr[-3000:]
    assert refreshed_from(prod, stg) and schema(stg) == schema(prod)
    assert leftovers(own_server.dsn) == [] and advisory_locks(own_server.dsn) == 0
