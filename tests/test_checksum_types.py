"""The typed row hash of tasks/checksums.py: for every type it special-cases, a changed value
changes the checksum, and what must not matter (row order, column order, the enum's OIDs,
which int width holds a number) does not. tests/test_checksums.py covers the public API.
"""

from __future__ import annotations

import uuid

import pytest

from dataops.tasks import pg
from dataops.tasks.checksums import checksum_sql, table_checksum

TYPES_SQL = """
CREATE TYPE mood AS ENUM ('happy', 'ok', 'sad');
CREATE TYPE big AS ENUM ({big_labels});
CREATE DOMAIN small_count AS integer CHECK (VALUE >= 0);
CREATE DOMAIN mood_d AS mood;
CREATE DOMAIN price AS numeric(10, 2);
CREATE TYPE pair AS (a int, b text);
CREATE TABLE t (
    id int PRIMARY KEY, i2 smallint, i8 bigint, n_fixed numeric(12, 2), n_free numeric, f8 float8, f4 real,
    d date, tm time, ttz timetz, ts timestamp, tstz timestamptz, u uuid, b bool, tx text, vc varchar(20),
    bp char(4), ip inet, net cidr, e mood, eb big, dc small_count, dm mood_d, dp price, j jsonb, arr int[],
    bin bytea, iv interval, cp pair, m money, o oid
);
INSERT INTO t
SELECT g, g, g::bigint * 1000000007, g * 1.25, g * 1.5, g / 7.0, g / 3.0, DATE '2024-01-01' + g, TIME '10:00' + g * interval '1 s',
       TIMETZ '10:00+02' + g * interval '1 s', TIMESTAMP '2024-01-01' + g * interval '1 h',
       TIMESTAMPTZ '2024-01-01 00:00+00' + g * interval '1 h', md5(g::text)::uuid, g % 2 = 0, 'text ' || g,
       'vc' || g, 'c' || (g % 10), ('10.0.' || g % 256 || '.1')::inet, ('10.' || g % 256 || '.0.0/16')::cidr,
       (ARRAY['happy', 'ok', 'sad'])[g % 3 + 1]::mood, ('l' || (g % 70))::big, g, (ARRAY['happy', 'ok', 'sad'])[g % 3 + 1]::mood,
       g * 0.5, jsonb_build_object('g', g), ARRAY[g, g + 1], decode(md5(g::text), 'hex'), g * interval '1 min',
       ROW(g, 'p' || g)::pair, g * 1.5, g
FROM generate_series(1, 200) g;
INSERT INTO t (id) VALUES (0);
CREATE TABLE nn AS SELECT * FROM t WHERE id > 0;  -- every column NOT NULL: hashed through the chain
DO $$ DECLARE c name; BEGIN
    FOR c IN SELECT attname FROM pg_attribute WHERE attrelid = 'nn'::regclass AND attnum > 0 AND NOT attisdropped LOOP
        EXECUTE format('ALTER TABLE nn ALTER COLUMN %I SET NOT NULL', c);
    END LOOP;
END $$;
"""

# (column, a change the checksum must see)
CHANGES = [
    ("i2", "i2 = i2 + 1"), ("i8", "i8 = 4294967296 * i8"), ("n_fixed", "n_fixed = n_fixed + 0.01"),
    ("n_free", "n_free = 3.000"),  # 3.0 (id 2) -> 3.000: equal as numbers, not as stored values
    ("f8", "f8 = f8 + 1e-12"), ("f4", "f4 = -f4"), ("d", "d = 'infinity'"), ("tm", "tm = tm + interval '1 microsecond'"),
    ("ttz", "ttz = ttz AT TIME ZONE '+03'"),  # the same instant in another zone
    ("ts", "ts = ts + interval '1 microsecond'"), ("tstz", "tstz = 'infinity'"), ("u", "u = gen_random_uuid()"),
    ("b", "b = NOT b"), ("tx", "tx = upper(tx)"), ("vc", "vc = vc || ' '"), ("bp", "bp = 'zz'"),
    ("ip", "ip = '10.0.2.1/24'"),  # same address, other mask
    ("net", "net = '10.2.0.0/24'"), ("e", "e = 'happy'"), ("eb", "eb = 'l69'"), ("dc", "dc = 0"), ("dm", "dm = NULL"),
    ("dp", "dp = dp + 1"), ("j", "j = '{\"g\": 2.0}'"), ("arr", "arr = ARRAY[2, 3, NULL]"), ("bin", "bin = '\\x00'"),
    ("iv", "iv = interval '1 day'"),  # 2 min -> 1 day
    ("cp", "cp = ROW(2, 'q')"), ("m", "m = 0"), ("o", "o = 0"), ("id", "id = 1000"),
]


