"""Checksums of table contents that prove two copies hold the same rows.

Computed inside PostgreSQL in one sequential scan (parallel where the server would run a
parallel `count(*)`); only two numbers cross the wire, so a 10 GB table costs a scan, not
a transfer.

How a row is hashed. Each column is hashed by a function chosen for its type, and the row
hashes are summed modulo 2^64. Summing makes the result independent of row order (a
restore or a CLUSTER reorders rows) while still counting duplicates, which XOR would
cancel. Within a row, the NOT NULL columns are chained in the order of their names: each
column's hash function takes the previous column's hash as its 64-bit seed, so every
step is a full mix and values swapped between rows or moved between columns change the
result. Nullable columns (which need a stand-in for NULL) and enums (a CASE on the label)
are hashed on their own, seeded by their names, and XORed into the chain's first seed.
Chaining rather than XORing every column and mixing once saves one operation per column,
about 8% of the scan (bench/RESULTS.md); ordering by name keeps it independent of the
table's column order.

The type-specific hashes avoid converting every value to text, which cost ~90% of the
scan. PostgreSQL's own hash functions hash by equality, not by stored value, so each is
used only where equal means identical, and is corrected where it is not:

- integers: hashint8extended folds 64 bits to 32, so the value itself is XORed in too;
  int2, int4 and int8 columns holding the same numbers give the same checksum.
- numeric: hash_numeric_extended hashes the value (1.0 = 1.00); a column without a fixed
  scale also mixes in scale(), so 6.00 -> 6.000 is detected. In numeric(p,s) every value
  has the same scale.
- timestamptz is hashed as its UTC instant (`AT TIME ZONE INTERVAL '0'` is exact and
  keeps infinity); timestamp, time, timetz, uuid, inet/cidr by their own hash functions,
  which are exact; date by its day number (infinity included); bool as 0/1.
- text and varchar by their bytes (`COLLATE "C"`, so a case-insensitive collation does
  not hide a change).
- enums by their label, never by OID (OIDs differ in a restored copy): the labels' hashes
  are looked up once and the column is mapped with a CASE on the enum, its most common
  labels first.
- everything else (float4/8, jsonb, json, arrays, composites, bytea, interval, money,
  char(n), ...) by its text form, with the output settings pinned (floats print the
  shortest exact form, so -0 and 0 differ).

Each table's own rows are summed: an inheritance parent's without its children's (they are
tables of their own, checksummed apart), a partitioned table's with all its partitions'.

Not detected: trailing spaces in a `character` column without a length (its cast to text
trims them), and any difference the type's text form hides. A type change (int to
numeric, timestamp to timestamptz) changes the checksum even if the values print alike, and
so does adding or dropping NOT NULL (it moves the column into or out of the chain):
compare checksums of tables whose schemas match (the schema diff says when they do not).

Results compare across databases and servers that use the same PostgreSQL hash functions
(stable across versions, since hash partitioning depends on them) on the same byte order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from dataops.errors import BadInput
from dataops.tasks.pg import row_source, table_label, user_tables
from dataops.tasks.schema import STABLE_OUTPUT, pinned_settings

# Recorded next to stored checksums, so a verifier can tell a changed method from changed data.
METHOD = ("sum64(chain of typed hashes over NOT NULL columns by name, seeded by the xor of the others) v4 "
          "(an inheritance parent's own rows)")

_TWO_64 = 1 << 64
_RELKINDS = {"r", "p", "m", "v", "f"}  # anything a SELECT can read rows from
_MAX_CASE_LABELS = 64  # above this, an enum column is hashed through its text form (same result)

# Builtin type OIDs are fixed across servers and versions.
_INT2, _INT4, _INT8, _OID, _BOOL = 21, 23, 20, 26, 16
_NUMERIC, _DATE, _TIME, _TIMETZ, _TIMESTAMP, _TIMESTAMPTZ = 1700, 1082, 1083, 1266, 1114, 1184
_UUID, _TEXT, _VARCHAR, _INET, _CIDR = 2950, 25, 1043, 869, 650

# value expression {v}, seed literal {s}; every template is strict: a NULL value gives NULL.
_TEMPLATES = {
    _INT2: "(pg_catalog.hashint4extended({v}, {s}) # ({v})::int8)",
    _INT4: "(pg_catalog.hashint4extended({v}, {s}) # ({v})::int8)",
    _INT8: "(pg_catalog.hashint8extended({v}, {s}) # {v})",
    _OID: "pg_catalog.hashoidextended({v}, {s})",
    _BOOL: "pg_catalog.hashint4extended(({v})::int4, {s})",
    _DATE: ("pg_catalog.hashint4extended(CASE WHEN pg_catalog.isfinite({v}) THEN {v} - DATE '2000-01-01' "
            "WHEN {v} > DATE '2000-01-01' THEN 2147483647 WHEN {v} < DATE '2000-01-01' THEN -2147483648 END, {s})"),
    _TIME: "pg_catalog.time_hash_extended({v}, {s})",
    _TIMETZ: "pg_catalog.timetz_hash_extended({v}, {s})",
    _TIMESTAMP: "pg_catalog.timestamp_hash_extended({v}, {s})",
    _TIMESTAMPTZ: "pg_catalog.timestamp_hash_extended({v} AT TIME ZONE INTERVAL '0', {s})",
    _UUID: "pg_catalog.uuid_hash_extended({v}, {s})",
    _TEXT: "pg_catalog.hashtextextended(({v})::text COLLATE \"C\", {s})",
    _VARCHAR: "pg_catalog.hashtextextended(({v})::text COLLATE \"C\", {s})",
    _INET: "pg_catalog.hashinetextended(({v})::inet, {s})",
    _CIDR: "pg_catalog.hashinetextended(({v})::inet, {s})",
}
# The same hashes with the seed {s} an expression (the chain so far), used exactly once in
# each. Integers go whole into the seed, where all 64 bits are mixed, instead of through
# hashint8extended's value argument, which folds them to 32.
_CHAIN = {**_TEMPLATES,
          _INT2: "pg_catalog.hashint8extended(0, ({s}) # ({v})::int8)",
          _INT4: "pg_catalog.hashint8extended(0, ({s}) # ({v})::int8)",
          _INT8: "pg_catalog.hashint8extended(0, ({s}) # {v})"}
_CHAIN_NUMERIC_FREE = "pg_catalog.hash_numeric_extended({v}, ({s}) # coalesce(pg_catalog.scale({v}), -1)::int8)"
_TEXT_FORM = "pg_catalog.hashtextextended(({v})::text COLLATE \"C\", {s})"
_NUMERIC_FIXED = "pg_catalog.hash_numeric_extended({v}, {s})"
_NUMERIC_FREE = "(pg_catalog.hash_numeric_extended({v}, {s}) # coalesce(pg_catalog.scale({v}), -1)::int8)"
_SQL_NAMES = {_INT2: "smallint", _INT4: "integer", _INT8: "bigint", _OID: "oid", _BOOL: "boolean",
              _NUMERIC: "numeric", _DATE: "date", _TIME: "time", _TIMETZ: "time with time zone",
              _TIMESTAMP: "timestamp", _TIMESTAMPTZ: "timestamp with time zone", _UUID: "uuid",
              _TEXT: "text", _VARCHAR: "text", _INET: "inet", _CIDR: "inet"}


@dataclass(frozen=True)
class TableChecksum:
    table: str  # 'users' for public, 'schema.table' otherwise
    rows: int
    checksum: str  # "<rows>:<16 hex digits>"; equal strings mean equal rows (with the same columns)
    columns: tuple[str, ...]  # the columns hashed, in table order


@dataclass(frozen=True)
class _Column:
    name: str
    type_oid: int  # the base type for a domain
    typmod: int
    not_null: bool
    is_enum: bool
    is_domain: bool
    enum_type: int  # OID of the enum type, 0 if none


def _seed(column: str, purpose: str) -> int:
    """A signed 64-bit number from the column's name: equal on every machine and database."""
    digest = hashlib.sha256(f"dataops-checksum:{purpose}:{column}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _int8(value: int) -> str:
    return f"'{value}'::int8"  # quoted: a bare -5 after # would lex as the jsonb operator #-


def _read_columns(cur: psycopg.Cursor, schema: str, table: str) -> tuple[int, list[_Column]]:
    name = f"{schema}.{table}"
    found = cur.execute("""SELECT c.oid, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                           WHERE n.nspname = %s AND c.relname = %s""", (schema, table)).fetchone()
    if found is None or found[1] not in _RELKINDS:
        raise BadInput(f'table "{name}" does not exist')
    rows = cur.execute("""
        SELECT a.attname, CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END,
               CASE WHEN t.typtype = 'd' THEN t.typtypmod ELSE a.atttypmod END, a.attnotnull,
               coalesce(b.typtype, t.typtype) = 'e', t.typtype = 'd',
               CASE WHEN coalesce(b.typtype, t.typtype) = 'e' THEN coalesce(b.oid, t.oid) ELSE 0 END
        FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
        LEFT JOIN pg_type b ON t.typtype = 'd' AND b.oid = t.typbasetype
        WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum""", (found[0],)).fetchall()
    return found[0], [_Column(*r) for r in rows]


def _chained(col: _Column) -> bool:
    return col.not_null and not col.is_enum


def _typed_hash(cur: psycopg.Cursor, col: _Column, seed: str, chain: bool) -> str:
    """The column's type-specific hash, seeded by a literal or (`chain`) by the chain so far."""
    v = sql.Identifier(col.name).as_string(cur)
    if col.is_domain and col.type_oid in _SQL_NAMES:
        v = f"({v})::{_SQL_NAMES[col.type_oid]}"
    if col.type_oid == _NUMERIC:
        template = _NUMERIC_FIXED if col.typmod >= 0 else (_CHAIN_NUMERIC_FREE if chain else _NUMERIC_FREE)
    else:
        template = (_CHAIN if chain else _TEMPLATES).get(col.type_oid, _TEXT_FORM)
    return template.format(v=v, s=seed)


def _by_frequency(cur: psycopg.Cursor, schema: str, table: str, column: str,
                  labels: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """The labels with the column's most common values first (pg_stats, when ANALYZE has
    run): a CASE stops at its first match, so on skewed data (most orders 'delivered')
    most rows take one comparison. The order changes the speed, never the result."""
    row = cur.execute("SELECT most_common_vals::text::text[] FROM pg_catalog.pg_stats "
                      "WHERE schemaname = %s AND tablename = %s AND attname = %s", (schema, table, column)).fetchone()
    common = {label: i for i, label in enumerate(row[0] if row and row[0] else [])}
    return sorted(labels, key=lambda lh: common.get(lh[0], len(common)))


def _column_hash(cur: psycopg.Cursor, col: _Column, schema: str, table: str) -> sql.Composable:
    v = sql.Identifier(col.name).as_string(cur)
    seed = _int8(_seed(col.name, "value"))
    if col.is_enum and not col.is_domain:
        labels = cur.execute("""SELECT enumlabel, pg_catalog.hashtextextended(enumlabel COLLATE "C", %s)
                                FROM pg_enum WHERE enumtypid = %s ORDER BY enumsortorder""",
                             (_seed(col.name, "value"), col.enum_type)).fetchall()
        fallback = _TEXT_FORM.format(v=v, s=seed)
        if 0 < len(labels) <= _MAX_CASE_LABELS:
            # Comparing enums compares OIDs: far cheaper than printing each label. The
            # ELSE (NULL, or a label added after this query was built) gives the same
            # hash the labels' constants were computed with.
            labels = _by_frequency(cur, schema, table, col.name, labels)
            whens = " ".join(f"WHEN {sql.Literal(label).as_string(cur)} THEN {_int8(h)}" for label, h in labels)
            expr = f"CASE {v} {whens} ELSE {fallback} END"
        else:
            expr = fallback
    else:
        expr = _typed_hash(cur, col, seed, chain=False)
    if not col.not_null:
        expr = f"coalesce({expr}, {_int8(_seed(col.name, 'null'))})"
    return sql.SQL(expr)


def row_hash_sql(conn: psycopg.Connection, schema: str, table: str, columns: list[str] | None = None,
                 exclude: list[str] | None = None) -> tuple[str, tuple[str, ...]]:
    """The expression that hashes one row of the table (its columns unqualified), and the
    columns it hashes: for callers that sum it over their own FROM (a subset, a CTE)."""
    cur = conn.cursor(row_factory=tuple_row)
    _, all_columns = _read_columns(cur, schema, table)
    names = [c.name for c in all_columns]
    for given in (columns or []) + (exclude or []):
        if given not in names:
            raise BadInput(f'column "{given}" does not exist in table "{schema}.{table}"')
    chosen = [c for c in all_columns if (columns is None or c.name in columns) and c.name not in (exclude or [])]
    start = _int8(_seed("\x1f".join(sorted(c.name for c in chosen)), "chain"))
    seed = " # ".join([start] + [_column_hash(cur, c, schema, table).as_string(cur) for c in chosen if not _chained(c)])
    chain = sorted((c for c in chosen if _chained(c)), key=lambda c: c.name)
    if not chain:
        row = f"pg_catalog.hashint8extended(0, {seed})"
    else:
        row = seed
        for col in chain:
            row = _typed_hash(cur, col, row, chain=True)
    return row, tuple(c.name for c in chosen)


def checksum_sql(conn: psycopg.Connection, schema: str, table: str, columns: list[str] | None = None,
                 exclude: list[str] | None = None) -> tuple[sql.Composed, tuple[str, ...]]:
    """The query that checksums a table, and the columns it hashes (for EXPLAIN and benchmarks)."""
    row, chosen = row_hash_sql(conn, schema, table, columns, exclude)
    # An inheritance parent's own rows only (its children are tables of their own); a partitioned
    # table's rows, which are its partitions'.
    query = sql.SQL("SELECT count(*), sum({row}) FROM {table}").format(row=sql.SQL(row),
                                                                        table=row_source(conn, schema, table))
    return query, chosen


def checksum_text(rows: int, total) -> str:
    """The checksum string of `rows` rows whose row hashes sum to `total`. The sum is
    numeric, so it cannot overflow; mod 2^64 fixes its width."""
    return f"{rows}:{int(total or 0) % _TWO_64:016x}"


def table_checksum(conn: psycopg.Connection, schema: str, table: str, columns: list[str] | None = None,
                   exclude: list[str] | None = None) -> TableChecksum:
    """Order-independent checksum of the rows of one table (or of some of its columns).

    Run it in the transaction whose view of the data you mean: a REPEATABLE READ
    transaction sharing pg_dump's snapshot checksums exactly the rows that were dumped.
    """
    query, chosen = checksum_sql(conn, schema, table, columns, exclude)
    cur = conn.cursor(row_factory=tuple_row)
    with pinned_settings(conn, STABLE_OUTPUT):
        rows, total = cur.execute(query).fetchone()
    return TableChecksum(table=table_label(schema, table), rows=rows, checksum=checksum_text(rows, total),
                         columns=chosen)


def table_checksums(conn: psycopg.Connection, tables: list[str] | None = None,
                    columns: Mapping[str, list[str]] | None = None,
                    exclude: Mapping[str, list[str]] | None = None) -> dict[str, TableChecksum]:
    """Checksums of many tables, keyed like row counts ('users', 'audit.events').

    By default every user table. `columns` and `exclude` are keyed by table; a key that
    names a table not being checksummed is an error, since a typo there would silently
    checksum columns the caller meant to leave out.
    """
    if tables is None:
        targets = user_tables(conn)
    else:
        targets = [parse_label(t) for t in tables]
    labels = {table_label(s, t): (s, t) for s, t in targets}
    per_table: dict[str, dict[str, list[str]]] = {label: {} for label in labels}
    for arg, mapping in (("columns", columns), ("exclude", exclude)):
        for key, names in (mapping or {}).items():
            schema, table = parse_label(key)
            label = table_label(schema, table)
            if label not in labels:
                where = "does not exist" if tables is None else "is not in tables"
                raise BadInput(f'{arg} names table "{schema}.{table}", which {where}')
            per_table[label][arg] = list(names)
    return {label: table_checksum(conn, schema, table, **per_table[label])
            for label, (schema, table) in labels.items()}


def parse_label(label: str) -> tuple[str, str]:
    """'users' -> ('public', 'users'); 'audit.events' -> ('audit', 'events')."""
    schema, _, table = label.rpartition(".")
    return (schema or "public", table)


_parse_label = parse_label  # the name it had before
