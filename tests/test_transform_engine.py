"""Batched transforms against a real PostgreSQL: resumable after kill -9, invalid rows
reported and untouched, revert back to the original checksum, one run at a time, short
transactions while the application keeps writing."""

from __future__ import annotations

import logging
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml

from dataops.dev.sample_app import create_schema, seed
from dataops.errors import BadInput, OperationFailed
from dataops.settings import TransformSettings, load_settings
from dataops.tasks import pg
from dataops.tasks.checksums import table_checksum
from dataops.tasks.transform.batches import Options, Overrides, next_batch_size
from dataops.tasks.transform.engine import revert, status, transform
from dataops.tasks.transform.plan import plan

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "transforms"


def write_settings(tmp_path: Path, dsn, transforms: Path = EXAMPLES, **options):
    path = tmp_path / "dataops.yaml"
    path.write_text(yaml.safe_dump({
        "environments": {"dev": {"role": "development", "database_url": dsn.secret()}},
        "storage": {"url": (tmp_path / "backups").as_uri()},
        "transforms": {"path": str(transforms), **options},
    }))
    return load_settings(path)


def write_transform(folder: Path, name: str, body: str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.py").write_text(textwrap.dedent(body))


def app_db(make_db, users: int = 300, seed_value: int = 42):
    dsn = make_db("xf")
    create_schema(dsn)
    seed(dsn, users=users, seed=seed_value)
    return dsn


def checksum(dsn, table: str, **kw) -> str:
    with pg.connect(dsn) as conn:
        return table_checksum(conn, "public", table, **kw).checksum


def query(dsn, q: str, params=None):
    with pg.connect(dsn) as conn:
        return conn.execute(q, params).fetchall()


def add_tax_amount(dsn) -> None:
    """What migration 0005 does (another area ships it)."""
    with pg.connect(dsn) as conn:
        conn.execute("ALTER TABLE orders ADD COLUMN tax_amount numeric(12,2)")
        conn.commit()


# -- the shipped examples --------------------------------------------------------------------------

def test_full_name_split_skips_and_reports_rows_without_a_first_name(make_db, tmp_path):
    dsn = app_db(make_db)
    settings = write_settings(tmp_path, dsn, batch_size=40)
    invalid_before = [r[0] for r in query(dsn, "SELECT id FROM users WHERE btrim(full_name) NOT LIKE '% %' ORDER BY id")]
    invalid_rows_before = query(dsn, "SELECT id, full_name, first_name, last_name, updated_at FROM users "
                                     "WHERE btrim(full_name) NOT LIKE '% %' ORDER BY id")
    assert invalid_before, "the sample data has names without a first name"

    s = transform(settings, settings.env("dev"), "users_split_full_name", Overrides(workers=2))

    assert s["status"] == "completed" and s["ranges"] == 2
    assert s["invalid"] == len(invalid_before)
    assert s["invalid_examples"] == [str(i) for i in invalid_before[:5]]
    assert s["changed"] == 300 - len(invalid_before) and s["unchanged"] == 0 and s["scanned"] == 300
    # invalid rows: exactly as they were (not even updated_at moved)
    assert query(dsn, "SELECT id, full_name, first_name, last_name, updated_at FROM users "
                      "WHERE btrim(full_name) NOT LIKE '% %' ORDER BY id") == invalid_rows_before
    # valid rows: split, and the split puts the name back together
    assert query(dsn, "SELECT count(*) FROM users WHERE btrim(full_name) LIKE '% %' "
                      "AND first_name || ' ' || last_name = btrim(full_name)")[0][0] == s["changed"]
    assert s["longest_tx_s"] < 1.0 and s["snapshot"]


@pytest.mark.parametrize("name, table", [("users_split_full_name", "users"), ("user_emails_normalize", "user_emails"),
                                         ("orders_backfill_tax_amount", "orders")])
def test_revert_returns_the_table_checksum_to_the_original(make_db, tmp_path, name, table):
    dsn = app_db(make_db)
    if table == "orders":
        add_tax_amount(dsn)
    settings = write_settings(tmp_path, dsn, batch_size=100)
    original = checksum(dsn, table)

    s = transform(settings, settings.env("dev"), name)
    assert s["changed"] > 0 and checksum(dsn, table) != original
    if name == "user_emails_normalize":
        assert s["deleted"] > 0
        assert query(dsn, "SELECT count(*) FROM user_emails WHERE email <> lower(btrim(email))")[0][0] == 0
        assert query(dsn, "SELECT count(*) FROM (SELECT user_id, email FROM user_emails GROUP BY 1, 2 "
                          "HAVING count(*) > 1) d")[0][0] == 0

    r = revert(settings, settings.env("dev"), name)

    assert r["status"] == "completed" and r["reverts"] == s["run_id"]
    assert checksum(dsn, table) == original  # updated_at included: the trigger did not stamp the restore
    if name == "user_emails_normalize":
        assert r["inserted"] == s["deleted"]
    runs = status(settings, settings.env("dev"), name)["runs"]
    assert [(x["action"], x["status"]) for x in runs] == [("revert", "completed"), ("run", "reverted")]
    with pytest.raises(BadInput, match="nothing to revert"):
        revert(settings, settings.env("dev"), name)


def test_revert_reinserts_the_rows_the_transform_deleted_and_no_others(make_db, tmp_path):
    dsn = app_db(make_db, users=200)
    settings = write_settings(tmp_path, dsn)
    s = transform(settings, settings.env("dev"), "user_emails_normalize")
    removed = sorted(int(r[0]) for r in query(dsn, "SELECT key[1] FROM dataops_transforms.deleted"))
    assert len(removed) == s["deleted"] > 0
    # after the transform, the application deletes a row the transform had normalized
    normalized = query(dsn, "SELECT min(e.id) FROM user_emails e JOIN dataops_snapshots.{} s USING (id)".format(
        s["snapshot"]))[0][0]
    with pg.connect(dsn) as conn:
        conn.execute("DELETE FROM user_emails WHERE id = %s", (normalized,))
        conn.commit()

    r = revert(settings, settings.env("dev"), "user_emails_normalize")

    assert r["inserted"] == len(removed)
    assert [x[0] for x in query(dsn, "SELECT id FROM user_emails WHERE id = ANY(%s) ORDER BY id", (removed,))] == removed
    assert query(dsn, "SELECT count(*) FROM user_emails WHERE id = %s", (normalized,))[0][0] == 0


def test_backfill_refuses_until_the_migration_added_the_column(make_db, tmp_path):
    dsn = app_db(make_db, users=50)
    settings = write_settings(tmp_path, dsn)
    orders = "SELECT md5(string_agg(o::text, '|' ORDER BY o.id)) FROM orders o"
    before = query(dsn, orders)
    with pytest.raises(BadInput, match='column "tax_amount" does not exist in table "public.orders"; '
                                       'run the migration that adds it first'):
        transform(settings, settings.env("dev"), "orders_backfill_tax_amount")
    assert query(dsn, orders) == before
    # no run recorded, no snapshot taken: nothing of ours was written either
    assert query(dsn, "SELECT count(*) FROM pg_tables WHERE schemaname = 'dataops_snapshots'") == [(0,)]
    assert query(dsn, "SELECT count(*) FROM pg_tables WHERE schemaname = 'dataops_transforms' "
                      "AND tablename = 'runs'")[0][0] == 0 or \
        query(dsn, "SELECT count(*) FROM dataops_transforms.runs") == [(0,)]


def test_dry_run_counts_and_previews_without_writing(make_db, tmp_path):
    dsn = app_db(make_db, users=100)
    settings = write_settings(tmp_path, dsn)
    before = checksum(dsn, "user_emails")
    p = plan(settings, settings.env("dev"), "user_emails_normalize", Options(workers=2))
    expected = query(dsn, "SELECT count(*) FROM user_emails e WHERE email <> lower(btrim(email)) OR EXISTS "
                          "(SELECT 1 FROM user_emails o WHERE o.user_id = e.user_id AND o.id < e.id "
                          "AND lower(btrim(o.email)) = lower(btrim(e.email)))")[0][0]
    assert p["needing_work"] == expected > 0 and p["would_change"] == expected
    assert len(p["ranges"]) == 2 and sum(r["rows"] for r in p["ranges"]) == p["rows"]
    assert p["preview"] and all(r["after"] == "(deleted)" or r["after"]["email"] == r["before"]["email"].strip().lower()
                                for r in p["preview"])
    assert checksum(dsn, "user_emails") == before
    assert query(dsn, "SELECT to_regnamespace('dataops_transforms') IS NULL")[0][0]


# -- crash safety -------------------------------------------------------------------------------------

BUMP_SQL = '''
    """Not idempotent on purpose: a batch applied twice would show in the checksum."""
    TABLE = "orders"
    SET = {"amount": "amount + 1"}
'''
BUMP_PANDAS = '''
    """The same, through pandas."""
    TABLE = "orders"
    COLUMNS = ["amount"]

    def change(df):
        return df[["amount"]] + 1
'''


@pytest.mark.parametrize("body", [BUMP_SQL, BUMP_PANDAS], ids=["sql", "pandas"])
def test_kill_9_in_the_middle_then_resume_matches_an_uninterrupted_run(make_db, tmp_path, body):
    killed_db, clean_db = app_db(make_db, users=200), app_db(make_db, users=200)
    folder = tmp_path / "transforms"
    write_transform(folder, "bump_amount", body)
    rows = query(killed_db, "SELECT count(*) FROM orders")[0][0]
    assert checksum(killed_db, "orders") == checksum(clean_db, "orders")

    (tmp_path / "clean").mkdir()
    clean_settings = write_settings(tmp_path / "clean", clean_db, folder, batch_size=25)
    clean = transform(clean_settings, clean_settings.env("dev"), "bump_amount", Overrides(workers=3))
    assert clean["changed"] == rows

    settings = write_settings(tmp_path, killed_db, folder, batch_size=25, throttle_ms=40)
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; from dataops.settings import load_settings; "
         "from dataops.tasks.transform.batches import Overrides; "
         "from dataops.tasks.transform.engine import transform; settings = load_settings(sys.argv[1]); "
         "transform(settings, settings.env('dev'), 'bump_amount', Overrides(workers=2))", settings.source],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            done = query(killed_db, "SELECT coalesce(sum(batches), 0) FROM dataops_transforms.ranges") \
                if query(killed_db, "SELECT to_regclass('dataops_transforms.ranges') IS NOT NULL")[0][0] else [(0,)]
            if done[0][0] >= 4:
                break
            assert child.poll() is None, f"the run ended before it could be killed: {child.stderr.read()!r}"
            assert time.monotonic() < deadline, "no batch committed within 60 s"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
    interrupted = status(settings, settings.env("dev"), "bump_amount")["runs"][0]
    assert interrupted["status"] == "interrupted" and 0 < interrupted["scanned"] < rows

    resumed = transform(settings, settings.env("dev"), "bump_amount", Overrides(throttle_ms=0, workers=1))

    assert resumed["run_id"] == interrupted["run_id"] and resumed["status"] == "completed"
    assert resumed["changed"] == rows and resumed["scanned"] == rows  # every row exactly once, across both sessions
    assert checksum(killed_db, "orders") == checksum(clean_db, "orders")


