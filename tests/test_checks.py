"""Each check against the sample application: passes on clean data, catches a planted fault.

One seeded database per module; each fault is planted inside a transaction that is rolled
back (DDL and catalog changes included), so a case costs a query, not a database. The
real read-only path through `run_checks` and faults left by failed commands (a failed
CREATE INDEX CONCURRENTLY) are in test_validation.py.
"""

from __future__ import annotations

import uuid

import pytest

from dataops.dev.sample_app import create_schema, seed
from dataops.errors import BadInput
from dataops.tasks import pg
from dataops.tasks.validation.checks import (
    CustomSqlCheck,
    DeclaredForeignKeys,
    DeclaredUniqueKeys,
    InvalidIndexes,
    LogicalForeignKeyCheck,
    NotNullCheck,
    NotValidConstraints,
    RowCountCheck,
    SequencesBehind,
    UniqueSetCheck,
    all_checks,
)
from dataops.tasks.validation.validate import _run_in
from dataops.validation_settings import (
    CustomCheck,
    RowCountBounds,
    TableRef,
    ValidationSettings,
    parse_column,
    parse_columns,
    parse_foreign_key,
)


@pytest.fixture(scope="module")
def sample(pg_server_dsn):
    name = f"checks_{uuid.uuid4().hex[:8]}"
    pg.create_database(pg_server_dsn, name)
    dsn = pg_server_dsn.with_database(name)
    create_schema(dsn)
    seed(dsn, users=100)
    yield dsn
    pg.drop_database(pg_server_dsn, name)


@pytest.fixture
def conn(sample):
    with pg.connect(sample) as conn:
        yield conn


def run(conn, checks, plant: str | None = None, examples: int = 3):
    """Results of `checks` after `plant`, with the database left as it was."""
    with conn.transaction(force_rollback=True):
        if plant:
            conn.execute(plant)
        return _run_in(conn, checks, examples)


def by_constraint(results, constraint):
    (found,) = [r for r in results if r.constraint == constraint]
    return found


# -- built in -------------------------------------------------------------------------------------

def test_every_builtin_check_passes_on_clean_data(conn):
    results = run(conn, all_checks())
    assert [r.line() for r in results if r.status != "pass"] == []
    kinds = {r.kind for r in results}
    assert kinds == {"foreign_key", "unique", "sequence", "invalid_index", "not_valid"}
    assert len([r for r in results if r.kind == "foreign_key"]) == 7  # every declared foreign key
    assert by_constraint(results, "users_email_key").detail == "(email) is unique"
    assert by_constraint(results, "orders_user_id_fkey").detail == "every (user_id) is found in users(id)"


def test_orphan_under_a_declared_foreign_key(conn):
    # replica mode skips the foreign key's triggers: the way a bulk load or a bad restore leaves orphans
    results = run(conn, [DeclaredForeignKeys()], "SET LOCAL session_replication_role = replica; "
                  "INSERT INTO user_emails (id, user_id, email) VALUES (90001, 999999, 'ghost@example.com')")
    r = by_constraint(results, "user_emails_user_id_fkey")
    assert (r.status, r.table, r.rows) == ("fail", "user_emails", 1)
    assert r.detail == "1 orphaned row: (user_id) not found in users(id)"
    assert r.examples == ("id=90001, user_id=999999",)
    assert r.name == "user_emails(user_id) -> users(id)"
    assert [x.status for x in results if x is not r] == ["pass"] * 6


