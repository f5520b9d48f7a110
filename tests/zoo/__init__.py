"""The schema zoo: a database with every PostgreSQL feature dataops must carry through a backup,
a restore, a migration, a transform, a refresh or an anonymization without losing anything.

    from zoo import load_zoo, reader_dsn, zoo_checksums, schema_dump

`load_zoo(dsn)` fills an (empty) database as the superuser of the test server; `reader_dsn(dsn)`
connects to it as `zoo_reader`, a LOGIN role without BYPASSRLS that may SELECT everything but
sees none of the 300 rows of the row-level-secured table `zoo.secret_note`.

`zoo_checksums(dsn)` and `schema_dump(dsn)` are the test's own yardsticks, independent of
dataops' checksum code: md5 of each relation's rows in text form, ordered, and pg_dump's
schema-only text.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import psycopg
from psycopg import sql

from dataops.dsn import Dsn

ZOO_SQL = Path(__file__).with_name("zoo.sql")

READER = "zoo_reader"
READER_PASSWORD = "zoo-reader-pw"

# Relations tests refer to by name.
RLS_TABLE = ("zoo", "secret_note")  # 300 rows, owners alice/bob/carol: zoo_reader sees none
RLS_ROWS = 300
UNPOPULATED_MATVIEWS = [("zoo", "pending_report"), ("sales", "daily_orders")]
POPULATED_MATVIEWS = [("zoo", "country_totals")]
PARTITIONED_PARENTS = [("zoo", "payment"), ("zoo", "events"), ("zoo", "events_2023"), ("sales", "metrics"),
                       ("sales", "metrics_eu")]
INHERITANCE_PARENT = ("zoo", "vehicle")  # children zoo.car, zoo.truck
SAME_NAME_TABLES = [("public", "items"), ("sales", "items"), ("Odd.Schema", "items")]
ODD_TABLE = ("Odd.Schema", "Mixed Case.Table")
LONG_TABLE = ("zoo", "t23456789012345678901234567890123456789012345678901234567890123")  # 63 bytes

# Extensions the zoo uses when the server has them (pgserver's build has none of them).
_OPTIONAL_EXTENSIONS = {
    "hstore": """
        CREATE EXTENSION IF NOT EXISTS hstore;
        CREATE TABLE zoo.ext_hstore (id integer PRIMARY KEY, attrs hstore);
        INSERT INTO zoo.ext_hstore SELECT i, CASE WHEN i % 7 = 0 THEN NULL
            ELSE hstore(ARRAY['k' || i, 'ü', 'nul'], ARRAY['v' || i, 'é "q"', NULL]) END FROM generate_series(1, 300) i;
    """,
    "citext": """
        CREATE EXTENSION IF NOT EXISTS citext;
        CREATE TABLE zoo.ext_citext (id integer PRIMARY KEY, login citext UNIQUE);
        INSERT INTO zoo.ext_citext SELECT i, 'User' || i FROM generate_series(1, 300) i;
    """,
    "uuid-ossp": """
        CREATE EXTENSION IF NOT EXISTS "uuid-ossp";
        CREATE TABLE zoo.ext_uuid (id uuid PRIMARY KEY DEFAULT uuid_generate_v4(), n integer);
        INSERT INTO zoo.ext_uuid SELECT uuid_generate_v5(uuid_ns_url(), 'http://zoo/' || i), i FROM generate_series(1, 300) i;
    """,
    "pgcrypto": """
        CREATE EXTENSION IF NOT EXISTS pgcrypto;
        CREATE TABLE zoo.ext_crypto (id integer PRIMARY KEY, digest_hex text);
        INSERT INTO zoo.ext_crypto SELECT i, encode(digest('zoo' || i, 'sha256'), 'hex') FROM generate_series(1, 300) i;
    """,
}


def _ensure_reader(conn: psycopg.Connection) -> None:
    """zoo_reader is cluster-wide: create it once, tolerate a concurrent creator."""
    conn.execute(sql.SQL("""
        DO $$ BEGIN
            IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {name}) THEN
                CREATE ROLE {role} LOGIN NOSUPERUSER NOBYPASSRLS PASSWORD {pw};
            END IF;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
        END $$""").format(name=sql.Literal(READER), role=sql.Identifier(READER), pw=sql.Literal(READER_PASSWORD)))


def available_extensions(dsn: Dsn) -> set[str]:
    with psycopg.connect(dsn.conninfo(), autocommit=True) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM pg_available_extensions")}


def load_zoo(dsn: Dsn) -> None:
    """Fill the database `dsn` names (empty, connected as a superuser) with the zoo."""
    with psycopg.connect(dsn.conninfo(), autocommit=True) as conn:
        _ensure_reader(conn)
        available = {r[0] for r in conn.execute("SELECT name FROM pg_available_extensions")}
        conn.execute(ZOO_SQL.read_text())
        for name, body in _OPTIONAL_EXTENSIONS.items():
            if name in available:
                conn.execute(body)
                table = body.split("CREATE TABLE ", 1)[1].split(" ", 1)[0]
                conn.execute(f"GRANT SELECT ON {table} TO {READER}")


def reader_dsn(dsn: Dsn) -> Dsn:
    """The same database, as zoo_reader."""
    return Dsn(psycopg.conninfo.make_conninfo(dsn.secret(), user=READER, password=READER_PASSWORD))


# -- the test's own yardsticks -------------------------------------------------------------------

_SESSION = ("SET TimeZone = 'UTC'; SET DateStyle = 'ISO, MDY'; SET IntervalStyle = 'postgres'; "
            "SET extra_float_digits = 1; SET bytea_output = 'hex'; SET lc_monetary = 'C'; SET row_security = off")


def zoo_relations(conn: psycopg.Connection) -> list[tuple[str, str, str]]:
    """(schema, name, relkind) of every table that holds rows (plain tables, partitions, inheritance
    parents and children: each counted by itself) and every populated materialized view."""
    return [tuple(r) for r in conn.execute("""
        SELECT n.nspname, c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE (c.relkind = 'r' OR (c.relkind = 'm' AND c.relispopulated))
          AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^(pg_|dataops_)'
        ORDER BY 1, 2""").fetchall()]


def zoo_checksums(dsn: Dsn, *, include_sequences: bool = True) -> dict[str, str]:
    """{"schema.name": "rows:md5"} for every relation that holds rows (ONLY its own rows), and
    {"sequence schema.name": "last_value,is_called"}: md5 over each row's text form, sorted."""
    out: dict[str, str] = {}
    with psycopg.connect(dsn.conninfo(), autocommit=True) as conn:
        conn.execute(_SESSION)
        for schema, name, _kind in zoo_relations(conn):
            rel = sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(name))
            n, digest = conn.execute(sql.SQL(
                "SELECT count(*), md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text COLLATE \"C\"), '')) "
                "FROM ONLY {} t").format(rel)).fetchone()
            out[f"{schema}.{name}"] = f"{n}:{digest}"
        if include_sequences:
            for schema, name in conn.execute("""
                    SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                    WHERE c.relkind = 'S' AND n.nspname !~ '^(pg_|dataops_)' AND n.nspname <> 'information_schema'
                    ORDER BY 1, 2""").fetchall():
                last, called = conn.execute(sql.SQL("SELECT last_value, is_called FROM {}.{}").format(
                    sql.Identifier(schema), sql.Identifier(name))).fetchone()
                out[f"sequence {schema}.{name}"] = f"{last},{called}"
    return out


def schema_dump(dsn: Dsn, *, privileges: bool = False) -> str:
    """pg_dump --schema-only --no-owner of the database, without the lines that name the dump
    itself; without GRANTs too unless `privileges` (dataops' restore and refresh leave owners and
    privileges out on purpose: roles differ between environments)."""
    from dataops.tasks import pg

    with psycopg.connect(dsn.conninfo(), autocommit=True) as conn:
        major = conn.info.server_version // 10000
    conninfo, env = dsn.libpq_args()
    import os

    args = [pg.client_binary("pg_dump", major), "--schema-only", "--no-owner", "-d", conninfo]
    if not privileges:
        args.append("--no-privileges")
    text = subprocess.run(args,
                          capture_output=True, text=True, check=True, env={**os.environ, **env}).stdout
    # pg_dump 16.x prints \restrict/\unrestrict lines with a random key in newer minor releases.
    return "\n".join(line for line in text.splitlines()
                     if not re.match(r"^(-- Dumped (from|by)|\\(un)?restrict )", line))
