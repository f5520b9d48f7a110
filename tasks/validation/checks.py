"""Integrity checks: what they look for, and the SQL that finds it.

Each check is a small object with a stated contract:

- `resolve(conn)`: look the names it was given up in the catalog; an unknown table or
  column is `BadInput` naming it (`table "public.nope" does not exist`), raised before
  any check runs.
- `run(ctx)`: one or more `CheckResult`s. Never writes: the caller runs every check in
  one READ ONLY REPEATABLE READ transaction (one snapshot for all of them), each check in
  its own savepoint so that one that errors (a statement timeout, a broken custom query)
  is reported as `error` ("could not run: ...") and the others still run. A check that
  covers many objects (every foreign key, every unique index) runs each in a savepoint of
  its own too: one statement that fails marks that one object, not the whole group.

A materialized view that was never populated (`WITH NO DATA`, or a restore that left it so)
has no rows to check and cannot be read: every check skips it, reported as `skip`
("skipped: not populated"), never as an error. A row-level-security refusal is not a check
that could not run but a role that cannot validate: it is raised (BadInput), never reported.

Built in, found from the database itself: orphaned rows of every declared foreign key
(NOT VALID ones included), duplicates under every unique index and constraint, sequences
behind their column's max, invalid indexes, NOT VALID constraints (a CHECK constraint's
rows are tested). Configured (`validation:` in dataops.yaml): NOT NULL by intent, logical
foreign keys, uniqueness sets, row-count bounds and custom SQL.

Full-table checks run with index scans switched off: an index that is corrupt or was left
invalid must not hide the very rows the check looks for (a hash anti-join or a hash
aggregate over a sequential scan is what these queries want anyway).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from decimal import Decimal, InvalidOperation
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from dataops.errors import BadInput, first_line, row_security_error
from dataops.validation_settings import (
    BUILTIN_KINDS,
    ColumnsRef,
    CustomCheck,
    ExpectValue,
    LogicalForeignKey,
    RowCountBounds,
    TableRef,
    ValidationSettings,
    parse_table,
)

PASS, FAIL, WARN, ERROR, SKIP = "pass", "fail", "warn", "error", "skip"
_SEVERITY = {ERROR: 0, FAIL: 1, WARN: 2, PASS: 3, SKIP: 4}
NOT_POPULATED = "skipped: not populated (a materialized view created WITH NO DATA; REFRESH MATERIALIZED VIEW fills it)"
_VALUE_WIDTH = 60

# User schemas: not the system's, not this tool's own (dataops_*), not an extension's objects.
_USER_NS = "n.nspname <> 'information_schema' AND n.nspname !~ '^(pg_|dataops_)'"
_NOT_EXTENSION = ("NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass "
                  "AND d.objid = {oid} AND d.deptype = 'e')")


@dataclass(frozen=True)
class CheckResult:
    name: str  # what was checked, e.g. "orders.user_id -> users.id"
    kind: str  # foreign_key, unique, sequence, invalid_index, not_valid, not_null, row_count, custom, ...
    table: str | None  # 'users', 'app.events'
    constraint: str | None  # constraint, index or sequence name, if there is one
    status: str  # pass, fail, warn, error, skip
    rows: int = 0  # rows at fault (or counted, for row_count)
    examples: tuple[str, ...] = ()  # a few keys of the rows at fault, e.g. "id=5, user_id=999"
    detail: str = ""
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.status in (FAIL, ERROR)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["examples"] = list(self.examples)
        return d

    def line(self) -> str:
        where = " ".join(x for x in (self.table, self.constraint) if x)
        eg = f" (e.g. {'; '.join(self.examples[:3])})" if self.examples and self.status not in (PASS, SKIP) else ""
        return f"{self.status.upper()} {KIND_LABELS.get(self.kind, self.kind)} {where or self.name}: {self.detail}{eg}"


KIND_LABELS = {"foreign_key": "foreign key", "logical_foreign_key": "logical foreign key", "unique": "unique key",
               "unique_set": "unique set", "sequence": "sequence", "invalid_index": "invalid index",
               "not_valid": "not valid constraint", "not_null": "not null", "row_count": "row count",
               "custom": "custom", "backup_freshness": "backup freshness"}


@dataclass
class CheckContext:
    conn: psycopg.Connection
    examples: int = 5
    _keys: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    _kinds: dict[tuple[str, str], str] = field(default_factory=dict)

    def cursor(self) -> psycopg.Cursor:
        return self.conn.cursor(row_factory=tuple_row)

    def use_indexes(self, on: bool) -> None:
        value = "on" if on else "off"
        self.cursor().execute("SELECT set_config('enable_indexscan', %s, true), set_config('enable_indexonlyscan', %s, true), "
                              "set_config('enable_bitmapscan', %s, true)", (value, value, value))

    def source(self, ref: TableRef, own_rows: bool = False) -> sql.Composable:
        """What to read `ref`'s rows from. `own_rows`: a plain table's rows without its inheritance
        children's (`ONLY`), as a declared constraint sees them: a primary key, a unique index or a
        foreign key of an inheritance parent does not cover its children's rows. A partitioned
        table is always read whole (its rows are its partitions')."""
        if own_rows:
            k = (ref.schema, ref.table)
            if k not in self._kinds:
                row = self.cursor().execute(
                    "SELECT c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = %s AND c.relname = %s", k).fetchone()
                self._kinds[k] = row[0] if row else ""
            if self._kinds[k] == "r":
                return sql.SQL("ONLY {}").format(_qualified(ref))
        return _qualified(ref)

    def unpopulated(self, ref: TableRef) -> bool:
        """Whether `ref` is a materialized view that holds no data (reading it is an error)."""
        row = self.cursor().execute(
            """SELECT c.relkind = 'm' AND NOT c.relispopulated FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s""",
            (ref.schema, ref.table)).fetchone()
        return bool(row and row[0])

    def key_columns(self, ref: TableRef) -> list[str]:
        """Columns that identify a row in examples: the primary key, else a unique index
        over NOT NULL columns, else [] (ctid is shown)."""
        k = (ref.schema, ref.table)
        if k not in self._keys:
            row = self.cursor().execute("""
                SELECT ARRAY(SELECT a.attname FROM unnest(i.indkey) WITH ORDINALITY u(attnum, o)
                             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = u.attnum ORDER BY u.o)
                FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE n.nspname = %s AND c.relname = %s AND i.indisunique AND i.indisvalid AND i.indpred IS NULL
                  AND 0 <> ALL (i.indkey)
                  AND NOT EXISTS (SELECT 1 FROM unnest(i.indkey) u(attnum) JOIN pg_attribute a
                                  ON a.attrelid = i.indrelid AND a.attnum = u.attnum WHERE NOT a.attnotnull)
                ORDER BY i.indisprimary DESC, i.indnatts, i.indexrelid LIMIT 1""", (ref.schema, ref.table)).fetchone()
            self._keys[k] = list(row[0]) if row else []
        return self._keys[k]


class Check:
    kind: str = ""

    def resolve(self, conn: psycopg.Connection) -> None:
        """Check the names this check refers to; BadInput if one does not exist."""

    def run(self, ctx: CheckContext) -> list[CheckResult]:
        raise NotImplementedError

    def describe(self) -> str:
        return self.kind

    def table_label(self) -> str | None:
        """The table this check is about, if it is about one."""
        return None

    def reads(self) -> list[TableRef]:
        """The tables or views this check reads (a configured check): when one of them is an
        unpopulated materialized view, the check is skipped instead of run."""
        return []


def not_populated(check: Check, ref: TableRef) -> CheckResult:
    return CheckResult(check.describe(), check.kind, check.table_label(), None, SKIP, 0, (),
                       f"{ref.label}: {NOT_POPULATED}")


def isolated(ctx: CheckContext, fallback: Callable[[str, str], CheckResult],
             run: Callable[[], CheckResult | list[CheckResult]]) -> list[CheckResult]:
    """`run()` in a savepoint of its own. A statement that fails rolls back that savepoint only
    and becomes `fallback(status, detail)`: an error ("could not run: ..."; "did not finish" for
    the statement timeout), or a skip when it read an unpopulated materialized view. A lost
    connection and a row-level-security refusal are raised: nothing after them can be trusted."""
    conn = ctx.conn
    try:
        with conn.transaction():
            found = run()
    except psycopg.errors.QueryCanceled as exc:
        if conn.closed or conn.broken:
            raise
        return [fallback(ERROR, f"did not finish within statement_timeout_s: {first_line(exc)}")]
    except psycopg.errors.ObjectNotInPrerequisiteState as exc:
        if conn.closed or conn.broken:
            raise
        if "has not been populated" in str(exc):
            return [fallback(SKIP, f"{NOT_POPULATED}: {first_line(exc)}")]
        return [fallback(ERROR, f"could not run: {first_line(exc)}")]
    except psycopg.Error as exc:
        refused = row_security_error(exc, role=conn.info.user if not conn.closed else None)
        if refused is not None:
            raise refused from None
        if conn.closed or conn.broken:
            raise
        return [fallback(ERROR, f"could not run: {first_line(exc)}")]
    return found if isinstance(found, list) else [found]


def run_check(ctx: CheckContext, check: Check) -> list[CheckResult]:
    """One check, isolated: skipped when it reads an unpopulated materialized view."""
    for ref in check.reads():
        if ctx.unpopulated(ref):
            return [not_populated(check, ref)]

    def fallback(status: str, detail: str) -> CheckResult:
        return CheckResult(check.describe(), check.kind, check.table_label(), None, status, 0, (), detail)

    return isolated(ctx, fallback, lambda: check.run(ctx))


def _item(name: str, kind: str, table: str | None, constraint: str | None) -> Callable[[str, str], CheckResult]:
    """The fallback result of one object of a group check (one foreign key, one index)."""
    return lambda status, detail: CheckResult(name, kind, table, constraint, status, 0, (), detail)


# -- catalog lookups -------------------------------------------------------------------------

def table_oid(conn: psycopg.Connection, ref: TableRef) -> int:
    row = conn.cursor(row_factory=tuple_row).execute(
        """SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p', 'm', 'v', 'f')""",
        (ref.schema, ref.table)).fetchone()
    if row is None:
        raise BadInput(f'table "{ref}" does not exist')
    return row[0]


def require_columns(conn: psycopg.Connection, ref: TableRef, columns: Sequence[str]) -> None:
    oid = table_oid(conn, ref)
    have = {r[0] for r in conn.cursor(row_factory=tuple_row).execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped", (oid,))}
    for col in columns:
        if col not in have:
            raise BadInput(f'column "{col}" does not exist in table "{ref}"')


def _qualified(ref: TableRef) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(ref.schema), sql.Identifier(ref.table))


def _cols(columns: Sequence[str], alias: str | None = None) -> list[sql.Composable]:
    if alias:
        return [sql.SQL("{}.{}").format(sql.Identifier(alias), sql.Identifier(c)) for c in columns]
    return [sql.Identifier(c) for c in columns]


def _show(value: Any) -> str:
    if value is None:
        return "NULL"
    text = str(value)
    return text if len(text) <= _VALUE_WIDTH else text[:_VALUE_WIDTH - 3] + "..."


def _key_text(names: Sequence[str], values: Sequence[Any]) -> str:
    return ", ".join(f"{n}={_show(v)}" for n, v in zip(names, values))


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _example_rows(ctx: CheckContext, ref: TableRef, where: sql.Composable, extra: Sequence[str] = (),
                  alias: str = "c", own_rows: bool = False) -> tuple[str, ...]:
    """Keys (plus `extra` columns) of up to ctx.examples rows of `ref` matching `where`."""
    if ctx.examples <= 0:
        return ()
    keys = ctx.key_columns(ref)
    shown = list(keys) + [c for c in extra if c not in keys]
    if keys:
        exprs = [sql.SQL("({})::text").format(e) for e in _cols(shown, alias)]
        order = sql.SQL(", ").join(_cols(keys, alias))
    else:
        shown = ["ctid"] + list(extra)
        exprs = [sql.SQL("{}.ctid::text").format(sql.Identifier(alias))] + [
            sql.SQL("({})::text").format(e) for e in _cols(extra, alias)]
        order = sql.SQL("{}.ctid").format(sql.Identifier(alias))
    q = sql.SQL("SELECT {exprs} FROM {t} AS {a} WHERE {where} ORDER BY {order} LIMIT {n}").format(
        exprs=sql.SQL(", ").join(exprs), t=ctx.source(ref, own_rows), a=sql.Identifier(alias), where=where,
        order=order,
        n=sql.Literal(ctx.examples))
    return tuple(_key_text(shown, r) for r in ctx.cursor().execute(q))


# -- foreign keys (declared and logical) -------------------------------------------------------

def _orphan_condition(child_cols: Sequence[str], parent: sql.Composable, parent_cols: Sequence[str],
                      match_full: bool = False) -> sql.Composable:
    cc = _cols(child_cols, "c")
    all_set = sql.SQL(" AND ").join(sql.SQL("{} IS NOT NULL").format(c) for c in cc)
    join = sql.SQL(" AND ").join(sql.SQL("{} = {}").format(p, c) for p, c in zip(_cols(parent_cols, "p"), cc))
    missing = sql.SQL("({all_set} AND NOT EXISTS (SELECT 1 FROM {parent} AS p WHERE {join}))").format(
        all_set=all_set, parent=parent, join=join)
    if match_full and len(cc) > 1:
        # MATCH FULL: all NULL is fine, some NULL is a violation.
        some_null = sql.SQL(" OR ").join(sql.SQL("{} IS NULL").format(c) for c in cc)
        return sql.SQL("({missing} OR (({some}) AND NOT ({none})))").format(
            missing=missing, some=some_null, none=sql.SQL(" AND ").join(sql.SQL("{} IS NULL").format(c) for c in cc))
    return missing


def orphans(ctx: CheckContext, child: TableRef, child_cols: Sequence[str], parent: TableRef,
            parent_cols: Sequence[str], *, match_full: bool = False,
            own_rows: bool = False) -> tuple[int, tuple[str, ...]]:
    """(number of child rows whose key has no parent row, a few of their keys). `own_rows`: both
    tables without their inheritance children, as a declared foreign key sees them."""
    where = _orphan_condition(child_cols, ctx.source(parent, own_rows), parent_cols, match_full)
    n = ctx.cursor().execute(sql.SQL("SELECT count(*) FROM {t} AS c WHERE {w}").format(
        t=ctx.source(child, own_rows), w=where)).fetchone()[0]
    return n, (_example_rows(ctx, child, where, extra=child_cols, own_rows=own_rows) if n else ())


def _fk_result(kind: str, name: str, constraint: str | None, child: TableRef, child_cols: Sequence[str],
               parent: TableRef, parent_cols: Sequence[str], n: int, examples: tuple[str, ...],
               validated: bool = True) -> CheckResult:
    target = f"{parent.label}({', '.join(parent_cols)})"
    if n:
        detail = f"{_plural(n, 'orphaned row')}: ({', '.join(child_cols)}) not found in {target}"
    else:
        detail = f"every ({', '.join(child_cols)}) is found in {target}"
    if not validated:
        detail += " (constraint is NOT VALID)"
    return CheckResult(name, kind, child.label, constraint, FAIL if n else PASS, n, examples, detail)


class DeclaredForeignKeys(Check):
    """Orphaned rows under every foreign key the schema declares, NOT VALID ones included
    (a NOT VALID foreign key was never checked against the rows that existed before it)."""

    kind = "foreign_key"

    def __init__(self, trust_validated: bool = False):
        # True only where every validated foreign key was added after its rows were (a fresh
        # copy's post-data step): PostgreSQL checked every row then, and scanning each child
        # table again costs seconds per million rows for nothing.
        self.trust_validated = trust_validated

    def run(self, ctx: CheckContext) -> list[CheckResult]:
        ctx.use_indexes(False)
        fks = ctx.cursor().execute(f"""
            SELECT n.nspname, c.relname, co.conname, pn.nspname, p.relname,
                   ARRAY(SELECT a.attname FROM unnest(co.conkey) WITH ORDINALITY u(k, o)
                         JOIN pg_attribute a ON a.attrelid = co.conrelid AND a.attnum = u.k ORDER BY u.o),
                   ARRAY(SELECT a.attname FROM unnest(co.confkey) WITH ORDINALITY u(k, o)
                         JOIN pg_attribute a ON a.attrelid = co.confrelid AND a.attnum = u.k ORDER BY u.o),
                   co.confmatchtype = 'f', co.convalidated
            FROM pg_constraint co JOIN pg_class c ON c.oid = co.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
            JOIN pg_class p ON p.oid = co.confrelid JOIN pg_namespace pn ON pn.oid = p.relnamespace
            WHERE co.contype = 'f' AND co.conparentid = 0 AND {_USER_NS} AND {_NOT_EXTENSION.format(oid='c.oid')}
            ORDER BY 1, 2, 3""").fetchall()
        out = []
        for schema, table, con, pschema, ptable, ccols, pcols, full, validated in fks:
            child, parent = TableRef(schema, table), TableRef(pschema, ptable)
            name = f"{child.label}({', '.join(ccols)}) -> {parent.label}({', '.join(pcols)})"
            if validated and self.trust_validated:
                r = _fk_result(self.kind, name, con, child, ccols, parent, pcols, 0, ())
                out.append(replace(r, detail=r.detail + " (validated by PostgreSQL as the constraint "
                                                                    "was added after the load)"))
                continue

            def one(child=child, ccols=ccols, parent=parent, pcols=pcols, full=full, name=name, con=con,
                    validated=validated) -> CheckResult:
                n, eg = orphans(ctx, child, ccols, parent, pcols, match_full=full, own_rows=True)
                return _fk_result(self.kind, name, con, child, ccols, parent, pcols, n, eg, validated)

            out += isolated(ctx, _item(name, self.kind, child.label, con), one)
        return out


class ColumnsCheck(Check):
    """A check dataops.yaml declares on columns of one table: it is about that table, and its
    columns must exist before it runs."""

    def __init__(self, ref: ColumnsRef):
        self.ref = ref

    def describe(self) -> str:
        return str(self.ref)

    def table_label(self) -> str | None:
        return self.ref.table.label

    def resolve(self, conn: psycopg.Connection) -> None:
        require_columns(conn, self.ref.table, self.ref.columns)

    def reads(self) -> list[TableRef]:
        return [self.ref.table]


class LogicalForeignKeyCheck(ColumnsCheck):
    """A foreign key the schema does not declare (`user_emails.user_id -> users.id`)."""

    kind = "logical_foreign_key"

    def __init__(self, fk: LogicalForeignKey):
        super().__init__(fk.child)
        self.fk = fk

    def describe(self) -> str:
        return self.fk.text

    def resolve(self, conn: psycopg.Connection) -> None:
        super().resolve(conn)
        require_columns(conn, self.fk.parent.table, self.fk.parent.columns)

    def reads(self) -> list[TableRef]:
        return [self.fk.child.table, self.fk.parent.table]

    def run(self, ctx: CheckContext) -> list[CheckResult]:
        ctx.use_indexes(False)
        c, p = self.fk.child, self.fk.parent
        n, eg = orphans(ctx, c.table, c.columns, p.table, p.columns)
        return [_fk_result(self.kind, self.fk.text, None, c.table, c.columns, p.table, p.columns, n, eg)]


# -- uniqueness ---------------------------------------------------------------------------------

def duplicates(ctx: CheckContext, ref: TableRef, keys: Sequence[sql.Composable], names: Sequence[str], *,
               predicate: sql.Composable | None = None, nulls_distinct: bool = True,
               own_rows: bool = False) -> tuple[int, int, tuple[str, ...]]:
    """(keys that occur more than once, rows holding them, a few of those keys with their counts).
    `own_rows`: without inheritance children's rows, as a unique index sees the table."""
    source = ctx.source(ref, own_rows)
    conds = [sql.SQL("({}) IS NOT NULL").format(k) for k in keys] if nulls_distinct else []
    if predicate is not None:
        conds.append(sql.SQL("({})").format(predicate))
    where = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conds) if conds else sql.SQL("")
    group = sql.SQL(", ").join(keys)
    grouped = sql.SQL("SELECT {group}, count(*) AS n FROM {t}{where} GROUP BY {group} HAVING count(*) > 1").format(
        group=group, t=source, where=where)
    groups, rows = ctx.cursor().execute(
        sql.SQL("SELECT count(*), coalesce(sum(n), 0) FROM ({}) AS d").format(grouped)).fetchone()
    examples: tuple[str, ...] = ()
    if groups and ctx.examples > 0:
        texts = sql.SQL(", ").join(sql.SQL("({})::text").format(k) for k in keys)
        q = sql.SQL("SELECT {texts}, count(*) FROM {t}{where} GROUP BY {group} HAVING count(*) > 1 "
                    "ORDER BY count(*) DESC, {group} LIMIT {n}").format(
            texts=texts, t=source, where=where, group=group, n=sql.Literal(ctx.examples))
        examples = tuple(f"{_key_text(names, r[:-1])} ({r[-1]} rows)" for r in ctx.cursor().execute(q))
    return groups, int(rows), examples