# -- one run at a time ---------------------------------------------------------------------------------

def test_a_second_concurrent_run_is_refused(make_db, tmp_path, caplog):
    dsn = app_db(make_db, users=200)
    settings = write_settings(tmp_path, dsn, batch_size=5, throttle_ms=100)  # about 1.5 s of batches
    outcome: dict = {}
    caplog.set_level(logging.INFO, logger="dataops.transform")

    def first():
        try:
            outcome["first"] = transform(settings, settings.env("dev"), "users_split_full_name", progress_every_s=0.3)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            outcome["first"] = exc

    t = threading.Thread(target=first)
    t.start()
    try:
        deadline = time.monotonic() + 30
        while not query(dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE "
                             "'dataops-transform:users_split_full_name:r%%'")[0][0]:
            assert time.monotonic() < deadline and t.is_alive(), f"the first run never started: {outcome}"
            time.sleep(0.02)
        with pytest.raises(OperationFailed, match=r"transform users_split_full_name is already running on dev \(pid \d+"):
            transform(settings, settings.env("dev"), "users_split_full_name")
        with pytest.raises(OperationFailed, match="already running"):
            revert(settings, settings.env("dev"), "users_split_full_name")
        assert status(settings, settings.env("dev"), "users_split_full_name")["runs"][0]["status"] == "running"
    finally:
        t.join(60)
    assert isinstance(outcome["first"], dict) and outcome["first"]["status"] == "completed", outcome
    progress = [m for m in caplog.messages if m.startswith("run users_split_full_name on dev: ")]
    assert re.search(r"\d+ of 200 rows \(\d+%\), \d+ left, .* rows/s, ETA", progress[0]), progress
    assert progress[-1].startswith("run users_split_full_name on dev: 200 of 200 rows (100%), 0 left"), progress


