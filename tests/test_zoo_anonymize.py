"""`dataops anonymize` in place on a copy of the schema zoo: rules on a partitioned parent
reach every partition (two levels, defaults, a key that moves rows between them), a
composite key, quoted mixed-case names, varchar(n)/char(n), a domain with a CHECK, a row-
level-secured table, an ON UPDATE rule; generated and identity columns do not break it.
Afterwards every foreign key holds (our own query), row counts are unchanged, and no
original value of a masked column is left (our own comparison, besides the leak scan)."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from conftest import run_cli
from psycopg import sql
from zoo import load_zoo

from dataops.errors import BadInput
from dataops.settings import load_settings
from dataops.tasks import pg

SALT = "zoo-anonymize-salt-0123456789"
ODD = '"Odd.Schema"."Mixed Case.Table"'
RULES = {
    "zoo.payment": {"note": {"template": "note {hash}"}, "payment_date": {"shift_days": 20}},  # partitioned, moves rows
    "zoo.refund": {"payment_date": {"shift_days": 20}, "reason": {"partial": {"keep_last": 0}}},  # FK to payment
    "zoo.events": {"payload": None},  # range partitions, one of them list-partitioned, defaults at both levels
    "sales.order_lines": {"sku": {"hash": {"length": 12}}},  # composite primary key; generated `total`
    ODD: {"Col With Space": "name", "ünïcode": {"template": "u{hash}"}, "dot.col": None},
    "zoo.all_types": {"c_varchar": "street_address", "c_char": "first_name", "c_email": "email",
                      "c_inet": "hash", "c_cidr": None, "c_macaddr": None, "c_macaddr8": None},
    "zoo.customer": {"first_name": "first_name", "last_name": "last_name", "email": "email"},  # slug is generated
    "zoo.employee": {"full_name": "name", "salary": None},
    "zoo.staff": {"name": "name"},
    "zoo.secret_note": {"body": {"template": "note {hash}"}},  # row-level security
    "zoo.booking": {"guest": "name"},  # the test adds an ON UPDATE rule to it
}
# (schema, table, column, key columns) of the masked columns compared with their originals
COMPARED = [("zoo", "payment", "note", "payment_id"), ("zoo", "refund", "reason", "refund_id"),
            ("sales", "order_lines", "sku", "order_id, line_no"),
            ("Odd.Schema", "Mixed Case.Table", "Col With Space", '"ID"'),
            ("Odd.Schema", "Mixed Case.Table", "ünïcode", '"ID"'), ("zoo", "all_types", "c_varchar", "id"),
            ("zoo", "all_types", "c_char", "id"), ("zoo", "all_types", "c_email", "id"),
            ("zoo", "all_types", "c_inet", "id"),
            ("zoo", "customer", "first_name", "customer_id"), ("zoo", "customer", "email", "customer_id"),
            ("zoo", "employee", "full_name", "emp_id"), ("zoo", "staff", "name", "staff_id"),
            ("zoo", "secret_note", "body", "note_id"), ("zoo", "booking", "guest", "booking_id")]


@pytest.fixture(scope="module")
def zoo_template(pg_server_dsn):
    """The zoo, loaded once for the module; tests take copies (CREATE DATABASE ... TEMPLATE)."""
    name = f"zooanon_{uuid.uuid4().hex[:10]}"
    pg.create_database(pg_server_dsn, name)
    load_zoo(pg_server_dsn.with_database(name))
    yield name
    pg.drop_database(pg_server_dsn, name)


@pytest.fixture
def zoo_copy(zoo_template, make_db, pg_server_dsn):
    dsn = make_db("zoodev")
    with psycopg.connect(pg_server_dsn.conninfo(), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(dsn.database)))
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(dsn.database),
                                                                      sql.Identifier(zoo_template)))
    return dsn


def _config(write_config, dsn, rules):
    return write_config({"dev": ("development", dsn)}, extra={"anonymize": {"salt": SALT, "pool_size": 500,
                                                                             "rules": rules}})


def _q(conn, query, *args):
    return conn.execute(query, args or None).fetchall()


def _counts(conn) -> dict[str, int]:
    """Rows of every table, partitions and inheritance children each by itself (ONLY)."""
    rels = _q(conn, """SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                       WHERE c.relkind = 'r' AND n.nspname IN ('zoo', 'sales', 'Odd.Schema', 'public') ORDER BY 1""")
    return {r: conn.execute(f"SELECT count(*) FROM ONLY {r}").fetchone()[0] for (r,) in rels}


def _orphans(conn) -> dict[str, int]:
    """Rows under every foreign key (declared on a parent or on one partition) that point at no row."""
    out = {}
    for name, child, parent, ccols, pcols in _q(conn, """
            SELECT co.conname, co.conrelid::regclass::text, co.confrelid::regclass::text,
                   ARRAY(SELECT quote_ident(attname) FROM unnest(co.conkey) WITH ORDINALITY k(n, o)
                         JOIN pg_attribute ON attrelid = co.conrelid AND attnum = k.n ORDER BY k.o),
                   ARRAY(SELECT quote_ident(attname) FROM unnest(co.confkey) WITH ORDINALITY k(n, o)
                         JOIN pg_attribute ON attrelid = co.confrelid AND attnum = k.n ORDER BY k.o)
            FROM pg_constraint co WHERE co.contype = 'f' AND co.conparentid = 0"""):  # clones: covered by their parent
        join = " AND ".join(f"p.{p} = c.{c}" for c, p in zip(ccols, pcols))
        notnull = " AND ".join(f"c.{c} IS NOT NULL" for c in ccols)
        out[f"{child} {name}"] = conn.execute(f"SELECT count(*) FROM {child} c WHERE {notnull} AND NOT EXISTS "
                                              f"(SELECT 1 FROM {parent} p WHERE {join})").fetchone()[0]
    return out


def _values(conn, schema, table, column, key) -> dict:
    q = sql.SQL("SELECT {k}, {c}::text FROM {s}.{t} WHERE {c} IS NOT NULL").format(
        k=sql.SQL(key), c=sql.Identifier(column), s=sql.Identifier(schema), t=sql.Identifier(table))
    return {tuple(r[:-1]): r[-1] for r in conn.execute(q)}


def test_anonymize_in_place_on_the_zoo(zoo_copy, write_config, prefect_api):
    dsn = zoo_copy
    with pg.connect(dsn) as conn:  # an audit rule ON UPDATE: it must not copy the old values anywhere
        conn.execute("CREATE RULE booking_audit AS ON UPDATE TO zoo.booking DO ALSO "
                     "INSERT INTO zoo.audit_log (table_name, op, row_data) VALUES ('booking', 'rule', to_jsonb(OLD))")
        conn.commit()
        counts, orphans = _counts(conn), _orphans(conn)
        before = {c[:3]: _values(conn, *c) for c in COMPARED}
        dates = dict(_q(conn, "SELECT payment_id, payment_date FROM zoo.payment"))
        per_partition = dict(_q(conn, "SELECT tableoid::regclass::text, count(*) FROM zoo.payment GROUP BY 1"))
        payloads = dict(_q(conn, "SELECT tableoid::regclass::text, count(payload) FROM zoo.events GROUP BY 1"))
        audit_rows = _q(conn, "SELECT count(*) FROM zoo.audit_log")[0][0]
    assert sum(orphans.values()) == 0 and len(orphans) >= 8
    assert len(per_partition) == 4 and all(payloads.values()) and len(payloads) == 5  # every leaf

    cfg = _config(write_config, dsn, RULES)
    r = run_cli("--config", str(cfg), "anonymize", "dev", env={"PREFECT_API_URL": prefect_api})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "leak scan: 0 leaked values" in r.stdout and "zoo.payment: 3,000 rows masked" in r.stdout

    with pg.connect(dsn) as conn:
        assert _counts(conn) == {**counts, **{k: v for k, v in _counts(conn).items() if k.startswith("zoo.payment_")}}
        assert sum(_q(conn, "SELECT count(*) FROM zoo.payment")[0]) == 3000
        assert {k: v for k, v in _orphans(conn).items() if v} == {}
        # every masked column: no original value left anywhere in it, and its rows still there
        for c in COMPARED:
            after = _values(conn, *c)
            original = set(before[c[:3]].values())
            assert after and not set(after.values()) & original, c
            assert after.keys() == before[c[:3]].keys(), c
        # the partitioned parent's rules reached every partition: notes masked, dates moved, in all of them
        rows = _q(conn, "SELECT tableoid::regclass::text, payment_id, payment_date, note FROM zoo.payment")
        assert {t for t, *_ in rows} == set(per_partition)
        assert all(d != dates[i] and abs((d - dates[i]).days) <= 20 for _, i, d, _ in rows)
        assert all(n is None or n == "" or n.startswith("note ") for *_, n in rows)
        assert _q(conn, "SELECT count(payload) FROM zoo.events") == [(0,)]
        # generated columns follow the masked values; triggers and the ON UPDATE rule stayed off, then back on
        assert _q(conn, "SELECT count(*) FROM zoo.customer WHERE slug IS DISTINCT FROM "
                        "zoo.slugify(first_name || ' ' || coalesce(last_name, ''))") == [(0,)]
        assert _q(conn, "SELECT count(*) FROM sales.order_lines WHERE total IS DISTINCT FROM qty * price") == [(0,)]
        assert _q(conn, "SELECT count(*) FROM zoo.customer WHERE updated_at IS NOT NULL") == [(0,)]
        assert _q(conn, "SELECT count(*) FROM zoo.audit_log")[0][0] == audit_rows
        assert _q(conn, "SELECT ev_enabled FROM pg_rewrite WHERE rulename = 'booking_audit'") == [("O",)]
        # fits: varchar(30), char(5) by characters; the domain's CHECK holds; all 300 RLS rows masked
        assert _q(conn, "SELECT max(char_length(c_varchar)) <= 30, max(char_length(c_char)) <= 5 FROM zoo.all_types") \
            == [(True, True)]
        assert _q(conn, "SELECT count(*) FROM zoo.customer WHERE email !~ '^[^@]+@[^@]+$'") == [(0,)]
        assert _q(conn, "SELECT count(*) FROM zoo.secret_note WHERE body LIKE 'note %'") == [(300,)]
        assert _q(conn, "SELECT count(*) FROM zoo.all_types WHERE c_cidr IS NOT NULL OR c_macaddr IS NOT NULL"
                  ) == [(0,)]


def test_zoo_rules_that_cannot_work_in_place_are_refused_first(zoo_copy, write_config):
    """Refused before anything is written, each with one clear line."""
    from dataops.tasks.anonymize.in_place import anonymize

    with pg.connect(zoo_copy) as conn:
        counts = _counts(conn)
        notes = _q(conn, "SELECT payment_id, note FROM zoo.payment ORDER BY 1")
    cases = [
        ({"zoo.customer": {"slug": "name"}},
         'anonymize.rules.zoo.customer.slug: column "slug" is generated (GENERATED ALWAYS AS ... STORED)'),
        ({"zoo.payment": {"payment_id": "hash"}},
         "anonymize.rules.zoo.payment.payment_id: column is GENERATED ALWAYS AS IDENTITY, which an UPDATE cannot"),
        ({"zoo.payment_p2022_01": {"note": None}},
         'anonymize.rules.zoo.payment_p2022_01: table "zoo.payment_p2022_01" is a partition of zoo.payment; '
         "write its rules on zoo.payment"),
        ({"zoo.all_types": {"c_email": "user_name"}},
         "anonymize.rules.zoo.all_types.c_email: only 0 of 500 Faker user_name values pass the checks of zoo.email"),
        ({"zoo.refund": {"payment_date": {"shift_days": 20}}},
         "anonymize.rules.zoo.refund.payment_date: zoo.refund.payment_date references zoo.payment.payment_date "
         "(refund_payment_date_payment_id_fkey), which is not masked"),
        ({"zoo.refund": {"payment_date": {"shift_days": 20}}, "zoo.payment": {"payment_date": {"shift_days": 10}}},
         "masked differently (shift up to 20 days here, shift up to 10 days there)"),
        ({"zoo.all_types": {"c_char": {"faker": "first_name", "unique": True}}},
         "anonymize.rules.zoo.all_types.c_char: unique Faker values end in a 17-character keyed suffix, which "
         "leaves no room in character(5)"),
    ]
    base = {**RULES, "zoo.payment": {"note": None}, "zoo.refund": {"reason": None}}  # no key masked
    for rules, message in cases:
        merged = {t: {**base.get(t, {}), **rules.get(t, {})} for t in {**base, **rules}}
        settings = load_settings(_config(write_config, zoo_copy, merged))
        with pytest.raises(BadInput) as err:
            anonymize(settings, settings.env("dev"))
        assert message in err.value.message, (rules, err.value.message)
    with pg.connect(zoo_copy) as conn:
        assert _counts(conn) == counts and _q(conn, "SELECT payment_id, note FROM zoo.payment ORDER BY 1") == notes
