"""Masking rules: the Python stream and the in-place SQL give the same value for every rule
kind, COPY text survives the round trip, bad rules are bad input, personal columns are found."""

from __future__ import annotations

import re
import time

import pytest
import yaml
from psycopg import sql

from dataops.errors import BadInput, ConfigError
from dataops.settings import ColumnRule, parse_settings
from dataops.tasks import pg
from dataops.tasks.anonymize.masking import Column, Keyed, compile_rule, escape, faker_pool, partial_mask, unescape
from dataops.tasks.anonymize.rules import name_reason
from dataops.tasks.schema import STABLE_OUTPUT

KEYED = Keyed("test-salt-0123456789abcdef")
TEXTS = ["john@example.com", "Jöhn Smïth", "+1 (555) 123-4567", "ab", "---", "tab\there\\back\nline", "", "x" * 40]
CASES = [  # (rule, column type, base type, values)
    *[(r, "text", "text", TEXTS) for r in (
        {"faker": "email"}, {"faker": "email", "unique": True}, {"faker": "name", "unique": True},
        {"partial": {"keep_last": 2}}, {"partial": {"keep_last": 0, "mask": "#"}}, {"hash": {"length": 12}},
        {"template": "user_{id}@example.com"}, {"template": "u{hash}", "unique": True})],
    ({"hash": {}}, "integer", "int4", ["1", "-5", "2147483647"]),
    ({"hash": {}}, "bigint", "int8", ["1"]),
    ({"hash": {}}, "uuid", "uuid", ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]),
    ({"hash": {}}, "inet", "inet", ["1.2.3.4", "::1"]),
    ({"shift_days": 30}, "date", "date", ["1980-02-29", "infinity", "2000-01-01"]),
    ({"shift_days": 3}, "timestamp with time zone", "timestamptz", ["2024-03-31 01:30:00+02", "2024-01-01 00:00:00.5+00"]),
    ({"shift_days": 3}, "timestamp without time zone", "timestamp", ["2024-03-31 01:30:00"]),
    ({"faker": "date_of_birth"}, "date", "date", ["1980-02-29"]),
    *[(r, f"character varying({n})", "varchar", ["Springfield", "x", ""]) for r, n in (
        ({"faker": "city"}, 15), ({"faker": "name"}, 15), ({"template": "c{hash}"}, 20),
        ({"faker": "email", "unique": True}, 40))],
    ({"faker": "first_name"}, "character(6)", "bpchar", ["Ann", "Bartholomew"]),
]


def _masker(rule: dict, typ: str, base: str, **kw):
    if "max_length" not in kw and (width := re.search(r"\((\d+)\)$", typ)):
        kw["max_length"] = int(width.group(1))
    col = Column("c", typ, base, kw.get("not_null", False), kw.get("unique", False), kw.get("max_length"))
    return compile_rule(ColumnRule.model_validate(rule), col, keyed=KEYED, locale="en_US", pool_size=200,
                        columns={"c": 0, "id": 1}, masked={"c"}, where="anonymize.rules.t.c")


@pytest.fixture(scope="module")
def scratch(pg_server_dsn):
    import uuid

    name = f"mask_{uuid.uuid4().hex[:10]}"
    pg.create_database(pg_server_dsn, name)
    yield pg_server_dsn.with_database(name)
    pg.drop_database(pg_server_dsn, name)


@pytest.mark.parametrize("rule,typ,base,values", CASES, ids=lambda v: str(v)[:40] if isinstance(v, dict) else None)
def test_stream_and_sql_agree(scratch, rule, typ, base, values):
    """The refresh masks in Python, `anonymize` in SQL: both must give the same bytes, or a
    database anonymized in place would not match a refreshed one."""
    m = _masker(rule, typ, base)
    with pg.connect(scratch, autocommit=True) as conn:
        for k, v in STABLE_OUTPUT.items():
            conn.execute("SELECT set_config(%s, %s, false)", (k, v))
        conn.execute("CREATE TEMP TABLE pool (pool int, i int, v text)")
        with conn.cursor().copy("COPY pool FROM STDIN") as cp:
            for i, v in enumerate(m.pool or []):
                cp.write_row((1, i, v))
        for value in values:
            col = sql.SQL("({}::{})").format(sql.Literal(value), sql.SQL(typ))
            d = m.digest_sql(col) if m.needs_digest else None
            pick = m.pick_sql(d, sql.Identifier("pool"), 1) if m.kind == "faker" else None
            in_sql = conn.execute(sql.SQL("SELECT concat({})").format(m.sql(col, d, pick, {"id": sql.Literal(42)}))).fetchone()[0]
            text = conn.execute(sql.SQL("SELECT concat({})").format(col)).fetchone()[0].encode()
            in_python = m.py(text, KEYED.digest(text), [b"x", b"42"])
            assert in_python == in_sql, (rule, value)
            if m.column.max_length:  # fits by characters, not bytes
                assert len(in_python) <= m.column.max_length, (rule, value, in_python)
            if rule.get("shift_days") and value != "infinity":
                assert in_python != text.decode()  # every date moves


