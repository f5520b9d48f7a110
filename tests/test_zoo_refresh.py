"""refresh-staging of the schema zoo (tests/zoo): partitioned tables (range, list, hash, two
levels, defaults) with foreign keys on the parent, on single partitions and pointing at a
partitioned table; a foreign-key cycle with deferrable keys; self references; inheritance;
generated and identity columns, domains, enums, arrays, quoted and 63-byte names, the same
table name in three schemas, unlogged tables; row-level security. Everything is checked by
the zoo's own yardsticks and plain SQL, never by the refresh's own checks."""

from __future__ import annotations

import pytest
from conftest import run_cli
from psycopg import sql
from test_refresh_staging import broken_foreign_keys, rows, run_refresh, scratch_databases
from zoo import RLS_TABLE, load_zoo, reader_dsn, schema_dump, zoo_checksums

from dataops.errors import BadInput
from dataops.settings import load_settings
from dataops.tasks import pg

ANON = {
    "salt": "zoo-refresh-salt-0123456789",
    "pool_size": 200,
    "rules": {  # the partitioned tables' rules are written on the partitioned table
        "zoo.payment": {"note": "hash"},
        "zoo.events": {"payload": None},
        "zoo.customer": {"first_name": "first_name", "last_name": "last_name", "email": {"faker": "email", "unique": True}},
        "zoo.employee": {"full_name": "name", "salary": None},
        "zoo.staff": {"name": "name"},
        "zoo.all_types": {"c_inet": None, "c_cidr": None, "c_macaddr": None, "c_macaddr8": None,
                          "c_email": {"faker": "email"}},
    },
}
MASKED_ROOTS = {"zoo.payment", "zoo.events", "zoo.customer", "zoo.employee", "zoo.staff", "zoo.all_types"}


@pytest.fixture
def zoo_pair(make_db, write_config):
    prod, stg = make_db("zprod"), make_db("zstg")
    load_zoo(prod)
    with pg.connect(stg, autocommit=True) as conn:
        conn.execute("CREATE TABLE old_staging (id int PRIMARY KEY); INSERT INTO old_staging VALUES (7)")

    def config(refresh_cfg: dict | None = None, source=None, more_rules: dict | None = None):
        anon = {**ANON, "rules": {**ANON["rules"], **(more_rules or {})}}
        return write_config({"production": ("production", source or prod), "staging": ("staging", stg)},
                            extra={"anonymize": anon, "refresh": refresh_cfg or {}})

    return prod, stg, config


def roots(dsn) -> dict[str, str]:
    """schema.name of every relation holding rows -> schema.name of its table (a partition's root)."""
    return {f"{s}.{n}": f"{rs}.{rn}" for s, n, rs, rn in rows(dsn, """
        SELECT n.nspname, c.relname, rn.nspname, r.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_class r ON r.oid = coalesce(pg_partition_root(c.oid), c.oid) JOIN pg_namespace rn ON rn.oid = r.relnamespace
        WHERE c.relkind = 'r' AND n.nspname !~ '^(pg_|information_schema)'""")}


def unmasked_digest(dsn, relation: str, leave_out: set[str]) -> tuple[int, str]:
    """Rows and md5 of one relation's own rows over its stored columns but `leave_out`."""
    schema, name = relation.split(".", 1)
    with pg.connect(dsn) as conn:
        cols = [r[0] for r in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped "
            "AND attgenerated = '' ORDER BY attnum", (f'"{schema}"."{name}"',)).fetchall() if r[0] not in leave_out]
        conn.execute("SET TimeZone = 'UTC'")
        row = sql.SQL("ROW({})::text").format(sql.SQL(", ").join(sql.Identifier(c) for c in cols))
        return conn.execute(sql.SQL("SELECT count(*), md5(string_agg({r}, E'\\n' ORDER BY {r} COLLATE \"C\")) "
                                    "FROM ONLY {}.{}").format(sql.Identifier(schema), sql.Identifier(name), r=row)
                            ).fetchone()


