"""What a refresh will do, decided before anything is written: which environments, which
tables and rows, which columns are masked and how, and whether that is allowed at all.

Everything here reads the source inside the refresh's snapshot and writes nothing, so
`dataops refresh-staging --check` runs exactly this and stops.

Which rows a subset copies is dataops.tasks.refresh.subset's (filters choose, children
follow their parents, parents follow kept rows); where a table's rows live (its leaf
partitions) and which foreign keys join which tables is dataops.tasks.refresh.catalog's.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from dataops.errors import ROW_SECURITY_FIX, BadInput, SafetyRefusal
from dataops.settings import Environment, Role, Settings
from dataops.tasks import pg
from dataops.tasks.anonymize.rules import (
    SKIPPED_SCHEMAS,
    MaskingPlan,
    TableInfo,
    check_condition,
    label_of,
    plan_masking,
    read_foreign_keys,
    read_tables,
    regclass,
    resolve_table,
)
from dataops.tasks.refresh.catalog import (
    Edge,
    Partition,
    Rel,
    as_edges,
    inheritance_children,
    leaves_of,
    read_partitions,
    refuse_partition_names,
)
from dataops.tasks.refresh.subset import Subset

ROWS_PER_PART_MASKED = 250_000
ROWS_PER_PART_RAW = 1_000_000


# -- guards ---------------------------------------------------------------------------------

def _only(settings: Settings, role: Role, flag: str) -> Environment:
    found = settings.by_role(role)
    if len(found) != 1:
        names = ", ".join(e.name for e in found) or "none"
        raise BadInput(f"cannot pick the {flag[2:]} environment: {len(found)} environments have role {role.value} "
                       f"({names}); pass {flag} ENV")
    return found[0]


def resolve_environments(settings: Settings, source: str | None, target: str | None) -> tuple[Environment, Environment]:
    """The source and target of a refresh, refused before any connection when not allowed.

    The one place a refresh turns names into Environments, so the guards below run wherever
    names come in (the flow, the CLI's early refusal) and nothing further down re-checks them.
    The target is never production; production data reaches a development target only
    with refresh.allow_production_to_development.
    """
    src = settings.env(source) if source else _only(settings, Role.PRODUCTION, "--source")
    tgt = settings.env(target) if target else _only(settings, Role.STAGING, "--target")
    if tgt.role is Role.PRODUCTION:
        raise SafetyRefusal(f"refresh target '{tgt.name}' has role production (environments.{tgt.name}.role); "
                            "a refresh replaces the target's data, so it only writes to staging or development")
    if tgt.role not in (Role.STAGING, Role.DEVELOPMENT):  # pragma: no cover - the enum has no other role
        raise SafetyRefusal(f"refresh target '{tgt.name}' must have role staging or development")
    if src.role is Role.PRODUCTION and tgt.role is Role.DEVELOPMENT and not settings.refresh.allow_production_to_development:
        raise SafetyRefusal(f"refusing to copy production data ('{src.name}') into development environment "
                            f"'{tgt.name}'; set refresh.allow_production_to_development: true in dataops.yaml if you mean it")
    s, t = src.database_url, tgt.database_url
    if src.name == tgt.name or (s.same_server(t) and s.database == t.database):
        raise BadInput(f"source '{src.name}' and target '{tgt.name}' are the same database; pick two environments")
    return src, tgt


# -- the plan ---------------------------------------------------------------------------------

@dataclass
class Piece:
    """A relation holding rows of a table: the table itself, or one of its leaf partitions."""

    rel: Rel
    est_rows: int
    blocks: int = 0


@dataclass
class TablePlan:
    table: TableInfo
    mode: str  # copy | truncate | exclude
    keep: sql.Composable | None = None  # predicate on alias t0 (None: every row)
    ctes: list[sql.Composable] = field(default_factory=list)  # WITH RECURSIVE parts the predicate needs
    pieces: list[Piece] = field(default_factory=list)  # where the rows are read from and written to
    filtered: bool = False  # a subset filter, the closure or a delete rule applies

    @property
    def label(self) -> str:
        return self.table.label

    @property
    def est_rows(self) -> int:
        return sum(p.est_rows for p in self.pieces) if self.pieces else self.table.est_rows

    @property
    def rel(self) -> Rel:
        return Rel(self.table.schema, self.table.name, self.table.relkind)


@dataclass
class SequencePlan:
    schema: str
    name: str
    last_value: int
    is_called: bool
    increment: int
    owner: tuple[str, str, str] | None  # (schema, table, column)


@dataclass
class RefreshPlan:
    source: str
    target: str
    tables: dict[str, TablePlan]
    foreign_keys: list[Edge]  # between tables (a partition's foreign key is its table's)
    masking: MaskingPlan
    sequences: list[SequencePlan]
    jobs: int
    partitions: dict[str, Partition] = field(default_factory=dict)
    matviews: list[str] = field(default_factory=list)  # materialized views with data in the source (quoted names)

    @property
    def copied(self) -> list[TablePlan]:
        return [t for t in self.tables.values() if t.mode == "copy"]

    def describe(self) -> list[dict]:
        rows = []
        for label, tp in sorted(self.tables.items()):
            masked = self.masking.tables.get(label)
            rows.append({"table": label, "mode": tp.mode + (" (subset)" if tp.filtered else ""),
                         "rows (estimate)": tp.est_rows,
                         "masked columns": ", ".join(f"{c}: {m.label}" for c, m in masked.maskers.items()) if masked else ""})
        return rows


def plan_refresh(settings: Settings, conn: psycopg.Connection, source: Environment, target: Environment) -> RefreshPlan:
    """Read the source (inside the caller's snapshot) and decide everything; raises BadInput
    for a bad table name, filter or rule, a source role that cannot read every row, and never writes."""
    tables = read_tables(conn)
    partitions = read_partitions(conn)
    cfg = settings.refresh
    refuse_partition_names([(k, f"refresh.exclude[{k}]") for k in cfg.exclude]
                           + [(k, f"refresh.truncate[{k}]") for k in cfg.truncate]
                           + [(k, f"refresh.subset.{k}") for k in cfg.subset]
                           + [(k, f"refresh.copy_whole[{k}]") for k in cfg.copy_whole], partitions)
    modes = {label: "copy" for label in tables}
    for key in cfg.exclude:
        modes[resolve_table(key, tables, f"refresh.exclude[{key}]")] = "exclude"
    for key in cfg.truncate:
        modes[resolve_table(key, tables, f"refresh.truncate[{key}]")] = "truncate"
    whole = {resolve_table(k, tables, f"refresh.copy_whole[{k}]") for k in cfg.copy_whole}
    filters = {resolve_table(k, tables, f"refresh.subset.{k}"): v for k, v in cfg.subset.items()}
    copied = {label for label, mode in modes.items() if mode == "copy"}
    pieces = {label: leaves_of(tables[label], partitions) for label in copied}
    read = [Rel(tables[t].schema, tables[t].name, tables[t].relkind) for t in copied]  # checksums read these,
    refuse_hidden_rows(conn, source, target, read + [p.rel for ps in pieces.values() for p in ps])  # the copy these
    for label, cond in filters.items():
        check_condition(conn, tables[label], cond, f"refresh.subset.{label}")
    edges = as_edges(read_foreign_keys(conn), tables, partitions)
    _check_dependencies(conn, tables, edges, modes, pieces)

    masking = plan_masking(settings, conn, tables, copied)
    deletes = {label: cond for label, cond in masking.deletes.items() if label in copied}
    subset = Subset(tables, edges, copied, filters, deletes, whole)
    plans = {}
    for label, table in tables.items():
        tp = TablePlan(table, modes[label])
        if tp.mode == "copy":
            tp.keep, tp.ctes = subset.keep_for(label)
            tp.filtered = tp.keep is not None
            tp.pieces = [Piece(p.rel, p.est_rows) for p in pieces[label]]
        plans[label] = tp
    _read_blocks(conn, plans)
    jobs = cfg.jobs or os.cpu_count() or 2
    matviews = [r[0] for r in conn.cursor(row_factory=tuple_row).execute(
        "SELECT format('%%I.%%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind = 'm' AND c.relispopulated AND n.nspname <> ALL (%s) ORDER BY 1", (list(SKIPPED_SCHEMAS),))]
    return RefreshPlan(source.name, target.name, plans, edges, masking, _read_sequences(conn, tables, modes, partitions),
                       jobs, partitions, matviews)


def refuse_hidden_rows(conn: psycopg.Connection, source: Environment, target: Environment, rels: list[Rel]) -> None:
    """Row-level security that would hide rows of a copied table from the source role: the
    copy would be short and its own row-count check, reading through the same policy, would
    agree with it. Every connection runs with row_security = off, so the copy would fail;
    this refuses first, in one line, before anything is written."""
    blocked = set(pg.row_security_blockers(conn))
    if not blocked:
        return
    names = [r[0] for r in conn.cursor(row_factory=tuple_row).execute(
        "SELECT quote_ident(s) || '.' || quote_ident(n) FROM unnest(%s::text[], %s::text[]) AS u(s, n)",
        ([r.schema for r in rels], [r.name for r in rels])).fetchall()]
    hidden = sorted(blocked & set(names))
    if hidden:
        shown = ", ".join(hidden[:5]) + (f" and {len(hidden) - 5} more" if len(hidden) > 5 else "")
        raise BadInput(f"refusing to copy {source.name} into {target.name}: row-level security would hide rows of "
                       f"{shown} from role {conn.info.user}; {ROW_SECURITY_FIX} (or exclude or truncate the table)")


def _check_dependencies(conn: psycopg.Connection, tables: dict[str, TableInfo], edges: list[Edge],
                        modes: dict[str, str], pieces: dict[str, list[Partition]]) -> None:
    """A copied row may not point into a table that is left out or left empty, no foreign key
    or view may depend on a left-out table, and no inheritance child may lose its parent:
    each would fail after the copy, so refuse now. A foreign table among the partitions of a
    copied table is refused too: its rows live on another server and are not ours to write."""
    for e in edges:
        if e.child not in modes or e.parent not in modes:
            continue
        if modes[e.child] == "copy" and modes[e.parent] != "copy":
            key = "refresh.exclude" if modes[e.parent] == "exclude" else "refresh.truncate"
            raise BadInput(f"{key}: table {e.parent} is referenced by {e.child} ({e.name}), which is copied; "
                           f"add {e.child} to refresh.exclude or refresh.truncate as well")
        if modes[e.child] == "truncate" and modes[e.parent] == "exclude":
            raise BadInput(f"refresh.exclude: table {e.parent} is referenced by {e.child} ({e.name}), which is "
                           f"created empty; exclude {e.child} as well")
    for label, ps in pieces.items():
        foreign = [p.rel.label for p in ps if p.rel.relkind == "f"]
        if foreign:
            raise BadInput(f"table {label} has a partition that is a foreign table ({foreign[0]}); a refresh copies "
                           f"no foreign data: add {label} to refresh.exclude or refresh.truncate")
    excluded = [tables[label] for label, mode in modes.items() if mode == "exclude"]
    for t in excluded:
        views = conn.cursor(row_factory=tuple_row).execute(
            """SELECT DISTINCT vn.nspname || '.' || v.relname FROM pg_depend d
               JOIN pg_rewrite r ON r.oid = d.objid AND d.classid = 'pg_rewrite'::regclass
               JOIN pg_class v ON v.oid = r.ev_class JOIN pg_namespace vn ON vn.oid = v.relnamespace
               WHERE d.refobjid = %s::regclass AND v.oid <> d.refobjid ORDER BY 1""",
            (regclass(t.schema, t.name),)).fetchall()
        if views:
            raise BadInput(f"refresh.exclude: view {views[0][0]} depends on table {t.label}; truncate the table "
                           "instead of excluding it")
        kept = [c for c in inheritance_children(conn, t) if modes.get(c) != "exclude"]
        if kept:
            raise BadInput(f"refresh.exclude: table {kept[0]} inherits from {t.label}; exclude it as well, or "
                           f"truncate {t.label} instead")


def _read_blocks(conn: psycopg.Connection, plans: dict[str, TablePlan]) -> None:
    """Sizes in blocks now (relpages may be stale); big tables and partitions are copied in
    block ranges."""
    cur = conn.cursor(row_factory=tuple_row)
    for tp in plans.values():
        for piece in tp.pieces:
            if piece.rel.relkind == "r":
                piece.blocks = cur.execute("SELECT pg_relation_size(%s::regclass) / current_setting('block_size')::int",
                                           (piece.rel.regclass,)).fetchone()[0]


def _read_sequences(conn: psycopg.Connection, tables: dict[str, TableInfo], modes: dict[str, str],
                    partitions: dict[str, Partition]) -> list[SequencePlan]:
    cur = conn.cursor(row_factory=tuple_row)
    rows = cur.execute(
        """
        SELECT n.nspname, c.relname, s.seqincrement, tn.nspname, t.relname, a.attname
        FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid
             AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
        LEFT JOIN pg_class t ON t.oid = d.refobjid LEFT JOIN pg_namespace tn ON tn.oid = t.relnamespace
        LEFT JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = d.refobjsubid
        WHERE n.nspname <> ALL (%s) AND n.nspname NOT LIKE 'pg\\_%%'
          AND NOT EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = 'pg_class'::regclass AND e.objid = c.oid
                          AND e.deptype = 'e')
        ORDER BY 1, 2
        """, (list(SKIPPED_SCHEMAS),)).fetchall()
    out = []
    for schema, name, inc, tschema, table, column in rows:
        owner = None
        if table is not None:
            label = label_of(tschema, table)
            if label in partitions:
                label = partitions[label].root
            if label in modes and modes[label] == "exclude":
                continue  # the table and its sequence are not created
            owner = (tschema, table, column) if label in tables else None
        last, called = cur.execute(sql.SQL("SELECT last_value, is_called FROM {}.{}").format(
            sql.Identifier(schema), sql.Identifier(name))).fetchone()
        out.append(SequencePlan(schema, name, last, called, inc, owner))
    return out


def parts_for(piece: Piece, python_masked: bool, jobs: int) -> int:
    """Block ranges one table or partition is copied in: one each for big ones, so they load in parallel."""
    if piece.rel.relkind != "r" or piece.blocks < 16:
        return 1
    per = ROWS_PER_PART_MASKED if python_masked else ROWS_PER_PART_RAW
    return max(1, min(jobs, math.ceil(piece.est_rows / per), piece.blocks // 8))


def count_subset(conn: psycopg.Connection, tp: TablePlan) -> tuple[int, int]:
    """(rows the subset keeps, rows in the table) now, for `--check`."""
    total = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(tp.rel.scan)).fetchone()[0]
    if tp.keep is None:
        return total, total
    with_ = sql.SQL("WITH RECURSIVE {} ").format(sql.SQL(", ").join(tp.ctes)) if tp.ctes else sql.SQL("")
    kept = conn.execute(sql.SQL("{}SELECT count(*) FROM {} AS t0 WHERE {}").format(
        with_, tp.rel.scan, tp.keep)).fetchone()[0]
    return kept, total
