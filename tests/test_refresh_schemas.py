"""Subsets on a schema with the shapes real ones have: children following their parents
through every level, nullable and composite foreign keys, several parents, a self reference,
a foreign-key cycle (deferrable), an opted-out table and delete rules that cascade. The
expected rows are worked out here, in Python, from the source rows: an oracle independent
of the SQL the refresh generates."""

from __future__ import annotations

import pytest
from test_refresh_staging import broken_foreign_keys, rows, run_refresh, scratch_databases

from dataops.errors import BadInput, ConfigError
from dataops.settings import load_settings
from dataops.tasks import pg
from dataops.tasks.refresh.plan import resolve_environments
from dataops.tasks.refresh.steps import check_refresh

SCHEMA = """
CREATE TABLE offices (id int PRIMARY KEY, region text NOT NULL);
CREATE TABLE employees (id int PRIMARY KEY, office_id int NOT NULL REFERENCES offices,
                        reports_to int REFERENCES employees);
CREATE TABLE customers (id int PRIMARY KEY, country text NOT NULL);
CREATE TABLE products (id int PRIMARY KEY, discontinued boolean NOT NULL);
CREATE TABLE orders (id int PRIMARY KEY, customer_id int NOT NULL REFERENCES customers,
                     employee_id int REFERENCES employees, order_date date NOT NULL, status text NOT NULL);
CREATE TABLE order_details (order_id int REFERENCES orders, product_id int REFERENCES products, qty int NOT NULL,
                            PRIMARY KEY (order_id, product_id));
CREATE TABLE detail_notes (id int PRIMARY KEY, order_id int NOT NULL, product_id int NOT NULL, remark text,
                           FOREIGN KEY (order_id, product_id) REFERENCES order_details);
CREATE TABLE returns (id int PRIMARY KEY, order_id int REFERENCES orders, reason text);
CREATE TABLE order_audit (id int PRIMARY KEY, order_id int NOT NULL REFERENCES orders, at date NOT NULL);
CREATE TABLE teams (id int PRIMARY KEY, lead_id int);
CREATE TABLE members (id int PRIMARY KEY, team_id int NOT NULL REFERENCES teams,
                      buddy_id int REFERENCES members DEFERRABLE INITIALLY DEFERRED);
ALTER TABLE teams ADD FOREIGN KEY (lead_id) REFERENCES members DEFERRABLE INITIALLY DEFERRED;

INSERT INTO offices SELECT i, CASE WHEN i <= 2 THEN 'north' ELSE 'south' END FROM generate_series(1, 6) i;
INSERT INTO employees SELECT i, 1 + (i - 1) % 6, CASE WHEN i > 1 THEN i / 2 END FROM generate_series(1, 60) i;
INSERT INTO customers SELECT i, (ARRAY['NZ', 'DE', 'JP'])[1 + i % 3] FROM generate_series(1, 100) i;
INSERT INTO products SELECT i, i % 10 = 0 FROM generate_series(1, 30) i;
INSERT INTO orders SELECT i, 1 + i % 100, CASE WHEN i % 7 <> 0 THEN 1 + i % 60 END, DATE '2024-01-01' + i % 365,
                          CASE WHEN i % 50 = 0 THEN 'fraud' ELSE 'ok' END FROM generate_series(1, 400) i;
INSERT INTO order_details SELECT o, 1 + (o + k * 7) % 30, k FROM generate_series(1, 400) o, generate_series(1, 3) k
                          WHERE k <= 1 + o % 3;
INSERT INTO detail_notes SELECT row_number() OVER (), order_id, product_id, 'remark' FROM order_details
                         WHERE (order_id + product_id) % 4 = 0;
INSERT INTO returns SELECT i, CASE WHEN i % 5 <> 0 THEN i * 5 END, 'damaged' FROM generate_series(1, 80) i;
INSERT INTO order_audit SELECT i, 1 + (i * 3) % 400, DATE '2024-01-01' FROM generate_series(1, 200) i;
BEGIN;
INSERT INTO teams SELECT i, i * 10 FROM generate_series(1, 8) i;
INSERT INTO members SELECT i, 1 + (i - 1) / 10, CASE WHEN i <= 20 AND i % 5 = 0 THEN i + 40 END
                    FROM generate_series(1, 80) i;
COMMIT;
"""
FOREIGN_KEYS = 12

SUBSET = {"subset": {"orders": "order_date >= '2024-07-01'", "offices": "region = 'north'", "teams": "id <= 2",
                     "products": "NOT discontinued"},
          "copy_whole": ["order_audit"]}
