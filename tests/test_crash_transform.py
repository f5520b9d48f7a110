"""Kill a transform, its revert and an in-place anonymize at every failpoint, check nothing is
half done, run it again, check it recovered, and that a revert still gets the original back.

Each cell runs the operation in a child process with one failpoint armed to `exit` (os._exit:
no `finally`, no `except`, connections dropped, as kill -9 leaves them) and checks, with this
file's own queries rather than the product's:
- transform and revert: every row is either untouched or fully transformed (or, for a revert,
  fully restored); the rows the checkpoints of the killed run call done are exactly the changed
  ones (a kill between a batch's change and its checkpoint rolls both back); no advisory lock
  is left; after the run is resumed every row was changed exactly once (the transform is not
  idempotent: a batch applied twice shows in `bumps`), and the revert gives back the table's
  original rows, hashed.
- anonymize: it is one transaction, so the database holds either its old content or the
  content one complete run writes, never a part; the next run leaves it masked with no
  original value left, and rewritten by VACUUM FULL.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import sampled
from test_crash_matrix import advisory_locks, content, schema
from test_refresh_staging import ANON
from test_transform_engine import ROOT, query, write_settings, write_transform

from dataops.dev.sample_app import create_schema, seed
from dataops.failpoints import FAILPOINT_EXIT
from dataops.settings import load_settings
from dataops.tasks import pg
from dataops.tasks.transform.batches import Overrides
from dataops.tasks.transform.engine import revert, transform

RUN_CELLS = ["transform.before_checkpoint", "transform.after_checkpoint", "transform.before_checks"]
REVERT_CELLS = ["revert.before_checkpoint", "revert.after_checkpoint"]
ANONYMIZE_CELLS = {"anonymize.before_commit": "old", "anonymize.after_commit": "masked"}
REPORT_CELLS = ["anonymize.report_before_rename"]
CELLS = [*RUN_CELLS, *REVERT_CELLS, *ANONYMIZE_CELLS, *REPORT_CELLS]  # test_failpoints.py holds this against the code

NAME = "bump_items"
ROWS = 200
TUNING = dict(batch_size=10, workers=2)  # about five batches per range: kills land mid-way
BUMP = {
    "sql": '''
        """Not idempotent on purpose: a batch applied twice shows in bumps, amount and note."""
        TABLE = "items"
        SET = {"amount": "amount + 1", "note": "note || '+'", "bumps": "bumps + 1"}
        SNAPSHOT = "*"
    ''',
    "pandas": '''
        """The same, through pandas (COPY into a temporary table, then UPDATE ... FROM)."""
        TABLE = "items"
        COLUMNS = ["amount", "note", "bumps"]
        SNAPSHOT = "*"

        def change(df):
            return df[["amount", "note", "bumps"]].assign(amount=df["amount"] + 1, note=df["note"] + "+",
                                                          bumps=df["bumps"] + 1)
    ''',
}
ITEMS = f"""
CREATE TABLE items (id integer PRIMARY KEY, amount numeric(12,2) NOT NULL, note text NOT NULL,
                    bumps integer NOT NULL DEFAULT 0, updated_at timestamptz NOT NULL);
CREATE FUNCTION stamp() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.updated_at := clock_timestamp(); RETURN NEW; END $$;
CREATE TRIGGER items_stamp BEFORE UPDATE ON items FOR EACH ROW EXECUTE FUNCTION stamp();
INSERT INTO items SELECT g, g * 1.25, 'n' || g, 0, timestamptz '2024-01-01 00:00Z' + g * interval '1 minute'
FROM generate_series(1, {ROWS}) g;
"""



def child(op: str) -> str:
    """`transform` or `revert` as a script, the config's path its argument."""
    return ("import sys; from dataops.settings import load_settings; "
            "from dataops.tasks.transform.batches import Overrides; "
            f"from dataops.tasks.transform.engine import {op}; s = load_settings(sys.argv[1]); "
            f"{op}(s, s.env('dev'), {NAME!r}, Overrides(**{TUNING!r}))")

ANONYMIZE_CHILD = ("import sys; from dataops.settings import load_settings; "
                   "from dataops.tasks.anonymize.in_place import anonymize; s = load_settings(sys.argv[1]); "
                   "anonymize(s, s.env('dev'))")


def kill_at(point: str, script: str, cfg) -> None:
    killed = subprocess.run([sys.executable, "-c", script, str(cfg)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "DATAOPS_FAILPOINTS": f"{point}=exit"})
    assert killed.returncode == FAILPOINT_EXIT, killed.stderr[-3000:]
    assert f"failpoint {point}: exiting" in killed.stderr


