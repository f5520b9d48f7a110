"""The issue-17 rules on the schema zoo (tests/zoo): json paths on a jsonb column of a two-level
partitioned table and on json/jsonb columns with arrays, duplicate keys and scalars at the
top; noise on numeric(7,2) under a CHECK; cases on a partitioned table and on a column a
generated column is computed from; a domain with a CHECK. A refresh and `dataops anonymize`
in place on a copy of the same zoo give the same values, row by row."""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest
from psycopg import sql
from test_refresh_staging import run_refresh
from zoo import load_zoo

from dataops.settings import load_settings
from dataops.tasks import pg
from dataops.tasks.anonymize.in_place import anonymize

pytestmark = pytest.mark.extended  # two zoo loads, a refresh and an anonymize: ~1 min

RULES = {
    "zoo.events": {"payload": {"json": {"text": {"partial": {"keep_last": 1}}, "nested.a[*]": {"noise": {"bound": 5}},
                                        "i": "hash", "null": "hash"}}},
    "zoo.all_types": {"c_inet": None, "c_cidr": None, "c_macaddr": None, "c_macaddr8": None,
                      "c_email": {"faker": "email"},
                      "c_jsonb": {"json": {"arr[*]": "hash", "f": {"noise": {"percent": 10}}, "id": {"choice": [1, 2]}}},
                      "c_json": {"json": {"a[*].x": {"regex": {"pattern": ".", "replace": "?"}},
                                          "i": {"generalize": {"step": 10}}}},
                      "c_int": {"noise": {"bound": 1000}}, "c_date": {"generalize": {"to": "year"}}},
    "zoo.payment": {"amount": {"noise": {"percent": 20}},
                    "note": {"cases": [{"when": "amount > 5", "rule": "hash"}],
                             "else": {"regex": {"pattern": "[0-9]", "replace": "#"}}}},
    "zoo.customer": {"first_name": {"cases": [{"when": "country = 'NZ'", "rule": "first_name"}],
                                    "else": {"generalize": {"prefix": 1}}},
                     "last_name": "last_name", "email": {"faker": "email", "unique": True}},
    "zoo.employee": {"full_name": "name", "salary": None},
    "zoo.staff": {"name": "name"},
}
COMPARED = {  # relation -> (key, masked columns)
    "zoo.events": ("event_id, occurred_at, kind", ["payload"]),
    "zoo.all_types": ("id", ["c_jsonb", "c_json", "c_int", "c_date", "c_email"]),
    "zoo.payment": ("payment_date, payment_id", ["amount", "note"]),
    "zoo.customer": ("customer_id", ["first_name", "slug", "email"]),
}


def _values(dsn, relation: str) -> dict:
    key, cols = COMPARED[relation]
    with pg.connect(dsn) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        q = sql.SQL("SELECT {k}, {c} FROM {r}").format(
            k=sql.SQL(key), r=sql.SQL(relation),
            c=sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c)) for c in cols))
        n = len(key.split(","))
        return {tuple(r[:n]): r[n:] for r in conn.execute(q)}


def test_zoo_refresh_and_in_place_agree_on_the_new_rules(make_db, write_config, pg_server_dsn):
    prod, stg, dev = make_db("mzprod"), make_db("mzstg"), make_db("mzdev")
    load_zoo(prod)
    with psycopg.connect(pg_server_dsn.with_database("postgres").conninfo(), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(dev.database)))
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(dev.database),
                                                                      sql.Identifier(prod.database)))
    cfg = write_config({"production": ("production", prod), "staging": ("staging", stg),
                        "dev": ("development", dev)},
                       extra={"anonymize": {"salt": f"zoo-rules-{uuid.uuid4().hex}", "pool_size": 200,
                                            "rules": RULES}})
    settings = load_settings(cfg)
    before = {r: _values(prod, r) for r in COMPARED}
    report = run_refresh(settings, "production", "staging")
    assert report.leaks.ok
    assert anonymize(settings, settings.env("dev"), vacuum=False).leaks.ok
    for rel in COMPARED:
        staged, in_place = _values(stg, rel), _values(dev, rel)
        assert staged.keys() == in_place.keys() == before[rel].keys(), rel
        diff = [k for k in staged if staged[k] != in_place[k]]
        assert not diff, (rel, diff[:3], staged[diff[0]], in_place[diff[0]])
    # every leaf partition's payload was masked, the rest of each document kept
    events, events0 = _values(stg, "zoo.events"), before["zoo.events"]
    masked = 0
    for k, (doc,) in events.items():
        (doc0,) = events0[k]
        if doc0 is None:
            assert doc is None
            continue
        d, d0 = json.loads(doc), json.loads(doc0)
        assert set(d) == set(d0) and d["null"] is None  # a json null stays null
        assert d["i"] != d0["i"] and len(d["i"]) == 16 and d["text"][-1] == d0["text"][-1]
        assert all(abs(a - b) <= 5 for a, b in zip(d["nested"]["a"], d0["nested"]["a"]))
        masked += 1
    assert masked > 0
    with pg.connect(stg) as conn:  # numeric(7,2) noise kept the CHECK (amount >= 0) and two decimals
        assert conn.execute("SELECT count(*) FROM zoo.payment WHERE amount < 0 OR scale(amount) <> 2").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM zoo.customer WHERE country <> 'NZ' AND length(first_name) <> 1"
                            ).fetchone() == (0,)
        scalars = conn.execute("SELECT c_jsonb::text FROM zoo.all_types WHERE jsonb_typeof(c_jsonb) <> 'object'"
                               ).fetchall()
    with pg.connect(prod) as conn:
        assert scalars == conn.execute("SELECT c_jsonb::text FROM zoo.all_types WHERE jsonb_typeof(c_jsonb) <> "
                                       "'object'").fetchall()  # documents without the paths: as they were