def _unique_result(kind: str, name: str, constraint: str | None, ref: TableRef, names: Sequence[str],
                   groups: int, rows: int, examples: tuple[str, ...]) -> CheckResult:
    cols = ", ".join(names)
    if groups:
        detail = (f"{_plural(groups, 'value')} of ({cols}) {'occurs' if groups == 1 else 'occur'} more than once, "
                  f"in {_plural(rows, 'row')}")
    else:
        detail = f"({cols}) is unique"
    return CheckResult(name, kind, ref.label, constraint, FAIL if groups else PASS, rows, examples, detail)


class DeclaredUniqueKeys(Check):
    """Duplicates under every primary key, unique constraint and unique index, read from
    the table itself: a corrupt index (a collation change under a text index) or one left
    invalid by a failed CREATE UNIQUE INDEX CONCURRENTLY can hold duplicates it does not show."""

    kind = "unique"

    def run(self, ctx: CheckContext) -> list[CheckResult]:
        ctx.use_indexes(False)
        nulls_nd = "i.indnullsnotdistinct" if ctx.conn.info.server_version >= 150000 else "false"
        idx = ctx.cursor().execute(f"""
            SELECT n.nspname, c.relname, ic.relname, co.conname,
                   ARRAY(SELECT pg_get_indexdef(i.indexrelid, k, true) FROM generate_series(1, i.indnkeyatts) k),
                   pg_get_expr(i.indpred, i.indrelid, true), {nulls_nd}, c.relispopulated
            FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
            JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
            LEFT JOIN pg_constraint co ON co.conindid = i.indexrelid AND co.conrelid = i.indrelid AND co.contype IN ('p', 'u')
            WHERE i.indisunique AND c.relkind IN ('r', 'p', 'm') AND {_USER_NS} AND {_NOT_EXTENSION.format(oid='c.oid')}
              AND NOT EXISTS (SELECT 1 FROM pg_inherits h WHERE h.inhrelid = i.indexrelid)
            ORDER BY 1, 2, 3""").fetchall()
        out = []
        for schema, table, index, con, exprs, pred, nulls_not_distinct, populated in idx:
            ref = TableRef(schema, table)
            name = f"{ref.label}({', '.join(exprs)})" + (f" WHERE {pred}" if pred else "")
            fallback = _item(name, self.kind, ref.label, con or index)
            if not populated:
                out.append(fallback(SKIP, NOT_POPULATED))
                continue

            def one(ref=ref, exprs=exprs, pred=pred, nnd=nulls_not_distinct, name=name, con=con,
                    index=index) -> CheckResult:
                keys = [sql.SQL(e) for e in exprs]  # catalog text (pg_get_indexdef), not user input
                groups, rows, eg = duplicates(ctx, ref, keys, exprs, predicate=sql.SQL(pred) if pred else None,
                                              nulls_distinct=not nnd, own_rows=True)
                return _unique_result(self.kind, name, con or index, ref, exprs, groups, rows, eg)

            out += isolated(ctx, fallback, one)
        return out


