"""Table snapshots: a copy of a table (or of the rows a filter selects) taken inside the
database right before a destructive step, and the way back from it.

Snapshots live in the tool's own schema `dataops_snapshots`, so they survive the step
they protect, are never counted as application tables, and are dropped explicitly.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone

import psycopg
from psycopg import sql

from dataops.errors import BadInput
from dataops.tasks import pg

SCHEMA = "dataops_snapshots"


@dataclass(frozen=True)
class Snapshot:
    name: str  # table name inside dataops_snapshots
    source: str  # schema.table it was taken from
    columns: tuple[str, ...]
    key: tuple[str, ...]
    rows: int
    where: str | None
    taken_at: datetime


def _split(table: str | tuple[str, str]) -> tuple[str, str]:
    """(schema, name) of "schema.table", "table", or a (schema, name) pair (names holding dots)."""
    if isinstance(table, tuple):
        return table
    schema, _, name = table.rpartition(".")
    return schema or "public", name


def _columns(conn: psycopg.Connection, schema: str, table: str) -> list[str]:
    rows = conn.execute(
        """SELECT a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped
             AND a.attgenerated = '' ORDER BY a.attnum""", (schema, table)).fetchall()
    if not rows:
        raise BadInput(f'table "{schema}.{table}" does not exist; check the table name')
    return [r[0] for r in rows]


def _primary_key(conn: psycopg.Connection, schema: str, table: str) -> list[str]:
    rows = conn.execute(
        """SELECT a.attname FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
           JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, ord) ON true
           JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
           WHERE n.nspname = %s AND c.relname = %s AND i.indisprimary ORDER BY k.ord""", (schema, table)).fetchall()
    return [r[0] for r in rows]


def take_snapshot(conn: psycopg.Connection, table: str | tuple[str, str], *, columns: list[str] | None = None,
                  where: str | None = None, key: list[str] | None = None, label: str | None = None) -> Snapshot:
    """Copy `table` (only `columns` and the key, only rows matching `where`) into a snapshot.

    Runs on the caller's connection so it can share the transaction of the step it
    protects. `where` is SQL written by the operator in a transform or config, not user input.
    """
    schema, name = _split(table)
    all_cols = _columns(conn, schema, name)
    key = key or _primary_key(conn, schema, name)
    if not key:
        raise BadInput(f'table "{schema}.{name}" has no primary key; give the snapshot a key column')
    wanted = list(dict.fromkeys([*key, *(columns or all_cols)]))
    unknown = [c for c in wanted if c not in all_cols]
    if unknown:
        raise BadInput(f'column "{unknown[0]}" does not exist in table "{schema}.{name}"')
    stamp = datetime.now(timezone.utc)
    slug = re.sub(r"[^a-z0-9_]", "_", (label or name).lower())[:30]
    snap = f"{slug}__{stamp:%Y%m%d%H%M%S}_{secrets.token_hex(2)}"
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(SCHEMA)))
    query = sql.SQL("CREATE TABLE {} AS SELECT {} FROM {}").format(
        pg.qualified(SCHEMA, snap), sql.SQL(", ").join(map(sql.Identifier, wanted)), pg.qualified(schema, name))
    if where:
        query = sql.SQL("{} WHERE {}").format(query, sql.SQL(where))
    cur = conn.execute(query)
    rows = cur.rowcount
    meta = {"source": f"{schema}.{name}", "columns": wanted, "key": key, "where": where}
    conn.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(pg.qualified(SCHEMA, snap),
                                                          sql.Literal(__import__("json").dumps(meta))))
    return Snapshot(snap, f"{schema}.{name}", tuple(wanted), tuple(key), rows, where, stamp)


def restore_snapshot(conn: psycopg.Connection, snap: Snapshot) -> int:
    """Put the snapshot's rows back: rows still present get their snapshotted values,
    rows since deleted are inserted again (when the snapshot holds every column).
    Returns the number of rows written. Rows added after the snapshot are left alone."""
    schema, name = _split(snap.source)
    all_cols = _columns(conn, schema, name)
    cols = list(snap.columns)
    target, source = pg.qualified(schema, name), pg.qualified(SCHEMA, snap.name)
    non_key = [c for c in cols if c not in snap.key]
    written = 0
    # Triggers (e.g. one that stamps updated_at) would write new values over the ones we
    # put back; disabling them is transactional and holds only until the caller commits.
    silenced = pg.silence_user_triggers(conn, [target])
    if non_key:
        match = sql.SQL(" AND ").join(
            sql.SQL("t.{c} = s.{c}").format(c=sql.Identifier(k)) for k in snap.key)
        sets = sql.SQL(", ").join(sql.SQL("{c} = s.{c}").format(c=sql.Identifier(c)) for c in non_key)
        written += conn.execute(sql.SQL("UPDATE {} AS t SET {} FROM {} AS s WHERE {}").format(
            target, sets, source, match)).rowcount
    if set(all_cols) <= set(cols):
        anti = sql.SQL(" AND ").join(sql.SQL("t.{c} = s.{c}").format(c=sql.Identifier(k)) for k in snap.key)
        col_list = sql.SQL(", ").join(map(sql.Identifier, cols))
        written += conn.execute(sql.SQL(
            "INSERT INTO {target} ({cols}) OVERRIDING SYSTEM VALUE SELECT {scols} FROM {source} AS s "
            "WHERE NOT EXISTS (SELECT 1 FROM {target} AS t WHERE {anti})").format(
            target=target, cols=col_list, source=source, anti=anti,
            scols=sql.SQL(", ").join(sql.SQL("s.{}").format(sql.Identifier(c)) for c in cols))).rowcount
    pg.restore_user_triggers(conn, silenced)
    return written


def drop_snapshot(conn: psycopg.Connection, snap: Snapshot) -> None:
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(pg.qualified(SCHEMA, snap.name)))

