"""Schema snapshots, fingerprints and differences against real databases.

Two databases get the same schema once per module; each difference case changes one of
them inside a transaction that is rolled back (DDL is transactional), so the cases cost
milliseconds instead of a database each.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import uuid
from pathlib import Path
from types import SimpleNamespace

import psycopg
import pytest

from dataops.errors import BadInput
from dataops.tasks import pg
from dataops.tasks.schema import (
    FINGERPRINT_VERSION,
    Difference,
    catalog_snapshot,
    diff_snapshots,
    fingerprint,
    neutral_view_definition,
    quote_ident,
    schema_fingerprint,
    view_definition_as_15,
)

SCHEMA_SQL = """
CREATE SCHEMA app;
CREATE TYPE mood AS ENUM ('happy', 'ok', 'sad');
CREATE DOMAIN email AS text CHECK (VALUE LIKE '%@%');
CREATE TABLE users (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    email text NOT NULL UNIQUE,
    name text COLLATE "C",
    active boolean NOT NULL DEFAULT true,
    mood mood,
    created_at timestamptz NOT NULL DEFAULT now(),
    name_upper text GENERATED ALWAYS AS (upper(name)) STORED
);
CREATE TABLE orders (
    id serial PRIMARY KEY,
    user_id bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    amount numeric(12, 2) NOT NULL,
    contact email
);
ALTER TABLE orders ADD CONSTRAINT orders_amount_positive CHECK (amount > 0) NOT VALID;
CREATE INDEX orders_user_id_idx ON orders (user_id);
CREATE TABLE audit_log (at timestamptz DEFAULT '2020-01-01 12:00+00', what text);
CREATE TABLE notes (id int PRIMARY KEY, body text);
CREATE TABLE app.events (id int, happened date NOT NULL, payload jsonb) PARTITION BY RANGE (happened);
CREATE TABLE app.events_2024 PARTITION OF app.events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE INDEX events_happened_idx ON app.events (happened);
CREATE SEQUENCE app.ticket_seq INCREMENT 5 MINVALUE 10 MAXVALUE 100000 CYCLE;
CREATE VIEW active_users AS SELECT id, email FROM users WHERE active;
CREATE MATERIALIZED VIEW app.order_totals AS SELECT user_id, sum(amount) AS total FROM orders GROUP BY user_id;
CREATE FUNCTION normalize_email(e text) RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT lower(trim(e)) $$;
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.created_at := now(); RETURN NEW; END $$;
CREATE TRIGGER users_touch BEFORE UPDATE ON users FOR EACH ROW EXECUTE FUNCTION touch();
CREATE PROCEDURE app.cleanup(days int) LANGUAGE sql
    BEGIN ATOMIC DELETE FROM public.audit_log WHERE at < now() - make_interval(days => days); END;