def test_orphans_under_a_not_valid_foreign_key_are_found_too(conn):
    plant = ("ALTER TABLE orders DROP CONSTRAINT orders_user_id_fkey;"
             "INSERT INTO orders (id, user_id, product_id, quantity, amount, status) "
             "VALUES (90001, 777777, 1, 1, 1, 'paid'), (90002, 777778, 1, 1, 1, 'paid');"
             "ALTER TABLE orders ADD CONSTRAINT orders_user_id_fkey FOREIGN KEY (user_id) REFERENCES users (id) NOT VALID")
    results = run(conn, [DeclaredForeignKeys(), NotValidConstraints()], plant)
    fk = [r for r in results if r.kind == "foreign_key" and r.constraint == "orders_user_id_fkey"][0]
    assert (fk.status, fk.rows) == ("fail", 2)
    assert fk.detail == "2 orphaned rows: (user_id) not found in users(id) (constraint is NOT VALID)"
    assert fk.examples == ("id=90001, user_id=777777", "id=90002, user_id=777778")
    nv = [r for r in results if r.kind == "not_valid"][0]
    assert nv.status == "warn" and nv.constraint == "orders_user_id_fkey"


def test_duplicates_under_a_unique_index_that_no_longer_tells_the_truth(conn):
    """An expression index whose function changed after the rows were indexed: the index
    says the keys are unique, the rows (grouped anew) say otherwise, like a text index after
    a collation change."""
    plant = ("CREATE FUNCTION sku_key(s text) RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT s $$;"
             "CREATE UNIQUE INDEX products_sku_key_idx ON products (sku_key(sku));"
             "CREATE OR REPLACE FUNCTION sku_key(s text) RETURNS text LANGUAGE sql IMMUTABLE "
             "AS $$ SELECT left(s, 9) $$")  # SKU-000010 .. SKU-000019 now collide, and so on
    results = run(conn, [DeclaredUniqueKeys()], plant)
    r = by_constraint(results, "products_sku_key_idx")
    assert (r.status, r.table) == ("fail", "products")
    assert r.detail == "10 values of (sku_key(sku)) occur more than once, in 99 rows"
    assert r.examples[0] == "sku_key(sku)=SKU-00001 (10 rows)"
    assert by_constraint(results, "products_sku_key").status == "pass"


def test_duplicates_under_a_partial_unique_index_respect_its_predicate(conn):
    plant = ("ALTER TABLE products DROP CONSTRAINT products_sku_key;"
             "UPDATE products SET sku = 'SAME' WHERE id IN (1, 2, 3);"
             "CREATE UNIQUE INDEX one_sku ON products (sku) WHERE id > 2")
    (r,) = [x for x in run(conn, [DeclaredUniqueKeys()], plant) if x.constraint == "one_sku"]
    assert r.status == "pass" and r.name == "products(sku) WHERE id > 2"  # rows 1 and 2 are outside the index


def test_lagging_sequence(conn, sample):
    # setval is not transactional: put the sequence back whatever happens
    try:
        results = run(conn, [SequencesBehind()], "SELECT setval('users_id_seq', 95)")
    finally:
        with pg.connect(sample, autocommit=True) as c:
            c.execute("SELECT setval('users_id_seq', (SELECT max(id) FROM users))")
    r = by_constraint(results, "users_id_seq")
    assert (r.status, r.table, r.name, r.rows) == ("fail", "users", "users.id", 5)
    assert r.detail == ("next value 96 is not past max(id) 100: 5 rows already hold values it will hand out, so "
                        "inserts using the default will fail with duplicate keys; "
                        "fix with SELECT setval('public.users_id_seq', (SELECT max(id) FROM public.users))")
    assert r.examples == ("max(id)=100", "next value=96")
    assert {x.status for x in results if x is not r} == {"pass"}


def test_never_called_sequence_behind_copied_rows(conn):
    plant = "CREATE TABLE t (id int GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY); INSERT INTO t VALUES (1), (2)"
    r = by_constraint(run(conn, [SequencesBehind()], plant), "t_id_seq")
    assert r.status == "fail" and r.detail.startswith("next value 1 is not past max(id) 2: 2 rows")


