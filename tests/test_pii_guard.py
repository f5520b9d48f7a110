"""The PII guard and the rules on a Northwind-like schema: short varchar columns take the
ordinary Faker rules (values picked among those that fit), the guard flags photos and
notes as well as names, phones and addresses, each with the right reason, and `keep`
says "reviewed, not personal"."""

from __future__ import annotations

import copy

import pytest

from dataops.errors import SafetyRefusal
from dataops.settings import load_settings, parse_settings
from dataops.tasks import pg
from dataops.tasks.anonymize.pii import name_reason, table_reasons, words
from dataops.tasks.anonymize.rules import plan_masking, read_tables
from dataops.tasks.checksums import table_checksums

SALT = "guard-test-salt-0123456789"
NORTHWIND = """
CREATE TABLE categories (category_id smallint PRIMARY KEY, category_name varchar(15) NOT NULL, description text,
                         picture bytea);
CREATE TABLE customers (customer_id bpchar(5) PRIMARY KEY, company_name varchar(40) NOT NULL,
                        contact_name varchar(30), contact_title varchar(30), address varchar(60), city varchar(15),
                        region varchar(15), postal_code varchar(10), country varchar(15), phone varchar(24),
                        fax varchar(24));
CREATE TABLE employees (employee_id smallint PRIMARY KEY, last_name varchar(20) NOT NULL,
                        first_name varchar(10) NOT NULL, title varchar(30), title_of_courtesy varchar(25),
                        birth_date date, hire_date date, address varchar(60), city varchar(15), region varchar(15),
                        postal_code varchar(10), country varchar(15), home_phone varchar(24), extension varchar(4),
                        photo bytea, notes text, reports_to smallint REFERENCES employees, photo_path varchar(255));
CREATE TABLE orders (order_id smallint PRIMARY KEY, customer_id bpchar(5) REFERENCES customers,
                     employee_id smallint REFERENCES employees, order_date date, ship_via smallint,
                     freight real, ship_name varchar(40), ship_address varchar(60), ship_city varchar(15),
                     ship_region varchar(15), ship_postal_code varchar(10), ship_country varchar(15));
INSERT INTO categories SELECT g, 'Category ' || g, 'Things of kind ' || g, '\\x89504e47'::bytea
FROM generate_series(1, 8) g;
INSERT INTO customers SELECT 'C' || lpad(g::text, 4, '0'), 'Company ' || g, 'Contact Person ' || g, 'Owner',
       g || ' Obere Str.', 'Berlin', NULL, lpad(g::text, 5, '1'), 'Germany', '030-00' || g, NULL
FROM generate_series(1, 90) g;
INSERT INTO employees SELECT g, 'Davolio' || g, left('Nancy' || g, 10), 'Sales Representative', 'Ms.',
       date '1968-12-08' + g, date '1992-05-01' + g, g || ' 20th Ave. E. Apt. 2A', 'Seattle', 'WA',
       '98122', 'USA', '(206) 555-98' || lpad(g::text, 2, '0'), '5467', '\\x151c2f00020000000d000e0014002100'::bytea,
       'Education includes a BA in psychology from Colorado State University in 1970. ' || g,
       NULLIF(1, g), 'http://accweb/emmployees/davolio' || g || '.bmp'
FROM generate_series(1, 30) g;
INSERT INTO orders SELECT g, 'C' || lpad((g % 90 + 1)::text, 4, '0'), g % 30 + 1, date '1996-07-04' + g, g % 3 + 1,
       g * 1.5, 'Vins et alcools Chevalier ' || g % 50, g || ' rue de l''Abbaye', 'Reims', NULL, '51100', 'France'
FROM generate_series(1, 400) g;
"""
# Quoted CamelCase, as a Northwind ported with its original names looks.
CAMEL = """
CREATE TABLE "Employees" ("EmployeeID" int PRIMARY KEY, "LastName" varchar(20), "FirstName" varchar(10),
                          "BirthDate" timestamp, "HomePhone" varchar(24), "Photo" bytea, "Notes" text,
                          "PhotoPath" varchar(255), "ShipAddress" varchar(60), "IPAddress" varchar(45));
INSERT INTO "Employees" SELECT g, 'Fuller', 'Andrew', '1952-02-19', '(206) 555-9482', '\\x00',
       'Andrew received his BTS', 'http://accweb/emmployees/fuller.bmp', '908 W. Capital Way', '10.0.0.' || g
FROM generate_series(1, 10) g;
"""
RULES = {
    "employees": {"first_name": "first_name", "last_name": "last_name", "birth_date": {"shift_days": 30},
                  "address": "street_address", "city": "city", "postal_code": "postcode",
                  "home_phone": "phone_number", "photo": None, "notes": None},
    "orders": {"ship_name": "name", "ship_address": "street_address", "ship_city": "city",
               "ship_postal_code": "postcode"},
    "customers": {"contact_name": "name", "address": "street_address", "city": "city", "postal_code": "postcode",
                  "phone": "phone_number", "fax": None},
    "categories": {"picture": "keep"},  # reviewed: pictures of product categories, nobody's photo
}
# (table, column, type) -> width: the masked varchar columns checked for fit afterwards
WIDTHS = {("employees", "first_name"): 10, ("employees", "last_name"): 20, ("employees", "city"): 15,
          ("employees", "postal_code"): 10, ("employees", "home_phone"): 24, ("orders", "ship_city"): 15,
          ("orders", "ship_name"): 40, ("customers", "city"): 15, ("customers", "contact_name"): 30,
          ("customers", "postal_code"): 10}


