"""Table checksums against a real database.

One database per module holds the data; tests that change rows do it inside a
transaction that is rolled back, so each case costs a query, not a database.
"""

from __future__ import annotations

import subprocess
import uuid

import pytest

from dataops.errors import BadInput
from dataops.tasks import pg
from dataops.tasks.checksums import TableChecksum, table_checksum, table_checksums

DATA_SQL = """
CREATE TYPE mood AS ENUM ('happy', 'ok', 'sad');
CREATE TABLE people (id int PRIMARY KEY, name text, amount numeric, seen timestamptz, tags text[],
                     mood mood, score float8, payload jsonb, photo bytea, wait interval, born date);
CREATE TABLE people_copy (LIKE people INCLUDING ALL);
CREATE TABLE pairs (a int, b text);
CREATE TABLE empty (x int);
CREATE SCHEMA app;
CREATE TABLE app.things (id int, label varchar(20));
CREATE SCHEMA dataops_snapshots;
CREATE TABLE dataops_snapshots.s1 (id int);
INSERT INTO people
SELECT g, CASE WHEN g % 7 = 0 THEN NULL ELSE 'name ' || g END, g * 1.50,
       '2024-03-01 10:00+00'::timestamptz + g * interval '1 hour', ARRAY['t' || g, 'x,y'],
       (ARRAY['happy', 'ok', 'sad'])[g % 3 + 1]::mood, g / 3.0, jsonb_build_object('g', g, 'v', 1.10),
       decode(md5(g::text), 'hex'), g * interval '90 minutes', DATE '2000-01-01' + g
FROM generate_series(1, 500) g ORDER BY g;
INSERT INTO people VALUES (0, '', 1.0, 'infinity', '{}', NULL, '-0', '{}', '\\x', '0', '-infinity'),
                          (-1, NULL, 'NaN', NULL, NULL, NULL, 'NaN', NULL, NULL, NULL, NULL);
INSERT INTO people_copy SELECT * FROM people ORDER BY id DESC;
INSERT INTO pairs VALUES (1, 'x'), (2, 'y');
INSERT INTO app.things VALUES (1, 'one'), (2, 'two');
"""


@pytest.fixture(scope="module")
def data(pg_server_dsn):
    name = f"checksums_{uuid.uuid4().hex[:8]}"
    pg.create_database(pg_server_dsn, name)
    dsn = pg_server_dsn.with_database(name)
    with pg.connect(dsn, autocommit=True) as conn:
        conn.execute(DATA_SQL)
    yield dsn
    pg.drop_database(pg_server_dsn, name)


@pytest.fixture
def conn(data):
    with pg.connect(data) as conn:
        yield conn


def checksum_after(conn, change: str, table: str = "people_copy", **kwargs) -> TableChecksum:
    with conn.transaction(force_rollback=True):
        conn.execute(change)
        return table_checksum(conn, "public", table, **kwargs)


def test_same_rows_in_another_order_give_the_same_checksum(conn):
    original, copy = table_checksum(conn, "public", "people"), table_checksum(conn, "public", "people_copy")
    assert (copy.rows, copy.checksum, copy.columns) == (original.rows, original.checksum, original.columns)
    assert original.rows == 502
    assert original.columns == ("id", "name", "amount", "seen", "tags", "mood", "score", "payload", "photo", "wait",
                                "born")
    assert original.checksum.startswith("502:") and len(original.checksum) == len("502:") + 16


def test_one_changed_value_changes_the_checksum(conn):
    original = table_checksum(conn, "public", "people")
    for change in ["UPDATE people_copy SET name = 'name 4!' WHERE id = 4",
                   "UPDATE people_copy SET amount = 6.000 WHERE id = 4",  # 6.00 -> 6.000: same value, other text
                   "UPDATE people_copy SET score = 0 WHERE id = 0",  # -0 -> 0
                   "UPDATE people_copy SET seen = seen + interval '1 microsecond' WHERE id = 9",
                   "UPDATE people_copy SET mood = 'ok' WHERE id = 2",
                   "UPDATE people_copy SET tags = ARRAY['t5', 'x', 'y'] WHERE id = 5"]:
        assert checksum_after(conn, change).checksum != original.checksum, change


