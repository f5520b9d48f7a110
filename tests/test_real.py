"""Every operation on public sample databases (pagila, northwind, chinook, employees), the way a user runs
them: the `dataops` command with a dataops.yaml and rules written for that schema. `make test-real`.

The databases are committed under tests/real/ (see each SOURCE.md) and loaded once per session into a
template, which every test clones. Each test checks the outcome with its own queries: per-table checksums
of sorted row texts, per-row comparisons by primary key across databases, orphan counts under every
foreign key. Each command's wall time is printed in a table at the end (bench/RESULTS.md uses it);
DATAOPS_REAL_TIMINGS=path.json also writes it as JSON. DATAOPS_REAL_EMPLOYEES_SCALE=N loads employees
N times over (N=30: about 3.9 million rows).
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from conftest import run_cli
from psycopg import sql
from real import DATABASES, load_real, table_rows

from dataops.dsn import Dsn
from dataops.tasks import pg

pytestmark = [pytest.mark.real, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parent.parent
SALT = {"DATAOPS_ANON_SALT": "real-samples-salt-5f0c1e9a7b3d"}
EMPLOYEES_SCALE = int(os.environ.get("DATAOPS_REAL_EMPLOYEES_SCALE", "1"))


# -- what a user writes for each database ------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    name: str
    rules: dict  # anonymize.rules
    subset: dict  # refresh.subset
    subset_expect: dict  # table -> SQL on the source counting the rows staging must hold (others: all rows)
    personal: tuple  # table.column the PII guard must name when no rule is written
    transform: str  # module source
    transform_table: str
    transform_changes: str  # SQL before the run: how many rows the transform must change
    transform_after: str  # SQL after the run (same session as transform_setup) that must return 0
    migration: tuple  # (table, column, type, index)
    transform_setup: str | None = None  # SQL run before the transform, in the session that checks it after
    side_effects: tuple = ()  # tables a transform's triggers write to (left out of the revert comparison)
    known_problems: tuple = ()  # names of the checks `dataops validate` must fail on the database as published
    fix: str | None = None  # ...and the fix it suggests, which the user runs before anything else
    skipped: tuple = ()  # tables whose checks validate must skip (an unpopulated materialized view)


PAGILA = Sample(
    name="pagila",
    rules={
        "customer": {"first_name": "first_name", "last_name": "last_name", "email": {"faker": "email", "unique": True}},
        "staff": {"first_name": "first_name", "last_name": "last_name", "email": {"faker": "email", "unique": True},
                  "username": {"template": "staff_{staff_id}"}, "password": "hash", "picture": None},
        "address": {"address": "street_address", "address2": None, "phone": {"partial": {"keep_last": 2}},
                    "postal_code": "postcode", "district": "keep"},
        "actor": {"first_name": "keep", "last_name": "keep"},  # film credits are public
        "city": {"city": "keep"},
        "country": {"country": "keep"},
    },
    subset={"payment": "payment_date >= '2022-07-01'"},  # the partitioned table: only its July partition
    subset_expect={"payment": "SELECT count(*) FROM public.payment WHERE payment_date >= '2022-07-01'"},
    personal=("customer.first_name", "customer.last_name", "customer.email", "staff.first_name", "staff.last_name",
              "staff.email", "staff.password", "staff.picture", "address.address", "address.phone"),
    transform='''
        """Zero-amount payments are charged the film's rental rate."""
        TABLE = "payment"
        WHERE = "amount = 0"
        SET = {"amount": "(SELECT f.rental_rate FROM public.rental r JOIN public.inventory i USING (inventory_id) "
                         "JOIN public.film f USING (film_id) WHERE r.rental_id = payment.rental_id)"}
        SNAPSHOT = ["amount"]
        VERIFY = "SELECT payment_id FROM public.payment WHERE amount = 0"
    ''',
    transform_table="payment",
    transform_changes="SELECT count(*) FROM public.payment WHERE amount = 0",
    transform_setup="CREATE TEMP TABLE old_zero AS SELECT payment_id FROM public.payment WHERE amount = 0",
    transform_after="SELECT count(*) FROM public.payment p JOIN public.rental r USING (rental_id) JOIN public.inventory i "
                    "USING (inventory_id) JOIN public.film f USING (film_id) WHERE p.amount = 0 "
                    "OR (p.payment_id IN (SELECT payment_id FROM old_zero) AND p.amount <> f.rental_rate)",
    migration=("rental", "late_fee", "numeric(5,2)", "rental_late_fee_idx"),
    skipped=("rental_by_category",),  # created WITH NO DATA, with a unique index
)

NORTHWIND = Sample(
    name="northwind",
    rules={
        "customers": {"contact_name": "name", "address": "street_address", "city": "city", "postal_code": "postcode",
                      "phone": "phone_number", "fax": "phone_number"},
        "employees": {"first_name": "first_name", "last_name": "last_name", "birth_date": {"shift_days": 365},
                      "address": "street_address", "city": "city", "postal_code": "postcode",
                      "home_phone": "phone_number", "extension": "keep", "photo": None, "notes": None,
                      "photo_path": None},
        "orders": {"ship_name": "company", "ship_address": "street_address", "ship_city": "keep",
                   "ship_postal_code": "postcode"},
        "categories": {"picture": "keep"},  # product category artwork, not a person
        "shippers": {"phone": "keep"},  # the carriers' switchboards
        "suppliers": {"contact_name": "name", "address": "keep", "city": "keep", "postal_code": "keep",
                      "phone": "keep", "fax": "keep"},  # business addresses
    },
    subset={"orders": "order_date >= '1998-01-01'"},
    subset_expect={
        "orders": "SELECT count(*) FROM public.orders WHERE order_date >= '1998-01-01'",
        "order_details": "SELECT count(*) FROM public.order_details WHERE order_id IN "
                         "(SELECT order_id FROM public.orders WHERE order_date >= '1998-01-01')",
    },
    personal=("customers.contact_name", "customers.address", "customers.phone", "employees.first_name",
              "employees.last_name", "employees.birth_date", "employees.address", "employees.home_phone",
              "employees.photo", "employees.notes", "orders.ship_address", "suppliers.contact_name"),
    transform='''
        """Discounts are capped at 20%: the 25% ones were granted by mistake."""
        TABLE = "order_details"
        WHERE = "discount > 0.2::real"
        SET = {"discount": "0.2::real"}
        SNAPSHOT = ["discount"]
        VERIFY = "SELECT order_id FROM public.order_details WHERE discount > 0.2::real"
    ''',
    transform_table="order_details",
    transform_changes="SELECT count(*) FROM public.order_details WHERE discount > 0.2::real",
    transform_after="SELECT count(*) FROM public.order_details WHERE discount > 0.2::real",
    migration=("orders", "tracking_number", "varchar(40)", "orders_tracking_number_idx"),
)

CHINOOK = Sample(
    name="chinook",
    rules={
        "customer": {"first_name": "first_name", "last_name": "last_name", "company": "keep",
                     "address": "street_address", "city": "city", "state": "keep", "postal_code": "postcode",
                     "phone": "phone_number", "fax": "phone_number", "email": {"faker": "email", "unique": True}},
        "employee": {"first_name": "first_name", "last_name": "last_name", "birth_date": {"shift_days": 365},
                     "address": "street_address", "city": "city", "postal_code": "postcode",
                     "phone": "phone_number", "fax": "phone_number", "email": {"faker": "email", "unique": True}},
        "invoice": {"billing_address": "street_address", "billing_city": "city", "billing_postal_code": "postcode"},
    },
    subset={"invoice": "invoice_date >= '2025-01-01'"},
    subset_expect={
        "invoice": "SELECT count(*) FROM public.invoice WHERE invoice_date >= '2025-01-01'",
        "invoice_line": "SELECT count(*) FROM public.invoice_line WHERE invoice_id IN "
                        "(SELECT invoice_id FROM public.invoice WHERE invoice_date >= '2025-01-01')",
    },
    personal=("customer.first_name", "customer.last_name", "customer.address", "customer.phone", "customer.email",
              "employee.first_name", "employee.last_name", "employee.birth_date", "employee.email",
              "invoice.billing_address"),
    transform='''
        """Tracks without a composer say 'Unknown', as the shop's pages do."""
        TABLE = "track"
        WHERE = "composer IS NULL"
        SET = {"composer": "'Unknown'"}
        SNAPSHOT = ["composer"]
        VERIFY = "SELECT track_id FROM public.track WHERE composer IS NULL"
    ''',
    transform_table="track",
    transform_changes="SELECT count(*) FROM public.track WHERE composer IS NULL",
    transform_after="SELECT count(*) FROM public.track WHERE composer IS NULL",
    migration=("invoice", "paid_at", "timestamp", "invoice_paid_at_idx"),
)

EMPLOYEES = Sample(
    name="employees",
    rules={
        "employee": {"first_name": "first_name", "last_name": "last_name", "birth_date": {"shift_days": 365},
                     "gender": "keep"},
        "audit": {"user_name": "keep"},  # database role names
    },
    subset={"employee": "hire_date >= '1995-01-01'"},
    subset_expect={
        "employee": "SELECT count(*) FROM public.employee WHERE hire_date >= '1995-01-01'",
        **{t: f"SELECT count(*) FROM public.{t} WHERE emp_no IN "
              "(SELECT emp_no FROM public.employee WHERE hire_date >= '1995-01-01')"
           for t in ("salary", "title", "dept_emp", "dept_manager")},
    },
    personal=("employee.first_name", "employee.last_name", "employee.birth_date"),
    transform='''
        """A 2% raise on every current salary."""
        TABLE = "salary"
        WHERE = "to_date = '9999-01-01'"
        SET = {"amount": "round(amount * 1.02)::int"}
        SNAPSHOT = ["amount"]
    ''',
    transform_table="salary",
    transform_changes="SELECT count(*) FROM public.salary WHERE to_date = '9999-01-01'",
    transform_setup="CREATE TEMP TABLE old_current AS SELECT emp_no, from_date, amount FROM public.salary "
                    "WHERE to_date = '9999-01-01'",
    transform_after="SELECT count(*) FROM public.salary s JOIN old_current o USING (emp_no, from_date) "
                    "WHERE s.amount <> round(o.amount * 1.02)::int",
    migration=("employee", "email", "text", "employee_email_idx"),
    side_effects=("public.audit",),  # salary_log_trigger logs every UPDATE (under row-level security)
    # The dump inserts explicit emp_no values into a SERIAL and never moves its sequence: the next insert
    # that takes the default would collide with employee 10001. validate says so and says how to fix it.
    known_problems=("employee_emp_no_seq",),
    fix="SELECT setval('public.employee_emp_no_seq', (SELECT max(emp_no) FROM public.employee))",
)

SAMPLES = {s.name: s for s in (PAGILA, NORTHWIND, CHINOOK, EMPLOYEES)}
assert set(SAMPLES) == set(DATABASES)
NAMES = list(SAMPLES)


# -- timings -----------------------------------------------------------------------------------------------

TIMINGS: dict[str, dict[str, float]] = {}
ROWS: dict[str, int] = {}


def record(db: str, op: str, seconds: float) -> None:
    TIMINGS.setdefault(db, {})[op] = round(seconds, 2)
    print(f"[real] {db}: {op} {seconds:.1f} s")


class _TimingsReport:
    """Prints the table at the end of the run (pytest's terminal summary: never captured)."""

    def pytest_terminal_summary(self, terminalreporter):
        for line in timings_table():
            terminalreporter.write_line(line)
        path = os.environ.get("DATAOPS_REAL_TIMINGS")
        if path and TIMINGS:
            Path(path).write_text(json.dumps({"seconds": TIMINGS, "rows": ROWS}, indent=2))


@pytest.fixture(scope="module", autouse=True)
def _timings_report(request):
    plugins = request.config.pluginmanager
    if not any(isinstance(p, _TimingsReport) for p in plugins.get_plugins()):
        plugins.register(_TimingsReport())
    yield


def timings_table() -> list[str]:
    if not TIMINGS:
        return []
    ops = list(dict.fromkeys(op for per in TIMINGS.values() for op in per))
    width = max(len(o) for o in ops)
    lines = ["", "real sample databases: seconds per command (wall time, including the CLI's start)",
             f"{'operation'.ljust(width)}  " + "  ".join(f"{n:>10}" for n in NAMES),
             f"{'rows'.ljust(width)}  " + "  ".join(f"{ROWS[n]:>10,}" if n in ROWS else f"{'-':>10}" for n in NAMES)]
    for op in ops:
        cells = [TIMINGS.get(n, {}).get(op) for n in NAMES]
        lines.append(f"{op.ljust(width)}  " + "  ".join(f"{c:>10.1f}" if c is not None else f"{'-':>10}" for c in cells))
    return lines


# -- databases ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def templates(pg_server_dsn):
    """name -> a database holding the sample as loaded, never changed: each test clones it."""
    made: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in made:
            tpl = f"real_tpl_{name}_{uuid.uuid4().hex[:8]}"
            pg.create_database(pg_server_dsn, tpl)
            made[name] = tpl
            started = time.monotonic()
            load_real(name, pg_server_dsn.with_database(tpl), scale=EMPLOYEES_SCALE if name == "employees" else 1)
            record(name, "load (psql)", time.monotonic() - started)
            if SAMPLES[name].fix:  # what `dataops validate` asks for (test_validate_passes checks that it does)
                scalar(pg_server_dsn.with_database(tpl), SAMPLES[name].fix)
            rows = table_rows(pg_server_dsn.with_database(tpl))
            ROWS[name] = sum(rows.values())
            print(f"[real] {name}: {sum(rows.values()):,} rows in {len(rows)} tables")
        return made[name]

    yield get
    for tpl in made.values():
        pg.drop_database(pg_server_dsn, tpl)


@pytest.fixture
def dbs(pg_server_dsn, templates):
    """dbs(prefix, sample=None): a new database, a clone of the sample's template or empty."""
    created: list[str] = []

    def make(prefix: str, sample: str | None = None) -> Dsn:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        with pg.connect(pg_server_dsn, autocommit=True, dbname="postgres") as conn:
            tpl = sql.SQL(" TEMPLATE {}").format(sql.Identifier(templates(sample))) if sample else sql.SQL(
                " TEMPLATE template0")
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)) + tpl)
        created.append(name)
        return pg_server_dsn.with_database(name)

    yield make
    for name in created:
        for leftover in (name, pg.previous_name(name)):
            pg.drop_database(pg_server_dsn, leftover)


def source_of(pg_server_dsn, templates, name) -> Dsn:
    return pg_server_dsn.with_database(templates(name))


# -- the user's side: the CLI, timed -------------------------------------------------------------------------

@pytest.fixture
def cli(prefect_api):
    def run(db: str, op: str | None, cfg: Path, *args: str, ok: bool = True, env: dict | None = None):
        started = time.monotonic()
        r = run_cli("--config", str(cfg), *args, env={"PREFECT_API_URL": prefect_api, **SALT, **(env or {})},
                    timeout=1800)
        if op:
            record(db, op, time.monotonic() - started)
        if ok:
            assert r.returncode == 0, (f"dataops {' '.join(args)} on {db} exited {r.returncode}: "
                                       f"{r.stderr.strip()[-3000:]}\n{r.stdout[-2000:]}")
        return r

    return run


def config(write_config, s3_bucket, sample: Sample, envs: dict, name: str = "dataops.yaml", **extra):
    body = {"anonymize": {"salt": "${DATAOPS_ANON_SALT}", "rules": sample.rules}, "refresh": {"subset": sample.subset}}
    body.update(extra)
    return write_config(envs, bucket=s3_bucket, extra=body, name=name)


# -- our own queries -----------------------------------------------------------------------------------------

def tables(conn) -> list[tuple[str, str]]:
    return conn.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND n.nspname NOT IN ('pg_catalog', "
        "'information_schema') AND n.nspname NOT LIKE 'pg\\_%' AND n.nspname NOT LIKE 'dataops\\_%' "
        "ORDER BY 1, 2").fetchall()


def checksums(dsn: Dsn, columns: dict[str, list[str]] | None = None) -> dict[str, tuple[int, str]]:
    """table -> (rows, md5 of the sorted row texts): order-independent, every type as PostgreSQL prints it.
    `columns` limits a table to some of its columns."""
    out = {}
    with psycopg.connect(dsn.conninfo(), autocommit=True) as conn:
        for schema, table in tables(conn):
            label = f"{schema}.{table}"
            cols = (columns or {}).get(label)
            row = sql.SQL("ROW({})").format(sql.SQL(", ").join(map(sql.Identifier, cols))) if cols else sql.SQL("t")
            out[label] = conn.execute(sql.SQL(
                "SELECT count(*), coalesce(md5(string_agg(r, E'\\n' ORDER BY r COLLATE \"C\")), '') "
                "FROM (SELECT {}::text AS r FROM {}.{} t) s").format(
                row, sql.Identifier(schema), sql.Identifier(table))).fetchone()
    return out


def sequences(dsn: Dsn) -> dict[str, int]:
    with psycopg.connect(dsn.conninfo(), autocommit=True) as conn:
        return dict(conn.execute("SELECT schemaname || '.' || sequencename, last_value FROM pg_sequences "
                                 "WHERE schemaname NOT LIKE 'dataops\\_%'").fetchall())


def schema_shape(dsn: Dsn) -> dict:
    """Columns (with types and defaults), indexes and constraints: what a migration and its downgrade touch."""
    with psycopg.connect(dsn.conninfo(), autocommit=True) as conn:
        cols = conn.execute("SELECT table_schema, table_name, column_name, data_type, column_default, is_nullable "
                            "FROM information_schema.columns WHERE table_schema NOT IN ('pg_catalog', "
                            "'information_schema') AND table_schema NOT LIKE 'dataops\\_%' ORDER BY 1, 2, 3").fetchall()
        idx = conn.execute("SELECT schemaname, tablename, indexname, indexdef FROM pg_indexes WHERE schemaname NOT IN "
                           "('pg_catalog') AND schemaname NOT LIKE 'dataops\\_%' ORDER BY 1, 2, 3").fetchall()
        cons = conn.execute("SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint "
                            "WHERE connamespace::regnamespace::text NOT LIKE 'dataops\\_%' ORDER BY 1, 2").fetchall()
    return {"columns": cols, "indexes": idx, "constraints": cons}


def scalar(dsn: Dsn, query: str):
    with psycopg.connect(dsn.conninfo(), autocommit=True) as conn:
        return conn.execute(query).fetchone()[0]


def orphans(dsn: Dsn) -> list[str]:
    """Rows under every declared foreign key (partitions' own included) whose parent row is missing."""
    bad = []
    with psycopg.connect(dsn.conninfo(), autocommit=True) as conn:
        fks = conn.execute("""
            SELECT conrelid::regclass::text, confrelid::regclass::text, conname,
                   (SELECT array_agg(quote_ident(attname) ORDER BY k.o) FROM unnest(conkey) WITH ORDINALITY k(n, o)
                    JOIN pg_attribute ON attrelid = conrelid AND attnum = k.n),
                   (SELECT array_agg(quote_ident(attname) ORDER BY k.o) FROM unnest(confkey) WITH ORDINALITY k(n, o)
                    JOIN pg_attribute ON attrelid = confrelid AND attnum = k.n)
            FROM pg_constraint WHERE contype = 'f' AND conparentid = 0""").fetchall()
        for child, parent, name, ccols, pcols in fks:
            join = " AND ".join(f"p.{p} = c.{c}" for c, p in zip(ccols, pcols))
            notnull = " AND ".join(f"c.{c} IS NOT NULL" for c in ccols)
            n = conn.execute(f"SELECT count(*) FROM {child} c WHERE {notnull} AND NOT EXISTS "
                             f"(SELECT 1 FROM {parent} p WHERE {join})").fetchone()[0]
            if n:
                bad.append(f"{child} {name}: {n} orphaned rows")
    return bad


def keyed(dsn: Dsn, table: str, column: str) -> dict[tuple, object]:
    """primary key -> the column's value, for the rows of public.<table>."""
    with psycopg.connect(dsn.conninfo(), autocommit=True) as conn:
        pk = [r[0] for r in conn.execute(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
            "WHERE i.indrelid = %s::regclass AND i.indisprimary ORDER BY array_position(i.indkey, a.attnum)",
            (f"public.{table}",)).fetchall()]
        assert pk, f"{table} has no primary key"
        rows = conn.execute(sql.SQL("SELECT {}, {} FROM public.{}").format(
            sql.SQL(", ").join(map(sql.Identifier, pk)), sql.Identifier(column), sql.Identifier(table))).fetchall()
    return {r[:-1]: r[-1] for r in rows}


HIGH_ENTROPY = ("email", "phone", "fax", "address", "password", "username")


def masking_problems(source: Dsn, target: Dsn, rules: dict) -> list[str]:
    """What a masked copy must look like, rule by rule, row by row (matched by primary key): a masked value
    never equals its own original; a null rule leaves NULL; keep leaves the original; and no original of an
    email, phone, address, password or user name appears anywhere in the copied column."""
    problems = []
    for table, columns in rules.items():
        for column, rule in columns.items():
            src, dst = keyed(source, table, column), keyed(target, table, column)
            common = [k for k in dst if k in src]
            assert common or not dst, f"{table}: no row of the copy matches a source row by primary key"
            if rule == "keep":
                same = sum(1 for k in common if src[k] == dst[k])
                if same != len(common):
                    problems.append(f"{table}.{column} (keep): {len(common) - same} of {len(common)} rows changed")
            elif rule is None:
                left = sum(1 for k in common if dst[k] is not None)
                if left:
                    problems.append(f"{table}.{column} (null): {left} rows not NULL")
            else:
                same = [k for k in common if src[k] not in (None, "") and src[k] == dst[k]]
                # A Faker name can be drawn for a row whose real name it is (pagila's staff were themselves
                # made with Faker): by chance, for a few rows of a low-entropy column. More is a leak.
                chance = 0 if any(w in column for w in HIGH_ENTROPY) or not isinstance(rule, str) else \
                    max(2, len(common) // 200)
                if len(same) > chance:
                    problems.append(f"{table}.{column}: {len(same)} of {len(common)} rows kept their original value, "
                                    f"e.g. key {same[0]}")
                if any(w in column for w in HIGH_ENTROPY):
                    leaked = ({v for v in src.values() if v not in (None, "")} &
                              {v for v in dst.values() if v not in (None, "")})
                    if leaked:
                        problems.append(f"{table}.{column}: {len(leaked)} source values appear in the copy, "
                                        f"e.g. {sorted(map(str, leaked))[0][:3]}...")
    return problems


def last_word(stdout: str) -> str:
    return stdout.strip().splitlines()[-1].split()[-1]


# -- the tests ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_backup_verify_restore_then_validate_against_the_restored_copy(name, dbs, cli, write_config, s3_bucket):
    sample = SAMPLES[name]
    prod, copy = dbs("prod", name), dbs("copy")
    cfg = config(write_config, s3_bucket, sample,
                 {"production": ("production", prod), "copy": ("development", copy)})
    before, seqs = checksums(prod), sequences(prod)

    backup_id = last_word(cli(name, "backup", cfg, "backup", "production").stdout)
    cli(name, "verify-backup", cfg, "verify-backup", "production", backup_id)
    cli(name, "restore", cfg, "restore", "production", backup_id, "--into", "copy")

    assert checksums(prod) == before, "the backup changed production"
    restored = checksums(copy)
    assert restored.keys() == before.keys()
    assert {t: v for t, v in restored.items() if v != before[t]} == {}, "restored tables differ from production"
    assert sequences(copy) == seqs
    assert schema_shape(copy) == schema_shape(prod)

    r = cli(name, "validate --against", cfg, "validate", "production", "--against", "copy", "--json", ok=False)
    report = json.loads(r.stdout) if r.stdout.strip().startswith("{") else None
    assert r.returncode == 0 and report and report["ok"], (
        f"validate --against a restored copy of {name} failed: {r.stderr.strip()[-1500:]}\n"
        + ("\n".join(d["text"] for d in report["comparison"]["schema_differences"][:10]) if report else ""))
    comp = report["comparison"]
    assert comp["schema_differences"] == []
    assert {t["table"]: t["status"] for t in comp["tables"] if t["status"] != "same"} == {}


@pytest.mark.parametrize("name", NAMES)
def test_validate_passes(name, dbs, cli, write_config, s3_bucket):
    """On the database as published (loaded here, not the template): every check passes, but for the
    problems the sample really has, which validate must find; after the fix it suggests, all pass."""
    sample = SAMPLES[name]
    prod = dbs("prod")
    load_real(name, prod, scale=EMPLOYEES_SCALE if name == "employees" else 1)
    cfg = config(write_config, s3_bucket, sample, {"production": ("production", prod)})
    before = checksums(prod)

    def failed_checks(r) -> dict[str, str]:
        report = json.loads(r.stdout) if r.stdout.strip().startswith("{") else None
        assert report and report["checks"], f"validate {name}: exit {r.returncode}: {r.stderr.strip()[-1500:]}"
        assert report["ok"] == (r.returncode == 0)
        return {c["constraint"] or c["name"]: f"{c['kind']} {c['table']}: {c['detail']}"
                for c in report["checks"] if c["status"] in ("fail", "error")}

    r = cli(name, "validate", cfg, "validate", "production", "--json", ok=False)
    failed = failed_checks(r)
    assert sorted(failed) == sorted(sample.known_problems), f"validate {name}: {failed}"
    skipped = {c["table"].rpartition(".")[2] for c in json.loads(r.stdout)["checks"] if c["status"] == "skip"}
    assert skipped == set(sample.skipped), f"validate {name} skipped the checks of {skipped}"
    assert checksums(prod) == before, "validate wrote to the database"
    if sample.fix:
        assert r.returncode == 1
        scalar(prod, sample.fix)
        r = cli(name, None, cfg, "validate", "production", "--json", ok=False)
        assert failed_checks(r) == {} and r.returncode == 0


MIGRATION = '''
    """{table}.{column} {type}, indexed"""
    from alembic import op

    revision = "0001"
    down_revision = None
    branch_labels = None
    depends_on = None
    transactional = False


    def upgrade() -> None:
        with op.get_context().autocommit_block():
            op.execute("ALTER TABLE public.{table} ADD COLUMN IF NOT EXISTS {column} {type}")
            op.execute("DROP INDEX CONCURRENTLY IF EXISTS public.{index}")
            op.execute("CREATE INDEX CONCURRENTLY {index} ON public.{table} ({column})")


    def downgrade() -> None:
        with op.get_context().autocommit_block():
            op.execute("DROP INDEX CONCURRENTLY IF EXISTS public.{index}")
            op.execute("ALTER TABLE public.{table} DROP COLUMN IF EXISTS {column}")
