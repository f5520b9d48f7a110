"""The plain functions other flows call, the validate-database flow and `dataops validate`,
against real databases: faults are committed the way they happen (a failed CREATE INDEX
CONCURRENTLY, a bulk load that skipped the foreign keys, a restore that left a sequence
behind), and validation must find them without writing anything.

One seeded database per module is the template; each test that plants a fault gets a copy
(CREATE DATABASE ... TEMPLATE, a file copy) instead of seeding again.
"""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest
from conftest import run_cli
from psycopg import sql

from dataops.dev.sample_app import create_schema, seed
from dataops.errors import BadInput, ConfigError
from dataops.settings import Environment, parse_settings
from dataops.tasks import pg
from dataops.tasks.checksums import TableChecksum
from dataops.tasks.validation.validate import (
    ValidationFailed,
    compare_environments,
    compare_with_expected,
    database_state,
    diff_schemas,
    format_report,
    run_checks,
    schema_fingerprint,
    table_checksums,
)
from dataops.validation_settings import ValidationSettings

CLEAN_CONFIG = {
    "not_null": ["users.email", "orders.amount"],
    "foreign_keys": ["audit_logs.user_id -> users.id"],
    "unique": ["users(email)", "user_emails(id)"],
    "row_counts": {"users": {"min": 1, "max": 1000}},
    "custom": [{"name": "no future orders", "sql": "SELECT id FROM orders WHERE created_at > now() + interval '1 day'"},
               {"name": "checks run read-only", "sql": "SELECT current_setting('transaction_read_only')",
                "expect": {"value": "on"}}],
}


@pytest.fixture(scope="module")
def template(pg_server_dsn):
    name = f"vtpl_{uuid.uuid4().hex[:8]}"
    pg.create_database(pg_server_dsn, name)
    dsn = pg_server_dsn.with_database(name)
    create_schema(dsn)
    seed(dsn, users=100)
    yield dsn
    pg.drop_database(pg_server_dsn, name)


@pytest.fixture
def copies(pg_server_dsn, template):
    made = []

    def copy(prefix: str = "v"):
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        with pg.connect(pg_server_dsn, autocommit=True, dbname="postgres") as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name),
                                                                         sql.Identifier(template.database)))
        made.append(name)
        return pg_server_dsn.with_database(name)

    yield copy
    for name in made:
        pg.drop_database(pg_server_dsn, name)


def env(dsn, name="production", role="production") -> Environment:
    return Environment(role=role, database_url=dsn, name=name)


def execute(dsn, statement: str) -> None:
    with pg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement)


# -- run_checks ------------------------------------------------------------------------------------

def test_clean_database_passes_every_check(template):
    report = run_checks(env(template), ValidationSettings(**CLEAN_CONFIG))
    assert report.ok and report.failures == [] and report.warnings == []
    assert report.summary() == f"{len(report.results)} checks passed"
    assert len(report.results) == 37
    assert report.fingerprint == schema_fingerprint(env(template))
    assert {r.kind for r in report.results} == {"foreign_key", "unique", "sequence", "invalid_index", "not_valid",
                                                "not_null", "logical_foreign_key", "unique_set", "row_count", "custom"}
    report.raise_if_failed()  # nothing to raise


