"""Faults from outside the process: the S3 server dies in the middle of an upload or of the
download a restore reads, and PostgreSQL ends the connection of a running restore, backup
(pg_dump), transform (a batch connection), migration, staging refresh (one of its copy
connections) or anonymize (pg_terminate_backend, as an operator, a pooler or a failover does).

None may leave a half-visible result. A step whose retry is safe rides through (the README's
promise: transient faults are retried with backoff): the backup's dump, a transform's range, a
restore. Otherwise the operation fails with one line, the target and the listing are as they were
(a failed migration is rolled back to whole revisions, a refresh discards its new copy, anonymize
rolls back its one transaction), and the next run succeeds and cleans up.
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
from test_refresh_staging import ANON

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


class DyingS3:
    """An S3 endpoint of this test's own (moto's server), so that stopping it hurts no other test.
    `die()` stops it and cuts the connections it is serving, as the death of its process would (a
    stopped werkzeug server finishes the responses in flight, so a download would go on). moto
    keeps its buckets in this process, so `revive()` on the same port finds them."""

    def __init__(self):
        import boto3

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None
        self.served: list = []  # sockets of the requests it accepted
        self.revive()
        self.client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                                   aws_access_key_id="testing", aws_secret_access_key="testing")

    def revive(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        accept = self.server._server.get_request  # the serving thread looks it up per connection

        def get_request():
            conn, addr = accept()
            self.served.append(conn)
            return conn, addr

        self.server._server.get_request = get_request

    def die(self) -> None:
        self._cut()  # first: stopping takes up to half a second, a download would go on meanwhile
        self.server.stop()
        self._cut()

    def _cut(self) -> None:
        import socket

        while self.served:
            try:
                self.served.pop().shutdown(socket.SHUT_RDWR)
            except OSError:  # closed already
                pass

    def storage(self, bucket: str = "faults") -> dict:
        return {"url": f"s3://{bucket}/b", "endpoint_url": self.endpoint, "region": "us-east-1",
                "access_key_id": "testing", "secret_access_key": "testing", "multipart_chunk_mb": 5}


@pytest.fixture
def own_s3():
    s3 = DyingS3()
    s3.client.create_bucket(Bucket="faults")
    yield s3
    s3.die()


def test_s3_dying_mid_upload_fails_the_backup_cleanly_and_the_next_one_cleans_up(own_s3, make_db, write_config):
    from dataops.tasks.backup.catalog import list_backups
    from dataops.tasks.backup.storage import open_storage

    prod = make_db("prod")
    create_schema(prod)
    seed(prod, users=30)
    add_blobs(prod, 250000)
    cfg = write_config({"production": ("production", prod)}, storage=own_s3.storage())
    env = {**os.environ, "DATAOPS_FAILPOINTS": "backup.mid_upload=pause(3)"}  # each stored part waits 3 s
    child = subprocess.Popen([sys.executable, "-c", CHILD["backup"].format(cfg=str(cfg))], env=env,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not own_s3.client.list_multipart_uploads(Bucket="faults").get("Uploads"):
        assert time.monotonic() < deadline and child.poll() is None, "the upload never started"
        time.sleep(0.1)
    time.sleep(1)  # the first part is stored, its failpoint waits
    own_s3.die()  # the store goes away mid-transfer
    try:
        rc = child.wait(180)
    finally:
        own_s3.revive()
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


@pytest.fixture
def s3_restore_world(own_s3, make_db, write_config, pg_server_dsn, prefect_api):
    """production backed up to the test's own S3 (~20 MB of incompressible rows, so the download
    lasts as long as pg_restore takes to load it), staging to be replaced by it."""
    from dataops.tasks.backup.dump import backup

    prod, stg = make_db("prod"), make_db("stg")
    create_schema(prod)
    seed(prod, users=40)
    add_blobs(prod, 400000)
    create_schema(stg)
    seed(stg, users=20, seed=3)
    cfg = write_config({"production": ("production", prod), "staging": ("staging", stg)}, storage=own_s3.storage())
    settings = load_settings(cfg)
    manifest = backup(settings, settings.env("production"))
    return {"cfg": cfg, "prod": prod, "stg": stg, "s3": own_s3, "server": pg_server_dsn, "api": prefect_api,
            "manifest": manifest, "old": (content(stg), schema(stg)), "new": (content(prod), schema(prod))}


# pg_restore loading the big table into the scratch database: the archive is being downloaded (the
# whole object was read once before, for its checksum)
LOADING_BLOBS = ("application_name = 'pg_restore' AND strpos(datname, '__dataops_restore_') > 0 AND state = 'active' "
                 "AND query LIKE 'COPY %blobs%'")


def when_seen(server, where: str, then, timeout: float = 90) -> threading.Thread:
    """In the background: once a session matching `where` (on pg_stat_activity) is seen, call `then()`."""
    def watch() -> None:
        with pg.connect(server, autocommit=True, dbname="postgres") as conn:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if conn.execute(f"SELECT 1 FROM pg_stat_activity WHERE {where}").fetchone():
                    thread.seen = True
                    then()
                    return
                time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.seen = False
    thread.start()
    return thread


def test_s3_dying_mid_download_fails_a_restore_cleanly_and_the_rerun_restores_exactly(s3_restore_world):
    """The store dies while pg_restore reads the archive from it, and stays away: the restore fails
    with one line naming the broken download, the target was never touched, the scratch database
    is dropped on the way out; once the store is back, the next restore loads it exactly."""
    w = s3_restore_world
    watcher = when_seen(w["server"], LOADING_BLOBS, w["s3"].die)
    child = subprocess.run([sys.executable, "-c", CHILD["restore"].format(cfg=str(w["cfg"]))], capture_output=True,
                           text=True, timeout=300)
    watcher.join(60)
    w["s3"].revive()
    assert watcher.seen, "pg_restore was never seen loading the big table"
    assert child.returncode == 1, child.stderr[-3000:]
    last = child.stderr.strip().splitlines()[-1]
    assert last.startswith("dataops.errors.TransientError: reading backup ") and "broke off after" in last, last
    assert (content(w["stg"]), schema(w["stg"])) == w["old"]
    assert leftovers(w["server"]) == [] and advisory_locks(w["server"]) == 0

    again = subprocess.run([sys.executable, "-c", CHILD["restore"].format(cfg=str(w["cfg"]))], capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (content(w["stg"]), schema(w["stg"])) == w["new"]
    assert leftovers(w["server"]) == [] and advisory_locks(w["server"]) == 0


def test_a_restore_rides_through_s3_dying_mid_download_when_it_comes_back(s3_restore_world):
    """The same break with the store back a second later: the README's promise for a transient
    fault holds, the restore step is retried (checksum, scratch database, load, all again) and the
    command succeeds, the target holding exactly the backup."""
    w = s3_restore_world

    def blip() -> None:
        w["s3"].die()
        time.sleep(1)
        w["s3"].revive()

    watcher = when_seen(w["server"], LOADING_BLOBS, blip)
    r = cli(w["cfg"], w["api"], "restore", "production", "latest", "--into", "staging")
    watcher.join(60)
    assert watcher.seen, "pg_restore was never seen loading the big table"
    assert r.returncode == 0, r.stderr[-3000:]
    assert RETRIED in r.stderr and "broke off after" in r.stderr, r.stderr[-3000:]
    assert (content(w["stg"]), schema(w["stg"])) == w["new"]
    assert leftovers(w["server"]) == [] and advisory_locks(w["server"]) == 0


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
    from test_crash_transform import NAME, half_done_run, items_transform, runs

    dsn = make_db("xft")
    cfg, original = items_transform(dsn, tmp_path)

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


# -- refresh-staging and anonymize ---------------------------------------------------------------------

REFRESH_ANON = {**ANON, "rules": {**ANON["rules"], "events": {"contact_email": {"hash": {}}}}}


def fill_big(dsn) -> None:
    """The sample application with two big tables, so that copying or masking it takes seconds:
    `events` masked (by a refresh in Python: a psycopg COPY out of production and one into the new
    copy), `blobs` left as it is (a refresh pipes psql into psql)."""
    create_schema(dsn)
    seed(dsn, users=200)
    with pg.connect(dsn) as conn:
        conn.execute("CREATE TABLE events (id bigint PRIMARY KEY, user_id bigint REFERENCES users (id), "
                     "contact_email text)")
        conn.execute("INSERT INTO events SELECT g, 1 + g % 200, 'p' || g || '@example.com' "
                     "FROM generate_series(1, 200000) g")
        conn.commit()
    add_blobs(dsn, 150000)


def fill_refresh_pair(prod, stg) -> None:
    """production big (fill_big), staging holding other, older data."""
    fill_big(prod)
    create_schema(stg)
    seed(stg, users=50, seed=7)


def refreshed_from(prod, stg) -> bool:
    """staging is a masked copy of production: the same keys, no e-mail address of production,
    the unmasked table equal."""
    with pg.connect(stg) as s, pg.connect(prod) as p:
        keys = "SELECT (SELECT array_agg(id ORDER BY id) FROM users), (SELECT count(*) FROM events)"
        emails = {r[0] for r in p.execute("SELECT email FROM users UNION ALL SELECT contact_email FROM events")}
        leaked = [r[0] for r in s.execute("SELECT email FROM users UNION ALL SELECT contact_email FROM events")
                  if r[0] in emails]
        same_keys = s.execute(keys).fetchone() == p.execute(keys).fetchone()
    return same_keys and not leaked and content(stg)["public.blobs"] == content(prod)["public.blobs"]


def one_error_line(stderr: str) -> str:
    """The command's error: one line `error: ...`, the last one it wrote."""
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and stderr.strip().splitlines()[-1] == errors[0], stderr[-3000:]
    return errors[0]