def test_zoo_copies_whole_every_key_holds_and_partitioned_rules_mask_every_partition(zoo_pair, pg_server_dsn):
    prod, stg, config = zoo_pair
    report = run_refresh(load_settings(config()))
    assert report.leaks.ok and {t for t, _, _ in report.masked} == MASKED_ROOTS

    # the same schema (owners and privileges aside, on purpose), every foreign key holds
    assert schema_dump(stg) == schema_dump(prod)
    n_fks = rows(prod, "SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND conparentid = 0")[0][0]
    assert broken_foreign_keys(stg, expect=n_fks) == []

    # every relation holding rows (each partition and inheritance child by itself, ONLY its own
    # rows) is identical, sequences included, but those of tables with masked columns
    want, got, root = zoo_checksums(prod), zoo_checksums(stg), roots(prod)
    assert want.keys() == got.keys()
    masked_rels = {rel for rel, r in root.items() if r in MASKED_ROOTS}
    assert {"zoo.payment_p2022_01", "zoo.payment_default", "zoo.events_2023_click", "zoo.events_default"} <= masked_rels
    for rel in want:
        if rel not in masked_rels:
            assert got[rel] == want[rel], rel
    # ... and those are identical in every other column, partition by partition
    masked_cols = {t: {c for tt, c, _ in report.masked if tt == t} for t in MASKED_ROOTS}
    for rel in masked_rels:
        assert unmasked_digest(stg, rel, masked_cols[root[rel]]) == unmasked_digest(prod, rel, masked_cols[root[rel]]), rel

    # the rule on the partitioned table masked every partition, the default one too
    notes = "SELECT tableoid::regclass::text, payment_id, note FROM zoo.payment WHERE note IS NOT NULL"
    before = {(p, i): n for p, i, n in rows(prod, notes)}
    after = {(p, i): n for p, i, n in rows(stg, notes)}
    assert before.keys() == after.keys() and len({p for p, _ in before}) == 4
    assert all(after[k] != before[k] for k in before)
    assert rows(stg, "SELECT count(payload) FROM zoo.events") == [(0,)]
    assert rows(prod, "SELECT count(payload) FROM zoo.events_2023_view")[0][0] > 0
    # generated columns follow the masked values; identity and serial columns go on past the data
    assert rows(stg, "SELECT count(*) FROM zoo.customer WHERE slug <> zoo.slugify(first_name || ' ' || "
                     "coalesce(last_name, ''))") == [(0,)]
    with pg.connect(stg) as conn:
        conn.execute("INSERT INTO zoo.payment (customer_id, staff_id, amount, payment_date) "
                     "VALUES (1, 1, 1, '2022-01-15 00:00:00+00')")
        conn.execute("INSERT INTO zoo.customer (first_name) VALUES ('new')")
        conn.execute("INSERT INTO zoo.refund (payment_date, payment_id, amount) "
                     "SELECT payment_date, payment_id, 1 FROM zoo.payment LIMIT 1")
        conn.commit()
    # materialized views as they were: with data refreshed, without data left so; unlogged stays unlogged
    assert rows(stg, "SELECT relname, relispopulated FROM pg_class WHERE relkind = 'm' ORDER BY 1") == \
        rows(prod, "SELECT relname, relispopulated FROM pg_class WHERE relkind = 'm' ORDER BY 1")
    assert rows(stg, "SELECT relpersistence FROM pg_class WHERE oid = 'zoo.session_cache'::regclass") == [("u",)]
    assert rows(stg, "SELECT to_regclass('old_staging')") == [(None,)] and scratch_databases(pg_server_dsn) == []