@pytest.fixture(scope="module")
def data(pg_server_dsn):
    name = f"cktypes_{uuid.uuid4().hex[:8]}"
    pg.create_database(pg_server_dsn, name)
    dsn = pg_server_dsn.with_database(name)
    labels = ", ".join(f"'l{i}'" for i in range(70))  # more than fit in a CASE: hashed through text
    with pg.connect(dsn, autocommit=True) as conn:
        conn.execute(TYPES_SQL.format(big_labels=labels))
    yield dsn
    pg.drop_database(pg_server_dsn, name)


@pytest.fixture
def conn(data):
    with pg.connect(data) as conn:
        yield conn


def after(conn, change: str, table: str = "t", **kw) -> str:
    with conn.transaction(force_rollback=True):
        conn.execute(change)
        return table_checksum(conn, "public", table, **kw).checksum


@pytest.mark.parametrize(("column", "change"), CHANGES, ids=[c[0] for c in CHANGES])
def test_one_changed_value_of_each_type_changes_the_checksum(conn, column, change):
    original = table_checksum(conn, "public", "t").checksum
    assert after(conn, f"UPDATE t SET {change} WHERE id = 2") != original
    if column != "id":
        assert after(conn, f"UPDATE t SET {column} = NULL WHERE id = 2") != original  # NULL is a value too
        assert after(conn, f"UPDATE t SET {column} = NULL WHERE id = 0") == original  # already NULL: no change


NOT_NULL_CHANGES = [(c, "dm = 'happy'" if c == "dm" else change) for c, change in CHANGES]


@pytest.mark.parametrize(("column", "change"), NOT_NULL_CHANGES, ids=[c[0] for c in NOT_NULL_CHANGES])
def test_one_changed_value_of_each_type_changes_the_checksum_when_not_null(conn, column, change):
    original = table_checksum(conn, "public", "nn").checksum
    assert after(conn, f"UPDATE nn SET {change} WHERE id = 2", table="nn") != original


def test_not_null_columns_are_chained_the_others_hashed_alone(conn):
    chained = checksum_sql(conn, "public", "nn")[0].as_string(conn)
    alone = checksum_sql(conn, "public", "t")[0].as_string(conn)
    # by name: vc is the last link, u the one before; each takes the chain so far as its seed
    assert chained.startswith('SELECT count(*), sum(pg_catalog.hashtextextended(("vc")::text COLLATE "C", '
                              'pg_catalog.uuid_hash_extended("u", ')
    assert '# "i8")) # ("id")::int8)' in chained  # whole 64-bit integers go into the seed
    assert "(pg_catalog.hashint8extended(\"i8\", " in alone and "coalesce(" in alone
    assert "coalesce(pg_catalog." not in chained.replace("coalesce(pg_catalog.scale", "")  # no NULL stand-ins
    assert "CASE \"e\" WHEN 'happy' THEN" in chained  # enums stay out of the chain


def test_chained_columns_ignore_column_order_and_int_width_but_not_swaps(conn):
    with conn.transaction(force_rollback=True):
        conn.execute("""
            CREATE TABLE narrow (a int NOT NULL, b text NOT NULL, c numeric(6, 2) NOT NULL);
            CREATE TABLE wide (b text NOT NULL, c numeric(6, 2) NOT NULL, a bigint NOT NULL);
            INSERT INTO narrow SELECT g, 'v' || g, g / 4.0 FROM generate_series(1, 50) g;
            INSERT INTO wide SELECT 'v' || g, g / 4.0, g FROM generate_series(1, 50) g ORDER BY g DESC;
            CREATE TABLE big1 (v bigint NOT NULL); CREATE TABLE big2 (v bigint NOT NULL);
            INSERT INTO big1 VALUES (1); INSERT INTO big2 VALUES (4294967296);
            CREATE TABLE xy (x int NOT NULL, y int NOT NULL); INSERT INTO xy VALUES (1, 2), (3, 4);
        """)
        assert table_checksum(conn, "public", "narrow").checksum == table_checksum(conn, "public", "wide").checksum
        assert table_checksum(conn, "public", "big1").checksum != table_checksum(conn, "public", "big2").checksum
        first = table_checksum(conn, "public", "xy").checksum
        conn.execute("UPDATE xy SET x = y, y = x WHERE x = 1")  # moved between columns
        moved = table_checksum(conn, "public", "xy").checksum
        conn.execute("UPDATE xy SET x = x, y = 4 WHERE y = 1; UPDATE xy SET y = 1 WHERE x = 3")  # swapped between rows
        assert len({first, moved, table_checksum(conn, "public", "xy").checksum}) == 3