def copying(side: str, table: str) -> str:
    """A copy connection of a refresh (`side`: copy, reading production; load, writing the new
    copy) in the middle of the COPY of `table` (some rows through already)."""
    return (f"application_name = 'dataops-refresh-{side}' AND state = 'active' AND query LIKE 'COPY %{table}%' "
            "AND pid IN (SELECT pid FROM pg_stat_progress_copy WHERE tuples_processed > 2000)")


@pytest.mark.parametrize("side, table", [("copy", "events"), ("load", "events"), ("copy", "blobs"), ("load", "blobs")])
def test_a_refresh_whose_copy_connection_is_ended_fails_cleanly_and_the_next_one_succeeds(
        side, table, make_db, write_config, pg_server_dsn, prefect_api):
    """One COPY of the refresh loses its session (either end, on the masking path and on the psql
    pipe): the copy step does not run twice (its readers share the flow's snapshot), so the
    refresh fails with one line, discards its new copy and leaves staging as it was; the next
    refresh succeeds."""
    prod, stg = make_db("prod"), make_db("stg")
    fill_refresh_pair(prod, stg)
    cfg = write_config({"production": ("production", prod), "staging": ("staging", stg)},
                       extra={"anonymize": REFRESH_ANON})
    old = (content(stg), schema(stg))

    watcher = terminate_when(pg_server_dsn, copying(side, table))
    r = cli(cfg, prefect_api, "refresh-staging")
    watcher.join(60)
    assert watcher.ended, f"no dataops-refresh-{side} session was seen copying {table}"
    assert r.returncode == 1, r.stderr[-3000:]
    error = one_error_line(r.stderr)
    assert error.startswith("error: copying the data failed: ") and any(
        lost in error for lost in ("closed the connection", "connection to server was lost")), error
    assert (content(stg), schema(stg)) == old
    assert leftovers(pg_server_dsn) == [] and advisory_locks(pg_server_dsn) == 0

    again = cli(cfg, prefect_api, "refresh-staging")
    assert again.returncode == 0, again.stderr[-3000:]
    assert refreshed_from(prod, stg) and schema(stg) == schema(prod)
    assert leftovers(pg_server_dsn) == [] and advisory_locks(pg_server_dsn) == 0