class UniqueSetCheck(ColumnsCheck):
    """Columns that must be unique together, without a constraint saying so."""

    kind = "unique_set"

    def run(self, ctx: CheckContext) -> list[CheckResult]:
        ctx.use_indexes(False)
        groups, rows, eg = duplicates(ctx, self.ref.table, _cols(self.ref.columns), self.ref.columns)
        return [_unique_result(self.kind, str(self.ref), None, self.ref.table, self.ref.columns, groups, rows, eg)]


# -- sequences, indexes, NOT VALID constraints ---------------------------------------------------

class SequencesBehind(Check):
    """Every sequence owned by a column (serial, identity): its next value must be past the
    column's largest value, or the next insert fails with a duplicate key (the usual
    leftover of a restore or a COPY with explicit ids)."""

    kind = "sequence"

    def run(self, ctx: CheckContext) -> list[CheckResult]:
        ctx.use_indexes(True)  # max(id) through the primary key: instant
        seqs = ctx.cursor().execute(f"""
            SELECT sn.nspname, s.relname, n.nspname, c.relname, a.attname,
                   CASE WHEN has_sequence_privilege(s.oid, 'SELECT') OR has_sequence_privilege(s.oid, 'USAGE')
                        THEN true ELSE false END,
                   ps.last_value, ps.start_value, ps.increment_by
            FROM pg_depend d JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
            JOIN pg_namespace sn ON sn.oid = s.relnamespace
            JOIN pg_class c ON c.oid = d.refobjid JOIN pg_namespace n ON n.oid = c.relnamespace
            JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = d.refobjsubid
            JOIN pg_sequences ps ON ps.schemaname = sn.nspname AND ps.sequencename = s.relname
            WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
              AND c.relkind IN ('r', 'p') AND NOT c.relispartition AND {_USER_NS} AND {_NOT_EXTENSION.format(oid='c.oid')}
            ORDER BY 1, 2""").fetchall()
        out = []
        for sschema, seq, schema, table, column, readable, last, start, step in seqs:
            ref = TableRef(schema, table)
            seq_name = seq if sschema == "public" else f"{sschema}.{seq}"
            name = f"{ref.label}.{column}"
            if not readable:
                out.append(CheckResult(name, self.kind, ref.label, seq_name, WARN, 0, (),
                                       f"cannot read sequence {sschema}.{seq}: grant SELECT on it to the validating user"))
                continue
            out += isolated(ctx, _item(name, self.kind, ref.label, seq_name),
                            lambda a=(sschema, seq, ref, column, seq_name, name, last, start, step): self._one(ctx, *a))
        return out

    def _one(self, ctx: CheckContext, sschema: str, seq: str, ref: TableRef, column: str, seq_name: str, name: str,
             last: int | None, start: int, step: int) -> CheckResult:
        nxt = start if last is None else last + step
        col = sql.Identifier(column)
        agg = "max" if step > 0 else "min"
        edge = ctx.cursor().execute(sql.SQL("SELECT {agg}({col}) FROM {t}").format(
            agg=sql.SQL(agg), col=col, t=_qualified(ref))).fetchone()[0]
        behind = edge is not None and (edge >= nxt if step > 0 else edge <= nxt)
        if not behind:
            detail = f"next value {nxt}" + (f" is past {agg}({column}) {edge}" if edge is not None
                                               else " (table is empty)")
            return CheckResult(name, self.kind, ref.label, seq_name, PASS, 0, (), detail)
        cmp = sql.SQL(">=") if step > 0 else sql.SQL("<=")
        n = ctx.cursor().execute(sql.SQL("SELECT count(*) FROM {t} WHERE {col} {cmp} {nxt}").format(
            t=_qualified(ref), col=col, cmp=cmp, nxt=sql.Literal(nxt))).fetchone()[0]
        fix = ctx.cursor().execute(  # quote_ident quotes only the names that need it, as a person would
            "SELECT format(%s::text, quote_ident(%s) || '.' || quote_ident(%s), %s::text, %s::text, %s::text)",
            (f"SELECT setval(%L, (SELECT {agg}(%I) FROM %I.%I))", sschema, seq, column, ref.schema,
             ref.table)).fetchone()[0]
        detail = (f"next value {nxt} is not past {agg}({column}) {edge}: {_plural(n, 'row')} already "
                  f"hold values it will hand out, so inserts using the default will fail with duplicate keys; "
                  f"fix with {fix}")
        return CheckResult(name, self.kind, ref.label, seq_name, FAIL, n,
                           (f"{agg}({column})={edge}", f"next value={nxt}"), detail)