INSERT INTO users (email, name, mood) VALUES ('a@example.com', 'Ann', 'happy'), ('b@example.com', NULL, NULL);
INSERT INTO orders (user_id, amount) SELECT id, 10.5 FROM users;
SELECT setval('app.ticket_seq', 500);
"""


@pytest.fixture(scope="module")
def twins(pg_server_dsn):
    """Two databases built from the same SQL, shared by the tests of this module."""
    names = [f"schema_{side}_{uuid.uuid4().hex[:8]}" for side in "ab"]
    for name in names:
        pg.create_database(pg_server_dsn, name)
        with pg.connect(pg_server_dsn, dbname=name, autocommit=True) as conn:
            conn.execute(SCHEMA_SQL)
    yield SimpleNamespace(a=pg_server_dsn.with_database(names[0]), b=pg_server_dsn.with_database(names[1]))
    for name in names:
        pg.drop_database(pg_server_dsn, name)


def snapshot_with(dsn, change: str | None = None) -> dict:
    """The snapshot of `dsn` as it would be after `change`, leaving the database as it was."""
    with pg.connect(dsn) as conn:
        with conn.transaction(force_rollback=True):
            if change:
                conn.execute(change)
            return catalog_snapshot(conn)


def dump_and_restore(src, dst) -> None:
    major, _ = pg.server_version(src)
    dump = subprocess.run([pg.client_binary("pg_dump", major), "--format=custom", f"--dbname={src.conninfo()}"],
                          capture_output=True)
    assert dump.returncode == 0, dump.stderr.decode()
    restore = subprocess.run([pg.client_binary("pg_restore", major), "--exit-on-error", f"--dbname={dst.conninfo()}"],
                             input=dump.stdout, capture_output=True)
    assert restore.returncode == 0, restore.stderr.decode()


# -- equality ------------------------------------------------------------------------------

def test_same_schema_gives_same_fingerprint_and_no_differences(twins):
    a, b = snapshot_with(twins.a), snapshot_with(twins.b)
    assert diff_snapshots(a, b) == []
    assert fingerprint(a) == fingerprint(b)
    with pg.connect(twins.a) as conn:
        assert schema_fingerprint(conn) == fingerprint(a)


def test_a_database_without_policies_rules_or_composite_types_has_the_fingerprint_it_always_had(twins):
    """Those keys came later and appear only when there is something in them: a manifest written
    before still matches a database without them."""
    snap = snapshot_with(twins.a)
    assert not {"types", "policies", "rules"} & set(snap)
    assert all("row_security" not in t for t in snap["tables"].values())


def test_snapshot_is_plain_json_without_oids_or_database_name(twins):
    snap = snapshot_with(twins.a)
    text = json.dumps(snap)
    assert twins.a.database not in text
    assert json.loads(text) == snap
    assert snap["columns"]["public.users.id"] == {"type": "bigint", "not_null": True, "default": None,
                                                  "identity": "always", "generated": None, "collation": None}
    assert snap["columns"]["public.users.name"]["collation"] == '"C"'
    assert snap["columns"]["public.users.name_upper"]["generated"] == "stored"
    assert snap["tables"]["app.events_2024"]["partition_of"] == "app.events"
    assert snap["sequences"]["public.orders_id_seq"]["owned_by"] == "public.orders.id"
    assert snap["sequences"]["app.ticket_seq"]["increment"] == 5  # a definition, never the current value
    assert snap["enums"]["public.mood"] == {"labels": ["happy", "ok", "sad"]}
    assert "app.cleanup(IN days integer)" in snap["functions"]
    assert "plpgsql" in snap["extensions"]


def test_pg_dump_restore_copy_has_the_same_fingerprint(twins, make_db):
    copy = make_db("restored")
    dump_and_restore(twins.a, copy)
    original, restored = snapshot_with(twins.a), snapshot_with(copy)
    assert diff_snapshots(original, restored) == []
    assert fingerprint(original) == fingerprint(restored)


def test_session_settings_and_tool_schemas_do_not_count(twins):
    """A caller's search_path or TimeZone must not change the fingerprint, and must survive it."""
    expected = fingerprint(snapshot_with(twins.a))
    with pg.connect(twins.b) as conn:
        with conn.transaction(force_rollback=True):
            conn.execute("CREATE SCHEMA dataops_snapshots; CREATE TABLE dataops_snapshots.s1 (id int)")
            conn.execute("SET search_path = app, public; SET TimeZone = 'Asia/Tokyo'; SET DateStyle = 'SQL, DMY'")
            assert schema_fingerprint(conn) == expected
            assert conn.execute("SELECT current_setting('search_path'), current_setting('TimeZone')").fetchone() == (
                "app, public", "Asia/Tokyo")


def test_reads_inside_a_read_only_repeatable_read_transaction(twins):
    with pg.connect(twins.a) as conn:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        assert catalog_snapshot(conn) == snapshot_with(twins.b)
        conn.execute("COMMIT")


# -- differences -------------------------------------------------------------------------

SOURCE_MD5 = hashlib.md5(b" SELECT lower(trim(e)) ").hexdigest()
NEW_MD5 = hashlib.md5(b" SELECT lower(e) ").hexdigest()

