"""Checksums of table contents that prove two copies hold the same rows.

Computed inside PostgreSQL in one sequential scan; only two numbers cross the wire, so a
10 GB table costs a scan, not a transfer. Each row is hashed from its text form
(ROW(col, ...)::text, columns in attnum order) with hashtextextended, a 64-bit hash, and
the row hashes are summed. Summing makes the result independent of row order (a restore
or a CLUSTER reorders rows) while still counting duplicates, which XOR would cancel.

Why the text form and not the types' own hash functions, which are faster: those hash by
equality, not by value as stored. numeric 1.0 and 1.00 hash alike, so do float 0 and -0,
and citext 'A' and 'a'; an enum hashes by its OID, which differs in a restored copy; int8
is folded to 32 bits. The text form is exactly what pg_dump writes, so equal text means
an equal restore. Its price is the output functions: ~90% of the run time.

Results compare across databases and servers only with the same server encoding and
PostgreSQL's hash on the same byte order (hashtextextended is stable across upgrades,
since hash partitioning depends on it). Output settings that change the text (TimeZone,
DateStyle, extra_float_digits, ...) are pinned while the scan runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from dataops.errors import BadInput
from tasks.pg import qualified, table_label, user_tables
from tasks.schema import STABLE_OUTPUT, pinned_settings

# Recorded next to stored checksums, so a verifier can tell a changed method from changed data.
METHOD = "sum64(hashtextextended(row::text COLLATE \"C\", 0))"

_TWO_64 = 1 << 64
_RELKINDS = {"r", "p", "m", "v", "f"}  # anything a SELECT can read rows from


@dataclass(frozen=True)
class TableChecksum:
    table: str  # 'users' for public, 'schema.table' otherwise
    rows: int
    checksum: str  # "<rows>:<16 hex digits>"; equal strings mean equal rows (with the same columns)
    columns: tuple[str, ...]  # the columns hashed, in table order


def table_checksum(conn: psycopg.Connection, schema: str, table: str, columns: list[str] | None = None,
                   exclude: list[str] | None = None) -> TableChecksum:
    """Order-independent checksum of the rows of one table (or of some of its columns).

    Run it in the transaction whose view of the data you mean: a REPEATABLE READ
    transaction sharing pg_dump's snapshot checksums exactly the rows that were dumped.
    """
    cur = conn.cursor(row_factory=tuple_row)
    name = f"{schema}.{table}"
    found = cur.execute("""SELECT c.oid, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                           WHERE n.nspname = %s AND c.relname = %s""", (schema, table)).fetchone()
    if found is None or found[1] not in _RELKINDS:
        raise BadInput(f'table "{name}" does not exist')
    all_columns = [r[0] for r in cur.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        (found[0],))]
    for given in (columns or []) + (exclude or []):
        if given not in all_columns:
            raise BadInput(f'column "{given}" does not exist in table "{name}"')
    chosen = [c for c in all_columns if (columns is None or c in columns) and c not in (exclude or [])]

    query = sql.SQL('SELECT count(*), sum(hashtextextended((ROW({cols})::text) COLLATE "C", 0)) FROM {table}').format(
        cols=sql.SQL(", ").join(sql.Identifier(c) for c in chosen), table=qualified(schema, table))
    with pinned_settings(conn, STABLE_OUTPUT):
        rows, total = cur.execute(query).fetchone()
    digest = int(total or 0) % _TWO_64  # the sum is numeric: it cannot overflow, and mod 2^64 fixes its width
    return TableChecksum(table=table_label(schema, table), rows=rows, checksum=f"{rows}:{digest:016x}",
                         columns=tuple(chosen))


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
        targets = [_parse_label(t) for t in tables]
    labels = {table_label(s, t): (s, t) for s, t in targets}
    per_table: dict[str, dict[str, list[str]]] = {label: {} for label in labels}
    for arg, mapping in (("columns", columns), ("exclude", exclude)):
        for key, names in (mapping or {}).items():
            schema, table = _parse_label(key)
            label = table_label(schema, table)
            if label not in labels:
                where = "does not exist" if tables is None else "is not in tables"
                raise BadInput(f'{arg} names table "{schema}.{table}", which {where}')
            per_table[label][arg] = list(names)
    return {label: table_checksum(conn, schema, table, **per_table[label])
            for label, (schema, table) in labels.items()}


def _parse_label(label: str) -> tuple[str, str]:
    schema, _, table = label.rpartition(".")
    return (schema or "public", table)
