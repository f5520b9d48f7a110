"""Kill a migration, and the rollback of one, at every failpoint of the apply and downgrade
paths; check the database holds whole revisions only; run the documented recovery; check again.

Two revisions, written into each test's folder, on a table `items` of 200 rows:
- 0001, transactional, two statements (a column on items, a new table `tags`);
- 0002, `transactional = False`: CREATE INDEX CONCURRENTLY IF NOT EXISTS items_a_idx, then
  items_b_idx, each committing by itself, as such revisions do.

After a kill (os._exit in the child, as kill -9), by this file's own queries:
- the schema (pg_dump --schema-only) is the one before or after a whole revision (S0, S1, S2),
  and alembic_version names that revision. The one state in between that is allowed: inside
  0002, S1 plus the statements 0002 already committed (items_a_idx built), the version still
  0001, since a non-transactional revision cannot be all or nothing. An INVALID index is in
  between too (pg_dump leaves INVALID indexes out, so they are queried apart): none may be left
  after a kill at a failpoint; a kill while the CREATE INDEX CONCURRENTLY builds may leave
  exactly the one it was building (test at the end);
- no advisory lock: the killed run's session ends with it, within a second even while its
  statement is waiting (the product sets client_connection_check_interval).

Recovery, as documented:
- `rollback`: the rollback-migration flow with the killed run's id (what the Crashed automation
  starts), driven by the run's audit row: the schema and revision from before the run, exactly,
  by downgrading (outcome rolled-back, not restored: a restore would lose every write made since
  the backup); the unfinished non-transactional revision's downgrade runs first, which removes
  what it left;
- `up`: migrate-database again: S2 at 0002 with every index valid; an INVALID index left by an
  interrupted build is dropped before 0002 runs (IF NOT EXISTS would keep it invalid for good),
  and preflight does not refuse the run for it.
A killed rollback is recovered by running the rollback again, or by `up`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from conftest import sampled
from test_crash_matrix import advisory_locks, schema

from dataops.failpoints import FAILPOINT_EXIT
from dataops.tasks import pg
from dataops.tasks.migration.audit import AuditRecord, ensure_table, history, load, save
from dataops.tasks.migration.checks import inspect_database
from dataops.tasks.migration.migrate import MigrationTarget, read_current, stamp, upgrade

# (failpoint, revision the run starts at) -> (state the database holds after the kill, its revision)
MIGRATE_CELLS = {
    ("migrate.before_revision", None): ("S0", None),
    ("migrate.inside_revision", None): ("S0", None),  # inside 0001: its open transaction rolls back
    ("migrate.inside_revision", "0001"): ("S1+a", "0001"),  # inside 0002: items_a_idx committed, unrecorded
    ("migrate.after_revision", None): ("S1", "0001"),  # 0001 committed, the audit does not list it yet
    ("migrate.after_revision", "0001"): ("S2", "0002"),
}
# the rollback of a run that went from base to 0002, killed: the database after the kill
ROLLBACK_CELLS = {
    "migrate.before_downgrade": ("S2", "0002"),
    "migrate.after_downgrade": ("S1", "0001"),  # 0002 undone and recorded; 0001 still to go
}
CELLS = sorted({p for p, _ in MIGRATE_CELLS} | set(ROLLBACK_CELLS))  # test_failpoints.py holds this against the code

REVISIONS = {
    "0001_items_note_and_tags": '''
        """a column on items and a table of tags: two statements, one transaction"""
        from alembic import op
        revision = "0001"
        down_revision = None
        transactional = True
        def upgrade():
            op.execute("ALTER TABLE public.items ADD COLUMN note text")
            op.execute("CREATE TABLE public.tags (id int PRIMARY KEY, item_id int REFERENCES public.items (id))")
        def downgrade():
            op.execute("DROP TABLE public.tags")
            op.execute("ALTER TABLE public.items DROP COLUMN note")
    ''',
    "0002_items_indexes": '''
        """two indexes built concurrently: each statement commits by itself"""
        from alembic import op
        revision = "0002"
        down_revision = "0001"
        transactional = False
        def upgrade():
            with op.get_context().autocommit_block():
                op.execute("CREATE INDEX CONCURRENTLY IF NOT EXISTS items_a_idx ON public.items (a)")
                op.execute("CREATE INDEX CONCURRENTLY IF NOT EXISTS items_b_idx ON public.items (b)")
        def downgrade():
            with op.get_context().autocommit_block():
                op.execute("DROP INDEX CONCURRENTLY IF EXISTS public.items_b_idx")
                op.execute("DROP INDEX CONCURRENTLY IF EXISTS public.items_a_idx")
    ''',
}
BUILD_A = "CREATE INDEX CONCURRENTLY items_a_idx ON public.items (a)"

CHILD = {
    "migrate": "from dataops.flows.migrate_database import migrate_database; migrate_database('app', config={cfg!r})",
    "rollback": ("from dataops.flows.rollback_migration import rollback_migration; "
                 "rollback_migration('app', {run_id!r}, config={cfg!r})"),
}


def child(operation: str, w: dict, failpoint: str | None = None, **kw) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_API_URL": w["api"], "DATAOPS_FAILPOINTS": f"{failpoint}=exit" if failpoint else ""}
    return subprocess.Popen([sys.executable, "-c", CHILD[operation].format(cfg=str(w["cfg"]), **kw)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def killed_at(proc: subprocess.Popen, point: str) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == FAILPOINT_EXIT, err[-3000:]
    assert f"failpoint {point}: exiting" in err


# -- invariants, by our own queries ----------------------------------------------------------------

def setup_items(dsn) -> None:
    with pg.connect(dsn) as conn:
        conn.execute("CREATE TABLE public.items (id int PRIMARY KEY, a int, b int)")
        conn.execute("INSERT INTO public.items SELECT g, g % 17, g % 5 FROM generate_series(1, 200) g")
        conn.commit()


def invalid_indexes(dsn) -> list[str]:
    with pg.connect(dsn) as conn:
        return [r[0] for r in conn.execute("SELECT indexrelid::regclass::text FROM pg_index WHERE NOT indisvalid "
                                           "ORDER BY 1")]


def locks_gone(server, timeout: float = 15) -> bool:
    """No advisory lock on the server, within `timeout`: a killed session's backend ends a moment
    after its client (at once when idle, within client_connection_check_interval when busy)."""
    deadline = time.monotonic() + timeout
    while advisory_locks(server):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def state(w: dict) -> tuple[str, str | None, list[str]]:
    """(which reference schema the database has, its recorded revision, its invalid indexes)."""
    dumped = schema(w["db"])
    name = next((k for k, v in w["states"].items() if v == dumped), "something in between")
    return name, read_current(w["db"]), invalid_indexes(w["db"])


_STATES: dict[str, str] = {}  # the reference schemas, built once per session


@pytest.fixture
def world(prefect_api, make_db, write_config, s3_bucket, tmp_path, pg_server_dsn):
    """`app` at base with 200 items, its migrations folder, and the reference schemas S0, S1,
    S1+a (S1 and 0002's first statement) and S2, each dumped from a database built to it."""
    path = tmp_path / "migrations"
    (path / "versions").mkdir(parents=True)
    repo = Path(__file__).resolve().parent.parent / "migrations"
    for name in ("env.py", "script.py.mako"):
        (path / name).write_text((repo / name).read_text())
    for name, source in REVISIONS.items():
        (path / "versions" / f"{name}.py").write_text(textwrap.dedent(source))

    db = make_db("app")
    setup_items(db)
    stamp(MigrationTarget(db, path), "base")  # the tool's own tables exist from the start, so every dump has them
    ensure_table(db)
    if not _STATES:
        ref = make_db("ref")
        setup_items(ref)
        stamp(MigrationTarget(ref, path), "base")
        ensure_table(ref)
        _STATES["S0"] = schema(ref)
        upgrade(MigrationTarget(ref, path), "0001")
        _STATES["S1"] = schema(ref)
        with pg.connect(ref, autocommit=True) as conn:
            conn.execute(BUILD_A)
            _STATES["S1+a"] = schema(ref)
            conn.execute("DROP INDEX public.items_a_idx")
        upgrade(MigrationTarget(ref, path), "0002")
        _STATES["S2"] = schema(ref)
        assert len(set(_STATES.values())) == 4
    states = dict(_STATES)

    def configure(**options) -> Path:
        return write_config({"app": ("staging", db)}, bucket=s3_bucket,
                            extra={"migrations": {"path": str(path), "lock_timeout": "2s", **options}})

    return {"db": db, "path": path, "cfg": configure(), "configure": configure, "states": states,
            "server": pg_server_dsn, "api": prefect_api}


def migrate_run_id(w: dict) -> str:
    return next(r.run_id for r in history(w["db"]) if r.action == "migrate")


def recover(w: dict, how: str, run_id: str, start: str | None) -> None:
    """The documented recovery, then: whole, recorded, nothing left."""
    from dataops.flows.migrate_database import migrate_database
    from dataops.flows.rollback_migration import rollback_migration

    if how == "rollback":
        r = rollback_migration("app", run_id, config=str(w["cfg"]))
        assert r["outcome"] == "rolled-back", r
        expected = ({None: "S0", "0001": "S1"}[start], start, [])
    else:
        r = migrate_database("app", config=str(w["cfg"]))
        assert r["outcome"] in ("succeeded", "nothing-to-do") and r["to_revision"] == "0002", r
        expected = ("S2", "0002", [])
    assert state(w) == expected
    assert locks_gone(w["server"], timeout=0)


# -- migrate -------------------------------------------------------------------------------------

# make test kills at every failpoint with one of its two recoveries (alternating); make test-crash runs both
MIGRATE_RUNS = [(p, s, r) for p, s in MIGRATE_CELLS for r in ("rollback", "up")]
MIGRATE_SAMPLE = {run for i, run in enumerate(MIGRATE_RUNS) if i % 4 in (0, 3)}  # rollback, up, rollback, ...


@pytest.mark.parametrize("point,start,recovery", sampled(MIGRATE_RUNS, MIGRATE_SAMPLE),
                         ids=[f"{p}@{s or 'base'}-{r}" for p, s, r in MIGRATE_RUNS])
def test_migration_killed_at_each_failpoint_leaves_whole_revisions_and_recovers(world, point, start, recovery):
    w = world
    if start:
        upgrade(MigrationTarget(w["db"], w["path"]), start)

    killed_at(child("migrate", w, point), point)

    assert locks_gone(w["server"])
    assert state(w) == (*MIGRATE_CELLS[point, start], [])
    record = load(w["db"], migrate_run_id(w))
    assert (record.phase, record.outcome, record.from_revision) == ("applying", "running", start)
    if point == "migrate.after_revision":  # the revision is in; the audit row does not say so yet
        assert record.applied == []

    recover(w, recovery, record.run_id, start)


# -- the rollback --------------------------------------------------------------------------------

ROLLBACK_RUNS = [(p, r) for p in ROLLBACK_CELLS for r in ("rollback", "up")]


@pytest.mark.parametrize("point,recovery", sampled(ROLLBACK_RUNS, {ROLLBACK_RUNS[0], ROLLBACK_RUNS[3]}),
                         ids=[f"{p}-{r}" for p, r in ROLLBACK_RUNS])
def test_rollback_killed_at_each_failpoint_leaves_whole_revisions_and_runs_again(world, point, recovery):
    w = world
    before = inspect_database(w["db"], checksums=False).fingerprint
    upgrade(MigrationTarget(w["db"], w["path"]))
    failed = AuditRecord(run_id=str(uuid.uuid4()), action="migrate", environment="app", who="test", phase="validating",
                         from_revision=None, to_revision="0002", applied=["0001", "0002"], fingerprint_before=before)
    save(w["db"], failed.finish("failed", "post-migration checks failed"))

    killed_at(child("rollback", w, point, run_id=failed.run_id), point)

    assert locks_gone(w["server"])
    assert state(w) == (*ROLLBACK_CELLS[point], [])
    recover(w, recovery, failed.run_id, None)


# -- killed while CREATE INDEX CONCURRENTLY builds ------------------------------------------------

@pytest.mark.parametrize("recovery", sampled(["rollback", "up"], {"rollback"}))
def test_migration_killed_while_an_index_builds_concurrently_leaves_it_invalid_and_recovery_removes_it(
        world, recovery):
    """kill -9 while 0002's first build waits for a writer (a transaction the test holds open):
    the server ends the session within client_connection_check_interval, so the migration lock
    goes although the writer is still there, and the index stays behind INVALID. The rollback
    undoes 0002's unfinished part; `up` drops the INVALID index and builds it again.

    lock_timeout is long here: the build's wait for the writer is a lock wait, which a short
    lock_timeout would end by itself (and the session with it, at the error it cannot send);
    what is tested is that a dead client is noticed while the statement still runs."""
    w = world
    w["configure"](lock_timeout="120s")
    upgrade(MigrationTarget(w["db"], w["path"]), "0001")
    writer = psycopg.connect(w["db"].conninfo(application_name="writer"))
    try:
        writer.execute("UPDATE public.items SET a = a WHERE id = 1")  # open: the build waits for it
        proc = child("migrate", w)
        deadline = time.monotonic() + 120
        while not invalid_indexes(w["db"]):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.1)
        with pg.connect(w["db"], autocommit=True) as conn:  # still building: waiting for the writer
            assert conn.execute("SELECT count(*) FROM pg_stat_progress_create_index").fetchone()[0] == 1
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        assert locks_gone(w["server"], timeout=10)  # while the writer still holds its transaction
    finally:
        writer.rollback()
        writer.close()

    assert state(w) == ("S1", "0001", ["items_a_idx"])  # pg_dump leaves INVALID indexes out
    recover(w, recovery, migrate_run_id(w), "0001")