CASES = [
    # (which side changes, SQL, the line a user reads)
    ("b", "ALTER TABLE audit_log ALTER COLUMN what TYPE varchar(20)",
     "column public.audit_log.what differs: type: text (a) vs character varying(20) (b)"),
    ("b", "DROP TABLE notes",
     "table public.notes missing in b: table, 2 columns"),
    ("b", "CREATE INDEX users_name_idx ON users (name)",
     "index public.users_name_idx missing in a: CREATE INDEX users_name_idx ON public.users USING btree (name)"),
    ("b", "ALTER TABLE users ALTER COLUMN active SET DEFAULT false",
     "column public.users.active differs: default: true (a) vs false (b)"),
    ("b", "ALTER TABLE orders VALIDATE CONSTRAINT orders_amount_positive",
     "constraint public.orders.orders_amount_positive differs: validated: false (a) vs true (b)"),
    ("b", "CREATE OR REPLACE VIEW active_users AS SELECT id, email FROM users WHERE active AND id > 0",
     "view public.active_users differs: definition: SELECT id, email FROM public.users WHERE active; (a) "
     "vs SELECT id, email FROM public.users WHERE (active AND (id > 0)); (b)"),
    ("b", "CREATE OR REPLACE FUNCTION normalize_email(e text) RETURNS text LANGUAGE sql IMMUTABLE "
          "AS $$ SELECT lower(e) $$",
     f"function public.normalize_email(e text) differs: source md5: {SOURCE_MD5} (a) vs {NEW_MD5} (b)"),
    ("a", "ALTER TYPE mood ADD VALUE 'angry'",
     "enum public.mood differs: labels: 'angry' missing in b"),
    ("b", "ALTER TABLE users ADD COLUMN nickname varchar(30)",
     "column public.users.nickname missing in a: character varying(30)"),
    ("b", "ALTER TABLE audit_log ALTER COLUMN what SET NOT NULL",
     "column public.audit_log.what differs: not null: false (a) vs true (b)"),
    ("b", "ALTER TABLE users DISABLE TRIGGER users_touch",
     "trigger public.users.users_touch differs: enabled: enabled (a) vs disabled (b)"),
    ("b", "ALTER SEQUENCE app.ticket_seq INCREMENT 10",
     "sequence app.ticket_seq differs: increment: 5 (a) vs 10 (b)"),
    ("b", "ALTER TABLE orders DROP CONSTRAINT orders_user_id_fkey",
     "constraint public.orders.orders_user_id_fkey missing in b: "
     "FOREIGN KEY (user_id) REFERENCES public.users(id) ON DELETE CASCADE"),
    ("b", "ALTER DOMAIN email ADD CONSTRAINT email_short CHECK (length(VALUE) < 100)",
     "domain public.email differs: constraints: 'email_short: CHECK ((length(VALUE) < 100))' missing in a"),
    ("b", "CREATE TABLE app.events_2025 PARTITION OF app.events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')",
     "table app.events_2025 missing in a: table, 3 columns"),
    # what a downgrade may forget, and a restore must bring back
    ("b", "CREATE TYPE app.addr AS (street text, zip varchar(5))", "type app.addr missing in a: composite"),
    ("b", "ALTER TABLE notes ENABLE ROW LEVEL SECURITY", "table public.notes differs: row security: none (a) vs enabled (b)"),
    ("a", "CREATE POLICY own ON notes FOR SELECT USING (id > 0)",
     "policy public.notes.own missing in b: permissive for select to public using (id > 0)"),
    ("b", "CREATE RULE no_del AS ON DELETE TO notes DO INSTEAD NOTHING",
     "rule public.notes.no_del missing in a: CREATE RULE no_del AS ON DELETE TO public.notes DO INSTEAD NOTHING;"),
]


@pytest.mark.parametrize(("side", "change", "line"), CASES, ids=[c[2].split(":")[0] for c in CASES])
def test_each_kind_of_difference_is_one_readable_line(twins, side, change, line):
    a = snapshot_with(twins.a, change if side == "a" else None)
    b = snapshot_with(twins.b, change if side == "b" else None)
    lines = [str(d) for d in diff_snapshots(a, b)]
    assert lines == [line]
    assert fingerprint(a) != fingerprint(b)


def test_differences_use_the_given_names_and_are_structured(twins):
    a = snapshot_with(twins.a)
    b = snapshot_with(twins.b, "ALTER TABLE audit_log ALTER COLUMN what TYPE varchar(20); DROP TABLE notes")
    assert diff_snapshots(a, b, "backup", "restored") == [
        Difference("table", "public.notes", "missing in restored", "table, 2 columns"),
        Difference("column", "public.audit_log.what", "differs",
                   "type: text (backup) vs character varying(20) (restored)"),
    ]


