"""What may run beside a transform, on real processes: each pair is either kept apart by a lock
that names its holder, or shown here to be safe.

- two transforms of one table under different names: refused (per-table lock), and so a
  transform of a partitioned table and one of its partitions, either way round;
- transforms of two partitions of one table: safe, they run at once (disjoint rows);
- a migration (up or down) while a transform runs: refused, naming the transform; a transform
  while a migration runs: refused, naming the migration. Nothing is written by the refused one.

The running transform is a child process paused (failpoint `transform.before_checks=pause`)
after its last batch, its locks held: a window of known length in which the others try.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time

import pytest
from test_migrations_examples import migrations_copy
from test_transform_engine import ROOT, query, write_settings, write_transform
from test_transform_keyset import LEAVES, PARTITIONED, bump, content, rows

from dataops.dev.sample_app import create_schema, seed
from dataops.errors import OperationFailed
from dataops.tasks import pg
from dataops.tasks.migration.migrate import MigrationTarget, downgrade, lock_is_free, read_current, stamp, upgrade
from dataops.tasks.transform.engine import revert, transform

PAUSE_S = 6  # the window the paused transform holds its locks in


@contextlib.contextmanager
def paused_transform(settings, dsn, name: str):
    """`name` run in a child process that stops for PAUSE_S after its last batch, locks held.
    Yields the pid of the session holding its locks; on leaving, the child must have completed."""
    script = ("import sys; from dataops.settings import load_settings; "
              "from dataops.tasks.transform.engine import transform; s = load_settings(sys.argv[1]); "
              f"transform(s, s.env('dev'), {name!r})")
    child = subprocess.Popen([sys.executable, "-c", script, str(settings.source)], cwd=ROOT, text=True,
                             env={**os.environ, "DATAOPS_FAILPOINTS": f"transform.before_checks=pause({PAUSE_S})"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not query(dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                        (f"dataops-transform:{name}:checks",))[0][0]:
            assert child.poll() is None, f"the transform ended before its pause: {child.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "the transform did not reach its pause within 60 s"
            time.sleep(0.05)
        (pid,), = query(dsn, "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                        (f"dataops-transform:{name}",))
        t0 = time.monotonic()
        yield pid
        assert time.monotonic() - t0 < PAUSE_S - 0.5, "the checks took longer than the window: widen PAUSE_S"
        assert child.wait(60) == 0, child.stderr.read()[-3000:]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def holder(name: str, pid: int) -> str:
    """The words a refusal uses for the paused transform's session."""
    return rf"\(pid {pid}, application_name dataops-transform:{re.escape(name)}, user \w+, since [0-9T:Z-]+\)"


def run_rows(dsn) -> list[tuple]:
    if not query(dsn, "SELECT to_regclass('dataops_transforms.runs') IS NOT NULL")[0][0]:
        return []
    return query(dsn, "SELECT transform, action, status FROM dataops_transforms.runs ORDER BY id")


ITEMS = """CREATE TABLE items (id int PRIMARY KEY, amount numeric(12,2) NOT NULL, note text NOT NULL,
                              bumps int NOT NULL DEFAULT 0);
           INSERT INTO items SELECT g, g, 'n' || g, 0 FROM generate_series(1, 200) g;"""


@pytest.fixture
def world(make_db, tmp_path):
    def make(ddl: str, transforms: dict[str, str]):
        dsn = make_db("xfcc")
        with pg.connect(dsn) as conn:
            conn.execute(ddl)
            conn.commit()
        for name, body in transforms.items():
            write_transform(tmp_path / "transforms", name, body)
        return dsn, write_settings(tmp_path, dsn, tmp_path / "transforms", batch_size=20)
    return make


# -- two transforms of one table --------------------------------------------------------------------

