"""Transforms over real keys: composite primary keys, unique indexes, keys of every common type
(int, bigint, text with commas and quotes, uuid, date, timestamp, timestamptz), quoted
mixed-case column names, and partitioned tables two levels deep. Each is run in small batches
over several key ranges, killed and resumed, and reverted; every check is this file's own query
on the rows, not the product's counters.

The transform bumps each row (amount + 1, note || '+', bumps + 1): not idempotent, so a batch
applied twice or a row skipped shows in the row itself.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from test_transform_engine import ROOT, query, write_settings, write_transform

from dataops.errors import BadInput
from dataops.failpoints import FAILPOINT_EXIT
from dataops.tasks import pg
from dataops.tasks.transform.batches import Options, Overrides
from dataops.tasks.transform.engine import revert, status, transform
from dataops.tasks.transform.plan import plan

N = 240  # rows per table

# name -> (DDL, key columns as quoted SQL)
TABLES = {
    "pk_text_int": (f"""
        CREATE TABLE pk_text_int (region text, id int, amount numeric(12,2) NOT NULL, note text NOT NULL,
                                  bumps int NOT NULL DEFAULT 0, PRIMARY KEY (region, id));
        INSERT INTO pk_text_int SELECT (ARRAY['eu', 'a,b', 'o''brien', '{{x}}', 'back\\slash', '"q"', 'Ä ü', ''])
                                       [1 + g % 8], g, g * 1.25, 'n' || g, 0
        FROM generate_series(1, {N}) g;""", '"region", "id"'),
    "Mixed Case": (f"""
        CREATE TABLE "Mixed Case" ("Order Id" bigint, "line.No" int, amount numeric(12,2) NOT NULL,
                                   note text NOT NULL, bumps int NOT NULL DEFAULT 0,
                                   PRIMARY KEY ("Order Id", "line.No"));
        INSERT INTO "Mixed Case" SELECT 5000000000 + g / 7, g % 7, g, 'n' || g, 0 FROM generate_series(1, {N}) g;""",
        '"Order Id", "line.No"'),
    "pk_date_uuid": (f"""
        CREATE TABLE pk_date_uuid (d date, u uuid, amount numeric(12,2) NOT NULL, note text NOT NULL,
                                   bumps int NOT NULL DEFAULT 0, PRIMARY KEY (d, u));
        INSERT INTO pk_date_uuid SELECT date '2024-02-27' + g % 5, md5(g::text)::uuid, g, 'n' || g, 0
        FROM generate_series(1, {N}) g;""", '"d", "u"'),
    "pk_ts_bigint": (f"""
        CREATE TABLE pk_ts_bigint (taken timestamp, seq bigint, amount numeric(12,2) NOT NULL, note text NOT NULL,
                                   bumps int NOT NULL DEFAULT 0, PRIMARY KEY (taken, seq));
        INSERT INTO pk_ts_bigint SELECT timestamp '2024-03-31 23:59:59.999999' + (g % 9) * interval '1.000001 s',
                                        g, g, 'n' || g, 0 FROM generate_series(1, {N}) g;""", '"taken", "seq"'),
    "pk_tstz": (f"""
        CREATE TABLE pk_tstz (at timestamptz PRIMARY KEY, amount numeric(12,2) NOT NULL, note text NOT NULL,
                              bumps int NOT NULL DEFAULT 0);
        INSERT INTO pk_tstz SELECT timestamptz '2024-10-27 00:59:59.123456+00' + g * interval '7 min 0.000001 s',
                                   g, 'n' || g, 0 FROM generate_series(1, {N}) g;""", '"at"'),
    "uniq_only": (f"""
        CREATE TABLE uniq_only (a int NOT NULL, b text NOT NULL, amount numeric(12,2) NOT NULL, note text NOT NULL,
                                bumps int NOT NULL DEFAULT 0);
        CREATE UNIQUE INDEX uniq_only_ab ON uniq_only (a, b) INCLUDE (note);
        INSERT INTO uniq_only SELECT g % 10, 'b' || g, g, 'n' || g, 0 FROM generate_series(1, {N}) g;""", '"a", "b"'),
}
REFUSED = """
CREATE TABLE nokey (a int, amount numeric, note text, bumps int);
CREATE TABLE nullable_unique (a int, b int, amount numeric, note text, bumps int, UNIQUE (a, b));
CREATE TABLE float_key (f double precision PRIMARY KEY, amount numeric, note text, bumps int);
CREATE TABLE parent_of (id int PRIMARY KEY, amount numeric, note text, bumps int);
CREATE TABLE child_of (extra int) INHERITS (parent_of);
INSERT INTO nokey VALUES (1, 1, 'n', 0);
"""
PARTITIONED = f"""
CREATE TABLE events (region text NOT NULL, id bigint NOT NULL, day date NOT NULL, amount numeric(12,2) NOT NULL,
                     note text NOT NULL, bumps int NOT NULL DEFAULT 0, updated_at timestamptz NOT NULL,
                     PRIMARY KEY (region, id, day)) PARTITION BY RANGE (day);