def test_added_or_duplicated_rows_change_the_checksum(conn):
    original = table_checksum(conn, "public", "people")
    added = checksum_after(conn, "INSERT INTO people_copy (id) VALUES (1000)")
    assert added.rows == original.rows + 1 and added.checksum != original.checksum
    deleted = checksum_after(conn, "DELETE FROM people_copy WHERE id = 3")
    assert deleted.rows == original.rows - 1
    pairs = table_checksum(conn, "public", "pairs")
    after = checksum_after(conn, "INSERT INTO pairs VALUES (1, 'x')", table="pairs")
    assert after.rows == 3 and after.checksum != pairs.checksum  # a duplicate row is not cancelled out


def test_values_swapped_between_rows_change_the_checksum(conn):
    original = table_checksum(conn, "public", "pairs")
    swapped = checksum_after(conn, "UPDATE pairs SET b = CASE b WHEN 'x' THEN 'y' ELSE 'x' END", table="pairs")
    assert swapped.rows == original.rows and swapped.checksum != original.checksum


def test_leaving_out_the_changed_column_gives_equal_checksums(conn):
    original = table_checksum(conn, "public", "people", exclude=["name"])
    changed = checksum_after(conn, "UPDATE people_copy SET name = upper(name)", exclude=["name"])
    assert changed.checksum == original.checksum and "name" not in changed.columns
    only = checksum_after(conn, "UPDATE people_copy SET name = upper(name)", columns=["born", "id"])
    assert only.columns == ("id", "born")  # table order, whatever order they were asked in
    assert only.checksum == table_checksum(conn, "public", "people", columns=["id", "born"]).checksum


def test_null_and_empty_string_differ(conn):
    with conn.transaction(force_rollback=True):
        conn.execute("CREATE TABLE one (v text); CREATE TABLE other (v text);"
                     "INSERT INTO one VALUES (NULL); INSERT INTO other VALUES ('')")
        assert table_checksum(conn, "public", "one").checksum != table_checksum(conn, "public", "other").checksum
        conn.execute("CREATE TABLE two (a text, b text); CREATE TABLE three (a text, b text);"
                     "INSERT INTO two VALUES ('x,y', NULL); INSERT INTO three VALUES ('x', 'y')")
        assert table_checksum(conn, "public", "two").checksum != table_checksum(conn, "public", "three").checksum


def test_empty_table(conn):
    assert table_checksum(conn, "public", "empty") == TableChecksum("empty", 0, "0:0000000000000000", ("x",))


def test_unknown_table_or_column_is_bad_input_naming_it(conn):
    with pytest.raises(BadInput, match='^table "public.nope" does not exist$'):
        table_checksum(conn, "public", "nope")
    with pytest.raises(BadInput, match='^table "app.people" does not exist$'):
        table_checksum(conn, "app", "people")
    with pytest.raises(BadInput, match='^column "x" does not exist in table "public.people"$'):
        table_checksum(conn, "public", "people", columns=["id", "x"])
    with pytest.raises(BadInput, match='^column "nmae" does not exist in table "public.people"$'):
        table_checksum(conn, "public", "people", exclude=["nmae"])
    with pytest.raises(BadInput, match='^table "public.nope" does not exist$'):
        table_checksums(conn, ["people", "nope"])
    with pytest.raises(BadInput, match='^exclude names table "public.peeple", which does not exist$'):
        table_checksums(conn, exclude={"peeple": ["name"]})
    with pytest.raises(BadInput, match='^columns names table "app.things", which is not in tables$'):
        table_checksums(conn, ["people"], columns={"app.things": ["id"]})


def test_session_output_settings_do_not_change_checksums_and_are_kept(conn):
    """Timestamps, floats, intervals and bytea print differently per session; the checksum must not."""
    expected = table_checksum(conn, "public", "people")
    conn.execute("SET TimeZone = 'Asia/Tokyo'; SET DateStyle = 'SQL, DMY'; SET extra_float_digits = 0;"
                 "SET IntervalStyle = 'sql_standard'; SET bytea_output = 'escape'")
    assert table_checksum(conn, "public", "people") == expected
    assert conn.execute("SELECT current_setting('TimeZone'), current_setting('bytea_output')").fetchone() == (
        "Asia/Tokyo", "escape")