def test_column_order_is_reported_once(twins):
    """A table rebuilt with the same columns in another order is one difference, not one per column."""
    change = "DROP TABLE notes; CREATE TABLE notes (body text, id int PRIMARY KEY)"
    lines = [str(d) for d in diff_snapshots(snapshot_with(twins.a), snapshot_with(twins.b, change))]
    assert lines == ["table public.notes differs: column order: id, body (a) vs body, id (b)"]


def test_long_definitions_are_cut_around_the_first_difference():
    head = "SELECT " + ", ".join(f"col{i}" for i in range(40))
    a = {"views": {"public.v": {"kind": "view", "definition": head + " FROM t WHERE x = 1"}}}
    b = {"views": {"public.v": {"kind": "view", "definition": head + " FROM t WHERE x = 2"}}}
    (diff,) = diff_snapshots(a, b)
    assert str(diff) == ("view public.v differs: definition: ...col38, col39 FROM t WHERE x = 1 (a) "
                         "vs ...col38, col39 FROM t WHERE x = 2 (b)")


def test_snapshots_of_different_formats_are_not_compared_field_by_field():
    assert [str(d) for d in diff_snapshots({"format": 1, "tables": {}}, {"format": 2, "tables": []})] == [
        "snapshot format differs: 1 (a) vs 2 (b); take both snapshots with the same version of dataops"]


def test_fingerprint_is_canonical():
    assert fingerprint({"b": [1, 2], "a": {"y": None, "x": True}}) == fingerprint(
        {"a": {"x": True, "y": None}, "b": [1, 2]})
    assert fingerprint({"a": [1, 2]}) != fingerprint({"a": [2, 1]})
    assert len(fingerprint({})) == 64


def test_snapshot_from_psycopg_connection_with_dict_rows(twins):
    """Callers may use another row factory; the snapshot must not depend on it."""
    with psycopg.connect(twins.a.conninfo(), row_factory=psycopg.rows.dict_row) as conn:
        assert catalog_snapshot(conn) == snapshot_with(twins.a)


# -- view text across server versions ------------------------------------------------------------

# pg_get_viewdef of the same views as PostgreSQL 15.x and 16.x print them: the zoo's and
# tests/test_pg15.py's TEXTS, read from a 15 database and from its copy restored into 16
# (tests/test_pg15.py checks the live servers still print these).
VIEW_TEXTS = json.loads((Path(__file__).with_name("view_texts_pg15_pg16.json")).read_text())


@pytest.mark.parametrize("name", sorted(VIEW_TEXTS))
def test_a_view_as_15_prints_it_reads_as_16_prints_it(name):
    texts = VIEW_TEXTS[name]
    assert neutral_view_definition(texts["15"]) == texts["16"]
    assert neutral_view_definition(texts["16"]) == texts["16"]  # 16's own text is already neutral


@pytest.mark.parametrize("name", sorted(VIEW_TEXTS))
def test_a_view_as_16_prints_it_reads_as_15_printed_it(name):
    """What a copy on 16 is compared with a version-1 fingerprint taken on 15 through."""
    texts = VIEW_TEXTS[name]
    assert view_definition_as_15(texts["16"]) == texts["15"]
    assert view_definition_as_15(texts["15"]) == texts["15"]


def test_quote_ident_is_the_servers(twins):
    names = ["item", "Odd Name", "user", "time", "year", "select", 'we"ird', "ä", "abc1", "1a", "_x", "system_user",
             "between", "int", "name", "left", "value"]
    with pg.connect(twins.a) as conn:
        server = [r[0] for r in conn.execute("SELECT quote_ident(n) FROM unnest(%s::text[]) WITH ORDINALITY u(n, i) "
                                             "ORDER BY i", (names,))]
    assert [quote_ident(n) for n in names] == server


def test_a_version_1_fingerprint_taken_on_15_is_read_with_15s_view_text(twins):
    with pg.connect(twins.a) as conn:
        as_15 = catalog_snapshot(conn, 1, source_major=15)
        assert catalog_snapshot(conn, 1, source_major=16) == catalog_snapshot(conn, 1)
        assert catalog_snapshot(conn, 2, source_major=15) == catalog_snapshot(conn, 2)  # only version 1 depends on it
    assert as_15["views"]["public.active_users"]["definition"] == (
        " SELECT users.id,\n    users.email\n   FROM public.users\n  WHERE users.active;")