def test_planted_faults_are_each_named_with_table_constraint_rows_and_keys(copies):
    db = copies()
    with pg.connect(db, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")  # a bulk load that skipped the foreign keys
        conn.execute("INSERT INTO orders (id, user_id, product_id, quantity, amount, status) "
                     "VALUES (5001, 424242, 1, 1, 9.99, 'paid')")
        conn.execute("RESET session_replication_role")
        conn.execute("SELECT setval('orders_id_seq', 300)")  # a restore that left the sequence behind
        conn.execute("ALTER TABLE users DROP CONSTRAINT users_email_key")
        conn.execute("INSERT INTO users (email) VALUES ('dup@example.com'), ('dup@example.com'), ('dup@example.com')")
        with pytest.raises(psycopg.errors.UniqueViolation):  # leaves an invalid index behind
            conn.execute("CREATE UNIQUE INDEX CONCURRENTLY users_email_key ON users (email)")
    report = run_checks(env(db), examples=2)
    lines = [r.line() for r in report.failures]
    assert lines == [
        "FAIL foreign key orders orders_user_id_fkey: 1 orphaned row: (user_id) not found in users(id) "
        "(e.g. id=5001, user_id=424242)",
        "FAIL unique key users users_email_key: 1 value of (email) occurs more than once, in 3 rows "
        "(e.g. email=dup@example.com (3 rows))",
        "FAIL sequence orders orders_id_seq: next value 301 is not past max(id) 5001: 8 rows already hold values it "
        "will hand out, so inserts using the default will fail with duplicate keys; fix with "
        "SELECT setval('public.orders_id_seq', (SELECT max(id) FROM public.orders)) (e.g. max(id)=5001; next value=301)",
        "FAIL invalid index users users_email_key: index is invalid (a failed or running CREATE INDEX CONCURRENTLY): "
        "DROP INDEX CONCURRENTLY public.users_email_key; then build it again "
        "(e.g. CREATE UNIQUE INDEX users_email_key ON public.users USING btree (email))",
    ]
    assert not report.ok and report.summary() == f"4 of {len(report.results)} checks failed"
    with pytest.raises(ValidationFailed) as err:
        report.raise_if_failed("before migrating")
    assert err.value.message.startswith(f"production before migrating: 4 of {len(report.results)} checks failed: "
                                        "FAIL foreign key orders orders_user_id_fkey: 1 orphaned row")
    assert err.value.exit_code == 1 and len(err.value.report["checks"]) == len(report.results)


def test_validation_never_writes(template):
    e = env(template)
    before = table_checksums(e)
    cfg = ValidationSettings(custom=[{"name": "tries to write", "sql": "DELETE FROM audit_logs"},
                                     {"name": "tries to write in a CTE",
                                      "sql": "WITH d AS (DELETE FROM orders RETURNING id) SELECT id FROM d"},
                                     {"name": "tries nextval", "sql": "SELECT nextval('users_id_seq')",
                                      "expect": {"value": 101}}],
                             builtin=[])
    report = run_checks(e, cfg)
    assert [(r.status, r.detail) for r in report.results] == [
        ("error", "could not run: cannot execute DELETE in a read-only transaction"),
        ("error", "could not run: cannot execute SELECT in a read-only transaction"),  # PostgreSQL's words for it
        ("error", "could not run: cannot execute nextval() in a read-only transaction"),
    ]
    assert table_checksums(e) == before
    with pg.connect(template) as conn:
        assert conn.execute("SELECT last_value FROM users_id_seq").fetchone()[0] == 100


def test_unknown_table_or_column_in_config_is_bad_input(template):
    for cfg, message in [({"not_null": ["nope.email"]}, 'table "public.nope" does not exist'),
                         ({"unique": ["users(email, nickname)"]}, 'column "nickname" does not exist in table "public.users"'),
                         ({"row_counts": {"app.users": {"min": 1}}}, 'table "app.users" does not exist'),
                         ({"foreign_keys": ["orders.user_id -> people.id"]}, 'table "public.people" does not exist')]:
        with pytest.raises(BadInput) as err:
            run_checks(env(template), ValidationSettings(**cfg))
        assert err.value.message == message and err.value.exit_code == 2


@pytest.mark.parametrize(("section", "message"), [
    ({"foreign_keys": ["user_emails.user_id => users.id"]},
     "validation.foreign_keys.0: 'user_emails.user_id => users.id' is not a foreign key; write "
     "child_table.column -> parent_table.column or child(a, b) -> parent(x, y)"),
    ({"foreign_keys": ["orders(user_id, product_id) -> users(id)"]},
     "validation.foreign_keys.0: 'orders(user_id, product_id) -> users(id)': 2 child column(s) but 1 parent column(s)"),
    ({"unique": ["users(email"]},
     "validation.unique.0: 'users(email' is not a column list; write table(column, ...) or schema.table(column, ...)"),
    ({"not_null": ["users"]}, "validation.not_null.0: 'users' is not a column; write table.column or schema.table.column"),
    ({"row_counts": {"users": {"min": 5, "max": 1}}}, "validation.row_counts.users: min 5 is greater than max 1"),
    ({"custom": [{"name": "x", "sql": "SELECT 1", "expect": "no_rows"}]}, "validation.custom.0.expect"),
    ({"statment_timeout_s": 5}, "validation.statment_timeout_s: unknown key; did you mean 'statement_timeout_s'?"),
])
def test_malformed_validation_config_is_a_config_error_naming_the_key(section, message):
    data = {"environments": {"production": {"role": "production", "database_url": "postgresql://u@h/db"}},
            "storage": {"url": "file:///tmp/x"}, "validation": section}
    with pytest.raises(ConfigError) as err:
        parse_settings(data, source="dataops.yaml", env={})
    assert err.value.message.startswith(f"dataops.yaml: {message}")


# -- checksums, fingerprints, parity -----------------------------------------------------------------

def test_checksums_equal_for_rows_in_another_order_and_differ_for_one_value(template, copies):
    other = copies()
    execute(other, "CLUSTER orders USING orders_created_at_idx; CLUSTER audit_logs USING audit_logs_user_id_idx")
    with pg.connect(other) as conn:  # really in another physical order
        first = conn.execute("SELECT id FROM orders LIMIT 1").fetchone()[0]
    assert first != 1
    a, b = table_checksums(env(template)), table_checksums(env(other, "staging", "staging"))
    assert a == b and set(a) == {"categories", "products", "users", "user_emails", "user_profiles", "orders",
                                 "settings", "feature_flags", "audit_logs"}
    execute(other, "UPDATE orders SET amount = amount + 0.01 WHERE id = 7")
    changed = table_checksums(env(other, "staging", "staging"), ["orders", "users"])
    assert changed["orders"].rows == a["orders"].rows and changed["orders"].checksum != a["orders"].checksum
    assert changed["users"] == a["users"]
    # Leaving out a column leaves out its changes (anonymized columns; the trigger sets updated_at)
    execute(other, "UPDATE users SET email = 'masked-' || id || '@example.com'")
    left_out = {"users": ["email", "updated_at"]}
    masked = table_checksums(env(other), ["users"], exclude=left_out)["users"]
    assert masked == table_checksums(env(template), ["users"], exclude=left_out)["users"]
    assert "email" not in masked.columns
    assert table_checksums(env(other), ["users"], exclude={"users": ["email"]}) != table_checksums(
        env(template), ["users"], exclude={"users": ["email"]})
    only = table_checksums(env(template), ["users"], columns={"users": ["id", "email"]})["users"]
    assert isinstance(only, TableChecksum) and only.columns == ("id", "email")


def test_changed_column_type_between_two_databases(template, copies):
    other = copies()
    execute(other, "ALTER TABLE users ALTER COLUMN phone TYPE varchar(40); UPDATE orders SET status = 'paid' WHERE id = 3")
    prod, staging = env(template), env(other, "staging", "staging")
    assert schema_fingerprint(prod) != schema_fingerprint(staging)
    assert [str(d) for d in diff_schemas(prod, staging)] == [
        "column public.users.phone differs: type: text (production) vs character varying(40) (staging)"]
    c = compare_environments(prod, staging)
    assert not c.ok and c.summary() == "production and staging differ: schemas differ (1 difference), 2 tables differ"
    status = {t.table: t.status for t in c.tables}
    assert status.pop("users") == "schema differs"  # no checksum for a table whose definition differs
    assert status.pop("orders") in ("data differs", "same")  # same if order 3 was already paid
    assert set(status.values()) == {"same"}
    users = next(t for t in c.tables if t.table == "users")
    assert (users.rows_a, users.rows_b, users.checksum_a) == (100, 100, None)
    assert compare_environments(prod, env(template, "copy", "staging")).ok


def test_restore_comparison_against_expected_counts_and_fingerprint(template):
    state = database_state(env(template), checksums=True)
    assert state.ok and state.counts["users"] == 100 and state.checksums["users"].startswith("100:")
    counts, problems = compare_with_expected(template, state.counts, state.fingerprint)
    assert (counts, problems) == (state.counts, [])
    wrong = {**state.counts, "users": 99}
    del wrong["settings"]
    _, problems = compare_with_expected(template, wrong, "0" * 64, source="the manifest")
    assert problems == [f"schema fingerprint {state.fingerprint[:12]} differs from the manifest's 000000000000",
                        "table settings: 8 rows, the manifest says absent", "table users: 100 rows, the manifest says 99"]
    sums = {**state.checksums, "orders": "307:0000000000000000"}
    _, problems = compare_with_expected(template, state.counts, state.fingerprint, sums, source="the manifest")
    assert problems == [f"table orders: checksum {state.checksums['orders']}, the manifest says 307:0000000000000000"]


# -- the flow and the command --------------------------------------------------------------------------

def test_flow_fails_with_the_report_when_a_check_fails(prefect_api, copies, write_config, s3_bucket):
    from dataops.flows.validate_database import validate_database

    db = copies()
    cfg = write_config({"production": ("production", db)}, bucket=s3_bucket,
                       extra={"validation": {"not_null": ["users.phone"]}})
    state = validate_database("production", config=str(cfg), return_state=True)
    assert state.is_failed()
    exc = state.result(raise_on_failure=False)
    assert isinstance(exc, ValidationFailed) and exc.report["ok"] is False
    assert exc.message == exc.report["verdict"] == f"FAILED: production: 1 of {exc.report['summary']['checks']} checks failed"
    (failed,) = [c for c in exc.report["checks"] if c["status"] == "fail"]
    assert (failed["kind"], failed["table"], failed["name"]) == ("not_null", "users", "users.phone")
    text = format_report(exc.report)
    assert text.splitlines()[-1] == exc.report["verdict"]
    assert "FAIL    not null" in text


def test_cli_exit_codes_text_and_json(prefect_api, template, copies, write_config, s3_bucket):
    staging = copies()
    execute(staging, "ALTER TABLE users ALTER COLUMN phone TYPE varchar(40)")
    cfg = write_config({"production": ("production", template), "staging": ("staging", staging)}, bucket=s3_bucket,
                       extra={"validation": CLEAN_CONFIG})
    run_env = {"PREFECT_API_URL": prefect_api}

    r = run_cli("--config", str(cfg), "validate", "production", env=run_env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "OK: production: 37 checks passed"
    assert "PASS    foreign key           orders         orders_user_id_fkey" in r.stdout

    r = run_cli("--config", str(cfg), "validate", "production", "--against", "staging", "--json", env=run_env)
    assert r.returncode == 1
    report = json.loads(r.stdout)
    assert report["verdict"] == ("FAILED: production: 37 checks passed; production and staging differ: "
                                 "schemas differ (1 difference), 1 table differs")
    assert [d["text"] for d in report["comparison"]["schema_differences"]] == [
        "column public.users.phone differs: type: text (production) vs character varying(40) (staging)"]
    assert r.stderr.strip().splitlines()[-1] == ("error: production: 37 checks passed; production and staging differ: "
                                                 "schemas differ (1 difference), 1 table differs")

    r = run_cli("--config", str(cfg), "validate", "production", "--against", "staging", env=run_env)
    assert r.returncode == 1 and "users          100              100           -         schema differs" in r.stdout

    r = run_cli("--config", str(cfg), "validate", "prod", env=run_env)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: unknown environment 'prod' (known: production, staging); add it under environments: in {cfg}"

    bad = write_config({"production": ("production", template)}, bucket=s3_bucket, name="bad.yaml",
                       extra={"validation": {"unique": ["users(emial)"]}})
    r = run_cli("--config", str(bad), "validate", "production", env=run_env)
    assert r.returncode == 2 and r.stderr.strip() == 'error: column "emial" does not exist in table "public.users"'