def app_schema(dsn) -> str:
    """The schema as pg_dump writes it, without the tool's own (dataops_transforms, dataops_snapshots)."""
    from pgserver._commands import POSTGRES_BIN_PATH

    conninfo, secret_env = dsn.libpq_args()
    out = subprocess.run([str(Path(POSTGRES_BIN_PATH) / "pg_dump"), "--schema-only", "--no-owner",
                          "--exclude-schema=dataops_*", f"--dbname={conninfo}"],
                         capture_output=True, text=True, env={**os.environ, **secret_env}, check=True).stdout
    return "\n".join(line for line in out.splitlines() if not line.startswith(("--", "\\restrict", "\\unrestrict")))


def no_lock_left(server) -> None:
    """The killed process's backends end a moment after it does: wait for their locks to go."""
    deadline = time.monotonic() + 15
    while advisory_locks(server):
        assert time.monotonic() < deadline, "an advisory lock outlived the killed process"
        time.sleep(0.05)


# -- what the table holds, by our own queries ---------------------------------------------------------

def rows(dsn) -> dict[int, tuple]:
    return {r[0]: r for r in query(dsn, "SELECT id, amount, note, bumps, updated_at::text FROM items")}


def bumped(original: tuple) -> tuple:
    """A row as one application of the transform leaves it (updated_at aside: the trigger stamps it)."""
    i, amount, note, bumps, _ = original
    return i, amount + 1, note + "+", bumps + 1


def checkpointed(dsn, run_id: int) -> set[int]:
    """The keys the ranges of `run_id` say are done: up to the checkpoint, or all of a finished range."""
    return {r[0] for r in query(dsn, """
        SELECT i.id FROM items i JOIN dataops_transforms.ranges r ON r.run_id = %s
            AND (r.lo IS NULL OR i.id > r.lo[1]::int) AND (r.hi IS NULL OR i.id <= r.hi[1]::int)
        WHERE r.finished OR i.id <= r.last_key[1]::int""", (run_id,))}


def ranges(dsn, run_id: int) -> list[tuple]:
    return query(dsn, "SELECT range_no, last_key, finished, changed, inserted, batches FROM dataops_transforms.ranges "
                      "WHERE run_id = %s ORDER BY range_no", (run_id,))


def runs(dsn) -> list[tuple]:
    return query(dsn, "SELECT id, action, status FROM dataops_transforms.runs ORDER BY id")


def triggers_enabled(dsn) -> bool:
    return query(dsn, "SELECT tgenabled FROM pg_trigger WHERE tgname = 'items_stamp'") == [("O",)]


def items_transform(dsn, tmp_path) -> tuple:
    """`items` loaded into `dsn` with the bump transform beside it: the config's path and the rows
    before, what the fault tests start from."""
    from test_transform_engine import write_settings, write_transform

    with pg.connect(dsn) as conn:
        conn.execute(ITEMS)
        conn.commit()
    write_transform(tmp_path / "transforms", NAME, BUMP["sql"])
    return write_settings(tmp_path, dsn, tmp_path / "transforms").source, rows(dsn)


def half_done_run(dsn, original: dict[int, tuple]) -> set[int]:
    """Check each row is untouched (every column, updated_at included) or changed exactly once;
    return the changed ones."""
    now, changed = rows(dsn), set()
    assert now.keys() == original.keys()
    for i, row in now.items():
        if row != original[i]:
            assert row[:4] == bumped(original[i]), f"row {i} is neither untouched nor changed once: {row}"
            changed.add(i)
    return changed


@pytest.fixture
def items(make_db, tmp_path, pg_server_dsn):
    def make(kind: str = "sql"):
        dsn = make_db("xfc")
        with pg.connect(dsn) as conn:
            conn.execute(ITEMS)
            conn.commit()
        write_transform(tmp_path / "transforms", NAME, BUMP[kind])
        settings = write_settings(tmp_path, dsn, tmp_path / "transforms")
        return {"dsn": dsn, "settings": settings, "cfg": settings.source, "server": pg_server_dsn,
                "original": rows(dsn), "content": content(dsn), "schema": app_schema(dsn)}
    return make


# -- a run ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("point, kind", sampled([(p, k) for p in RUN_CELLS for k in ("sql", "pandas")
                                                 if k == "sql" or p.endswith("_checkpoint")],  # pandas: its own write path
                                                {("transform.before_checkpoint", "sql")}))