def test_the_texts_cover_qualified_and_unqualified_views():
    """The table above must keep both kinds, or the case above proves nothing."""
    changed = [n for n, t in VIEW_TEXTS.items() if t["15"] != t["16"]]
    same = [n for n, t in VIEW_TEXTS.items() if t["15"] == t["16"]]
    assert len(changed) >= 15 and {"texts.v_join", "texts.v_union", "texts.v_lateral"} <= set(same)


@pytest.mark.parametrize(("text", "expected"), [
    # the only relation's qualifier goes, also in clauses a reader might not look at
    (" SELECT t.a, sum(t.b) OVER (PARTITION BY t.c ORDER BY t.a) AS s FROM public.t WHERE (t.a > 0) "
     "GROUP BY t.a, t.b, t.c HAVING (count(t.a) > 1) ORDER BY t.a LIMIT 5;",
     " SELECT a, sum(b) OVER (PARTITION BY c ORDER BY a) AS s FROM public.t WHERE (a > 0) "
     "GROUP BY a, b, c HAVING (count(a) > 1) ORDER BY a LIMIT 5;"),
    # a subquery keeps its qualifiers: there `t.a` may be the outer relation's column
    (" SELECT t.a FROM public.t WHERE (EXISTS ( SELECT 1 FROM public.u WHERE (u.a = t.a)));",
     " SELECT a FROM public.t WHERE (EXISTS ( SELECT 1 FROM public.u WHERE (u.a = t.a)));"),
    # two relations: a qualifier may be what tells them apart
    (" SELECT t.a FROM public.t, public.u WHERE (t.a = u.a);",
     " SELECT t.a FROM public.t, public.u WHERE (t.a = u.a);"),
    # whole-row references keep the name; a composite's field is reached through the column
    (" SELECT t.*::public.t AS r, (t.c).x AS x FROM public.t;", " SELECT t.*::public.t AS r, (c).x AS x FROM public.t;"),
    # a schema-qualified function call is not a column
    (" SELECT public.f(t.a) AS f FROM public.t;", " SELECT public.f(a) AS f FROM public.t;"),
    # quoted names, with a doubled quote and a dot inside
    (' SELECT "we""ird.t"."A" FROM public."we""ird.t";', ' SELECT "A" FROM public."we""ird.t";'),
    # not a view's text: left as it is
    ("not sql at all", "not sql at all"),
    (" SELECT 1; SELECT 2;", " SELECT 1; SELECT 2;"),
])
def test_neutral_view_definition_cases(text, expected):
    assert neutral_view_definition(text) == expected


def test_on_16_the_neutral_form_is_the_servers_own_text(twins):
    """So a fingerprint recorded before version 2 (a manifest, a migration's audit row) of a 16
    database still equals the one taken now."""
    with pg.connect(twins.a) as conn:
        v1, v2 = catalog_snapshot(conn, 1), catalog_snapshot(conn, 2)
        assert catalog_snapshot(conn) == v2 and FINGERPRINT_VERSION == 2
    assert v1["views"] and v1 == v2


def test_an_unknown_fingerprint_version_is_refused(twins):
    with pg.connect(twins.a) as conn, pytest.raises(BadInput, match=r"schema fingerprint version 3 is newer than "
                                                                    r"this dataops knows \(1, 2\); upgrade dataops"):
        schema_fingerprint(conn, 3)


def test_a_view_that_really_changed_still_differs():
    old = VIEW_TEXTS["texts.v_check"]["15"]
    new = old.replace("'a'::text", "'b'::text")
    a = {"views": {"texts.v_check": {"kind": "view", "definition": neutral_view_definition(old)}}}
    b = {"views": {"texts.v_check": {"kind": "view", "definition": neutral_view_definition(new)}}}
    assert [str(d) for d in diff_snapshots(a, b)] == [
        "view texts.v_check differs: definition: SELECT id, name, kind FROM texts.item WHERE (kind = 'a'::text); (a) "
        "vs SELECT id, name, kind FROM texts.item WHERE (kind = 'b'::text); (b)"]