def test_masking_is_deterministic_and_keyed():
    email = _masker({"faker": "email", "unique": True}, "text", "text")
    v = b"ada@example.com"
    first = email.py(v, KEYED.digest(v), [])
    assert first == email.py(v, KEYED.digest(v), [])  # same input, same output: joins still match
    assert first != email.py(b"bob@example.com", KEYED.digest(b"bob@example.com"), [])
    other = Keyed("another-salt-0123456789")
    assert KEYED.digest(v) != other.digest(v)
    assert faker_pool(KEYED, "name", "en_US", 50) == faker_pool(Keyed("test-salt-0123456789abcdef"), "name", "en_US", 50)
    assert faker_pool(KEYED, "name", "en_US", 50) != faker_pool(other, "name", "en_US", 50)
    # unique: pool entries repeat, outputs do not
    outputs = {email.py(f"u{i}@x.org".encode(), KEYED.digest(f"u{i}@x.org".encode()), []) for i in range(5000)}
    assert len(outputs) == 5000


def test_copy_text_round_trip():
    for raw in [b"plain", b"tab\there", b"new\nline", b"back\\slash", b"cr\rx", b"\\N", b""]:
        assert unescape(escape(raw)) == raw
    assert unescape(b"a\\tb\\\\c\\nd\\101\\x41") == b"a\tb\\c\ndAA"


def test_partial_mask_keeps_shape_and_tail():
    assert partial_mask("+1 (555) 123-4567", 2, "*") == "+* (***) ***-**67"
    assert partial_mask("ab", 2, "*") == "**"  # nothing left to hide otherwise
    assert partial_mask("", 2, "*") == ""


@pytest.mark.parametrize("rule,typ,base,kw,message", [
    ({"faker": "emial"}, "text", "text", {}, 'unknown Faker provider "emial" for locale en_US; did you mean "email"?'),
    ({"faker": "name", "locale": "xx_YY"}, "text", "text", {}, 'unknown Faker locale "xx_YY"'),
    ({"null": True}, "text", "text", {"not_null": True}, "column is NOT NULL"),
    ({"constant": "x"}, "text", "text", {"unique": True}, "column is unique; a constant would repeat"),
    ({"partial": {}}, "integer", "int4", {}, "partial masks apply to text columns"),
    ({"shift_days": 5}, "text", "text", {}, "shift_days applies to date and timestamp columns"),
    ({"hash": {"length": 32}}, "character varying(20)", "varchar", {"max_length": 20}, "hash length 32 exceeds"),
    ({"faker": "address"}, "character varying(10)", "varchar", {"max_length": 10},
     "only 0 of 200 Faker address values fit character varying(10) (0 distinct, at least 20 needed); use a template "
     "or hash: {length: 10}, a wider column, or another Faker provider"),
    ({"faker": "city"}, "character varying(15)", "varchar", {"max_length": 15, "unique": True},
     "unique Faker values end in a 17-character keyed suffix, which leaves no room in character varying(15); "
     "use hash: {length: 15}"),
    ({"faker": "email", "unique": True}, "character varying(20)", "varchar", {"max_length": 20},
     "Faker email values fit 3 characters (character varying(20) less the 17-character unique suffix)"),
    ({"constant": "redacted by policy"}, "character varying(10)", "varchar", {"max_length": 10},
     "the constant has 18 characters, more than character varying(10) holds"),
    ({"template": "person-{hash}"}, "character varying(20)", "varchar", {"max_length": 20},
     "template values have at least 23 characters"),
    ({"hash": {}}, "oid", "oid", {}, "the id of a large object"),
    ({"template": "{c}@x"}, "text", "text", {}, "template uses the column's own value"),
    ({"template": "{nope}@x"}, "text", "text", {}, 'template names column "nope"'),
    ({"hash": {}}, "jsonb", "jsonb", {}, "hash applies to text, integer, uuid and inet columns"),
])
def test_rules_that_cannot_work_are_bad_input(rule, typ, base, kw, message):
    with pytest.raises(BadInput) as err:
        _masker(rule, typ, base, **kw)
    assert err.value.message.startswith("anonymize.rules.t.c: ") and message in err.value.message