def test_a_transform_killed_at_each_failpoint_leaves_whole_batches_and_resumes_them_once(items, point, kind):
    w = items(kind)
    dsn, original = w["dsn"], w["original"]
    if point == "transform.before_checkpoint":
        kill_at("transform.after_checkpoint", child("transform"), w["cfg"])  # some batches done first
        (run_id, *_), = runs(dsn)
        before = (rows(dsn), ranges(dsn, run_id))
        assert 0 < len(half_done_run(dsn, original)) < ROWS
    kill_at(point, child("transform"), w["cfg"])
    if point == "transform.after_checkpoint":  # and once more: a resumed run moves on by whole batches too
        kill_at(point, child("transform"), w["cfg"])

    (run_id, action, status), = runs(dsn)
    assert (action, status) == ("run", "running")  # interrupted: resumed by the next run, never reverted by it
    changed = half_done_run(dsn, original)
    assert changed == checkpointed(dsn, run_id)  # the checkpoints and the table agree, row by row
    done = ranges(dsn, run_id)
    assert sum(r[3] for r in done) == len(changed)
    if point == "transform.before_checkpoint":
        assert (rows(dsn), done) == before  # the killed batch left no trace, in the table or its checkpoint
    elif point == "transform.after_checkpoint":
        assert 0 < len(changed) < ROWS and sum(r[5] for r in done) >= 2
    else:
        assert changed == set(original) and all(r[2] for r in done)
    assert triggers_enabled(dsn)
    no_lock_left(w["server"])

    s = transform(w["settings"], w["settings"].env("dev"), NAME, Overrides(**TUNING))
    assert (s["run_id"], s["status"]) == (run_id, "completed")
    assert s["scanned"] == s["changed"] == ROWS  # across both sessions: every row exactly once
    assert half_done_run(dsn, original) == set(original)
    assert query(dsn, "SELECT count(*) FROM pg_tables WHERE schemaname = 'dataops_snapshots'") == [(1,)]

    r = revert(w["settings"], w["settings"].env("dev"), NAME, Overrides(**TUNING))
    assert r["reverts"] == run_id and r["status"] == "completed"
    assert (content(dsn), app_schema(dsn)) == (w["content"], w["schema"])
    assert [x[1:] for x in runs(dsn)] == [("run", "reverted"), ("revert", "completed")]
    no_lock_left(w["server"])


# -- a revert ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("point", sampled(REVERT_CELLS, {"revert.before_checkpoint"}))
def test_a_revert_killed_at_each_failpoint_restores_whole_batches_and_resumes(items, point):
    w = items()
    dsn, original = w["dsn"], w["original"]
    s = transform(w["settings"], w["settings"].env("dev"), NAME, Overrides(**TUNING))
    changed = rows(dsn)
    assert s["changed"] == ROWS and all(changed[i] != original[i] for i in original)
    if point == "revert.before_checkpoint":
        kill_at("revert.after_checkpoint", child("revert"), w["cfg"])  # some batches restored first
        rev_id = runs(dsn)[-1][0]
        before = (rows(dsn), ranges(dsn, rev_id))
    kill_at(point, child("revert"), w["cfg"])
    if point == "revert.after_checkpoint":
        kill_at(point, child("revert"), w["cfg"])

    assert [x[1:] for x in runs(dsn)] == [("run", "completed"), ("revert", "running")]
    rev_id = runs(dsn)[-1][0]
    now = rows(dsn)
    restored = {i for i in now if now[i] == original[i]}
    assert all(now[i] == changed[i] for i in set(now) - restored), "a row neither restored nor as the run left it"
    assert restored == checkpointed(dsn, rev_id)
    if point == "revert.before_checkpoint":
        assert (now, ranges(dsn, rev_id)) == before
    assert 0 < len(restored) < ROWS
    assert triggers_enabled(dsn)  # the batch turns them off and on in its own transaction
    no_lock_left(w["server"])

    r = revert(w["settings"], w["settings"].env("dev"), NAME, Overrides(**TUNING))
    assert (r["run_id"], r["reverts"], r["status"]) == (rev_id, s["run_id"], "completed")
    assert r["changed"] == ROWS  # across both sessions: every row written back once
    assert (content(dsn), app_schema(dsn)) == (w["content"], w["schema"])
    assert [x[1:] for x in runs(dsn)] == [("run", "reverted"), ("revert", "completed")]
    no_lock_left(w["server"])


# -- anonymize in place -------------------------------------------------------------------------------

MASKED = {  # column -> query of its values; none of the original ones may survive a run
    "users.email": "SELECT email FROM users", "user_emails.email": "SELECT email FROM user_emails",
    "users.phone": "SELECT phone FROM users WHERE phone IS NOT NULL",
    "users.address": "SELECT address FROM users WHERE address IS NOT NULL",
    "users.ip_address": "SELECT ip_address::text FROM users WHERE ip_address IS NOT NULL",
    "users.password_hash": "SELECT password_hash FROM users WHERE password_hash <> 'x'",
}
FILES = "SELECT pg_relation_filenode('users')"