def test_a_second_transform_of_the_same_table_under_another_name_is_refused_naming_the_first(world):
    dsn, settings = world(ITEMS, {"bump_a": bump("items"), "bump_b": bump("public.items")})
    before = rows(dsn, "items", "id")
    dev = settings.env("dev")

    with paused_transform(settings, dsn, "bump_a") as pid:
        for attempt in (transform, revert):
            with pytest.raises(OperationFailed, match=r"^another transform \(bump_a\) of public\.items is running "
                                                      + holder("bump_a", pid) + "; wait for it to finish"):
                attempt(settings, dev, "bump_b")

    after = rows(dsn, "items", "id")
    assert all(after[k] == (v[0] + 1, v[1] + "+", v[2] + 1) for k, v in before.items())  # bump_a once, bump_b never
    assert run_rows(dsn) == [("bump_a", "run", "completed")]  # the refused one recorded nothing
    assert query(dsn, "SELECT count(*) FROM pg_tables WHERE schemaname = 'dataops_snapshots'") == [(1,)]

    assert transform(settings, dev, "bump_b")["changed"] == 200  # once the first is done, the second runs
    assert all(r[2] == 2 for r in rows(dsn, "items", "id").values())


@pytest.mark.extended  # make test-crash (CI runs it after make test): keeps make test under 15 minutes
def test_a_partitioned_table_and_its_partitions_exclude_each_other_and_two_partitions_run_at_once(world):
    dsn, settings = world(PARTITIONED, {"whole": bump("events"), "leaf_eu": bump("events_2024_eu"),
                                        "mid_2024": bump("events_2024"), "leaf_2025": bump("events_2025")})
    dev = settings.env("dev")
    originals = {leaf: content(dsn, leaf) for leaf in LEAVES}

    with paused_transform(settings, dsn, "leaf_eu") as pid:  # a partition two levels down runs...
        for name, table in (("whole", "public.events"), ("mid_2024", "public.events_2024")):
            with pytest.raises(OperationFailed, match=rf"^another transform \(leaf_eu\) of a partition of "
                                                      rf"{re.escape(table)} is running " + holder("leaf_eu", pid)):
                transform(settings, dev, name)  # ...so its ancestors are refused
        s = transform(settings, dev, "leaf_2025")  # a partition beside it is not: disjoint rows
        assert s["status"] == "completed" and s["changed"] == content(dsn, "events_2025")[0]

    with paused_transform(settings, dsn, "whole") as pid:  # and the other way round
        for name, child in (("leaf_eu", "events_2024_eu"), ("mid_2024", "events_2024")):
            with pytest.raises(OperationFailed, match=r"^another transform \(whole\) of public\.events is running "
                                                      + holder("whole", pid) + rf".* \(public\.{child} is one of its "
                                                      r"partitions\)$"):
                transform(settings, dev, name)

    assert sorted(run_rows(dsn)) == [("leaf_2025", "run", "completed"), ("leaf_eu", "run", "completed"),
                                     ("whole", "run", "completed")]  # the refused ones recorded nothing
    # rows of each leaf: bumped once by "whole", once more by its own transform where it had one
    bumps = dict(query(dsn, "SELECT tableoid::regclass::text, array_agg(DISTINCT bumps) FROM events GROUP BY 1"))
    assert bumps == {"events_2024_eu": [2], "events_2024_rest": [1], "events_2025": [2], "events_other": [1]}
    for name in ("whole", "leaf_eu", "leaf_2025"):
        revert(settings, dev, name)
    assert {leaf: content(dsn, leaf) for leaf in LEAVES} == originals


# -- migrations and transforms ----------------------------------------------------------------------

SLOW = {"0009_slow": '''
    """a slow revision: a window in which the migration holds its locks"""
    from alembic import op
    revision = "0009"
    down_revision = "0008"
    transactional = True
    def upgrade():
        op.execute("CREATE TABLE public.applied_once (id int PRIMARY KEY)")
        op.execute("SELECT pg_sleep(4)")
    def downgrade():
        op.execute("DROP TABLE public.applied_once")
'''}