def test_every_column_is_hashed_and_most_without_text(conn):
    query, cols = checksum_sql(conn, "public", "t")
    text = query.as_string(conn)
    assert cols[0] == "id" and len(cols) == 31
    for fn in ("hashint8extended(\"i8\"", "hash_numeric_extended(\"n_fixed\"", "pg_catalog.scale(\"n_free\")",
               "timestamp_hash_extended(\"tstz\" AT TIME ZONE INTERVAL '0'", "uuid_hash_extended(\"u\"",
               "hashinetextended((\"ip\")::inet", "CASE \"e\" WHEN 'happy' THEN", "(\"dc\")::integer"):
        assert fn in text, fn
    assert "CASE \"eb\" WHEN" not in text  # 70 labels: through the label's text, same result


def test_values_swapped_between_rows_or_moved_between_columns_change_it(conn):
    original = table_checksum(conn, "public", "t").checksum
    assert after(conn, "UPDATE t SET tx = CASE id WHEN 3 THEN 'text 4' ELSE 'text 3' END WHERE id IN (3, 4)") != original
    with conn.transaction(force_rollback=True):  # two values moved between columns of one row
        assert conn.execute("UPDATE t SET i2 = 7, i8 = 9 WHERE id = 5").rowcount == 1
        placed = table_checksum(conn, "public", "t").checksum
        assert conn.execute("UPDATE t SET i2 = i8::smallint, i8 = i2 WHERE id = 5").rowcount == 1
        assert table_checksum(conn, "public", "t").checksum != placed
    with conn.transaction(force_rollback=True):
        conn.execute("CREATE TABLE xy (x int, y int); INSERT INTO xy VALUES (1, 2)")
        first = table_checksum(conn, "public", "xy").checksum
        conn.execute("UPDATE xy SET x = 2, y = 1")
        assert table_checksum(conn, "public", "xy").checksum != first


def test_folded_int8_values_are_told_apart(conn):
    """hashint8extended folds 64 bits to 32: 1 and 2^32 hash alike on their own."""
    with conn.transaction(force_rollback=True):
        conn.execute("CREATE TABLE a (v bigint); CREATE TABLE b (v bigint);"
                     "INSERT INTO a VALUES (1); INSERT INTO b VALUES (4294967296)")
        assert conn.execute("SELECT hashint8extended(1, 7) = hashint8extended(4294967296, 7)").fetchone()[0]
        assert table_checksum(conn, "public", "a").checksum != table_checksum(conn, "public", "b").checksum


def test_what_must_not_matter_does_not(conn):
    with conn.transaction(force_rollback=True):
        conn.execute("""
            CREATE TABLE narrow (a int, b text, c numeric(6, 2));
            CREATE TABLE wide (b text, c numeric(6, 2), a bigint);  -- other column order, other int width
            INSERT INTO narrow SELECT g, 'v' || g, g / 4.0 FROM generate_series(1, 50) g;
            INSERT INTO wide SELECT 'v' || g, g / 4.0, g FROM generate_series(1, 50) g ORDER BY g DESC;
        """)
        assert table_checksum(conn, "public", "narrow").checksum == table_checksum(conn, "public", "wide").checksum


def test_case_and_text_paths_of_an_enum_agree(conn):
    with conn.transaction(force_rollback=True):
        conn.execute("CREATE TABLE viacase (m mood); CREATE TABLE viatext (m mood_d);"
                     "INSERT INTO viacase VALUES ('ok'), (NULL); INSERT INTO viatext VALUES ('ok'), (NULL)")
        assert "CASE" in checksum_sql(conn, "public", "viacase")[0].as_string(conn)
        assert "CASE" not in checksum_sql(conn, "public", "viatext")[0].as_string(conn)
        assert table_checksum(conn, "public", "viacase").checksum == table_checksum(conn, "public", "viatext").checksum


def test_the_scan_can_run_in_parallel(conn):
    """count(*) runs with parallel workers on a big table; the checksum must be able to as well
    (every function in it is PARALLEL SAFE)."""
    query, _ = checksum_sql(conn, "public", "t")
    with conn.transaction(force_rollback=True):
        conn.execute("SET LOCAL parallel_setup_cost = 0; SET LOCAL parallel_tuple_cost = 0;"
                     "SET LOCAL min_parallel_table_scan_size = 0; SET LOCAL max_parallel_workers_per_gather = 2")
        plan = "\n".join(r[0] for r in conn.execute(b"EXPLAIN " + query.as_bytes(conn)))
    assert "Gather" in plan and "Parallel Seq Scan" in plan and "Partial Aggregate" in plan