DELETE = {"orders": "status = 'fraud'", "members": "id = 60"}


@pytest.fixture
def shop(make_db, write_config):
    prod, stg = make_db("prod"), make_db("stg")
    with pg.connect(prod, autocommit=True) as conn:
        conn.execute(SCHEMA)
    with pg.connect(stg, autocommit=True) as conn:
        conn.execute("CREATE TABLE old_staging (id int PRIMARY KEY); INSERT INTO old_staging VALUES (1)")

    def config(refresh_cfg: dict, delete: dict | None = None):
        anon = {"salt": "schemas-test-salt-0123456789", "delete": delete or {}}
        return write_config({"production": ("production", prod), "staging": ("staging", stg)},
                            extra={"anonymize": anon, "refresh": refresh_cfg})

    return prod, stg, config


def expected_rows(prod) -> dict[str, set]:
    """The subset rules worked out in Python on the source rows."""
    def table(query):
        return rows(prod, query)

    offices = dict(table("SELECT id, region FROM offices"))
    employees = {i: (o, r) for i, o, r in table("SELECT id, office_id, reports_to FROM employees")}
    products = dict(table("SELECT id, discontinued FROM products"))
    orders = {i: (e, d.isoformat(), s) for i, e, d, s in table("SELECT id, employee_id, order_date, status FROM orders")}
    details = {(o, p) for o, p in table("SELECT order_id, product_id FROM order_details")}
    notes = {i: (o, p) for i, o, p in table("SELECT id, order_id, product_id FROM detail_notes")}
    returns = dict(table("SELECT id, order_id FROM returns"))
    audit = dict(table("SELECT id, order_id FROM order_audit"))
    teams = dict(table("SELECT id, lead_id FROM teams"))
    members = {i: (t, b) for i, t, b in table("SELECT id, team_id, buddy_id FROM members")}

    # deleted rows and, transitively, every row pointing at one (through the cycle too)
    gone_orders = {i for i, (_, _, s) in orders.items() if s == "fraud"}
    gone_members, gone_teams = {60}, set()
    while True:
        teams_now = {t for t, lead in teams.items() if lead in gone_members}
        members_now = gone_members | {m for m, (t, b) in members.items() if t in teams_now or b in gone_members}
        if (teams_now, members_now) == (gone_teams, gone_members):
            break
        gone_teams, gone_members = teams_now, members_now

    # chosen: filters, and rows following their parents' chosen rows
    kept_orders = {i for i, (_, d, _) in orders.items() if d >= "2024-07-01"} - gone_orders
    kept_products = {i for i, disc in products.items() if not disc}
    kept_details = {(o, p) for o, p in details if o in kept_orders and p in kept_products}
    kept_notes = {i for i, key in notes.items() if key in kept_details}
    kept_returns = {i for i, o in returns.items() if o is None or o in kept_orders}
    kept_audit = {i for i, o in audit.items() if o not in gone_orders}  # copy_whole: all but the deleted
    kept_offices = {i for i, r in offices.items() if r == "north"}
    kept_employees = {i for i, (o, _) in employees.items() if o in kept_offices}
    kept_teams = {t for t in teams if t <= 2} - gone_teams
    kept_members = {m for m, (t, _) in members.items() if t in kept_teams} - gone_members

    # parents follow kept rows, to the end
    kept_orders |= {audit[i] for i in kept_audit} | {returns[i] for i in kept_returns if returns[i] is not None}
    kept_employees |= {orders[i][0] for i in kept_orders if orders[i][0] is not None}
    while True:
        more = {employees[e][1] for e in kept_employees if employees[e][1] is not None} - kept_employees
        if not more:
            break
        kept_employees |= more
    kept_offices |= {employees[e][0] for e in kept_employees}
    while True:
        t2 = kept_teams | {members[m][0] for m in kept_members}
        m2 = kept_members | {members[m][1] for m in kept_members if members[m][1] is not None} | {teams[t] for t in t2}
        if (t2, m2) == (kept_teams, kept_members):
            break
        kept_teams, kept_members = t2, m2
    assert not kept_members & gone_members and not kept_teams & gone_teams and not kept_orders & gone_orders
    return {"offices": kept_offices, "employees": kept_employees, "customers": set(range(1, 101)),
            "products": kept_products, "orders": kept_orders, "order_details": kept_details, "detail_notes": kept_notes,
            "returns": kept_returns, "order_audit": kept_audit, "teams": kept_teams, "members": kept_members}