class InvalidIndexes(Check):
    """Indexes marked invalid: left by a failed CREATE INDEX CONCURRENTLY (or one still
    running). Queries ignore them while every write still pays to maintain them."""

    kind = "invalid_index"

    def run(self, ctx: CheckContext) -> list[CheckResult]:
        rows = ctx.cursor().execute(f"""
            SELECT ins.nspname, ic.relname, n.nspname, c.relname, pg_get_indexdef(i.indexrelid)
            FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_namespace ins ON ins.oid = ic.relnamespace
            JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE NOT i.indisvalid AND {_USER_NS} AND {_NOT_EXTENSION.format(oid='c.oid')}
            ORDER BY 1, 2""").fetchall()
        if not rows:
            return [CheckResult("invalid indexes", self.kind, None, None, PASS, 0, (), "no invalid indexes")]
        out = []
        for ischema, index, schema, table, definition in rows:
            iname = index if ischema == "public" else f"{ischema}.{index}"
            out.append(CheckResult(iname, self.kind, TableRef(schema, table).label, iname, FAIL, 0, (definition,),
                                   f"index is invalid (a failed or running CREATE INDEX CONCURRENTLY): "
                                   f"DROP INDEX CONCURRENTLY {ischema}.{index}; then build it again"))
        return out


class NotValidConstraints(Check):
    """Constraints added NOT VALID and never validated. A CHECK constraint's rows are
    tested here (fail if any violates it); a foreign key's rows are tested by the foreign
    key check. Either way a NOT VALID constraint is a warning: validate it."""

    kind = "not_valid"

    def run(self, ctx: CheckContext) -> list[CheckResult]:
        ctx.use_indexes(False)
        rows = ctx.cursor().execute(f"""
            SELECT n.nspname, c.relname, co.conname, co.contype, pg_get_expr(co.conbin, co.conrelid, true)
            FROM pg_constraint co JOIN pg_class c ON c.oid = co.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE NOT co.convalidated AND co.contype IN ('c', 'f') AND co.conislocal AND co.conparentid = 0
              AND {_USER_NS} AND {_NOT_EXTENSION.format(oid='c.oid')}
            ORDER BY 1, 2, 3""").fetchall()
        if not rows:
            return [CheckResult("NOT VALID constraints", self.kind, None, None, PASS, 0, (), "no NOT VALID constraints")]
        out = []
        for schema, table, con, contype, expr in rows:
            ref = TableRef(schema, table)
            validate = ctx.cursor().execute("SELECT format(%s::text, %s::text, %s::text, %s::text)", (
                "ALTER TABLE %I.%I VALIDATE CONSTRAINT %I", schema, table, con)).fetchone()[0]
            if contype == "f":
                out.append(CheckResult(con, self.kind, ref.label, con, WARN, 0, (),
                                       f"foreign key is NOT VALID (its rows are checked above); when they pass: {validate}"))
                continue

            def one(ref=ref, con=con, expr=expr, validate=validate) -> CheckResult:
                where = sql.SQL("NOT ({})").format(sql.SQL(expr))  # catalog text, not user input
                n = ctx.cursor().execute(sql.SQL("SELECT count(*) FROM {t} AS c WHERE {w}").format(
                    t=_qualified(ref), w=where)).fetchone()[0]
                if n:
                    return CheckResult(con, self.kind, ref.label, con, FAIL, n, _example_rows(ctx, ref, where),
                                       f"CHECK ({expr}) is NOT VALID and {_plural(n, 'row')} violate it")
                return CheckResult(con, self.kind, ref.label, con, WARN, 0, (),
                                   f"CHECK ({expr}) is NOT VALID but every row satisfies it: {validate}")

            out += isolated(ctx, _item(con, self.kind, ref.label, con), one)
        return out


