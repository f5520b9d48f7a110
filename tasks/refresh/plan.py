"""What a refresh will do, decided before anything is written: which environments, which
tables and rows, which columns are masked and how, and whether that is allowed at all.

Everything here reads the source inside the refresh's snapshot and writes nothing, so
`dataops refresh-staging --check` runs exactly this and stops.

Subsetting keeps referential integrity upwards: a table's rows are those its filter
selects, plus every row that a kept row of another table points to, transitively
(orders of the last 90 days keep their users and products, even if users has a filter of
its own). It is computed by SQL on the source, one predicate per table, so it needs no
writes to production and no memory here: a parent's predicate is its own filter OR
EXISTS (a kept child row pointing at it). Self references (categories.parent_id) use a
recursive CTE; a foreign-key cycle through several filtered tables is refused.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from dataops.errors import BadInput, SafetyRefusal
from dataops.settings import Environment, Role, Settings
from dataops.tasks.anonymize.rules import (
    SKIPPED_SCHEMAS,
    ForeignKey,
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

ROWS_PER_PART_MASKED = 250_000
ROWS_PER_PART_RAW = 1_000_000
MAX_PREDICATE_CHARS = 200_000


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
class TablePlan:
    table: TableInfo
    mode: str  # copy | truncate | exclude
    keep: sql.Composable | None = None  # predicate on alias t0 (None: every row)
    ctes: list[sql.Composable] = field(default_factory=list)  # WITH RECURSIVE parts the predicate needs
    blocks: int = 0
    filtered: bool = False  # a subset filter, the closure or a delete rule applies

    @property
    def label(self) -> str:
        return self.table.label


@dataclass
class SequencePlan:
    schema: str
    name: str
    last_value: int
    is_called: bool
    increment: int
    owner: tuple[str, str] | None  # (table label, column)


@dataclass
class RefreshPlan:
    source: str
    target: str
    tables: dict[str, TablePlan]
    foreign_keys: list[ForeignKey]
    masking: MaskingPlan
    sequences: list[SequencePlan]
    jobs: int

    @property
    def copied(self) -> list[TablePlan]:
        return [t for t in self.tables.values() if t.mode == "copy"]

    def describe(self) -> list[dict]:
        rows = []
        for label, tp in sorted(self.tables.items()):
            masked = self.masking.tables.get(label)
            rows.append({"table": label, "mode": tp.mode + (" (subset)" if tp.filtered else ""),
                         "rows (estimate)": tp.table.est_rows,
                         "masked columns": ", ".join(f"{c}: {m.label}" for c, m in masked.maskers.items()) if masked else ""})
        return rows


def plan_refresh(settings: Settings, conn: psycopg.Connection, source: Environment, target: Environment) -> RefreshPlan:
    """Read the source (inside the caller's snapshot) and decide everything; raises BadInput
    for a bad table name, filter or rule, and never writes."""
    tables = read_tables(conn)
    fks = read_foreign_keys(conn)
    cfg = settings.refresh
    modes = {label: "copy" for label in tables}
    for key in cfg.exclude:
        modes[resolve_table(key, tables, f"refresh.exclude[{key}]")] = "exclude"
    for key in cfg.truncate:
        modes[resolve_table(key, tables, f"refresh.truncate[{key}]")] = "truncate"
    filters = {resolve_table(k, tables, f"refresh.subset.{k}"): v for k, v in cfg.subset.items()}
    for label, cond in filters.items():
        check_condition(conn, tables[label], cond, f"refresh.subset.{label}")
    _check_dependencies(conn, tables, fks, modes)

    copied = {label for label, mode in modes.items() if mode == "copy"}
    masking = plan_masking(settings, conn, tables, copied)
    deletes = {label: cond for label, cond in masking.deletes.items() if label in copied}
    builder = _KeepBuilder(tables, fks, copied, filters, deletes)
    plans = {}
    for label, table in tables.items():
        tp = TablePlan(table, modes[label])
        if tp.mode == "copy":
            tp.keep, tp.ctes = builder.for_table(label)
            tp.filtered = tp.keep is not None
        plans[label] = tp
    _read_blocks(conn, plans)
    jobs = cfg.jobs or os.cpu_count() or 2
    return RefreshPlan(source.name, target.name, plans, fks, masking, _read_sequences(conn, tables, modes), jobs)


def _check_dependencies(conn: psycopg.Connection, tables: dict[str, TableInfo], fks: list[ForeignKey],
                        modes: dict[str, str]) -> None:
    """A copied row may not point into a table that is left out or left empty, and no view may
    depend on a left-out table: both would fail after the copy, so refuse now."""
    for fk in fks:
        if modes[fk.child] == "copy" and modes[fk.parent] != "copy":
            key = "refresh.exclude" if modes[fk.parent] == "exclude" else "refresh.truncate"
            raise BadInput(f"{key}: table {fk.parent} is referenced by {fk.child} ({fk.name}), which is copied; "
                           f"add {fk.child} to refresh.exclude or refresh.truncate as well")
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


class _KeepBuilder:
    def __init__(self, tables, fks, copied, filters, deletes):
        self.tables, self.copied, self.filters, self.deletes = tables, copied, filters, deletes
        self.children: dict[str, list[ForeignKey]] = {}
        for fk in fks:
            if fk.child in copied and fk.parent in copied:
                self.children.setdefault(fk.parent, []).append(fk)
        self.aliases = itertools.count(1)

    def for_table(self, label: str) -> tuple[sql.Composable | None, list[sql.Composable]]:
        ctes: dict[str, sql.Composable] = {}
        keep = self._keep(label, sql.Identifier("t0"), [], ctes)
        delete = self.deletes.get(label)
        if delete:
            gone = sql.SQL("NOT ({})").format(sql.SQL(delete))
            keep = gone if keep is None else sql.SQL("({}) AND {}").format(keep, gone)
        if keep is not None and len(keep.as_string()) > MAX_PREDICATE_CHARS:
            raise BadInput(f"refresh.subset: the foreign-key closure of {label} grows too large to run as SQL; "
                           "filter fewer tables")
        return keep, list(ctes.values())

    def _keep(self, label: str, alias: sql.Identifier, stack: list[str], ctes: dict) -> sql.Composable | None:
        """Predicate over `alias` selecting the rows of `label` to copy; None for all rows."""
        own = self.filters.get(label)
        if own is None:
            return None
        if label in stack:
            cycle = " -> ".join(stack[stack.index(label):] + [label])
            raise BadInput(f"refresh.subset: filtered tables form a foreign-key cycle ({cycle}); remove one of the filters")
        selfs = [fk for fk in self.children.get(label, []) if fk.child == label]
        if not selfs:
            return self._base(label, alias, stack + [label], ctes)
        # Rows reachable from the base rows by following the self references up, as a CTE.
        name = f"keep_{list(self.tables).index(label)}"
        keys = list(dict.fromkeys(c for fk in selfs for c in fk.parent_columns + fk.child_columns))
        r, p = sql.Identifier("r"), sql.Identifier("p")
        cols = lambda a: sql.SQL(", ").join(sql.SQL("{}.{}").format(a, sql.Identifier(c)) for c in keys)  # noqa: E731
        joins = sql.SQL(" OR ").join(
            sql.SQL("({})").format(sql.SQL(" AND ").join(
                sql.SQL("p.{} = k.{}").format(sql.Identifier(pc), sql.Identifier(cc))
                for pc, cc in zip(fk.parent_columns, fk.child_columns))) for fk in selfs)
        if label not in ctes:
            ctes[label] = sql.SQL("{n} AS (SELECT {rc} FROM ONLY {t} AS r WHERE {b} UNION "
                                 "SELECT {pc} FROM ONLY {t} AS p JOIN {n} AS k ON {j})").format(
                n=sql.Identifier(name), rc=cols(r), t=self.tables[label].qualified,
                b=self._base(label, r, stack + [label], ctes), pc=cols(p), j=joins)
        ref = selfs[0].parent_columns
        return sql.SQL("({}) IN (SELECT {} FROM {})").format(
            sql.SQL(", ").join(sql.SQL("{}.{}").format(alias, sql.Identifier(c)) for c in ref),
            sql.SQL(", ").join(sql.Identifier(c) for c in ref), sql.Identifier(name))

    def _base(self, label: str, alias: sql.Identifier, stack: list[str], ctes: dict) -> sql.Composable:
        parts = [sql.SQL("({})").format(sql.SQL(self.filters[label]))]
        for fk in self.children.get(label, []):
            if fk.child == label:
                continue
            child = sql.Identifier(f"t{next(self.aliases)}")
            cond = [sql.SQL("{}.{} = {}.{}").format(child, sql.Identifier(cc), alias, sql.Identifier(pc))
                    for cc, pc in zip(fk.child_columns, fk.parent_columns)]
            inner = self._keep(fk.child, child, stack, ctes)
            if inner is not None:
                cond.append(sql.SQL("({})").format(inner))
            if self.deletes.get(fk.child):
                cond.append(sql.SQL("NOT ({})").format(sql.SQL(self.deletes[fk.child])))
            parts.append(sql.SQL("EXISTS (SELECT 1 FROM ONLY {} AS {} WHERE {})").format(
                self.tables[fk.child].qualified, child, sql.SQL(" AND ").join(cond)))
        return sql.SQL(" OR ").join(parts)


def _read_blocks(conn: psycopg.Connection, plans: dict[str, TablePlan]) -> None:
    """Table sizes in blocks now (relpages may be stale); big tables are copied in block ranges."""
    cur = conn.cursor(row_factory=tuple_row)
    for tp in plans.values():
        if tp.mode != "copy" or tp.table.relkind != "r":
            continue
        tp.blocks = cur.execute("SELECT pg_relation_size(%s::regclass) / current_setting('block_size')::int",
                                (regclass(tp.table.schema, tp.table.name),)).fetchone()[0]


def _read_sequences(conn: psycopg.Connection, tables: dict[str, TableInfo], modes: dict[str, str]) -> list[SequencePlan]:
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
            if label in modes and modes[label] == "exclude":
                continue  # the table and its sequence are not created
            owner = (label, column) if label in tables else None
        last, called = cur.execute(sql.SQL("SELECT last_value, is_called FROM {}.{}").format(
            sql.Identifier(schema), sql.Identifier(name))).fetchone()
        out.append(SequencePlan(schema, name, last, called, inc, owner))
    return out


def parts_for(tp: TablePlan, python_masked: bool, jobs: int) -> int:
    if tp.table.relkind != "r" or tp.blocks < 16:
        return 1
    per = ROWS_PER_PART_MASKED if python_masked else ROWS_PER_PART_RAW
    return max(1, min(jobs, math.ceil(tp.table.est_rows / per), tp.blocks // 8))
