"""Kill it at every failpoint of restore, verify-backup and refresh, check nothing is lost, run it
again, check it recovered.

Each cell runs the operation in a child process with one failpoint armed to `exit` (os._exit: no
`finally`, no `except`, connections dropped, as kill -9 leaves them) and then checks, with this
file's own queries rather than the product's checks:
- the target database exists and holds its old content or its new content, never a mix or none
  (every table's rows hashed in key order, and the schema from pg_dump --schema-only);
- after recovery (the same operation run again) it holds the new content, and no scratch database,
  no previous copy and no advisory lock of ours is left on the server.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import sampled
from test_refresh_staging import ANON

from dataops.dev.sample_app import create_schema, seed
from dataops.failpoints import FAILPOINT_EXIT
from dataops.settings import load_settings
from dataops.tasks import pg

# failpoint -> the content the target holds after a kill there: "old" or "new"
RESTORE_CELLS = {
    "restore.after_scratch_created": "old",
    "restore.before_switch": "old",
    "restore.between_renames": "old",
    "restore.after_switch": "new",
}
VERIFY_CELLS = ["verify.after_load", "verify.before_mark"]
REFRESH_CELLS = {
    "refresh.after_create": "old",
    "refresh.after_copy": "old",
    "refresh.after_indexes": "old",
    "refresh.after_checks": "old",
    "refresh.between_renames": "old",
    "refresh.after_switch": "new",
}
BACKUP_CELLS = ["backup.mid_upload", "backup.before_manifest"]
CELLS = [*BACKUP_CELLS, *RESTORE_CELLS, *VERIFY_CELLS, *REFRESH_CELLS]  # test_failpoints.py holds this against the code

CHILD = {
    "backup": ("from dataops.settings import load_settings; from dataops.tasks.backup.dump import backup; "
               "s = load_settings({cfg!r}); backup(s, s.env('production'))"),
    "restore": ("from dataops.settings import load_settings; from dataops.tasks.backup.catalog import get_backup; "
                "from dataops.tasks.backup.restore import restore; from dataops.tasks.backup.storage import open_storage; "
                "s = load_settings({cfg!r}); st = open_storage(s.storage); "
                "restore(s, st, get_backup(st, 'production', 'latest'), s.env('staging'))"),
    "verify": ("from dataops.settings import load_settings; from dataops.tasks.backup.catalog import get_backup; "
               "from dataops.tasks.backup.restore import verify_and_record; "
               "from dataops.tasks.backup.storage import open_storage; "
               "s = load_settings({cfg!r}); st = open_storage(s.storage); "
               "verify_and_record(s, st, get_backup(st, 'production', 'latest'), s.env('production'))"),
    "refresh": ("from dataops.settings import load_settings; from dataops.tasks.refresh.plan import resolve_environments; "
                "from dataops.tasks.refresh.steps import refresh; s = load_settings({cfg!r}); "
                "refresh(s, *resolve_environments(s, None, None))"),
}


def run_child(operation: str, cfg: Path, failpoint: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "DATAOPS_FAILPOINTS": f"{failpoint}=exit" if failpoint else ""}
    return subprocess.run([sys.executable, "-c", CHILD[operation].format(cfg=str(cfg))], env=env, capture_output=True,
                          text=True, timeout=300)


# -- invariants, by our own queries ---------------------------------------------------------------

def content(dsn) -> dict[str, str]:
    """Every user table's rows, hashed in a fixed order, by name: what the database holds."""
    with pg.connect(dsn) as conn:
        tables = conn.execute("SELECT format('%I.%I', schemaname, tablename) FROM pg_tables "
                              "WHERE schemaname NOT IN ('pg_catalog', 'information_schema') "
                              "AND schemaname NOT LIKE 'dataops%' ORDER BY 1").fetchall()
        return {t: conn.execute(f"SELECT md5(coalesce(string_agg(x::text, '|' ORDER BY x::text), '')) "
                                f"FROM {t} x").fetchone()[0] for (t,) in tables}


def schema(dsn) -> str:
    from pgserver._commands import POSTGRES_BIN_PATH

    conninfo, secret_env = dsn.libpq_args()
    out = subprocess.run([str(Path(POSTGRES_BIN_PATH) / "pg_dump"), "--schema-only", "--no-owner", f"--dbname={conninfo}"],
                         capture_output=True, text=True, env={**os.environ, **secret_env}, check=True).stdout
    return "\n".join(line for line in out.splitlines() if not line.startswith(("--", "\\restrict", "\\unrestrict")))


