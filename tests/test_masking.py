"""Masking rules: the Python stream and the in-place SQL give the same value for every rule
kind, COPY text survives the round trip, bad rules are bad input, personal columns are found."""

from __future__ import annotations

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
]


def _masker(rule: dict, typ: str, base: str, **kw):
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
    ({"faker": "address"}, "character varying(10)", "varchar", {"max_length": 10}, "more than character varying(10)"),
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
                                       "keep (got faker, keep)"),
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