def test_invalid_index(conn):
    plant = ("CREATE INDEX users_phone_idx ON users (phone);"
             "UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'users_phone_idx'::regclass")
    assert run(conn, [InvalidIndexes()])[0].detail == "no invalid indexes"
    (r,) = run(conn, [InvalidIndexes()], plant)
    assert (r.status, r.table, r.constraint) == ("fail", "users", "users_phone_idx")
    assert r.detail == ("index is invalid (a failed or running CREATE INDEX CONCURRENTLY): "
                        "DROP INDEX CONCURRENTLY public.users_phone_idx; then build it again")
    assert r.examples == ("CREATE INDEX users_phone_idx ON public.users USING btree (phone)",)


def test_not_valid_check_constraints_are_tested_against_the_rows(conn):
    plant = ("ALTER TABLE orders ADD CONSTRAINT small_qty CHECK (quantity < 5) NOT VALID;"
             "ALTER TABLE orders ADD CONSTRAINT positive_qty CHECK (quantity > 0) NOT VALID")
    results = run(conn, [NotValidConstraints()], plant)
    bad, fine = by_constraint(results, "small_qty"), by_constraint(results, "positive_qty")
    assert bad.status == "fail" and bad.rows > 0
    assert bad.detail == f"CHECK (quantity < 5) is NOT VALID and {bad.rows} rows violate it"
    assert bad.examples[0].startswith("id=")
    assert (fine.status, fine.detail) == ("warn", "CHECK (quantity > 0) is NOT VALID but every row satisfies it: "
                                                  "ALTER TABLE public.orders VALIDATE CONSTRAINT positive_qty")


# -- configured ------------------------------------------------------------------------------------

def test_not_null_by_intent(conn):
    (ok,) = run(conn, [NotNullCheck(parse_column("users.email"))])
    assert (ok.status, ok.detail) == ("pass", "no NULLs in email")
    (bad,) = run(conn, [NotNullCheck(parse_column("public.users.phone"))], "UPDATE users SET phone = NULL WHERE id <= 20")
    assert (bad.status, bad.table, bad.name) == ("fail", "users", "users.phone")
    assert bad.rows >= 20 and bad.examples == ("id=1", "id=2", "id=3")


def test_logical_foreign_key(conn):
    fk = LogicalForeignKeyCheck(parse_foreign_key("audit_logs.user_id -> users.id"))
    (ok,) = run(conn, [fk])
    assert ok.status == "pass" and ok.detail == "every (user_id) is found in users(id)"
    (bad,) = run(conn, [fk], "ALTER TABLE audit_logs DROP CONSTRAINT audit_logs_user_id_fkey;"
                             "UPDATE audit_logs SET user_id = 5000 + id WHERE id IN (7, 8)")
    assert (bad.status, bad.kind, bad.rows, bad.name) == ("fail", "logical_foreign_key", 2, "audit_logs.user_id -> users.id")
    assert bad.examples == ("id=7, user_id=5007", "id=8, user_id=5008")


def test_uniqueness_set(conn):
    check = UniqueSetCheck(parse_columns("user_emails(user_id, email)"))
    plant = "DELETE FROM user_emails WHERE id NOT IN (SELECT min(id) FROM user_emails GROUP BY user_id, email)"
    (ok,) = run(conn, [check], plant)
    assert (ok.status, ok.detail) == ("pass", "(user_id, email) is unique")
    (bad,) = run(conn, [check], plant + "; INSERT INTO user_emails (id, user_id, email) "
                                        "SELECT 90000 + id, user_id, email FROM user_emails WHERE id IN (1, 2)")
    assert (bad.status, bad.rows) == ("fail", 4)
    assert bad.detail == "2 values of (user_id, email) occur more than once, in 4 rows"
    assert bad.examples[0].startswith("user_id=1, email=") and bad.examples[0].endswith(" (2 rows)")