def leftovers(server) -> list[str]:
    """Databases of ours that only a run in progress may have: scratch copies and previous copies."""
    with pg.connect(server, autocommit=True, dbname="postgres") as conn:
        return [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE strpos(datname, '__dataops_') > 0 "
                                           "ORDER BY 1")]


def advisory_locks(server) -> int:
    with pg.connect(server, autocommit=True, dbname="postgres") as conn:
        return conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                            "AND pid <> pg_backend_pid()").fetchone()[0]


# -- restore ------------------------------------------------------------------------------------

@pytest.fixture
def restore_world(make_db, write_config, tmp_path, pg_server_dsn):
    """production (80 users) backed up; staging (30 other users) to be replaced by it."""
    from dataops.tasks.backup.dump import backup

    prod, stg = make_db("prod"), make_db("stg")
    create_schema(prod)
    seed(prod, users=80)
    create_schema(stg)
    seed(stg, users=30, seed=7)
    cfg = write_config({"production": ("production", prod), "staging": ("staging", stg)},
                       storage={"url": f"file://{tmp_path}/store"})
    settings = load_settings(cfg)
    backup(settings, settings.env("production"))
    return {"cfg": cfg, "prod": prod, "stg": stg, "old": (content(stg), schema(stg)),
            "new": (content(prod), schema(prod)), "server": pg_server_dsn}