def test_rule_syntax_errors_name_the_key():
    base = {"environments": {"p": {"role": "production", "database_url": "postgresql://u@h/db"}},
            "storage": {"url": "file:///tmp/x"}}
    for text, message in [
        ("{faker: email, keep: true}", "give exactly one of faker, template, constant, null, hash, partial, shift_days, "
                                       "keep, noise, regex, choice, generalize, json, cases (got faker, keep)"),
        ("{constant: null}", "constant: null is the null rule"),
        ("{partial: {keep_last: 2}, unique: true}", "unique applies to faker, hash and template rules"),
        ("{fakr: email}", "anonymize.rules.users.email.fakr: unknown key; did you mean 'faker'?"),
    ]:
        with pytest.raises(ConfigError) as err:
            parse_settings({**base, "anonymize": {"rules": {"users": {"email": yaml.safe_load(text)}}}})
        assert message in err.value.message and "anonymize.rules.users.email" in err.value.message
    s = parse_settings({**base, "anonymize": {"salt": "0123456789abcdef0", "rules": {"users": yaml.safe_load(
        "{ip: null, a: keep, b: hash, c: name, d: {shift_days: 3}}")}}})
    assert [r.kind for r in s.anonymize.rules["users"].values()] == ["null", "keep", "hash", "faker", "shift_days"]
    with pytest.raises(ConfigError, match="anonymize.salt: must be at least 16 characters"):
        parse_settings({**base, "anonymize": {"salt": "short"}})
    with pytest.raises(ConfigError, match="table orders is in both exclude and truncate"):
        parse_settings({**base, "refresh": {"exclude": ["orders"], "truncate": ["orders"]}})


def test_personal_columns_are_found_by_name_and_type():
    found = {c: name_reason(t, c, ty) for t, c, ty in [
        ("users", "email", "text"), ("users", "last_name", "text"), ("customers", "name", "text"),
        ("users", "ip_address", "inet"), ("logins", "client", "inet"), ("users", "password_hash", "text"),
        ("people", "ssn", "int8"), ("users", "birthday", "date"), ("audit_logs", "user_agent", "text"),
        ("users", "email_verified", "bool"), ("users", "email_verified_at", "timestamptz"),
        ("products", "name", "text"), ("orders", "status", "text")]}
    assert all(found[c] for c in ("email", "last_name", "ip_address", "client", "password_hash", "ssn", "birthday",
                                  "user_agent"))
    assert found["name"] is None  # products.name is the last one named `name`: not a person
    assert not any(found[c] for c in ("email_verified", "email_verified_at", "status"))
    assert name_reason("customers", "name", "text") == "name suggests person name"


def _compiled(rule: dict, typ: str, base: str, width: int | None, *, unique=False, pool_size=200, salt=None):
    col = Column("c", typ, base, False, unique, width)
    return compile_rule(ColumnRule.model_validate(rule), col, keyed=Keyed(salt) if salt else KEYED, locale="en_US",
                        pool_size=pool_size, columns={"c": 0}, masked={"c"}, where="anonymize.rules.t.c")


def test_faker_pools_keep_the_values_that_fit_the_column():
    """{faker: city} on varchar(15) used to be refused because some Faker cities are longer;
    now the pool holds only cities of at most 15 characters, as many as asked for."""
    assert max(len(v) for v in faker_pool(KEYED, "city", "en_US", 200)) > 15  # the refusal case of old
    t0 = time.monotonic()
    for provider, width in [("city", 15), ("name", 15), ("first_name", 10), ("last_name", 10), ("company", 12)]:
        m = _compiled({"faker": provider}, f"character varying({width})", "varchar", width)
        assert len(m.pool) == 200 and max(len(v) for v in m.pool) <= width and len(set(m.pool)) > 20, provider
        assert m.label.endswith(f"values of up to {width} characters") or max(
            len(v) for v in faker_pool(KEYED, provider, "en_US", 200)) <= width
        again = _compiled({"faker": provider}, f"character varying({width})", "varchar", width)
        assert again.pool == m.pool  # deterministic: same salt, same rule, same width, same pool
        assert _compiled({"faker": provider}, f"character varying({width})", "varchar", width,
                         salt="another-salt-0123456789").pool != m.pool
    assert time.monotonic() - t0 < 20

    # a pool where every value fits stays the plain pool: the column masks as a text column does
    postcode = _compiled({"faker": "postcode"}, "character varying(10)", "varchar", 10)
    assert postcode.pool_spec[3] is None
    assert postcode.pool == _compiled({"faker": "postcode"}, "text", "text", None).pool

    # a worker process rebuilds the same fitted pool from the masker it is sent
    import pickle

    from dataops.tasks.anonymize import masking

    city = _compiled({"faker": "city"}, "character varying(15)", "varchar", 15)
    masking._POOLS.clear()
    clone = pickle.loads(pickle.dumps(city))
    clone._pool = None
    assert clone.pool == city.pool

    # unique: the pool leaves room for the 17-character suffix, and every output fits
    email = _compiled({"faker": "email", "unique": True}, "character varying(40)", "varchar", 40)
    outputs = {email.py(f"u{i}".encode(), KEYED.digest(f"u{i}".encode()), []) for i in range(2000)}
    assert len(outputs) == 2000 and max(len(o) for o in outputs) <= 40
    assert max(len(v) for v in email.pool) <= 40 - 17