def _settings(rules: dict | None = None, **anon):
    base = {"environments": {"p": {"role": "production", "database_url": "postgresql://u@h/db"}},
            "storage": {"url": "file:///tmp/x"}}
    return parse_settings({**base, "anonymize": {"salt": SALT, "pool_size": 500, "rules": rules or {}, **anon}})


def _load(dsn, *scripts):
    with pg.connect(dsn) as conn:
        for script in scripts:
            conn.execute(script)
        conn.commit()


def _findings(dsn, rules=None) -> dict[str, str]:
    with pg.connect(dsn) as conn:
        plan = plan_masking(_settings(rules), conn, read_tables(conn))
    return {f"{f.table}.{f.column}": f.reason for f in plan.unmasked_personal}


def test_reasons_match_the_words_of_the_name():
    """Whole words of snake_case and camelCase names: ship_address is a postal address (it
    used to read as `ip_addr`), only ip/mac words or inet/macaddr types are IP/MAC."""
    assert words("ShipAddress") == words("shipAddress") == words("ship_address") == "ship_address"
    assert words("IPAddress") == "ip_address" and words("Home Phone") == "home_phone"
    expect = {
        ("orders", "ship_address", "varchar"): "name suggests postal address",
        ("orders", "ShipAddress", "varchar"): "name suggests postal address",
        ("orders", "shipaddress", "varchar"): "name suggests postal address",
        ("customers", "address", "varchar"): "name suggests postal address",
        ("orders", "ship_city", "varchar"): "name suggests postal address",
        ("orders", "ShipPostalCode", "varchar"): "name suggests postal address",
        ("users", "zip", "text"): "name suggests postal address",
        ("users", "ip_address", "text"): "name suggests IP/MAC address",
        ("users", "IPAddress", "varchar"): "name suggests IP/MAC address",
        ("logins", "last_login_ip", "text"): "name suggests IP/MAC address",
        ("devices", "mac", "text"): "name suggests IP/MAC address",
        ("logins", "client", "inet"): "type inet holds IP addresses",
        ("devices", "hw", "macaddr"): "type macaddr holds MAC addresses",
        ("users", "email_address", "text"): "name suggests email",
        ("employees", "HomePhone", "varchar"): "name suggests phone",
        ("employees", "homephone", "varchar"): "name suggests phone",
        ("customers", "fax", "varchar"): "name suggests phone",
        ("employees", "BirthDate", "timestamp"): "name suggests birth date",
        ("employees", "birth_date", "date"): "name suggests birth date",
        ("people", "birth_place", "text"): "name suggests birth place",
        ("employees", "FirstName", "varchar"): "name suggests person name",
        ("orders", "ship_name", "varchar"): "name suggests person name",
        ("customers", "contact_name", "varchar"): "name suggests person name",
        ("employees", "Photo", "bytea"): "name suggests a photo, picture or scan (bytea)",
        ("users", "avatar", "bytea"): "name suggests a photo, picture or scan (bytea)",
        ("documents", "passport_scan", "oid"): "name suggests a photo, picture or scan (oid)",
        ("documents", "scan", "oid"): "name suggests a photo, picture or scan (oid)",
        ("contracts", "signature", "bytea"): "name suggests a photo, picture or scan (bytea)",
        ("users", "profilePicture", "bytea"): "name suggests a photo, picture or scan (bytea)",
    }
    for (table, column, typ), reason in expect.items():
        assert name_reason(table, column, typ) == reason, (table, column)
    for table, column, typ in [("employees", "photo_path", "varchar"), ("employees", "title", "varchar"),
                               ("employees", "region", "varchar"), ("employees", "country", "varchar"),
                               ("customers", "company_name", "varchar"), ("employees", "extension", "varchar"),
                               ("orders", "ship_via", "int2"), ("users", "avatar_url", "text"),
                               ("servers", "web_address", "text"), ("t", "membership", "text"),
                               ("t", "zipper", "text"), ("t", "secretary", "text"), ("t", "interface", "bytea"),
                               ("t", "skip", "text"), ("t", "health_check", "text"), ("t", "notes", "text")]:
        assert name_reason(table, column, typ) is None, (table, column)