# -- configured checks ---------------------------------------------------------------------------

class NotNullCheck(ColumnsCheck):
    """A column that must hold no NULLs although no constraint says so (yet)."""

    kind = "not_null"

    def describe(self) -> str:
        return f"{self.ref.table.label}.{self.ref.columns[0]}"

    def run(self, ctx: CheckContext) -> list[CheckResult]:
        ctx.use_indexes(False)
        t, col = self.ref.table, self.ref.columns[0]
        where = sql.SQL("{} IS NULL").format(sql.SQL("{}.{}").format(sql.Identifier("c"), sql.Identifier(col)))
        n = ctx.cursor().execute(sql.SQL("SELECT count(*) FROM {t} AS c WHERE {w}").format(
            t=_qualified(t), w=where)).fetchone()[0]
        detail = f"{_plural(n, 'row')} with {col} NULL" if n else f"no NULLs in {col}"
        return [CheckResult(self.describe(), self.kind, t.label, None, FAIL if n else PASS, n,
                            _example_rows(ctx, t, where) if n else (), detail)]


class RowCountCheck(Check):
    kind = "row_count"

    def __init__(self, table: TableRef, bounds: RowCountBounds):
        self.table, self.bounds = table, bounds

    def describe(self) -> str:
        return self.table.label

    def table_label(self) -> str | None:
        return self.table.label

    def resolve(self, conn: psycopg.Connection) -> None:
        table_oid(conn, self.table)

    def reads(self) -> list[TableRef]:
        return [self.table]

    def run(self, ctx: CheckContext) -> list[CheckResult]:
        n = ctx.cursor().execute(sql.SQL("SELECT count(*) FROM {}").format(_qualified(self.table))).fetchone()[0]
        lo, hi = self.bounds.min, self.bounds.max
        want = " and ".join(x for x in (f"at least {lo:,}" if lo is not None else "",
                                        f"at most {hi:,}" if hi is not None else "") if x)
        ok = (lo is None or n >= lo) and (hi is None or n <= hi)
        detail = f"{_plural(n, 'row')}" + ("" if ok else f", expected {want}")
        return [CheckResult(self.table.label, self.kind, self.table.label, None, PASS if ok else FAIL, n, (), detail)]