def values(dsn) -> dict[str, set]:
    return {col: {r[0] for r in query(dsn, q)} for col, q in MASKED.items()}


@pytest.fixture
def anon_world(make_db, tmp_path, pg_server_dsn):
    """A development copy of production data (40 users), and a twin of it anonymized by one
    uninterrupted run: what "masked" must look like."""
    dev, twin = make_db("anon"), make_db("anontwin")
    create_schema(dev)
    seed(dev, users=40)
    with pg.connect(pg_server_dsn, autocommit=True, dbname="postgres") as conn:
        conn.execute(f'DROP DATABASE "{twin.database}"')
        conn.execute(f'CREATE DATABASE "{twin.database}" TEMPLATE "{dev.database}"')
    cfg = tmp_path / "dataops.yaml"
    cfg.write_text(yaml.safe_dump({
        "environments": {"dev": {"role": "development", "database_url": dev.secret()},
                         "twin": {"role": "development", "database_url": twin.secret()}},
        "storage": {"url": (tmp_path / "backups").as_uri()}, "anonymize": ANON}))
    settings = load_settings(cfg)
    from dataops.tasks.anonymize.in_place import anonymize

    original = values(dev)
    assert all(original.values()), original  # every masked column has values to leak
    assert anonymize(settings, settings.env("twin")).leaks.ok
    return {"dev": dev, "cfg": Path(cfg), "settings": settings, "server": pg_server_dsn, "original": original,
            "old": (content(dev), schema(dev)), "masked": (content(twin), schema(twin)),
            "files": query(dev, FILES)}


def leaked(w) -> dict[str, set]:
    now = values(w["dev"])
    return {c: now[c] & w["original"][c] for c in MASKED if now[c] & w["original"][c]}


@pytest.mark.parametrize("point", sampled(list(ANONYMIZE_CELLS), {"anonymize.before_commit"}))
def test_anonymize_killed_at_each_failpoint_is_all_or_nothing_and_the_next_run_masks_it(anon_world, point):
    from dataops.tasks.anonymize.in_place import anonymize

    w = anon_world
    assert w["masked"] != w["old"]
    kill_at(point, ANONYMIZE_CHILD, w["cfg"])

    assert (content(w["dev"]), schema(w["dev"])) == w[ANONYMIZE_CELLS[point]]  # all or nothing, triggers back on
    assert query(w["dev"], FILES) == w["files"]  # no VACUUM FULL yet: after a commit, old row versions are on disk
    no_lock_left(w["server"])

    report = anonymize(w["settings"], w["settings"].env("dev"))
    assert report.leaks.ok and leaked(w) == {}
    assert query(w["dev"], FILES) != w["files"]  # rewritten: the old row versions are gone with the old files
    if point == "anonymize.before_commit":
        assert (content(w["dev"]), schema(w["dev"])) == w["masked"]  # exactly what one run writes
    else:  # masked twice: still masked, but no longer the values a refresh from the same source writes
        assert schema(w["dev"]) == w["masked"][1]
        assert query(w["dev"], "SELECT count(*) FROM users") == [(40,)]
        assert query(w["dev"], "SELECT count(*) FROM audit_logs WHERE event_type IN ('login', 'password_change')") \
            == [(0,)]
    no_lock_left(w["server"])


def test_anonymize_killed_while_writing_its_report_leaves_no_half_report_and_the_next_run_writes_it(
        anon_world, prefect_api, tmp_path):
    """The report is written after the commit: a kill there leaves the database masked (as one run
    leaves it), no file at PATH (never half a report), and the next run writes it whole and clears
    the temporary file the killed one left."""
    from conftest import run_cli

    w = anon_world
    out = tmp_path / "reports" / "masking.json"
    out.parent.mkdir()
    env = {"PREFECT_API_URL": prefect_api}
    r = run_cli("--config", str(w["cfg"]), "anonymize", "dev", "--report", str(out),
                env={**env, "DATAOPS_FAILPOINTS": "anonymize.report_before_rename=exit"})
    assert r.returncode == FAILPOINT_EXIT, r.stderr
    assert not out.exists() and len(list(out.parent.glob(".masking.json.*.tmp"))) == 1
    assert (content(w["dev"]), schema(w["dev"])) == w["masked"] and leaked(w) == {}
    r = run_cli("--config", str(w["cfg"]), "anonymize", "dev", "--report", str(out), env=env)
    assert r.returncode == 0, r.stderr
    import json

    data = json.loads(out.read_text())
    assert {c["table"] for c in data["columns"]} >= {"users"} and list(out.parent.iterdir()) == [out]
    no_lock_left(w["server"])