def masked_in_place(stg, before: dict[str, str]) -> bool:
    """Every masked table of the database rewritten, none of its e-mail addresses left."""
    now = content(stg)
    with pg.connect(stg) as conn:
        kept = conn.execute("SELECT count(*) FROM events WHERE contact_email LIKE '%@example.com'").fetchone()[0]
    return kept == 0 and all(now[t] != before[t] for t in ("public.users", "public.user_emails", "public.events"))


@pytest.mark.parametrize("when", ["updating", "before_commit"])
def test_an_anonymize_whose_connection_is_ended_changes_nothing_and_the_rerun_masks(
        when, make_db, write_config, pg_server_dsn, prefect_api):
    """anonymize runs in one transaction: its session ends in the middle of the UPDATE of the big
    table, or with every statement done and the commit not yet sent. It fails with one line, the
    database holds exactly what it held (rows and schema: the foreign keys it dropped for the
    update are there), and the next run masks it."""
    stg = make_db("dev")
    fill_big(stg)
    cfg = write_config({"staging": ("staging", stg)}, extra={"anonymize": REFRESH_ANON})
    before = content(stg)
    old = (before, schema(stg))

    if when == "updating":
        where, failpoints = ("application_name = 'dataops-anonymize' AND state = 'active' "
                             "AND query LIKE 'COPY (UPDATE %events%'"), ""
    else:
        where, failpoints = ("application_name = 'dataops-anonymize' AND state = 'idle in transaction' "
                             "AND state_change < now() - interval '2 s'"), "anonymize.before_commit=pause(6)"
    watcher = terminate_when(pg_server_dsn, where)
    r = cli(cfg, prefect_api, "anonymize", "staging", failpoints=failpoints)
    watcher.join(60)
    assert watcher.ended, "the anonymize session was never seen"
    assert r.returncode == 1, r.stderr[-3000:]
    error = one_error_line(r.stderr)
    assert error.startswith("error: anonymize staging lost its connection before its commit (") and error.endswith(
        "nothing was changed (one transaction, rolled back); run it again"), error
    assert (content(stg), schema(stg)) == old
    assert advisory_locks(pg_server_dsn) == 0

    again = cli(cfg, prefect_api, "anonymize", "staging")
    assert again.returncode == 0, again.stderr[-3000:]
    assert masked_in_place(stg, before) and schema(stg) == old[1]