def test_row_count_bounds(conn):
    (ok,) = run(conn, [RowCountCheck(TableRef("public", "users"), RowCountBounds(min=1, max=1000))])
    assert (ok.status, ok.rows, ok.detail) == ("pass", 100, "100 rows")
    (bad,) = run(conn, [RowCountCheck(TableRef("public", "users"), RowCountBounds(min=101))])
    assert (bad.status, bad.detail) == ("fail", "100 rows, expected at least 101")


def test_custom_sql_checks(conn):
    checks = [CustomSqlCheck(CustomCheck(name="no negative prices", sql="SELECT id, price FROM products WHERE price < 0;")),
              CustomCheck(name="twelve flags", sql="SELECT count(*) FROM feature_flags", expect={"value": 12}),
              CustomCheck(name="expects 11", sql="SELECT count(*) FROM feature_flags", expect={"value": 11}),
              CustomCheck(name="cheap products", sql="SELECT id, price FROM products WHERE price < 5 ORDER BY id")]
    checks = [c if isinstance(c, CustomSqlCheck) else CustomSqlCheck(c) for c in checks]
    r = {x.name: x for x in run(conn, checks)}
    assert (r["no negative prices"].status, r["no negative prices"].detail) == ("pass", "returned no rows")
    assert (r["twelve flags"].status, r["twelve flags"].detail) == ("pass", "returned 12")
    assert (r["expects 11"].status, r["expects 11"].detail) == ("fail", "returned 12, expected 11")
    cheap = r["cheap products"]
    assert cheap.status == "fail" and cheap.detail == f"returned {cheap.rows} rows, expected none"
    assert cheap.examples[0].startswith("id=") and ", price=" in cheap.examples[0]


def test_a_check_that_errors_does_not_stop_the_others(conn):
    checks = [CustomSqlCheck(CustomCheck(name="typo", sql="SELECT * FROM nope")),
              CustomSqlCheck(CustomCheck(name="slow", sql="SELECT pg_sleep(2)", expect={"value": ""})),
              RowCountCheck(TableRef("public", "users"), RowCountBounds(min=1))]
    with conn.transaction(force_rollback=True):
        conn.execute("SET LOCAL statement_timeout = '200ms'")
        results = _run_in(conn, checks, 3)
    assert [(x.name, x.status) for x in results] == [("typo", "error"), ("slow", "error"), ("users", "pass")]
    assert results[0].detail == 'could not run: relation "nope" does not exist'
    assert results[1].detail == "did not finish within statement_timeout_s: canceling statement due to statement timeout"


def test_unknown_names_are_bad_input_before_anything_runs(conn):
    for text, message in [("nope.id", 'table "public.nope" does not exist'),
                          ("users.emial", 'column "emial" does not exist in table "public.users"'),
                          ("app.users.id", 'table "app.users" does not exist')]:
        with pytest.raises(BadInput) as err:
            run(conn, [RowCountCheck(TableRef("public", "users"), RowCountBounds(min=1)), NotNullCheck(parse_column(text))])
        assert err.value.message == message
    with pytest.raises(BadInput, match='^column "uid" does not exist in table "public.user_emails"$'):
        run(conn, [LogicalForeignKeyCheck(parse_foreign_key("user_emails.uid -> users.id"))])


def test_configured_checks_come_from_the_validation_section():
    cfg = ValidationSettings(not_null=["users.email"], foreign_keys=['"App"."Events"(user_id) -> users(id)'],
                             unique=["user_emails(user_id, email)"], row_counts={"users": {"min": 1}},
                             custom=[{"name": "x", "sql": "SELECT 1 WHERE false"}], builtin=["sequences"])
    names = [(type(c).__name__, c.describe()) for c in all_checks(cfg)]
    assert names == [("SequencesBehind", "sequence"), ("NotNullCheck", "users.email"),
                     ("LogicalForeignKeyCheck", '"App"."Events"(user_id) -> users(id)'),
                     ("UniqueSetCheck", "user_emails(user_id, email)"), ("RowCountCheck", "users"),
                     ("CustomSqlCheck", "x")]
    fk = cfg.foreign_key_refs()[0]
    assert (fk.child.table.schema, fk.child.table.table, fk.parent.columns) == ("App", "Events", ("id",))