class CustomSqlCheck(Check):
    """Operator-written SQL, run in the checks' READ ONLY transaction under the statement
    timeout: it must return no rows, or exactly one value."""

    kind = "custom"

    def __init__(self, spec: CustomCheck):
        self.spec = spec

    def describe(self) -> str:
        return self.spec.name

    def table_label(self) -> str | None:
        return parse_table(self.spec.table).label if self.spec.table else None

    def resolve(self, conn: psycopg.Connection) -> None:
        if self.spec.table:
            table_oid(conn, parse_table(self.spec.table))

    def reads(self) -> list[TableRef]:
        return [parse_table(self.spec.table)] if self.spec.table else []

    def run(self, ctx: CheckContext) -> list[CheckResult]:
        ctx.use_indexes(True)
        table = parse_table(self.spec.table).label if self.spec.table else None
        body = sql.SQL(self.spec.sql)  # operator-written SQL from dataops.yaml, by design
        cur = ctx.cursor()
        # Run exactly as written (a write, even in a CTE, fails: the transaction is READ ONLY),
        # streamed row by row, so a check that returns a million rows costs no memory.
        n, kept, names = 0, [], []
        for row in cur.stream(body):
            if n == 0:
                names = [d.name for d in cur.description or []]
            n += 1
            if len(kept) < max(ctx.examples, 2):
                kept.append(row)
        if isinstance(self.spec.expect, ExpectValue):
            want = self.spec.expect.value
            if n != 1 or not kept[0]:
                return [CheckResult(self.spec.name, self.kind, table, None, FAIL, n, (),
                                    f"returned {_plural(n, 'row')}; expected one value, {_show(want)}")]
            got = kept[0][0]
            ok = _same_value(got, want)
            return [CheckResult(self.spec.name, self.kind, table, None, PASS if ok else FAIL, 0, (),
                                f"returned {_show(got)}" + ("" if ok else f", expected {_show(want)}"))]
        examples = tuple(_key_text(names, r) for r in kept[:ctx.examples])
        detail = f"returned {_plural(n, 'row')}, expected none" if n else "returned no rows"
        return [CheckResult(self.spec.name, self.kind, table, None, FAIL if n else PASS, n, examples, detail)]