KEYS = {"order_details": "order_id, product_id"}


def test_subset_children_follow_parents_through_every_level_and_every_key_holds(shop, pg_server_dsn):
    prod, stg, config = shop
    settings = load_settings(config(SUBSET, DELETE))
    want = expected_rows(prod)
    # the oracle exercises what it should: rows pulled in only as parents, cascades, closures
    assert want["orders"] - {i for (i,) in rows(prod, "SELECT id FROM orders WHERE order_date >= '2024-07-01'")}
    assert 2 not in want["teams"] and 5 in want["teams"] and {45, 50} <= want["members"]
    assert any(r > 0 for r in (len(want["employees"]) - 20, len(want["offices"]) - 2))

    check = check_refresh(settings, *resolve_environments(settings, None, None))
    counts = {t.table: t.subset for t in check.tables}
    totals = {t: rows(prod, f"SELECT count(*) FROM {t}")[0][0] for t in want}
    for t, ids in want.items():
        if t == "customers":
            assert counts[t] is None  # no filter reaches them: every row, not counted
        else:
            assert counts[t] == (len(ids), totals[t]), t
    assert rows(stg, "SELECT count(*) FROM old_staging") == [(1,)]  # --check wrote nothing

    report = run_refresh(settings)
    for t, ids in want.items():
        got = rows(stg, f"SELECT {KEYS.get(t, 'id')} FROM {t}")
        got = {r if len(r) > 1 else r[0] for r in got}
        assert got == ids, t
    assert {t.table: t.rows for t in report.tables} == {t: len(ids) for t, ids in want.items()}
    assert broken_foreign_keys(stg, expect=FOREIGN_KEYS) == []
    assert rows(stg, "SELECT to_regclass('old_staging')") == [(None,)] and scratch_databases(pg_server_dsn) == []
    # children of an order that came only as a parent (of an audit row) are not copied
    pulled = want["orders"] - {i for (i,) in rows(prod, "SELECT id FROM orders WHERE order_date >= '2024-07-01'")}
    assert rows(stg, "SELECT count(*) FROM order_details WHERE order_id = ANY(%s)", sorted(pulled)) == [(0,)]
    assert rows(prod, "SELECT count(*) FROM order_details WHERE order_id = ANY(%s)", sorted(pulled))[0][0] > 0


def test_without_subset_every_row_of_a_cycle_is_copied(shop, pg_server_dsn):
    prod, stg, config = shop
    with pg.connect(pg_server_dsn, autocommit=True) as conn:  # dates print as 13/01/2024 on the source
        conn.execute(f'ALTER DATABASE "{prod.database}" SET DateStyle = \'SQL, DMY\'')
    report = run_refresh(load_settings(config({})))
    for t in ("teams", "members", "employees", "order_details", "detail_notes"):
        assert rows(stg, f"SELECT count(*) FROM {t}") == rows(prod, f"SELECT count(*) FROM {t}"), t
    assert rows(stg, "SELECT id, order_date FROM orders ORDER BY id") == \
        rows(prod, "SELECT id, order_date FROM orders ORDER BY id")
    assert broken_foreign_keys(stg, expect=FOREIGN_KEYS) == [] and not any(t.subset for t in report.tables)
    deferrable = rows(stg, "SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND condeferrable AND condeferred")
    assert deferrable == [(2,)]


@pytest.mark.parametrize("refresh_cfg,message", [
    ({"copy_whole": ["order_audti"]},
     'refresh.copy_whole[order_audti]: table "public.order_audti" does not exist; did you mean order_audit?'),
    ({"subset": {"orders": "order_date >= '2024-07-01'"}, "copy_whole": ["sales.returns"]},
     'refresh.copy_whole[sales.returns]: table "sales.returns" does not exist'),
])
def test_copy_whole_names_a_real_table(shop, refresh_cfg, message):
    prod, stg, config = shop
    settings = load_settings(config(refresh_cfg))
    with pytest.raises(BadInput) as err:
        run_refresh(settings)
    assert err.value.message.startswith(message) and err.value.exit_code == 2
    assert "\n" not in err.value.message
    assert rows(stg, "SELECT count(*) FROM old_staging") == [(1,)]


def test_copy_whole_and_a_filter_on_one_table_is_refused_when_loading(shop):
    prod, stg, config = shop
    with pytest.raises(ConfigError, match="orders is in copy_whole and also has a subset filter"):
        load_settings(config({"subset": {"orders": "true"}, "copy_whole": ["orders"]}))