# -- short transactions under a concurrent writer --------------------------------------------------------

def test_longest_transaction_stays_under_the_bound_while_another_session_writes(make_db, tmp_path):
    dsn = app_db(make_db, users=500)
    settings = write_settings(tmp_path, dsn, batch_size=10, max_batch_seconds=1.0, throttle_ms=10)
    stop = threading.Event()
    waits: list[float] = []
    inserted: list[int] = []
    errors: list[BaseException] = []

    def writer():
        rng = random.Random(7)
        try:
            with pg.connect(dsn, autocommit=True) as conn:
                while not stop.is_set():
                    t0 = time.monotonic()
                    if rng.random() < 0.2:
                        uid = conn.execute("INSERT INTO users (email, full_name) VALUES (%s, 'New Person') RETURNING id",
                                           (f"new{len(inserted)}@example.com",)).fetchone()[0]
                        inserted.append(uid)
                    else:
                        conn.execute("UPDATE users SET phone = %s WHERE id = %s", (str(rng.random()), rng.randint(1, 500)))
                    waits.append(time.monotonic() - t0)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    try:
        s = transform(settings, settings.env("dev"), "users_split_full_name")
    finally:
        stop.set()
        t.join(10)
    assert not errors, errors
    assert len(waits) > 50 and s["batches"] > 5
    assert s["longest_tx_s"] < 1.0, s  # the bound, measured by the transform itself
    assert max(waits) < 1.5, f"a writer waited {max(waits):.2f} s for the transform's row locks"
    # the writer's rows were all checkpointed, none was left behind or applied twice
    assert s["scanned"] >= 500 and s["changed"] + s["invalid"] + s["unchanged"] == s["needing_work"]
    left = [r[0] for r in query(dsn, "SELECT id FROM users WHERE first_name IS NULL AND btrim(full_name) LIKE '% %'")]
    assert set(left) <= set(inserted), "only rows the writer added after the last batch may still need the split"