@pytest.mark.parametrize("point", list(RESTORE_CELLS))
def test_restore_killed_at_each_failpoint_loses_nothing_and_recovers(restore_world, point):
    w = restore_world
    killed = run_child("restore", w["cfg"], point)
    assert killed.returncode == FAILPOINT_EXIT, killed.stderr[-2000:]
    assert f"failpoint {point}: exiting" in killed.stderr

    assert (content(w["stg"]), schema(w["stg"])) == w[RESTORE_CELLS[point]]

    again = run_child("restore", w["cfg"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert (content(w["stg"]), schema(w["stg"])) == w["new"]
    assert leftovers(w["server"]) == [] and advisory_locks(w["server"]) == 0


def test_a_restore_recovers_the_only_copy_an_older_swap_left_behind(restore_world):
    """A swap of an earlier dataops renamed the target away and died before the second rename: the
    old copy under the previous-copy name is all that is left. The next restore renames it back
    before anything else, and never drops it first."""
    w = restore_world
    stg = w["stg"].database
    with pg.connect(w["server"], autocommit=True, dbname="postgres") as conn:
        conn.execute(f'ALTER DATABASE "{stg}" RENAME TO "{pg.previous_name(stg)}"')
    env = {**os.environ, "DATAOPS_FAILPOINTS": "restore.before_switch=raise"}
    failed = subprocess.run([sys.executable, "-c", CHILD["restore"].format(cfg=str(w["cfg"]))], env=env,
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode != 0 and "failpoint restore.before_switch" in failed.stderr
    assert not pg.database_exists(w["server"], stg)  # the restore never swaps before its checks...

    assert run_child("restore", w["cfg"]).returncode == 0  # ...and the swap puts the old copy back first
    assert (content(w["stg"]), schema(w["stg"])) == w["new"]
    assert leftovers(w["server"]) == []


def test_two_targets_with_a_long_common_prefix_get_their_own_previous_copy():
    a, b = "x" * 45 + "_a", "x" * 45 + "_b"
    assert pg.previous_name(a) != pg.previous_name(b)
    assert max(len(pg.previous_name(a)), len(pg.previous_name(b))) <= 63


# -- verify-backup --------------------------------------------------------------------------------

@pytest.mark.parametrize("point", VERIFY_CELLS)
def test_verify_killed_at_each_failpoint_marks_nothing_and_the_next_run_discards_its_scratch(restore_world, point):
    from dataops.tasks.backup.catalog import get_backup
    from dataops.tasks.backup.storage import open_storage

    w = restore_world
    storage = open_storage(load_settings(w["cfg"]).storage)
    killed = run_child("verify", w["cfg"], point)
    assert killed.returncode == FAILPOINT_EXIT, killed.stderr[-2000:]
    assert not get_backup(storage, "production", "latest").verified
    assert (content(w["prod"]), schema(w["prod"])) == w["new"]  # the source is only read

    again = run_child("verify", w["cfg"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert get_backup(storage, "production", "latest").verified
    assert leftovers(w["server"]) == [] and advisory_locks(w["server"]) == 0


def test_a_scratch_database_in_use_is_not_discarded(restore_world):
    """The collector takes only scratch databases no live run owns: one being loaded stays."""
    from dataops.tasks.scratch import discard_leftovers, owned_scratch

    server = restore_world["server"]
    with owned_scratch(server, "live", "verify") as name:
        assert discard_leftovers(server) == [] and name in leftovers(server)
    assert name not in leftovers(server)  # its owner drops it on the way out


# -- refresh ------------------------------------------------------------------------------------

@pytest.fixture
def refresh_world(make_db, write_config, pg_server_dsn):
    prod, stg = make_db("prod"), make_db("stg")
    create_schema(prod)
    seed(prod, users=60)
    create_schema(stg)
    seed(stg, users=25, seed=7)
    cfg = write_config({"production": ("production", prod), "staging": ("staging", stg)}, extra={"anonymize": ANON})
    return {"cfg": cfg, "prod": prod, "stg": stg, "old": (content(stg), schema(stg)), "server": pg_server_dsn}


def masked_copy_of_production(w) -> bool:
    with pg.connect(w["stg"]) as s, pg.connect(w["prod"]) as p:
        same_ids = s.execute("SELECT array_agg(id ORDER BY id) FROM users").fetchone() == \
            p.execute("SELECT array_agg(id ORDER BY id) FROM users").fetchone()
        emails = {r[0] for r in p.execute("SELECT email FROM users")}
        leaked = [r[0] for r in s.execute("SELECT email FROM users") if r[0] in emails]
    return same_ids and not leaked


@pytest.mark.parametrize("point", sampled(list(REFRESH_CELLS), {"refresh.between_renames"}))
def test_refresh_killed_at_each_failpoint_loses_nothing_and_recovers(refresh_world, point):
    w = refresh_world
    killed = run_child("refresh", w["cfg"], point)
    assert killed.returncode == FAILPOINT_EXIT, killed.stderr[-2000:]
    if REFRESH_CELLS[point] == "old":
        assert (content(w["stg"]), schema(w["stg"])) == w["old"]
    else:
        assert masked_copy_of_production(w)

    again = run_child("refresh", w["cfg"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert masked_copy_of_production(w) and schema(w["stg"]) == schema(w["prod"])
    assert leftovers(w["server"]) == [] and advisory_locks(w["server"]) == 0


def add_blobs(dsn, rows: int) -> None:
    """Incompressible rows, so that a dump spans several 5 MiB parts and a restore takes a while."""
    with pg.connect(dsn) as conn:
        conn.execute("CREATE TABLE blobs AS SELECT g AS id, md5(g::text) || md5((g * 7)::text) || md5(random()::text) "
                     "AS body FROM generate_series(1, %s) g", (rows,))
        conn.commit()


# -- backup -------------------------------------------------------------------------------------

@pytest.fixture(params=sampled(["s3", "file"], {"s3"}))
def backup_world(request, make_db, write_config, tmp_path, pg_server_dsn, s3_bucket, s3_endpoint):
    """production with a table of incompressible text (a dump of several 5 MiB parts, so S3 takes
    it as a multipart upload), and one good backup already listed."""
    from dataops.tasks.backup.dump import backup

    prod = make_db("prod")
    create_schema(prod)
    seed(prod, users=40)
    add_blobs(prod, 250000)
    storage = ({"url": f"s3://{s3_bucket}/b", "endpoint_url": s3_endpoint, "region": "us-east-1",
                "access_key_id": "testing", "secret_access_key": "testing", "multipart_chunk_mb": 5}
               if request.param == "s3" else {"url": f"file://{tmp_path}/store"})
    cfg = write_config({"production": ("production", prod)}, storage=storage)
    settings = load_settings(cfg)
    first = backup(settings, settings.env("production"))
    return {"cfg": cfg, "prod": prod, "first": first.id, "content": (content(prod), schema(prod)),
            "server": pg_server_dsn}


def stored(w):
    """(listed backup ids, unfinished uploads, backup folders without a manifest), read from storage."""
    from dataops.tasks.backup.catalog import MANIFEST, list_backups
    from dataops.tasks.backup.storage import open_storage

    storage = open_storage(load_settings(w["cfg"]).storage)
    folders: dict[str, set[str]] = {}
    for o in storage.list("production/"):
        folders.setdefault(o.key.split("/")[1], set()).add(o.key.split("/")[-1])
    return ([m.id for m in list_backups(storage, "production")], storage.incomplete("production/"),
            sorted(f for f, names in folders.items() if MANIFEST not in names))


@pytest.mark.parametrize("point", sampled(BACKUP_CELLS, {"backup.mid_upload"}))
@pytest.mark.parametrize("recovery", sampled(["backup", "prune"], {"backup"}))
def test_backup_killed_at_each_failpoint_lists_nothing_new_and_the_next_run_discards_what_it_left(
        backup_world, point, recovery):
    w = backup_world
    killed = run_child("backup", w["cfg"], point)
    assert killed.returncode == FAILPOINT_EXIT, killed.stderr[-2000:]
    listed, unfinished, orphans = stored(w)
    assert listed == [w["first"]]  # a backup is listed only once it is whole
    assert (unfinished, orphans) != ([], [])  # and the killed one did leave something behind
    assert (content(w["prod"]), schema(w["prod"])) == w["content"]

    if recovery == "backup":
        again = run_child("backup", w["cfg"])
        assert again.returncode == 0, again.stderr[-2000:]
        listed, unfinished, orphans = stored(w)
        assert len(listed) == 2 and listed[0] == w["first"] and (unfinished, orphans) == ([], [])
        verified = run_child("verify", w["cfg"])  # the new one restores
        assert verified.returncode == 0, verified.stderr[-2000:]
    else:
        from dataops.tasks.backup.dump import discard_backup_leftovers

        settings = load_settings(w["cfg"])
        gone = discard_backup_leftovers(settings, settings.env("production"))
        assert gone and stored(w) == ([w["first"]], [], [])
    assert leftovers(w["server"]) == [] and advisory_locks(w["server"]) == 0


@pytest.mark.extended
def test_a_second_backup_of_the_same_environment_is_refused_naming_the_first(restore_world):
    from dataops.errors import OperationFailed
    from dataops.tasks.backup.dump import backup

    w = restore_world
    env = {**os.environ, "DATAOPS_FAILPOINTS": "backup.before_manifest=pause(8)"}
    first = subprocess.Popen([sys.executable, "-c", CHILD["backup"].format(cfg=str(w["cfg"]))], env=env,
                             stderr=subprocess.PIPE, text=True)
    try:
        settings = load_settings(w["cfg"])
        deadline = time.monotonic() + 60
        while advisory_locks(w["server"]) == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        with pytest.raises(OperationFailed, match=r"another backup of 'production' is running \(pid \d+, "
                                                  r"application_name dataops-backup production pid \d+ on "):
            backup(settings, settings.env("production"))
    finally:
        assert first.wait(120) == 0, first.stderr.read()[-2000:]


@pytest.mark.extended
def test_a_restore_into_staging_while_a_refresh_of_staging_runs_is_refused_naming_it(restore_world):
    """Both replace the whole database: one at a time per target, the second refused with the
    first one's session, and the target left as the first one makes it."""
    from dataops.errors import OperationFailed
    from dataops.tasks.backup.catalog import get_backup
    from dataops.tasks.backup.restore import restore
    from dataops.tasks.backup.storage import open_storage

    w = restore_world
    cfg = w["cfg"].parent / "with-rules.yaml"
    import yaml

    body = yaml.safe_load(w["cfg"].read_text())
    body["anonymize"] = ANON
    cfg.write_text(yaml.safe_dump(body))
    env = {**os.environ, "DATAOPS_FAILPOINTS": "refresh.after_copy=pause(6)"}
    refreshing = subprocess.Popen([sys.executable, "-c", CHILD["refresh"].format(cfg=str(cfg))], env=env,
                                  stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not [d for d in leftovers(w["server"]) if "__dataops_refresh_" in d]:
            assert time.monotonic() < deadline and refreshing.poll() is None, "the refresh never built its copy"
            time.sleep(0.2)
        settings = load_settings(cfg)
        storage = open_storage(settings.storage)
        with pytest.raises(OperationFailed, match=r"another restore or refresh of 'staging' .* is running \(pid \d+, "
                                                  r"application_name dataops-refresh staging pid \d+ on "):
            restore(settings, storage, get_backup(storage, "production", "latest"), settings.env("staging"))
    finally:
        assert refreshing.wait(180) == 0, refreshing.stderr.read()[-2000:]
    assert leftovers(w["server"]) == []