def test_pools_count_characters_not_bytes():
    """char(6) holds Jürgen (6 characters, 7 bytes in UTF-8): the fit is by characters."""
    col = Column("c", "character(6)", "bpchar", False, False, 6)
    m = compile_rule(ColumnRule.model_validate({"faker": "first_name", "locale": "de_DE"}), col, keyed=KEYED,
                     locale="en_US", pool_size=2000, columns={"c": 0}, masked={"c"}, where="anonymize.rules.t.c")
    assert max(len(v) for v in m.pool) <= 6
    wide = [v for v in m.pool if len(v.encode()) > 6]
    assert wide, "some kept names are longer than 6 bytes"


def _plan(dsn, rules: dict, **anon):
    from dataops.tasks.anonymize.rules import plan_masking, read_tables

    settings = parse_settings({"environments": {"p": {"role": "production", "database_url": "postgresql://u@h/db"}},
                               "storage": {"url": "file:///tmp/x"},
                               "anonymize": {"salt": "rules-test-salt-0123456789", "pool_size": 300, "rules": rules,
                                             **anon}})
    with pg.connect(dsn) as conn:
        return plan_masking(settings, conn, read_tables(conn))


def test_rules_are_checked_against_domains_keys_and_real_rows(db):
    """Domains (nested too) limit and check the pool; a template is tried on real rows; the
    two sides of a foreign key are made to mask alike, or refused."""
    with pg.connect(db) as conn:
        conn.execute("""
            CREATE DOMAIN short_city AS varchar(15) CHECK (VALUE ~ '^[A-M]');
            CREATE DOMAIN shorter_city AS short_city;
            CREATE TYPE flag AS ENUM ('on', 'off');
            CREATE TABLE places (id int PRIMARY KEY, town short_city, hometown shorter_city, login varchar(8),
                                 state flag, code varchar(30) UNIQUE);
            INSERT INTO places SELECT g, 'Auckland', 'Berlin', 'u' || g, 'on', 'c' || g FROM generate_series(1, 50) g;
            CREATE TABLE visits (id int PRIMARY KEY, code varchar(25) REFERENCES places (code));
            INSERT INTO visits SELECT g, 'c' || g FROM generate_series(1, 50) g;
        """)
        conn.commit()
    plan = _plan(db, {"places": {"town": "city", "hometown": "city"}})
    for col in ("town", "hometown"):
        m = plan.tables["places"].maskers[col]
        assert m.column.max_length == 15 and len(m.pool) > 20
        assert all(v[0] in "ABCDEFGHIJKLM" and len(v) <= 15 for v in m.pool), col
        assert "values short_city accepts" in m.label or "values shorter_city accepts" in m.label

    for rules, message in [
        ({"places": {"login": {"template": "person_{id}"}}},  # person_1 fits varchar(8), person_10 does not
         "anonymize.rules.places.login: template person_{id} gives 'person_"),
        ({"places": {"state": {"constant": "maybe"}}}, "anonymize.rules.places.state: the constant 'maybe' is not a "
                                                       "valid flag (invalid input value for enum flag"),
        ({"places": {"state": "city"}}, "anonymize.rules.places.state: faker city gives"),
        ({"visits": {"code": "last_name"}}, "anonymize.rules.visits.code: visits.code references places.code "
                                        "(visits_code_fkey), which is not masked"),
        ({"places": {"code": "last_name"}, "visits": {"code": "hash"}}, "masked differently"),
    ]:
        with pytest.raises(BadInput) as err:
            _plan(db, rules)
        assert message in err.value.message, err.value.message
    with pytest.raises(BadInput, match=r"for a row, not a valid character varying\(8\) \(9 characters\)"):
        _plan(db, {"places": {"login": {"template": "person_{id}"}}})
    assert _plan(db, {"places": {"login": {"template": "user_{id}"}}}).tables  # user_50 fits

    # the same Faker rule on both sides of the key: the child takes the parent's unique suffix and
    # both keep the values that fit the narrower column, so the masked keys still match
    plan = _plan(db, {"places": {"code": "last_name"}, "visits": {"code": "last_name"}})
    parent, child = plan.tables["places"].maskers["code"], plan.tables["visits"].maskers["code"]
    assert parent.unique and child.unique and parent.signature == child.signature
    assert max(len(v) for v in child.pool) <= 25 - 17
    v = b"c7"
    assert parent.py(v, parent.keyed.digest(v), []) == child.py(v, child.keyed.digest(v), [])