def _same_value(got: Any, want: Any) -> bool:
    if want is None or got is None:
        return got is None and want is None
    if isinstance(want, bool):
        return isinstance(got, bool) and got is want
    if isinstance(want, (int, float)) and not isinstance(got, bool):
        try:
            return Decimal(str(got)) == Decimal(str(want))
        except InvalidOperation:
            return False
    return str(got) == str(want)


# -- what runs by default --------------------------------------------------------------------------

_BUILTINS = {"foreign_keys": DeclaredForeignKeys, "unique_keys": DeclaredUniqueKeys, "sequences": SequencesBehind,
             "invalid_indexes": InvalidIndexes, "not_valid_constraints": NotValidConstraints}


def builtin_checks(kinds: Sequence[str] = BUILTIN_KINDS) -> list[Check]:
    return [_BUILTINS[k]() for k in BUILTIN_KINDS if k in kinds]


def configured_checks(cfg: ValidationSettings) -> list[Check]:
    checks: list[Check] = []
    checks += [NotNullCheck(r) for r in cfg.not_null_refs()]
    checks += [LogicalForeignKeyCheck(fk) for fk in cfg.foreign_key_refs()]
    checks += [UniqueSetCheck(r) for r in cfg.unique_refs()]
    checks += [RowCountCheck(parse_table(t), b) for t, b in cfg.row_counts.items()]
    checks += [CustomSqlCheck(c) for c in cfg.custom]
    return checks


def all_checks(cfg: ValidationSettings | None = None) -> list[Check]:
    cfg = cfg or ValidationSettings()
    return builtin_checks(cfg.builtin) + configured_checks(cfg)


def sort_results(results: Sequence[CheckResult]) -> list[CheckResult]:
    """Failures first, then warnings, then passes; otherwise in the order they ran."""
    return sorted(results, key=lambda r: _SEVERITY.get(r.status, 9))