def test_all_user_tables_by_default_keyed_like_row_counts(conn):
    sums = table_checksums(conn)
    assert list(sums) == ["app.things", "empty", "pairs", "people", "people_copy"]  # not dataops_snapshots.s1
    assert sums["app.things"].table == "app.things" and sums["app.things"].rows == 2
    picked = table_checksums(conn, ["people", "app.things"], columns={"people": ["id"]},
                             exclude={"app.things": ["label"]})
    assert list(picked) == ["people", "app.things"]
    assert picked["people"].columns == ("id",) and picked["app.things"].columns == ("id",)


def test_reads_inside_a_read_only_repeatable_read_transaction(conn):
    expected = table_checksums(conn)
    conn.rollback()
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    assert table_checksums(conn) == expected
    conn.execute("COMMIT")


def test_pg_dump_restore_copy_has_the_same_checksums(data, make_db):
    copy = make_db("restored")
    major, _ = pg.server_version(data)
    dump = subprocess.run([pg.client_binary("pg_dump", major), "--format=custom", f"--dbname={data.conninfo()}"],
                          capture_output=True)
    assert dump.returncode == 0, dump.stderr.decode()
    restore = subprocess.run([pg.client_binary("pg_restore", major), "--exit-on-error", f"--dbname={copy.conninfo()}"],
                             input=dump.stdout, capture_output=True)
    assert restore.returncode == 0, restore.stderr.decode()
    with pg.connect(data) as a, pg.connect(copy) as b:
        # The enum's OIDs differ in the copy; its checksum must not.
        enum_oid = "SELECT oid FROM pg_enum WHERE enumlabel = 'ok'"
        assert a.execute(enum_oid).fetchone() != b.execute(enum_oid).fetchone()
        assert table_checksums(a) == table_checksums(b)


def test_an_enum_is_matched_most_common_label_first_with_the_same_checksum(make_db):
    """The CASE that maps an enum's labels tries the column's most common values first
    (after ANALYZE); only the speed changes, never the checksum."""
    from dataops.tasks.checksums import checksum_sql

    db = make_db("enumfreq")
    with pg.connect(db, autocommit=True) as conn:
        conn.execute("CREATE TYPE mood AS ENUM ('happy', 'ok', 'sad'); CREATE TABLE t (id int, m mood);"
                     "INSERT INTO t SELECT g, CASE WHEN g % 10 = 0 THEN 'ok' WHEN g % 33 = 0 THEN NULL "
                     "ELSE 'sad' END::mood FROM generate_series(1, 400) g")

        def whens() -> list[str]:
            text = checksum_sql(conn, "public", "t")[0].as_string(conn)
            return sorted(("happy", "ok", "sad"), key=lambda w: text.index(f"WHEN '{w}'"))

        before = table_checksum(conn, "public", "t")
        assert whens() == ["happy", "ok", "sad"]  # no statistics yet: the enum's own order
        conn.execute("ANALYZE t")
        assert whens() == ["sad", "ok", "happy"]
        assert table_checksum(conn, "public", "t") == before
        conn.execute("UPDATE t SET m = 'happy' WHERE id = 7")  # and a change still shows
        assert table_checksum(conn, "public", "t") != before


def test_an_inheritance_parent_counts_its_own_rows_and_a_partitioned_table_its_partitions(conn):
    with conn.transaction(force_rollback=True):
        conn.execute("""CREATE TABLE vehicle (id int, make text);
                        CREATE TABLE car (seats int) INHERITS (vehicle);
                        CREATE TABLE parts (id int, region text) PARTITION BY LIST (region);
                        CREATE TABLE parts_eu PARTITION OF parts FOR VALUES IN ('eu');
                        CREATE TABLE parts_other PARTITION OF parts DEFAULT;
                        INSERT INTO vehicle VALUES (1, 'a'), (2, 'b');
                        INSERT INTO car VALUES (3, 'c', 4), (4, 'd', 2), (5, 'e', 7);
                        INSERT INTO parts VALUES (1, 'eu'), (2, 'us'), (3, 'eu')""")
        sums = table_checksums(conn, ["vehicle", "car", "parts"])
        assert {t: c.rows for t, c in sums.items()} == {"vehicle": 2, "car": 3, "parts": 3}
        counts = pg.row_counts(conn)
        assert (counts["vehicle"], counts["car"], counts["parts"]) == (2, 3, 3) and "parts_eu" not in counts
        before = sums["vehicle"].checksum
        conn.execute("DELETE FROM car WHERE id = 5")
        assert table_checksum(conn, "public", "vehicle").checksum == before  # a child's change is the child's