def test_free_text_is_personal_next_to_personal_columns():
    from dataops.tasks.anonymize.masking import Column

    def col(name, typ="text", base="text", n=None):
        return Column(name, typ, base, False, False, n)

    employees = [col("first_name", "character varying(10)", "varchar", 10), col("notes"),
                 col("Comments", "character varying(500)", "varchar", 500), col("remark", "character varying(40)",
                                                                                "varchar", 40)]
    found = table_reasons("employees", employees)
    assert found["notes"] == ("free text (text) in a table with personal columns (first_name): it may name people")
    assert found["Comments"].startswith("free text (character varying(500))")
    assert "remark" not in found  # varchar(40) holds a label, not a story
    # the same columns in a table with nothing personal are not flagged
    assert table_reasons("categories", [col("category_name"), col("description"), col("notes")]) == {}
    # a ruled neighbour still makes the table about people: only the open columns are answered
    assert set(table_reasons("employees", employees, only={"notes"})) == {"notes"}


def test_guard_flags_northwind_columns_with_the_right_reasons(db):
    _load(db, NORTHWIND, CAMEL)
    found = _findings(db)
    postal, person = "name suggests postal address", "name suggests person name"
    photo = "name suggests a photo, picture or scan (bytea)"
    assert found == {
        "employees.first_name": person, "employees.last_name": person,
        "employees.birth_date": "name suggests birth date",
        "employees.address": postal, "employees.city": postal, "employees.postal_code": postal,
        "employees.home_phone": "name suggests phone", "employees.photo": photo,
        "employees.notes": "free text (text) in a table with personal columns (last_name, first_name, birth_date "
                           "and 4 more): it may name people",
        "orders.ship_name": person, "orders.ship_address": postal, "orders.ship_city": postal,
        "orders.ship_postal_code": postal,
        "customers.contact_name": person, "customers.address": postal, "customers.city": postal,
        "customers.postal_code": postal, "customers.phone": "name suggests phone",
        "customers.fax": "name suggests phone",
        "categories.picture": photo,
        "Employees.LastName": person, "Employees.FirstName": person, "Employees.BirthDate": "name suggests birth date",
        "Employees.HomePhone": "name suggests phone", "Employees.Photo": photo,
        "Employees.Notes": "free text (text) in a table with personal columns (LastName, FirstName, BirthDate and 3 "
                           "more): it may name people",
        "Employees.ShipAddress": postal, "Employees.IPAddress": "name suggests IP/MAC address",
    }
    # keep: reviewed, not personal; everything else ruled: nothing left for the guard
    rules = copy.deepcopy(RULES)
    rules["Employees"] = {c: "keep" for c in ("LastName", "FirstName", "BirthDate", "HomePhone", "Photo", "Notes",
                                              "ShipAddress", "IPAddress")}
    assert _findings(db, rules) == {}


@pytest.mark.parametrize("default,kinds", [("hash", {"photo": "null", "birth_date": "shift_days", "notes": "hash"}),
                                           ("null", {"photo": "null", "birth_date": "null", "first_name": "hash"})])
def test_default_masks_photos_and_dates_too(db, default, kinds):
    """anonymize.default on a bytea or date column picks a rule that type takes (a hash does not)."""
    _load(db, NORTHWIND)
    with pg.connect(db) as conn:
        plan = plan_masking(_settings({"categories": {"picture": "keep"}}, default=default), conn, read_tables(conn))
    assert plan.unmasked_personal == []
    got = {c: m.kind for c, m in plan.tables["employees"].maskers.items()}
    assert {c: got[c] for c in kinds} == kinds