CREATE TABLE events_2024 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')
    PARTITION BY LIST (region);
CREATE TABLE events_2024_eu PARTITION OF events_2024 FOR VALUES IN ('eu');
CREATE TABLE events_2024_rest PARTITION OF events_2024 DEFAULT;
CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE events_other PARTITION OF events DEFAULT;
CREATE FUNCTION stamp() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.updated_at := clock_timestamp(); RETURN NEW; END $$;
CREATE TRIGGER events_stamp BEFORE UPDATE ON events FOR EACH ROW EXECUTE FUNCTION stamp();
-- a trigger of one partition only: a revert must silence it too
CREATE FUNCTION mark() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.note := NEW.note || '!'; RETURN NEW; END $$;
CREATE TRIGGER events_2025_mark BEFORE UPDATE ON events_2025 FOR EACH ROW EXECUTE FUNCTION mark();
INSERT INTO events SELECT (ARRAY['eu', 'us', 'ap'])[1 + g % 3], g / 2, date '2023-12-30' + (g * 5) % 800,
                          g, 'n' || g, 0, timestamptz '2024-01-01 00:00Z' + g * interval '1 minute'
FROM generate_series(1, {N}) g;
"""
LEAVES = ["events_2024_eu", "events_2024_rest", "events_2025", "events_other"]


def bump(table: str, extra: str = "") -> str:
    return f'''
        """Not idempotent on purpose: a batch applied twice shows in bumps, amount and note."""
        TABLE = {table!r}
        SET = {{"amount": "amount + 1", "note": "note || '+'", "bumps": "bumps + 1"}}
        SNAPSHOT = "*"
        {extra}
    '''


def bump_pandas(table: str) -> str:
    return f'''
        """The same, through pandas."""
        TABLE = {table!r}
        COLUMNS = ["amount", "note", "bumps"]
        SNAPSHOT = "*"

        def change(df):
            return df[["amount", "note", "bumps"]].assign(amount=df["amount"] + 1, note=df["note"] + "+",
                                                          bumps=df["bumps"] + 1)
    '''


# -- this file's own view of a table --------------------------------------------------------------

def rows(dsn, table: str, key: str) -> dict[str, tuple]:
    """{key as text: (amount, note, bumps)}, read with ONLY per partition-free query."""
    return {r[0]: tuple(r[1:]) for r in query(dsn, f'SELECT ROW({key})::text, amount, note, bumps FROM "{table}"')}


def content(dsn, table: str) -> tuple[int, str]:
    """Every column of every row, hashed: what a revert must give back (updated_at included)."""
    return query(dsn, f"""SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t::text COLLATE "C"), ''))
                          FROM "{table}" t""")[0]


def bumped_once(before: dict, after: dict, note_suffix: str = "+") -> None:
    assert after.keys() == before.keys()
    wrong = {k: (before[k], after[k]) for k in before
             if after[k] != (before[k][0] + 1, before[k][1] + note_suffix, before[k][2] + 1)}
    assert not wrong, f"{len(wrong)} rows not changed exactly once, e.g. {list(wrong.items())[:3]}"


def kill_at(point: str, op: str, cfg, name: str, tuning: dict) -> None:
    script = ("import sys; from dataops.settings import load_settings; "
              "from dataops.tasks.transform.batches import Overrides; "
              f"from dataops.tasks.transform.engine import {op}; s = load_settings(sys.argv[1]); "
              f"{op}(s, s.env('dev'), {name!r}, Overrides(**{tuning!r}))")
    killed = subprocess.run([sys.executable, "-c", script, str(cfg)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "DATAOPS_FAILPOINTS": f"{point}=exit"})
    assert killed.returncode == FAILPOINT_EXIT, killed.stderr[-3000:]


@pytest.fixture
def world(make_db, tmp_path):
    def make(sql_text: str, name: str, body: str, **options):
        dsn = make_db("xfk")
        with pg.connect(dsn) as conn:
            conn.execute(sql_text)
            conn.commit()
        write_transform(tmp_path / "transforms", name, body)
        return dsn, write_settings(tmp_path, dsn, tmp_path / "transforms", **options)
    return make


# -- composite and typed keys ---------------------------------------------------------------------

@pytest.mark.parametrize("table", list(TABLES))
def test_each_key_is_walked_in_ranges_once_and_reverted(world, table):
    ddl, key = TABLES[table]
    dsn, settings = world(ddl, "bump", bump(table), batch_size=7)
    before, original = rows(dsn, table, key), content(dsn, table)

    s = transform(settings, settings.env("dev"), "bump", Overrides(workers=3))

    assert (s["status"], s["ranges"], s["scanned"], s["changed"]) == ("completed", 3, N, N)
    assert s["batches"] >= 6  # several per range: batch ends fall inside groups of the first key column
    bumped_once(before, rows(dsn, table, key))
    bounds = query(dsn, "SELECT lo, hi, total FROM dataops_transforms.ranges ORDER BY range_no")
    assert bounds[0][0] is None and bounds[-1][1] is None and sum(b[2] for b in bounds) == N
    assert all(len(b[1] or b[0]) == key.count(",") + 1 for b in bounds[:2])  # one text per key column

    r = revert(settings, settings.env("dev"), "bump", Overrides(workers=2))
    assert (r["status"], r["changed"]) == ("completed", N)
    assert content(dsn, table) == original


def test_pandas_over_a_composite_key_with_quoted_mixed_case_columns(world):
    ddl, key = TABLES["Mixed Case"]
    dsn, settings = world(ddl, "bump", bump_pandas("Mixed Case"), batch_size=9)
    before, original = rows(dsn, "Mixed Case", key), content(dsn, "Mixed Case")
    s = transform(settings, settings.env("dev"), "bump", Overrides(workers=2))
    assert (s["status"], s["changed"]) == ("completed", N)
    bumped_once(before, rows(dsn, "Mixed Case", key))
    revert(settings, settings.env("dev"), "bump")
    assert content(dsn, "Mixed Case") == original


def test_dry_run_and_invalid_rows_show_composite_keys(world):
    ddl, key = TABLES["pk_text_int"]
    dsn, settings = world(ddl, "bump", bump("pk_text_int", 'VALID = "id % 50 <> 0"'), batch_size=11)
    p = plan(settings, settings.env("dev"), "bump", Options(workers=3))
    assert p["key"] == "region, id" and len(p["ranges"]) == 3 and sum(r["rows"] for r in p["ranges"]) == N
    invalid = [r[0] for r in query(dsn, "SELECT ROW(region, id)::text FROM pk_text_int WHERE id % 50 = 0 "
                                        "ORDER BY region, id")]
    assert p["invalid"] == len(invalid) and p["invalid_examples"] == invalid[:5]
    assert p["preview"][0]["key"].startswith("(")
    s = transform(settings, settings.env("dev"), "bump")
    assert s["invalid"] == len(invalid) and sorted(s["invalid_examples"]) == sorted(invalid[:5])


def test_deleted_rows_of_a_composite_key_are_put_back_by_the_revert(world):
    ddl, key = TABLES["pk_date_uuid"]
    dsn, settings = world(ddl, "trim", '''
        """Bump some rows, delete others."""
        TABLE = "pk_date_uuid"
        SET = {"bumps": "bumps + 1"}
        DELETE = "amount::int % 4 = 0"
        SNAPSHOT = "*"
    ''', batch_size=13)
    original = content(dsn, "pk_date_uuid")
    doomed = query(dsn, "SELECT ROW(d, u)::text FROM pk_date_uuid WHERE amount::int % 4 = 0 ORDER BY 1")
    s = transform(settings, settings.env("dev"), "trim", Overrides(workers=2))
    assert s["deleted"] == len(doomed) == N // 4
    assert query(dsn, "SELECT count(*) FROM pk_date_uuid WHERE amount::int % 4 = 0") == [(0,)]
    recorded = query(dsn, "SELECT ROW(key[1]::date, key[2]::uuid)::text FROM dataops_transforms.deleted ORDER BY 1")
    assert recorded == doomed
    r = revert(settings, settings.env("dev"), "trim")
    assert r["inserted"] == len(doomed) and content(dsn, "pk_date_uuid") == original


def test_a_composite_key_transform_killed_mid_run_and_mid_revert_resumes_exactly(world):
    ddl, key = TABLES["Mixed Case"]
    dsn, settings = world(ddl, "bump", bump("Mixed Case"), batch_size=10)
    tuning = {"batch_size": 10, "workers": 2}
    before, original = rows(dsn, "Mixed Case", key), content(dsn, "Mixed Case")

    kill_at("transform.after_checkpoint", "transform", settings.source, "bump", tuning)
    kill_at("transform.before_checkpoint", "transform", settings.source, "bump", tuning)
    half = rows(dsn, "Mixed Case", key)
    changed = {k for k in half if half[k] != before[k]}
    assert 0 < len(changed) < N
    # the checkpoints and the rows agree: exactly the keys up to each range's checkpoint are changed
    done = {r[0] for r in query(dsn, '''
        SELECT ROW(m."Order Id", m."line.No")::text FROM "Mixed Case" m JOIN dataops_transforms.ranges r ON
            (r.lo IS NULL OR (m."Order Id", m."line.No") > (r.lo[1]::bigint, r.lo[2]::int))
            AND (r.hi IS NULL OR (m."Order Id", m."line.No") <= (r.hi[1]::bigint, r.hi[2]::int))
        WHERE r.finished OR (m."Order Id", m."line.No") <= (r.last_key[1]::bigint, r.last_key[2]::int)''')}
    assert done == changed

    s = transform(settings, settings.env("dev"), "bump", Overrides(**tuning))
    assert (s["status"], s["scanned"], s["changed"]) == ("completed", N, N)  # across the sessions: once each
    bumped_once(before, rows(dsn, "Mixed Case", key))

    kill_at("revert.after_checkpoint", "revert", settings.source, "bump", tuning)
    assert content(dsn, "Mixed Case") != original
    r = revert(settings, settings.env("dev"), "bump", Overrides(**tuning))
    assert (r["status"], r["changed"]) == ("completed", N)
    assert content(dsn, "Mixed Case") == original


# -- partitioned tables ---------------------------------------------------------------------------

def triggers_on(dsn) -> list[tuple]:
    return query(dsn, "SELECT tgrelid::regclass::text, tgname, tgenabled FROM pg_trigger WHERE NOT tgisinternal "
                      "ORDER BY 1, 2")


def test_a_partitioned_table_is_run_through_every_partition_resumed_and_reverted(world):
    dsn, settings = world(PARTITIONED, "bump", bump("events"), batch_size=8)
    key = "region, id, day"
    tuning = {"batch_size": 8, "workers": 2}
    per_leaf = {leaf: content(dsn, leaf) for leaf in LEAVES}
    assert all(n > 10 for n, _ in per_leaf.values()), per_leaf  # rows in every leaf, two levels down
    before, enabled = rows(dsn, "events", key), triggers_on(dsn)

    kill_at("transform.after_checkpoint", "transform", settings.source, "bump", tuning)
    half = rows(dsn, "events", key)
    assert 0 < sum(half[k] != before[k] for k in half) < N
    s = transform(settings, settings.env("dev"), "bump", Overrides(**tuning))
    assert (s["status"], s["scanned"], s["changed"]) == ("completed", N, N)
    after = rows(dsn, "events", key)
    in_2025 = {r[0] for r in query(dsn, "SELECT ROW(region, id, day)::text FROM events_2025")}
    bumped_once({k: v for k, v in before.items() if k not in in_2025}, {k: v for k, v in after.items()
                                                                         if k not in in_2025})
    bumped_once({k: v for k, v in before.items() if k in in_2025}, {k: v for k, v in after.items() if k in in_2025},
                "+!")  # the partition's own trigger ran on the change
    assert query(dsn, "SELECT count(*) FROM events WHERE updated_at < '2024-01-02'") == [(0,)]  # stamped

    kill_at("revert.after_checkpoint", "revert", settings.source, "bump", tuning)
    r = revert(settings, settings.env("dev"), "bump", Overrides(**tuning))
    assert (r["status"], r["changed"]) == ("completed", N)
    # every leaf as it was, updated_at and note included: no trigger fired on the restore, in any partition
    assert {leaf: content(dsn, leaf) for leaf in LEAVES} == per_leaf
    assert triggers_on(dsn) == enabled and all(t[2] == "O" for t in enabled)


# -- what is refused, before anything is written ----------------------------------------------------

@pytest.mark.parametrize("table, key, message", [
    ("nokey", None, r'^table "public.nokey" has no primary key and no unique index on NOT NULL columns, so a '
                    r'transform cannot walk it in batches; add a primary key \(ALTER TABLE public.nokey ADD PRIMARY '
                    r"KEY \(...\)\), or a unique index on NOT NULL columns and set KEY in fix.py$"),
    ("nullable_unique", None, "has no primary key and no unique index on NOT NULL columns"),
    ("nullable_unique", '["b", "a"]', 'KEY column "a" of table "public.nullable_unique" may be NULL'),
    ("nullable_unique", '["a"]', 'KEY "a" of fix.py is not unique'),
    ("nullable_unique", '["a", "zz"]', 'column "zz" does not exist in table "public.nullable_unique"'),
    ("float_key", None, 'key column "f" of table "public.float_key" is double precision'),
    ("parent_of", None, 'table "public.parent_of" has 1 inheritance child table'),
    ("pk_text_int", '["region", "id", "region"]', "KEY must be a column name or a list of column names"),
])
def test_a_table_without_a_usable_key_is_refused_before_anything_is_written(world, table, key, message):
    dsn, settings = world(REFUSED + TABLES["pk_text_int"][0], "fix",
                          bump(table, f"KEY = {key}" if key else ""))
    with pg.connect(dsn) as conn:
        before = conn.execute(f"SELECT md5(string_agg(t::text, '|' ORDER BY t::text)) FROM {table} t").fetchone()
    with pytest.raises(BadInput, match=message):
        transform(settings, settings.env("dev"), "fix")
    with pg.connect(dsn) as conn:
        assert conn.execute(f"SELECT md5(string_agg(t::text, '|' ORDER BY t::text)) FROM {table} t").fetchone() \
            == before
    assert query(dsn, "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'dataops%'") == [(0,)]


def test_a_key_given_in_another_order_walks_the_index_order(world):
    ddl, key = TABLES["uniq_only"]
    dsn, settings = world(ddl, "bump", bump("uniq_only", 'KEY = ["b", "a"]'), batch_size=50)
    before = rows(dsn, "uniq_only", key)
    s = transform(settings, settings.env("dev"), "bump")
    assert s["changed"] == N
    bumped_once(before, rows(dsn, "uniq_only", key))
    assert query(dsn, "SELECT key_column FROM dataops_transforms.runs") == [(["a", "b"],)]


# -- state tables of an earlier version --------------------------------------------------------------

def test_an_interrupted_run_of_the_single_key_version_resumes_after_the_upgrade(world):
    """Before composite keys, checkpoints were text: the upgrade turns them into one-element
    arrays in place, and the interrupted run resumes where it stopped."""
    ddl = f"""CREATE TABLE items (id int PRIMARY KEY, amount numeric(12,2) NOT NULL, note text NOT NULL,
                                  bumps int NOT NULL DEFAULT 0);
              INSERT INTO items SELECT g, g, 'n' || g, 0 FROM generate_series(1, {N}) g;"""
    dsn, settings = world(ddl, "bump", bump("items"), batch_size=10)
    before = rows(dsn, "items", "id")
    kill_at("transform.after_checkpoint", "transform", settings.source, "bump", {"batch_size": 10, "workers": 2})
    with pg.connect(dsn) as conn:  # back to the earlier layout, as that version left it
        for table, column in (("ranges", "lo"), ("ranges", "hi"), ("ranges", "last_key"), ("deleted", "key"),
                              ("runs", "key_column")):
            conn.execute(f"ALTER TABLE dataops_transforms.{table} ALTER {column} TYPE text USING {column}[1]")
        conn.commit()
    assert query(dsn, "SELECT count(*) FROM dataops_transforms.ranges WHERE last_key ~ '^[0-9]+$'")[0][0] >= 1
    assert status(settings, settings.env("dev"), "bump")["runs"][0]["status"] == "interrupted"

    s = transform(settings, settings.env("dev"), "bump")

    assert (s["status"], s["scanned"], s["changed"]) == ("completed", N, N)
    bumped_once(before, rows(dsn, "items", "id"))
    assert query(dsn, "SELECT format_type(atttypid, NULL) FROM pg_attribute WHERE attrelid = "
                      "'dataops_transforms.ranges'::regclass AND attname = 'last_key'") == [("text[]",)]


def test_date_and_timestamptz_keys_mean_the_same_rows_in_sessions_with_other_time_settings(world):
    """The run is killed in New York and resumed in Kolkata (DMY dates); the revert runs in UTC:
    checkpoints and the keys of deleted rows must still name the same rows. The sessions' DateStyles
    are not ISO either (psycopg reads timestamptz only in ISO: dataops sets the output style, and
    keeps the input order)."""
    ddl = f"""CREATE TABLE stamped (day date, at timestamptz, amount numeric(12,2) NOT NULL, note text NOT NULL,
                                    bumps int NOT NULL DEFAULT 0, PRIMARY KEY (day, at));
              INSERT INTO stamped SELECT date '2024-03-09' + g % 3, timestamptz '2024-03-10 06:59:59.999999Z'
                                         + g * interval '13 min 0.000001 s', g, 'n' || g, 0
              FROM generate_series(1, {N}) g;"""
    dsn, settings = world(ddl, "trim", '''
        """Bump some rows, delete others."""
        TABLE = "stamped"
        SET = {"bumps": "bumps + 1"}
        DELETE = "amount::int % 3 = 0"
        SNAPSHOT = "*"
    ''', batch_size=10)
    original = content(dsn, "stamped")
    os.environ.update(PGTZ="America/New_York", PGDATESTYLE="ISO, DMY")
    kill_at("transform.after_checkpoint", "transform", settings.source, "trim", {"batch_size": 10, "workers": 2})
    os.environ.update(PGTZ="Asia/Kolkata", PGDATESTYLE="SQL, DMY")
    s = transform(settings, settings.env("dev"), "trim", Overrides(workers=2))
    assert (s["scanned"], s["deleted"]) == (N, N // 3)
    assert query(dsn, "SELECT count(*), min(bumps), max(bumps) FROM stamped") == [(N - N // 3, 1, 1)]
    os.environ.update(PGTZ="UTC", PGDATESTYLE="Postgres, MDY")
    r = revert(settings, settings.env("dev"), "trim")
    assert r["inserted"] == N // 3
    assert content(dsn, "stamped") == original


def test_an_empty_table_with_a_composite_key_is_done_at_once_and_reverts(world):
    ddl, key = TABLES["pk_text_int"]
    dsn, settings = world(ddl + "DELETE FROM pk_text_int;", "bump", bump("pk_text_int"))
    p = plan(settings, settings.env("dev"), "bump", Options(workers=3))
    assert (p["rows"], p["ranges"]) == (0, [{"lo": None, "hi": None, "rows": 0}])
    s = transform(settings, settings.env("dev"), "bump", Overrides(workers=3))
    assert (s["status"], s["scanned"], s["ranges"]) == ("completed", 0, 1)
    assert revert(settings, settings.env("dev"), "bump")["status"] == "completed"


OPERATOR_TRIGGERS = f"""
CREATE TABLE audited (id int PRIMARY KEY, amount numeric NOT NULL, note text NOT NULL, bumps int NOT NULL DEFAULT 0,
                      touched int NOT NULL DEFAULT 0);
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.touched := NEW.touched + 1; RETURN NEW; END $$;
CREATE TRIGGER a_on BEFORE UPDATE ON audited FOR EACH ROW EXECUTE FUNCTION touch();
CREATE TRIGGER b_off BEFORE UPDATE ON audited FOR EACH ROW EXECUTE FUNCTION touch();
CREATE TRIGGER c_always BEFORE UPDATE ON audited FOR EACH ROW EXECUTE FUNCTION touch();
CREATE TRIGGER d_replica BEFORE UPDATE ON audited FOR EACH ROW EXECUTE FUNCTION touch();
ALTER TABLE audited DISABLE TRIGGER b_off;
ALTER TABLE audited ENABLE ALWAYS TRIGGER c_always;
ALTER TABLE audited ENABLE REPLICA TRIGGER d_replica;
INSERT INTO audited SELECT g, g, 'n' || g FROM generate_series(1, {N}) g;
"""


def test_a_revert_leaves_each_trigger_in_the_mode_the_operator_set(world):
    dsn, settings = world(OPERATOR_TRIGGERS, "bump", bump("audited"), batch_size=9)
    modes, original = triggers_on(dsn), content(dsn, "audited")
    assert [m for _, _, m in modes] == ["O", "D", "A", "R"]

    transform(settings, settings.env("dev"), "bump", Overrides(workers=2))
    # a_on and c_always fired on the change; the switched-off and the replica-only triggers did not
    assert query(dsn, "SELECT min(touched), max(touched) FROM audited") == [(2, 2)]
    r = revert(settings, settings.env("dev"), "bump", Overrides(workers=2))

    assert (r["status"], r["changed"]) == ("completed", N)
    assert content(dsn, "audited") == original  # no trigger fired on the restore
    assert triggers_on(dsn) == modes  # b_off still off, c_always and d_replica as they were