@pytest.fixture
def app(make_db, tmp_path):
    dsn = make_db("xfmig")
    create_schema(dsn)
    seed(dsn, users=120)
    write_transform(tmp_path / "transforms", "bump_orders", '''
        """Not idempotent: amount + 1."""
        TABLE = "orders"
        SET = {"amount": "amount + 1"}
        SNAPSHOT = ["amount"]
    ''')
    return dsn, write_settings(tmp_path, dsn, tmp_path / "transforms", batch_size=25)


def orders(dsn) -> dict:
    return dict(query(dsn, "SELECT id, amount FROM orders"))


def test_a_migration_is_refused_while_a_transform_runs_naming_it(app, tmp_path):
    dsn, settings = app
    mt = MigrationTarget(dsn, migrations_copy(tmp_path), label="dev")
    stamp(mt, "0002")
    before = orders(dsn)

    with paused_transform(settings, dsn, "bump_orders") as pid:
        words = rf"transform bump_orders: pid {pid}, application_name dataops-transform:bump_orders, user \w+"
        for attempt in (lambda: upgrade(mt, "0003"), lambda: downgrade(mt, steps=1)):
            with pytest.raises(OperationFailed, match=rf"^a data transform is running on dev \({words}.*\); a "
                                                      "migration does not change the schema under a transform's "
                                                      "batches: wait for it to finish"):
                attempt()
        assert re.match(rf"^a data transform is running on dev \({words}", lock_is_free(mt) or "")
        assert read_current(dsn) == "0002"  # nothing applied
        assert query(dsn, "SELECT count(*) FROM information_schema.columns WHERE table_name = 'users' "
                          "AND column_name = 'email_verified'") == [(0,)]

    assert all(amount == before[i] + 1 for i, amount in orders(dsn).items())
    assert lock_is_free(mt) is None
    assert upgrade(mt, "0003").revisions == ["0003"]  # the transform done, the migration goes ahead
    assert run_rows(dsn) == [("bump_orders", "run", "completed")]


def test_a_transform_is_refused_while_a_migration_runs_naming_it(app, tmp_path):
    dsn, settings = app
    mt = MigrationTarget(dsn, migrations_copy(tmp_path, **SLOW), label="dev")
    stamp(mt, "0008")
    before = orders(dsn)
    outcome: dict = {}

    def migrate() -> None:
        try:
            outcome["result"] = upgrade(mt, who="slow-migrator")
        except Exception as exc:  # noqa: BLE001 - asserted below
            outcome["result"] = exc

    t = threading.Thread(target=migrate)
    t.start()
    try:
        deadline = time.monotonic() + 30
        while not query(dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                             "'dataops-migrate slow-migrator' AND query LIKE '%%pg_sleep%%'")[0][0]:
            assert time.monotonic() < deadline and t.is_alive(), f"the migration never started: {outcome}"
            time.sleep(0.05)
        (pid,), = query(dsn, "SELECT pid FROM pg_stat_activity WHERE application_name = "
                             "'dataops-migrate slow-migrator'")
        for attempt in (transform, revert):
            with pytest.raises(OperationFailed, match=rf"^a migration is running on dev \(pid {pid}, application_name "
                                                      r"dataops-migrate slow-migrator, .*\); transform bump_orders "
                                                      "does not start while the schema changes"):
                attempt(settings, settings.env("dev"), "bump_orders")
        assert t.is_alive(), "the refusals came after the migration: they proved nothing"
    finally:
        t.join(60)
    assert outcome["result"].revisions == ["0009"], outcome
    assert orders(dsn) == before and run_rows(dsn) == []  # the refused transform wrote nothing
    assert query(dsn, "SELECT to_regnamespace('dataops_snapshots') IS NULL")[0][0]
    assert transform(settings, settings.env("dev"), "bump_orders")["status"] == "completed"  # afterwards it runs