# -- the parts ----------------------------------------------------------------------------------------

def test_batch_size_adapts_toward_forty_percent_of_the_bound():
    opts = Options(batch_size=1000, max_batch_seconds=1.0)
    assert next_batch_size(1000, 0.1, opts) == 1500  # fast: at most x1.5
    assert next_batch_size(1000, 0.4, opts) == 1000  # on target
    assert next_batch_size(1000, 0.8, opts) == 500
    assert next_batch_size(1000, 9.0, opts) == 250  # far too slow: at most a quarter
    assert next_batch_size(9000, 0.01, opts) == 10_000  # grows to 10x batch_size at most
    assert next_batch_size(12, 9.0, opts) == 10  # never below 10 rows


def test_overrides_are_held_to_the_bounds_of_the_config():
    cfg = TransformSettings(batch_size=100, workers=2)
    assert Options.from_settings(cfg) == Options(batch_size=100, max_batch_seconds=1.0, throttle_ms=0, workers=2)
    assert Options.from_settings(cfg, Overrides(workers=4, max_batch_seconds=2)) == \
        Options(batch_size=100, max_batch_seconds=2.0, throttle_ms=0, workers=4)
    for name, value in [("batch_size", 0), ("batch_size", 1_000_001), ("max_batch_seconds", 0),
                        ("max_batch_seconds", 601), ("throttle_ms", -1), ("throttle_ms", 600_001), ("workers", 0),
                        ("workers", 65), ("workers", "many")]:
        with pytest.raises(BadInput, match=rf"^{name}: .* \(got {value!r}\)$"):
            Overrides(**{name: value})