def _zoo_subset_oracle(prod) -> dict[str, set]:
    """What the subset below keeps, worked out from the source rows in Python."""
    customers = {r[0] for r in rows(prod, "SELECT customer_id FROM zoo.customer WHERE customer_id <= 50")}
    payments = {(leaf, d, i, s) for leaf, d, i, c, s in rows(
        prod, "SELECT tableoid::regclass::text, payment_date, payment_id, customer_id, staff_id FROM zoo.payment")
        if c in customers and (s <= 5 or leaf == "zoo.payment_default")}  # the staff key is on three partitions only
    payment_keys = {(d, i) for _, d, i, _ in payments}
    staff_boss = dict(rows(prod, "SELECT staff_id, manager_id FROM zoo.staff"))
    # payments pull their staff only where the key is declared: the default partition has none
    staff = {s for s in staff_boss if s <= 5} | {s for leaf, *_, s in payments if leaf != "zoo.payment_default"}
    while more := {staff_boss[s] for s in staff if staff_boss[s] is not None} - staff:
        staff |= more
    emp = {e: (d, b) for e, d, b in rows(prod, "SELECT emp_id, dept_id, boss_id FROM zoo.employee")}
    head = dict(rows(prod, "SELECT dept_id, head_emp_id FROM zoo.department"))
    depts = {d for d in head if d in (2, 3)}
    emps = {e for e, (d, _) in emp.items() if d in depts}  # employees follow departments inside the cycle
    while True:
        d2 = depts | {emp[e][0] for e in emps}
        e2 = emps | {emp[e][1] for e in emps if emp[e][1] is not None} | {head[d] for d in d2 if head[d] is not None}
        if (d2, e2) == (depts, emps):
            break
        depts, emps = d2, e2
    orders = {o for o, c in rows(prod, "SELECT order_id, customer_id FROM sales.orders") if c is None or c in customers}
    return {
        "zoo.customer": customers, "zoo.payment": {(leaf, i) for leaf, _, i, _ in payments},
        "zoo.refund": {r for r, d, i in rows(prod, "SELECT refund_id, payment_date, payment_id FROM zoo.refund")
                       if (d, i) in payment_keys},
        "zoo.events": {e for e, c in rows(prod, "SELECT event_id, customer_id FROM zoo.events")
                       if c is None or c in customers},
        "zoo.jan_payment_note": {i for leaf, _, i, _ in payments if leaf == "zoo.payment_p2022_01"},
        "zoo.staff": staff, "zoo.department": depts, "zoo.employee": emps, "sales.orders": orders,
        "sales.order_lines": {(o, n) for o, n in rows(prod, "SELECT order_id, line_no FROM sales.order_lines")
                              if o in orders},
    }


KEYS = {"zoo.customer": "customer_id", "zoo.jan_payment_note": "id", "zoo.payment": "tableoid::regclass::text, payment_id", "zoo.refund": "refund_id",
        "zoo.events": "event_id", "zoo.staff": "staff_id", "zoo.department": "dept_id", "zoo.employee": "emp_id",
        "sales.orders": "order_id", "sales.order_lines": "order_id, line_no"}
SUBSET = {"subset": {"zoo.customer": "customer_id <= 50", "zoo.staff": "staff_id <= 5", "zoo.department": "dept_id IN (2, 3)"},
          "exclude": ["sales.metrics"]}