def test_northwind_rules_fit_short_columns_in_place_and_in_a_refresh(make_db, write_config):
    """{faker: first_name} on varchar(10), {faker: city} on varchar(15), {faker: name} on
    ship_name: accepted by the refresh and by anonymize in place, every written value fits
    (the database would refuse one that did not) and comes from the fitted pool."""
    from dataops.tasks.anonymize.in_place import anonymize
    from dataops.tasks.refresh.plan import resolve_environments
    from dataops.tasks.refresh.steps import refresh

    prod, stg, dev = make_db("nwprod"), make_db("nwstg"), make_db("nwdev")
    for dsn in (prod, dev):
        _load(dsn, NORTHWIND)
    anon = {"salt": SALT, "pool_size": 500, "rules": RULES}
    cfg = write_config({"production": ("production", prod), "staging": ("staging", stg), "dev": ("development", dev)},
                       extra={"anonymize": anon})
    settings = load_settings(cfg)
    with pg.connect(prod) as conn:
        plan = plan_masking(settings, conn, read_tables(conn))
        originals = {key: {r[0] for r in conn.execute(f"SELECT {key[1]} FROM {key[0]}")} for key in WIDTHS}
    assert plan.unmasked_personal == []
    pools = {(t, c): set(m.pool) for t, tm in plan.tables.items() for c, m in tm.maskers.items() if m.kind == "faker"}
    fitted = {k for k in pools if plan.tables[k[0]].maskers[k[1]].pool_spec[3] is not None}
    assert {("employees", "first_name"), ("employees", "city"), ("orders", "ship_city")} <= fitted

    report = anonymize(settings, settings.env("dev"))
    assert report.leaks.ok and report.tables["employees"] == 30 and report.tables["orders"] == 400
    refreshed = refresh(settings, *resolve_environments(settings, "production", "staging"))
    assert refreshed.leaks.ok

    for dsn in (dev, stg):
        with pg.connect(dsn) as conn:
            assert conn.execute("SELECT count(*) FROM orders").fetchone()[0] == 400
            for (table, column), width in WIDTHS.items():
                values = [r[0] for r in conn.execute(f"SELECT {column} FROM {table} WHERE {column} IS NOT NULL")]
                assert values and max(len(v) for v in values) <= width, (table, column)
                assert set(values) <= pools[(table, column)], (table, column)
                assert not set(values) & originals[(table, column)] - pools[(table, column)]
            assert conn.execute("SELECT count(*) FROM employees WHERE photo IS NOT NULL OR notes IS NOT NULL"
                                ).fetchone()[0] == 0
            assert conn.execute("SELECT count(*) FROM categories WHERE picture IS NULL").fetchone()[0] == 0  # kept
    # in place and refreshed agree value for value
    query = "SELECT employee_id, first_name, last_name, city, home_phone FROM employees ORDER BY 1"
    with pg.connect(dev) as a, pg.connect(stg) as b:
        assert a.execute(query).fetchall() == b.execute(query).fetchall()


def test_guard_refuses_in_place_before_writing(make_db, write_config):
    from dataops.tasks.anonymize.in_place import anonymize

    dev = make_db("nwdev")
    _load(dev, NORTHWIND)
    rules = copy.deepcopy(RULES)
    del rules["employees"]["photo"], rules["employees"]["notes"]
    settings = load_settings(write_config({"dev": ("development", dev)}, extra={"anonymize": {
        "salt": SALT, "pool_size": 500, "rules": rules}}))
    with pg.connect(dev) as conn:
        before = {t: c.checksum for t, c in table_checksums(conn).items()}
    with pytest.raises(SafetyRefusal) as err:
        anonymize(settings, settings.env("dev"))
    assert "2 personal-looking column(s) have no masking rule: employees.photo (name suggests a photo, picture or " \
           "scan (bytea)), employees.notes (free text (text) in a table with personal columns" in err.value.message
    with pg.connect(dev) as conn:
        assert {t: c.checksum for t, c in table_checksums(conn).items()} == before


def test_scans_in_large_objects_are_flagged_and_unlinked_in_place(make_db, write_config):
    """An oid column named like a scan is flagged; nulling it in place also unlinks the large
    objects it pointed at (their data would stay readable by id otherwise)."""
    from dataops.tasks.anonymize.in_place import anonymize

    dev = make_db("lodev")
    _load(dev, """CREATE TABLE documents (id int PRIMARY KEY, holder_name text, passport_scan oid, kind text);
                  INSERT INTO documents SELECT g, 'Holder ' || g, lo_from_bytea(0, ('scan of passport ' || g)::bytea),
                         'passport' FROM generate_series(1, 20) g;
                  SELECT lo_from_bytea(0, 'not referenced by a masked column'::bytea);""")
    assert _findings(dev) == {"documents.holder_name": "name suggests person name",
                              "documents.passport_scan": "name suggests a photo, picture or scan (oid)"}
    with pg.connect(dev) as conn:
        assert conn.execute("SELECT count(*) FROM pg_largeobject_metadata").fetchone()[0] == 21
    settings = load_settings(write_config({"dev": ("development", dev)}, extra={"anonymize": {
        "salt": SALT, "pool_size": 500, "rules": {"documents": {"holder_name": "name", "passport_scan": None}}}}))
    report = anonymize(settings, settings.env("dev"))
    assert report.leaks.ok and report.tables == {"documents": 20}
    with pg.connect(dev) as conn:
        assert conn.execute("SELECT count(passport_scan), count(*) FROM documents").fetchone() == (0, 20)
        assert conn.execute("SELECT count(*) FROM pg_largeobject_metadata").fetchone()[0] == 1  # the other one stays
        assert conn.execute("SELECT count(*) FROM pg_largeobject WHERE convert_from(data, 'UTF8') LIKE 'scan of %'"
                            ).fetchone()[0] == 0