def test_rows_of_a_table_without_a_key_are_shown_by_ctid(conn):
    plant = "CREATE TABLE loose (v text); INSERT INTO loose VALUES ('a'), (NULL), (NULL)"
    (r,) = run(conn, [NotNullCheck(parse_column("loose.v"))], plant)
    assert (r.status, r.rows, r.examples) == ("fail", 2, ("ctid=(0,2)", "ctid=(0,3)"))


def test_an_inheritance_parents_keys_do_not_cover_its_childrens_rows(conn):
    """A primary key or a foreign key of an inheritance parent constrains its own rows only: a child
    may repeat the parent's ids and hold values the parent's foreign key would refuse. Reading the
    parent with its children would report duplicates and orphans that are not there."""
    plant = """CREATE TABLE vehicle (id int PRIMARY KEY, owner_id bigint REFERENCES users (id));
               CREATE TABLE car (seats int) INHERITS (vehicle);
               INSERT INTO vehicle SELECT g, (SELECT min(id) FROM users) FROM generate_series(1, 5) g;
               INSERT INTO car SELECT g, 999999, 4 FROM generate_series(3, 8) g"""
    results = run(conn, [DeclaredForeignKeys(), DeclaredUniqueKeys()], plant)
    assert by_constraint(results, "vehicle_pkey").status == "pass"
    assert by_constraint(results, "vehicle_owner_id_fkey").status == "pass"
    # an orphan among the parent's own rows is still found, and only it
    results = run(conn, [DeclaredForeignKeys()], plant + "; SET LOCAL session_replication_role = replica; "
                  "INSERT INTO vehicle VALUES (6, 888888)")
    r = by_constraint(results, "vehicle_owner_id_fkey")
    assert (r.status, r.rows, r.examples) == ("fail", 1, ("id=6, owner_id=888888",))


def test_one_failing_object_of_a_group_errors_alone(conn):
    plant = """CREATE FUNCTION picky(t text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
               BEGIN IF current_setting('enable_indexscan') = 'off' THEN RAISE EXCEPTION 'picky'; END IF;
               RETURN t; END $$;
               CREATE UNIQUE INDEX users_picky ON users (picky(email))"""
    results = run(conn, [DeclaredUniqueKeys()], plant)
    assert by_constraint(results, "users_picky").status == "error"
    assert by_constraint(results, "users_picky").detail == "could not run: picky"
    assert [r.status for r in results if r.constraint != "users_picky"] == ["pass"] * (len(results) - 1)


def test_an_unpopulated_materialized_view_is_skipped_by_every_check(conn):
    from dataops.tasks.validation.checks import NOT_POPULATED

    plant = """CREATE MATERIALIZED VIEW user_ids AS SELECT id FROM users WITH NO DATA;
               CREATE UNIQUE INDEX user_ids_id ON user_ids (id)"""
    checks = [DeclaredUniqueKeys(), RowCountCheck(TableRef("public", "user_ids"), RowCountBounds(min=1)),
              UniqueSetCheck(parse_columns("user_ids(id)")),
              CustomSqlCheck(CustomCheck(name="reads it", sql="SELECT id FROM user_ids WHERE id < 0"))]
    results = run(conn, checks, plant)
    skipped = [r for r in results if r.status == "skip"]
    assert [(r.kind, r.table) for r in skipped] == [("unique", "user_ids"), ("row_count", "user_ids"),
                                                    ("unique_set", "user_ids"), ("custom", None)]
    assert skipped[0].detail == NOT_POPULATED and skipped[1].detail == f"user_ids: {NOT_POPULATED}"
    assert skipped[3].detail.startswith(NOT_POPULATED)
    assert all(r.status == "pass" for r in results if r.status != "skip")