@pytest.fixture(scope="module")
def schema_only_db(pg_server_dsn):
    name = f"xfbad_{os.getpid()}"
    pg.create_database(pg_server_dsn, name)
    dsn = pg_server_dsn.with_database(name)
    create_schema(dsn)
    yield dsn
    pg.drop_database(pg_server_dsn, name)


@pytest.mark.parametrize("body, message", [
    ('TABLE = "users"\nWHRE = "true"\nSET = {"phone": "NULL"}\n', "unknown setting WHRE; did you mean WHERE?"),
    ('TABLE = "users"\nSET = {"phone": "NULL"}\ndef change(df):\n    return df\n', "give exactly one of SET"),
    ('TABLE = "users"\nSET = {"phone": "NULL"}\nDELETE = "true"\n', 'needs SNAPSHOT = "\\*"'),
    ('TABLE = "users"\nSET = {"first_name": "x"}\nSNAPSHOT = ["last_name"]\n', "SNAPSHOT does not include first_name"),
    ('TABLE = "nope"\nSET = {"phone": "NULL"}\n', 'table "public.nope" does not exist'),
    ('TABLE = "users"\nSET = {"phone": "NULL"}\nWHERE = "no_such_column > 1"\n',
     'WHERE/VALID/SET/DELETE does not run on public.users: column "no_such_column" does not exist'),
    ('TABLE = "users"\nKEY = "full_name"\nSET = {"phone": "NULL"}\n', 'KEY "full_name" .* is not unique'),
    ('TABLE = "users"\nSET = {"id": "id + 1"}\n', "must not change its batch key"),
    ('TABLE = "users"\nSET = {"phone": "NULL"}\nVERIFY = "SELEC 1"\n', "VERIFY does not run"),
    ('import nosuchmodule\n', "cannot load the transform: ModuleNotFoundError"),
])
def test_bad_transform_modules_are_bad_input(schema_only_db, tmp_path, body, message):
    dsn = schema_only_db
    folder = tmp_path / "transforms"
    write_transform(folder, "bad", body)
    settings = write_settings(tmp_path, dsn, folder)
    with pytest.raises(BadInput, match=message):
        transform(settings, settings.env("dev"), "bad")
    with pytest.raises(BadInput, match=r"unknown transform 'nope' in .* \(known: bad\)"):
        plan(settings, settings.env("dev"), "nope", Options())


def test_a_table_without_planner_statistics_is_analyzed_before_the_batches(make_db, tmp_path):
    """A copy pg_restore just loaded has no statistics: at 9M rows the planner then chose a full
    scan for every keyset batch and the backfill gave up (bench_curves at 3M users)."""
    dsn = app_db(make_db)
    add_tax_amount(dsn)
    with pg.connect(dsn, autocommit=True) as conn:  # as pg_restore leaves a table: no statistics
        conn.execute("CREATE TABLE orders_fresh (LIKE orders INCLUDING ALL)")
        conn.execute("INSERT INTO orders_fresh SELECT * FROM orders")
        conn.execute("DROP TABLE orders CASCADE")
        conn.execute("ALTER TABLE orders_fresh RENAME TO orders")
        assert conn.execute("SELECT count(*) FROM pg_stats WHERE tablename = 'orders'").fetchone()[0] == 0
    settings = write_settings(tmp_path, dsn)
    transform(settings, settings.env("dev"), "orders_backfill_tax_amount")
    assert query(dsn, "SELECT last_analyze IS NOT NULL FROM pg_stat_user_tables WHERE relname = 'orders'") == [(True,)]
    assert query(dsn, "SELECT count(*) FROM orders WHERE tax_amount IS NULL") == [(0,)]