'''


@pytest.mark.parametrize("name", NAMES)
def test_migrate_up_then_down(name, dbs, cli, write_config, s3_bucket, tmp_path):
    sample = SAMPLES[name]
    table, column, type_, index = sample.migration
    prod = dbs("prod", name)
    migrations = tmp_path / "migrations"
    (migrations / "versions").mkdir(parents=True)
    for f in ("env.py", "script.py.mako"):
        shutil.copy(REPO / "migrations" / f, migrations / f)
    (migrations / "versions" / f"0001_{table}_{column}.py").write_text(
        textwrap.dedent(MIGRATION).format(table=table, column=column, type=type_, index=index))
    cfg = config(write_config, s3_bucket, sample, {"production": ("production", prod)},
                 migrations={"path": str(migrations), "allow_auto_approve": True, "lock_timeout": "5s"})
    before_data, before_shape = checksums(prod), schema_shape(prod)

    cli(name, "migrate up", cfg, "migrate", "production", "up", "--auto-approve")

    shape = schema_shape(prod)
    assert any(c[1:3] == (table, column) for c in shape["columns"]), f"{table}.{column} was not added"
    assert any(i[2] == index for i in shape["indexes"]), f"index {index} was not built"
    assert scalar(prod, f"SELECT indisvalid FROM pg_index WHERE indexrelid = 'public.{index}'::regclass")
    with psycopg.connect(prod.conninfo(), autocommit=True) as conn:
        original = {f"public.{table}": [r[0] for r in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = 'public' AND table_name = %s "
            "AND column_name <> %s ORDER BY ordinal_position", (table, column)).fetchall()]}
    assert checksums(prod, original) == before_data, "the migration changed data"

    cli(name, "migrate down", cfg, "migrate", "production", "down", "--steps", "1", "--confirm", "production")

    assert schema_shape(prod) == before_shape, "the downgrade did not give the schema back"
    assert checksums(prod) == before_data


@pytest.mark.parametrize("name", NAMES)
def test_transform_run_then_revert(name, dbs, cli, write_config, s3_bucket, tmp_path):
    sample = SAMPLES[name]
    prod = dbs("prod", name)
    folder = tmp_path / "transforms"
    folder.mkdir()
    module = f"fix_{name}"
    (folder / f"{module}.py").write_text(textwrap.dedent(sample.transform))
    cfg = config(write_config, s3_bucket, sample, {"production": ("production", prod)},
                 transforms={"path": str(folder)})
    expected = scalar(prod, sample.transform_changes)
    assert expected > 0
    before = checksums(prod)

    with psycopg.connect(prod.conninfo(), autocommit=True) as conn:
        if sample.transform_setup:  # the rows as they were, in this session's temporary table
            conn.execute(sample.transform_setup)
        r = cli(name, "transform run", cfg, "transform", "production", "run", module)
        wrong = conn.execute(sample.transform_after).fetchone()[0]

    assert wrong == 0, f"{wrong} rows of {sample.transform_table} not changed as the transform says"
    after = checksums(prod)
    changed = {t for t in before if after[t] != before[t]}
    assert changed - set(sample.side_effects) == {f"public.{sample.transform_table}"}, f"the run changed {changed}"
    assert {t: n for t, (n, _) in after.items() if t not in sample.side_effects} == \
        {t: n for t, (n, _) in before.items() if t not in sample.side_effects}, "row counts changed"
    assert f"{expected:,}" in r.stdout, f"the run does not report {expected:,} changed rows:\n{r.stdout[-1500:]}"

    cli(name, "transform revert", cfg, "transform", "production", "revert", module)

    reverted = checksums(prod)
    assert {t: v for t, v in reverted.items() if t not in sample.side_effects} == \
        {t: v for t, v in before.items() if t not in sample.side_effects}, "the revert did not restore the rows"


@pytest.mark.parametrize("name", NAMES)
def test_pii_guard_names_every_personal_column(name, dbs, cli, write_config, s3_bucket):
    sample = SAMPLES[name]
    prod, stg = dbs("prod", name), dbs("stg")
    cfg = write_config({"production": ("production", prod), "staging": ("staging", stg)}, bucket=s3_bucket,
                       extra={"anonymize": {"salt": "${DATAOPS_ANON_SALT}"}})

    r = cli(name, "refresh-staging --check (no rules)", cfg, "refresh-staging", "--check", ok=False)

    named = {line.split()[2] for line in r.stdout.splitlines() if line.startswith("NO RULE")}
    assert r.returncode == 2, f"exit {r.returncode}: {r.stderr.strip()[-1500:]}"
    assert set(sample.personal) - named == set(), f"the guard misses {sorted(set(sample.personal) - named)}"

    cfg = config(write_config, s3_bucket, sample, {"production": ("production", prod),
                                                             "staging": ("staging", stg)}, name="rules.yaml")
    r = cli(name, "refresh-staging --check", cfg, "refresh-staging", "--check", ok=False)
    assert r.returncode == 0, f"with the rules: exit {r.returncode}: {r.stderr.strip()[-1500:]}\n{r.stdout[-1500:]}"


@pytest.mark.parametrize("name", NAMES)
def test_refresh_staging_masks_subsets_and_scans_for_leaks(name, dbs, cli, write_config, s3_bucket, pg_server_dsn,
                                                           templates):
    sample = SAMPLES[name]
    prod, stg = dbs("prod", name), dbs("stg")
    source = source_of(pg_server_dsn, templates, name)
    cfg = config(write_config, s3_bucket, sample, {"production": ("production", prod),
                                                             "staging": ("staging", stg)})
    before = checksums(prod)

    r = cli(name, "refresh-staging", cfg, "refresh-staging", "--source", "production", "--target", "staging")

    assert "leak scan: 0 leaked" in r.stdout, r.stdout[-2000:]
    assert checksums(prod) == before, "the refresh wrote to production"
    counts, expected = table_rows(stg), table_rows(source)
    for table, query in sample.subset_expect.items():
        expected[f"public.{table}"] = scalar(source, query)
    assert counts == expected, {t: (counts.get(t), expected.get(t)) for t in expected if counts.get(t) != expected[t]}
    assert orphans(stg) == []
    problems = masking_problems(source, stg, sample.rules)
    assert not problems, "\n".join(problems)
    unmasked = unmasked_columns(source, sample.rules)
    whole = {t for t in expected if f"{t.removeprefix('public.')}" not in sample.subset_expect}
    copied, original = checksums(stg, unmasked), checksums(source, unmasked)
    assert {t for t in whole if copied[t] != original[t]} == set(), "unmasked columns differ from the source"
    assert schema_shape(stg)["constraints"] == schema_shape(source)["constraints"]


@pytest.mark.parametrize("name", NAMES)
def test_anonymize_in_place(name, dbs, cli, write_config, s3_bucket, pg_server_dsn, templates):
    sample = SAMPLES[name]
    stg = dbs("stg", name)  # staging holds an unmasked copy (restored from a backup, say)
    source = source_of(pg_server_dsn, templates, name)
    cfg = config(write_config, s3_bucket, sample, {"staging": ("staging", stg)})
    unmasked = unmasked_columns(stg, sample.rules)
    before = checksums(stg, unmasked)

    r = cli(name, "anonymize", cfg, "anonymize", "staging")

    assert "leak scan: 0 leaked" in r.stdout, r.stdout[-2000:]
    assert table_rows(stg) == table_rows(source)
    problems = masking_problems(source, stg, sample.rules)
    assert not problems, "\n".join(problems)
    after = checksums(stg, unmasked)
    assert {t: v for t, v in after.items() if v != before[t]} == {}, "anonymize changed columns without a rule"
    assert orphans(stg) == []


def unmasked_columns(dsn: Dsn, rules: dict) -> dict[str, list[str]]:
    """public.<table> -> its columns without a rule, for the tables that have rules."""
    with psycopg.connect(dsn.conninfo(), autocommit=True) as conn:
        return {f"public.{t}": [c for (c,) in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = 'public' AND table_name = %s "
            "ORDER BY ordinal_position", (t,)).fetchall() if c not in cols] for t, cols in rules.items()}


RLS_SAMPLES = [n for n in NAMES if n == "employees"]  # audit: ENABLE ROW LEVEL SECURITY, policies TO PUBLIC


@pytest.mark.parametrize("name", RLS_SAMPLES)
def test_a_role_that_row_level_security_filters_is_refused_then_works_with_bypassrls(
        name, dbs, cli, write_config, s3_bucket, pg_server_dsn):
    """dataops as a least-privilege role (SELECT on every table, CREATEDB, staging's owner): row-level
    security would show it none of audit's rows. Backup, validate and refresh must refuse, one line naming
    the table, writing nothing; never a backup or a staging copy with rows silently missing. Once the role
    is given BYPASSRLS (what the error asks), they work and carry every row."""
    sample = SAMPLES[name]
    role = f"real_op_{uuid.uuid4().hex[:8]}"
    prod = dbs("prod", name)
    with psycopg.connect(prod.conninfo(), autocommit=True) as conn:
        # the audit trigger logs this as postgres: a row the policy (user_name = current_user) hides from role
        conn.execute("UPDATE public.salary SET amount = amount + 1 WHERE emp_no = 10001 AND to_date = '9999-01-01'")
        audit_rows = conn.execute("SELECT count(*) FROM public.audit").fetchone()[0]
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN CREATEDB NOSUPERUSER NOBYPASSRLS").format(sql.Identifier(role)))
        for grant in ("GRANT USAGE ON SCHEMA public TO {}", "GRANT SELECT ON ALL TABLES IN SCHEMA public TO {}",
                      "GRANT SELECT ON ALL SEQUENCES IN SCHEMA public TO {}"):
            conn.execute(sql.SQL(grant).format(sql.Identifier(role)))
    assert audit_rows == 1
    stg = dbs("stg")
    with pg.connect(pg_server_dsn, autocommit=True, dbname="postgres") as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(stg.database), sql.Identifier(role)))
    as_role = {e: f"postgresql://{role}@/{d.database}?host={d.host}&port={d.port}" for e, d in (("prod", prod),
                                                                                                ("stg", stg))}
    cfg = config(write_config, s3_bucket, sample, {"production": ("production", as_role["prod"]),
                                                             "staging": ("staging", as_role["stg"])})
    stg_before = checksums(stg)
    try:
        wrong = []
        for op, args in (("backup (RLS role)", ("backup", "production")),
                         ("validate (RLS role)", ("validate", "production")),
                         ("refresh-staging (RLS role)", ("refresh-staging",))):
            r = cli(name, op, cfg, *args, ok=False)
            err = r.stderr.strip().splitlines()
            if not (r.returncode == 2 and len(err) == 1 and err[0].startswith("error:")
                    and "row-level security" in err[0] and "audit" in err[0]):
                wrong.append(f"dataops {' '.join(args)} as {role}: exit {r.returncode}: {r.stderr.strip()[-1000:]}")
        r = cli(name, None, cfg, "backups", "production", "--json")
        if json.loads(r.stdout) != []:
            wrong.append("a refused backup left a backup behind")
        if checksums(stg) != stg_before:
            wrong.append("a refused refresh changed staging")

        with pg.connect(pg_server_dsn, autocommit=True, dbname="postgres") as conn:
            conn.execute(sql.SQL("ALTER ROLE {} BYPASSRLS").format(sql.Identifier(role)))
        backup_id = last_word(cli(name, "backup (BYPASSRLS role)", cfg, "backup", "production").stdout)
        manifest = next(m for m in json.loads(cli(name, None, cfg, "backups", "production", "--json").stdout)
                        if m["id"] == backup_id)
        assert {t.rpartition(".")[2]: n for t, n in manifest["tables"].items()}["audit"] == audit_rows
        cli(name, "refresh-staging (BYPASSRLS role)", cfg, "refresh-staging")
        assert scalar(pg_server_dsn.with_database(stg.database), "SELECT count(*) FROM public.audit") == audit_rows
        assert not wrong, "\n".join(wrong)  # what the refusals got wrong (the rest ran: BYPASSRLS works)
    finally:
        with pg.connect(pg_server_dsn, autocommit=True, dbname="postgres") as conn:
            owned = [d for (d,) in conn.execute(
                "SELECT datname FROM pg_database WHERE datdba = (SELECT oid FROM pg_roles WHERE rolname = %s)",
                (role,)).fetchall()]
        for d in owned:  # staging and whatever copy the refresh left: ours, dropped
            pg.drop_database(pg_server_dsn, d)
        with psycopg.connect(prod.conninfo(), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