def test_zoo_subset_through_partitions_and_a_cycle(zoo_pair, prefect_api):
    prod, stg, config = zoo_pair
    with pg.connect(prod, autocommit=True) as conn:  # a key pointing at one partition, one declared on a sub-level
        conn.execute("""
            CREATE TABLE zoo.jan_payment_note (id int PRIMARY KEY, payment_date timestamptz NOT NULL,
                payment_id bigint NOT NULL, FOREIGN KEY (payment_date, payment_id)
                REFERENCES zoo.payment_p2022_01 (payment_date, payment_id));
            INSERT INTO zoo.jan_payment_note SELECT payment_id, payment_date, payment_id FROM zoo.payment_p2022_01;
            ALTER TABLE zoo.events_2023 ADD CONSTRAINT events_2023_customer_fkey FOREIGN KEY (customer_id)
                REFERENCES zoo.customer""")
    cfg = config(SUBSET)
    want = _zoo_subset_oracle(prod)
    assert 1 in want["zoo.department"] and 40 in want["zoo.employee"]  # the cycle's closure had work to do
    assert any(s > 5 for leaf, s in rows(prod, "SELECT tableoid::regclass::text, staff_id FROM zoo.payment "
                                               "WHERE customer_id <= 50") if leaf == "zoo.payment_default")

    r = run_cli("--config", str(cfg), "refresh-staging", "--check", env={"PREFECT_API_URL": prefect_api})
    assert r.returncode == 0, r.stderr
    shown = {line.split()[1].rstrip(":"): line for line in r.stdout.splitlines() if line.startswith("subset  ")}
    assert shown.keys() == want.keys()
    for table, keys in want.items():
        total = rows(prod, f"SELECT count(*) FROM {table}")[0][0]
        assert shown[table] == f"subset  {table}: {len(keys):,} of {total:,} rows", shown[table]
    assert rows(stg, "SELECT count(*) FROM old_staging") == [(1,)]

    report = run_refresh(load_settings(cfg))
    copied = {t.table: t.rows for t in report.tables}
    for table, keys in want.items():
        got = {r if len(r) > 1 else r[0] for r in rows(stg, f"SELECT {KEYS[table]} FROM {table}")}
        assert got == keys and copied[table] == len(keys), table
    n_fks = rows(prod, "SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND conparentid = 0")[0][0]
    assert broken_foreign_keys(stg, expect=n_fks) == []
    assert rows(stg, "SELECT count(*) FROM zoo.vehicle") == rows(prod, "SELECT count(*) FROM zoo.vehicle")
    assert rows(stg, "SELECT count(*) FROM pg_class WHERE left(relname, 7) = 'metrics'") == [(0,)]  # with its partitions


@pytest.mark.parametrize("refresh_cfg,anon_rules,message", [
    ({"subset": {"zoo.payment_p2022_01": "true"}}, {},
     "refresh.subset.zoo.payment_p2022_01: zoo.payment_p2022_01 is a partition of zoo.payment; write it on zoo.payment"),
    ({"copy_whole": ["sales.metrics_eu"]}, {},
     "refresh.copy_whole[sales.metrics_eu]: sales.metrics_eu is a partition of sales.metrics; write it on sales.metrics"),
    ({}, {"zoo.events_2023_view": {"payload": None}},
     'anonymize.rules.zoo.events_2023_view: table "zoo.events_2023_view" is a partition of zoo.events'),
])
def test_rules_and_filters_naming_a_partition_are_refused(zoo_pair, refresh_cfg, anon_rules, message):
    prod, stg, config = zoo_pair
    with pytest.raises(BadInput) as err:
        run_refresh(load_settings(config(refresh_cfg, more_rules=anon_rules)))
    assert err.value.message.startswith(message) and "\n" not in err.value.message
    assert rows(stg, "SELECT id FROM old_staging") == [(7,)]


def test_a_source_role_that_row_level_security_limits_is_refused_before_anything_is_written(
        zoo_pair, prefect_api, pg_server_dsn):
    prod, stg, config = zoo_pair
    cfg = config(source=reader_dsn(prod))
    r = run_cli("--config", str(cfg), "refresh-staging", env={"PREFECT_API_URL": prefect_api})
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and line.startswith("error: refusing to copy production into staging: row-level security")
    assert f"{'.'.join(RLS_TABLE)} from role zoo_reader" in line and "BYPASSRLS" in line
    assert rows(stg, "SELECT id FROM old_staging") == [(7,)] and scratch_databases(pg_server_dsn) == []
    assert rows(stg, "SELECT count(*) FROM pg_class WHERE relname = 'secret_note'") == [(0,)]
