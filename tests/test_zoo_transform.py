"""Transforms on the schema zoo: its pagila-like partitioned table (zoo.payment: partitions by
month plus a default, foreign keys on the parent and on each partition, a foreign key from
zoo.refund pointing at it, an identity column, a CHECK) and its composite-key table
(sales.order_lines: a domain-typed column, a generated column, a cascading foreign key), each
run in small batches on two workers, killed at a failpoint, resumed, killed in its revert,
and reverted; checked row by row with this file's own queries, and at the end against the
zoo's own yardsticks (every relation's rows hashed, the schema as pg_dump writes it).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from test_transform_engine import query, write_settings, write_transform
from test_transform_keyset import kill_at
from zoo import load_zoo, zoo_checksums

from dataops.errors import BadInput
from dataops.tasks import pg
from dataops.tasks.transform.batches import Overrides
from dataops.tasks.transform.engine import revert, transform

TUNING = {"batch_size": 100, "workers": 2}


def app_schema(dsn) -> str:
    """pg_dump's schema of the zoo, without the tool's own schemas (dataops_*)."""
    with pg.connect(dsn, autocommit=True) as conn:
        major = conn.info.server_version // 10000
    conninfo, secret_env = dsn.libpq_args()
    out = subprocess.run([pg.client_binary("pg_dump", major), "--schema-only", "--no-owner",
                          "--exclude-schema=dataops_*", f"--dbname={conninfo}"],
                         capture_output=True, text=True, env={**os.environ, **secret_env}, check=True).stdout
    return "\n".join(line for line in out.splitlines() if not line.startswith(("--", "\\restrict", "\\unrestrict")))


@pytest.fixture
def zoo_db(make_db, tmp_path):
    def make(name: str, body: str):
        dsn = make_db("xfzoo")
        load_zoo(dsn)
        write_transform(tmp_path / "transforms", name, body)
        settings = write_settings(tmp_path, dsn, tmp_path / "transforms", batch_size=TUNING["batch_size"])
        return dsn, settings, zoo_checksums(dsn), app_schema(dsn)
    return make


def run_killed_resumed_reverted(dsn, settings, name: str, rows, bumped) -> None:
    """The life every test here checks: killed after a committed batch, resumed, every row
    changed exactly once; the revert killed after a committed batch, resumed, every row back."""
    before = rows(dsn)
    kill_at("transform.after_checkpoint", "transform", Path(settings.source), name, TUNING)
    half = rows(dsn)
    assert half.keys() == before.keys()
    changed = {k for k in before if half[k] != before[k]}
    assert all(half[k] == bumped(before[k]) for k in changed), "a row neither untouched nor changed once"
    assert 0 < len(changed) < len(before)
    assert query(dsn, "SELECT status FROM dataops_transforms.runs") == [("running",)]

    s = transform(settings, settings.env("dev"), name, Overrides(**TUNING))
    assert (s["status"], s["scanned"], s["changed"]) == ("completed", len(before), len(before))
    after = rows(dsn)
    assert {k: bumped(v) for k, v in before.items()} == after  # every row exactly once, across both sessions

    kill_at("revert.after_checkpoint", "revert", Path(settings.source), name, TUNING)
    now = rows(dsn)
    restored = {k for k in now if now[k] == before[k]}
    assert all(now[k] == after[k] for k in set(now) - restored) and 0 < len(restored) < len(before)
    r = revert(settings, settings.env("dev"), name, Overrides(**TUNING))
    assert (r["status"], r["reverts"]) == ("completed", s["run_id"])
    assert rows(dsn) == before


def test_the_zoo_payment_table_partitioned_by_month_is_transformed_resumed_and_reverted(zoo_db):
    dsn, settings, sums, schema = zoo_db("payment_bump", '''
        """Not idempotent on purpose: amount + 1, and a mark on the note."""
        TABLE = "zoo.payment"
        SET = {"amount": "amount + 1", "note": "coalesce(note, '') || '+'"}
        SNAPSHOT = ["amount", "note"]
    ''')

    def rows(d) -> dict:
        return {(r[0], r[1]): r[2:] for r in query(d, "SELECT payment_date::text, payment_id, "
                                                      "tableoid::regclass::text, customer_id, staff_id, amount, note "
                                                      "FROM zoo.payment")}

    def bumped(v: tuple) -> tuple:
        part, customer, staff, amount, note = v
        return part, customer, staff, amount + 1, (note or "") + "+"

    assert len({v[0] for v in rows(dsn).values()}) == 4  # rows in every partition, the default one included
    run_killed_resumed_reverted(dsn, settings, "payment_bump", rows, bumped)
    assert zoo_checksums(dsn) == sums and app_schema(dsn) == schema


def test_the_zoo_order_lines_composite_key_is_transformed_resumed_and_reverted(zoo_db):
    dsn, settings, sums, schema = zoo_db("lines_bump", '''
        """Not idempotent: one more of each line (a domain-typed column; total is generated from it)."""
        TABLE = "sales.order_lines"
        SET = {"qty": "qty + 1", "sku": "sku || '+'"}
        SNAPSHOT = "*"
    ''')

    def rows(d) -> dict:
        return {(r[0], r[1]): r[2:] for r in query(d, "SELECT order_id, line_no, sku, qty, price, total "
                                                      "FROM sales.order_lines")}

    def bumped(v: tuple) -> tuple:
        sku, qty, price, _total = v
        return sku + "+", qty + 1, price, (qty + 1) * price

    assert query(dsn, "SELECT count(DISTINCT line_no), count(*) > 1000 FROM sales.order_lines") == [(3, True)]
    run_killed_resumed_reverted(dsn, settings, "lines_bump", rows, bumped)
    assert zoo_checksums(dsn) == sums and app_schema(dsn) == schema


def test_a_two_level_partitioned_table_and_a_quoted_dotted_table_of_the_zoo(zoo_db, tmp_path):
    dsn, settings, sums, schema = zoo_db("events_tag", '''
        """Tag every event (jsonb), through both levels of partitions and their defaults."""
        TABLE = "zoo.events"
        SET = {"payload": "coalesce(payload, '{}') "
                          "|| jsonb_build_object('tag', coalesce((payload->>'tag')::int, 0) + 1)"}
        SNAPSHOT = ["payload"]
    ''')
    write_transform(tmp_path / "transforms", "odd_bump", '''
        """Names with dots, spaces and capitals."""
        TABLE = '"Odd.Schema"."Mixed Case.Table"'
        SET = {"UPPER": '"UPPER" + 1', "dot.col": "coalesce(\\"dot.col\\", '') || '+'"}
        SNAPSHOT = ["UPPER", "dot.col"]
    ''')
    dev = settings.env("dev")
    s = transform(settings, dev, "events_tag", Overrides(workers=3, batch_size=150))
    assert (s["changed"], s["ranges"]) == (4000, 3)
    assert query(dsn, "SELECT count(*) FROM zoo.events WHERE payload->>'tag' = '1'") == [(4000,)]
    assert query(dsn, "SELECT count(DISTINCT tableoid) FROM zoo.events") == [(5,)]  # every leaf, both levels
    o = transform(settings, dev, "odd_bump")
    assert o["changed"] == 300
    assert query(dsn, 'SELECT count(*) FROM "Odd.Schema"."Mixed Case.Table" WHERE "UPPER" % 10 = 1') == [(300,)]
    revert(settings, dev, "odd_bump")
    revert(settings, dev, "events_tag", Overrides(workers=2))
    assert zoo_checksums(dsn) == sums and app_schema(dsn) == schema


@pytest.mark.parametrize("table, message", [
    ("zoo.raw_log", 'table "zoo.raw_log" has no primary key and no unique index on NOT NULL columns'),
    ("zoo.uidx_only", 'table "zoo.uidx_only" has no primary key and no unique index on NOT NULL columns'),
    ("zoo.vehicle", 'table "zoo.vehicle" has 2 inheritance child table'),
    ("zoo.country_totals", '"zoo.country_totals" is a materialized view'),
])
def test_zoo_tables_a_transform_cannot_walk_are_refused_before_anything_is_written(zoo_db, table, message):
    dsn, settings, sums, schema = zoo_db("fix", f'''
        """A fix."""
        TABLE = "{table}"
        SET = {{"note": "upper(note)"}}
    ''')
    with pytest.raises(BadInput, match=message):
        transform(settings, settings.env("dev"), "fix")
    assert zoo_checksums(dsn) == sums and app_schema(dsn) == schema
    assert query(dsn, "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'dataops%'") == [(0,)]