def test_an_anonymize_that_loses_its_commit_says_what_the_server_made_of_it(make_db, write_config):
    """A commit can land and its answer be lost: the error then says what txid_status says of the
    transaction (committed: anonymized, VACUUM FULL to run; aborted: nothing changed), or that it
    is unknown while the server is away. A statement timeout is not a lost connection."""
    import psycopg

    from dataops.tasks.anonymize.in_place import lost_connection, lost_connection_error

    dev = make_db("dev")
    cfg = write_config({"staging": ("staging", dev), "gone": ("staging", f"postgresql://u@127.0.0.1:{free_port()}/x")},
                       extra={"anonymize": REFRESH_ANON})
    settings = load_settings(cfg)
    with pg.connect(dev) as conn:
        committed = conn.execute("SELECT txid_current()").fetchone()[0]
        conn.commit()
        aborted = conn.execute("SELECT txid_current()").fetchone()[0]
        conn.rollback()
    lost = psycopg.OperationalError("server closed the connection unexpectedly")
    assert lost_connection(lost) and not lost_connection(psycopg.errors.QueryCanceled("canceling statement"))

    said = lost_connection_error(settings, settings.env("staging"), committed, True, lost, ["public.users"]).message
    assert "during its commit (server closed the connection unexpectedly), which went through: staging is " \
           "anonymized" in said and said.endswith("run VACUUM FULL of public.users"), said
    said = lost_connection_error(settings, settings.env("staging"), aborted, True, lost, ["public.users"]).message
    assert "nothing was changed" in said, said
    said = lost_connection_error(settings, settings.env("gone"), committed, True, lost, []).message
    assert f"whether it went through is unknown (SELECT txid_status({committed}) on gone says)" in said, said
