"""What a refresh needs to know about the source's tables beyond their columns: where their
rows live (partitions) and how they point at each other (foreign keys, as table edges).

A partitioned table is one table to a refresh: its masking rules, subset filter, row count
and checksum are those of the partitioned table (the root), whatever the partitions. Its
rows are copied partition by partition (each leaf streamed straight into the same leaf of
the copy, so big partitioned tables copy in parallel). Foreign keys may be declared on the
root (PostgreSQL clones them onto every partition) or on one partition only (pagila's
payment_p2022_01 -> staff) and may point at a partitioned table or at one partition: an
edge always joins two roots and remembers the partition it is limited to, if any.

Inheritance children (INHERITS, not partitions) are tables of their own: a parent's rows
are read with ONLY, so no row is copied twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from dataops.errors import BadInput
from dataops.tasks.anonymize.rules import SKIPPED_SCHEMAS, ForeignKey, Named, TableInfo, label_of, split_label


@dataclass(frozen=True)
class Rel(Named):
    """One relation by name: a table, a partition or a partitioned partition."""

    schema: str
    name: str
    relkind: str  # r plain, p partitioned, f foreign

    @property
    def scan(self) -> sql.Composed:
        """The relation in a FROM clause, its own rows only: ONLY for a plain table (an
        inheritance parent's rows are not its children's); a partitioned table has no rows
        of its own, so its partitions' rows are its rows."""
        return sql.SQL("ONLY {}").format(self.qualified) if self.relkind == "r" else self.qualified


@dataclass(frozen=True)
class Partition:
    rel: Rel
    root: str  # label of the partitioned table at the top
    leaf: bool  # holds rows (not partitioned further)
    est_rows: int


@dataclass(frozen=True)
class Edge:
    """A foreign key between two (root) tables. `child_scope`/`parent_scope` name the
    partition it is declared on or points at, when it is not the whole table."""

    name: str
    child: str
    child_columns: tuple[str, ...]
    parent: str
    parent_columns: tuple[str, ...]
    validated: bool
    child_rel: Rel  # the relation the constraint is on (the table or a partition)
    parent_rel: Rel
    child_scope: Rel | None = None
    parent_scope: Rel | None = None

    @property
    def self_reference(self) -> bool:
        return self.child == self.parent


def read_partitions(conn: psycopg.Connection) -> dict[str, Partition]:
    """Every partition (at any level), keyed by its label, with the root it belongs to."""
    rows = conn.cursor(row_factory=tuple_row).execute(
        """
        SELECT n.nspname, c.relname, c.relkind, rn.nspname, r.relname, c.reltuples::bigint
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        CROSS JOIN LATERAL (SELECT a.relid FROM pg_partition_ancestors(c.oid) a
                            JOIN pg_class x ON x.oid = a.relid WHERE NOT x.relispartition) top
        JOIN pg_class r ON r.oid = top.relid JOIN pg_namespace rn ON rn.oid = r.relnamespace
        WHERE c.relispartition AND n.nspname <> ALL (%s) AND n.nspname NOT LIKE 'pg\\_%%'
        ORDER BY 1, 2
        """, (list(SKIPPED_SCHEMAS),)).fetchall()
    return {label_of(s, n): Partition(Rel(s, n, kind), label_of(rs, rn), kind != "p", max(est, 0))
            for s, n, kind, rs, rn, est in rows}


def leaves_of(table: TableInfo, partitions: dict[str, Partition]) -> list[Partition]:
    """The relations holding a table's rows: the table itself, or its leaf partitions."""
    if table.relkind != "p":
        return [Partition(Rel(table.schema, table.name, table.relkind), table.label, True, table.est_rows)]
    return [p for p in partitions.values() if p.root == table.label and p.leaf]


def as_edges(fks: list[ForeignKey], tables: dict[str, TableInfo], partitions: dict[str, Partition]) -> list[Edge]:
    """Foreign keys as edges between tables: one declared on (or pointing at) a partition
    becomes an edge of its root, limited to that partition."""
    def side(label: str) -> tuple[str, Rel, Rel | None]:
        if label in partitions:
            p = partitions[label]
            return p.root, p.rel, p.rel
        t = tables.get(label)
        if t is None:  # a table read_tables leaves out (an extension's): not ours to copy
            schema, name = split_label(label)
            return label, Rel(schema, name, "r"), None
        return label, Rel(t.schema, t.name, t.relkind), None

    edges = []
    for fk in fks:
        child, child_rel, child_scope = side(fk.child)
        parent, parent_rel, parent_scope = side(fk.parent)
        edges.append(Edge(fk.name, child, fk.child_columns, parent, fk.parent_columns, fk.validated,
                          child_rel, parent_rel, child_scope, parent_scope))
    return edges


def in_scope(alias: sql.Identifier, scope: Rel) -> sql.Composed:
    """`alias`'s row lies in the partition `scope` (or one of its own partitions)."""
    return sql.SQL("{}.tableoid IN (SELECT relid FROM pg_partition_tree({}::regclass))").format(
        alias, sql.Literal(scope.regclass))


def refuse_partition_names(keys: list[tuple[str, str]], partitions: dict[str, Partition]) -> None:
    """Rules and filters are written on the partitioned table and apply to every partition;
    one that names a partition would cover part of the table only, so it is refused."""
    for key, where in keys:
        label = label_of(*split_label(key.strip()))
        if label in partitions:
            root = partitions[label].root
            raise BadInput(f"{where}: {label} is a partition of {root}; write it on {root} (rules and filters "
                           "of a partitioned table apply to every partition)")


def inheritance_children(conn: psycopg.Connection, table: TableInfo) -> list[str]:
    """Tables that INHERIT from `table` (partitions aside)."""
    rows = conn.cursor(row_factory=tuple_row).execute(
        """SELECT n.nspname, c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE i.inhparent = %s::regclass AND NOT c.relispartition ORDER BY 1, 2""",
        (table.regclass,)).fetchall()
    return [label_of(s, n) for s, n in rows]
