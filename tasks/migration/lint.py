"""Lint pending revisions for changes that lock or break a live database.

Works on the SQL the plan renders (Alembic offline mode), parsed by pglast, PostgreSQL's own
parser as a library, so a statement is judged by what it is, not by how it is spelled.
Whether a statement runs inside a transaction is read from the same rendered stream
(autocommit blocks show up as COMMIT ... BEGIN). The rules, their reasons and the safe
rewrites are data in lint_rules.py; docs/lint-rules.md is generated from it.

A table created earlier in the same plan is new and empty: indexes, constraints, rewrites
and NOT NULL columns on it are fine. Downgrades are not linted: undoing is dropping.

A finding that has been checked can be allowed in the revision file with a comment line
`# dataops: allow=<rule>[,<rule>...]`; allowed findings are still listed, but not as errors.

With the target database at hand (lint_against), a finding on an existing table says how
big it is (pg_class's estimate, a count if the table was never analyzed; the sum of the
partitions for a partitioned table), because that is how long the lock holds; and
`migrations.lint_small_table_rows` turns lock findings on smaller tables into warnings.

lock_timeout: dataops sets it (and statement_timeout) for every revision it runs, so the
`lock-timeout` rule fires on a revision only when the revision turns it off (SET lock_timeout
= 0). Plain SQL meant to run elsewhere (`lint --sql FILE`, lint_sql) gets no such help: there
the rule asks for SET lock_timeout before the first statement that takes a strong lock.
"""

from __future__ import annotations

import ast
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import psycopg

from dataops.tasks.migration.lint_rules import ERROR, RULES, WARNING
from dataops.tasks.migration.migrate import VERSION_SCHEMA, MigrationTarget, RevisionPlan

__all__ = ["ERROR", "RULES", "WARNING", "Finding", "lint", "lint_against", "lint_sql", "heads_finding",
           "errors_sentence", "lint_text", "usage_lookup"]

# not in backticks: the revision template quotes an example of the comment
_ALLOW = re.compile(r"(?<!`)#[ \t]*dataops:[ \t]*allow[ \t]*=[ \t]*([a-z0-9, \t-]+)", re.IGNORECASE)
_VOLATILE = {"random", "clock_timestamp", "gen_random_uuid", "uuid_generate_v1", "uuid_generate_v4", "timeofday",
             "nextval"}
_SERIAL = {"serial", "serial4", "bigserial", "serial8", "smallserial", "serial2"}
_NARROW_KEY = {"int4", "int2", "int", "integer", "smallint", "serial", "serial4", "smallserial", "serial2"}
_STRONG_LOCK = {"AlterTableStmt", "IndexStmt", "DropStmt", "RenameStmt", "TruncateStmt", "VacuumStmt", "ClusterStmt",
                "ReindexStmt", "CreateTrigStmt", "AlterDomainStmt", "AlterEnumStmt"}
# Findings whose cost is the time a lock holds while the table is read or rewritten: the ones
# migrations.lint_small_table_rows may turn into warnings on small tables.
LOCK_RULES = {"add-column-volatile-default", "add-column-rewrite", "index-not-concurrent",
              "constraint-without-using-index", "drop-index-not-concurrent", "reindex-not-concurrent",
              "detach-partition-not-concurrent", "vacuum-full", "cluster", "set-logged", "column-type-change",
              "constraint-not-valid", "set-not-null-scan", "validate-in-same-transaction"}
MAX_IDENTIFIER = 63


@dataclass(frozen=True)
class Finding:
    revision: str
    rule: str
    severity: str
    statement: str
    reason: str
    alternative: str
    allowed: bool = False
    table: str | None = None  # the existing table the statement locks or changes, when known
    rows: int | None = None  # its rows (estimate) and size, when lint ran against the database
    size: str | None = None

    @property
    def blocks(self) -> bool:
        return self.severity == ERROR and not self.allowed

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        tag = "allowed" if self.allowed else self.severity
        return (f"{self.revision} {tag} {self.rule}: {self.statement}\n    why: {self.reason}\n"
                f"    instead: {self.alternative}")


class _Hit(NamedTuple):
    rule: str
    extra: str = ""
    table: str | None = None


def allowed_rules(path: str | Path) -> set[str]:
    text = Path(path).read_text()
    out: set[str] = set()
    for m in _ALLOW.finditer(text):
        out |= {r.strip().lower() for r in m.group(1).split(",") if r.strip()}
    return out


def _trivial(body: list[ast.stmt]) -> bool:
    rest = [s for s in body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    if not rest:
        return True
    if len(rest) == 1:
        s = rest[0]
        if isinstance(s, ast.Pass):
            return True
        if isinstance(s, ast.Raise) and s.exc is not None:
            exc = s.exc.func if isinstance(s.exc, ast.Call) else s.exc
            return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return False


def has_downgrade(path: str | Path) -> bool:
    tree = ast.parse(Path(path).read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "downgrade":
            return not _trivial(node.body)
    return False


# -- helpers on pglast nodes -----------------------------------------------------------------

def _qualified(rangevar) -> str:
    return f"{rangevar.schemaname or 'public'}.{rangevar.relname}"


def _dotted(names) -> str:
    parts = [getattr(p, "sval", str(p)) for p in names]
    return ".".join(parts if len(parts) > 1 else ["public", *parts])


def _regclass(name: str) -> str:
    """schema.table as the parser gave it (case kept) -> text for to_regclass()."""
    return ".".join('"' + p.replace('"', '""') + '"' for p in name.split(".", 1))


def _short(sql: str) -> str:
    one = " ".join(re.sub(r"--[^\n]*", " ", sql).split())
    return one if len(one) <= 160 else one[:157] + "..."


def _enum_name(value) -> str:
    return getattr(value, "name", str(value))


def _nodes(node) -> list:
    """Every node under `node` (itself included)."""
    from pglast.visitors import Visitor

    found: list = []

    class Collect(Visitor):
        def visit(self, ancestors, n):
            found.append(n)

    Collect()(node)
    return found


def _deparse(node) -> str:
    from pglast.stream import RawStream

    return RawStream()(node)


def _ident(name: str) -> str:
    return name if re.fullmatch(r"[a-z_][a-z0-9_$]*", name) else '"' + name.replace('"', '""') + '"'


def _type_name(typename) -> str:
    return getattr(typename.names[-1], "sval", "") if typename is not None and typename.names else ""


def _calls_volatile(expr) -> bool:
    if expr is None:
        return False
    return any(type(n).__name__ == "FuncCall" and getattr(n.funcname[-1], "sval", "") in _VOLATILE
               for n in _nodes(expr))


def _duplicates_query(table: str, columns: list[str], where: str | None, primary: bool) -> str:
    cols = ", ".join(columns)
    q = (f"SELECT {cols}, count(*) FROM {table}{' WHERE ' + where if where else ''} "
         f"GROUP BY {cols} HAVING count(*) > 1 LIMIT 10")
    if primary:
        q += f"; SELECT count(*) FROM {table} WHERE " + " OR ".join(f"{c} IS NULL" for c in columns)
    return f"find the duplicates first: {q}"


def _long_identifiers(source: str) -> list[str]:
    """Identifiers over 63 bytes, read from the tokens: the parser has already cut them."""
    from pglast.parser import scan

    names = []
    for tok in scan(source):  # offsets in characters
        if tok.name == "IDENT":
            word = source[tok.start:tok.end + 1]
            if word.startswith('"'):
                word = word[1:-1].replace('""', '"')
            if len(word.encode()) > MAX_IDENTIFIER:
                names.append(word)
    return list(dict.fromkeys(names))


def _sets_timeout_off(node) -> bool:
    if node.name != "lock_timeout" or _enum_name(node.kind) != "VAR_SET_VALUE" or not node.args:
        return False
    val = getattr(node.args[0], "val", None)
    raw = getattr(val, "ival", getattr(val, "sval", None))
    return str(raw).strip().lower() in ("0", "0ms", "0s", "0min")


# -- the SQL rules -------------------------------------------------------------------------

class _Linter:
    """Walks one plan's revisions in order, remembering what the plan itself created."""

    def __init__(self, live=None):
        self.new_tables: set[str] = set()
        self.new_indexes: set[str] = set()
        self.validated: set[str] = set()  # tables with a VALIDATE CONSTRAINT earlier in the plan
        self.live = live  # LiveDatabase or None

    def revision(self, sql: str, *, transactional: bool, managed: bool = True) -> list[tuple[_Hit, str]]:
        """(hit, statement text) for one revision's rendered SQL. `managed`: dataops runs it
        (with lock_timeout set and the revision's transaction begun by Alembic's BEGIN/COMMIT)."""
        from pglast import parse_sql
        from pglast.parser import ParseError

        try:
            stmts = parse_sql(sql)
        except ParseError as exc:
            return [(_Hit("unparsable-sql", f"parser: {exc}"), _short(sql))]
        hits: list[tuple[_Hit, str]] = []
        in_tx = False
        added_not_valid: set[tuple[str, str]] = set()
        enum_values: set[str] = set()  # values added in the open transaction
        timeout_set = False
        tx_positions = [i for i, r in enumerate(stmts) if type(r.stmt).__name__ == "TransactionStmt"]
        for i, raw in enumerate(stmts):
            node = raw.stmt
            kind = type(node).__name__
            end = raw.stmt_location + raw.stmt_len if raw.stmt_len else len(sql)
            source = sql[raw.stmt_location:end]  # pglast's offsets count characters
            text = _short(source)
            if kind == "TransactionStmt":
                k = _enum_name(node.kind)
                begin = k in ("TRANS_STMT_BEGIN", "TRANS_STMT_START")
                if managed and transactional and i not in (tx_positions[0], tx_positions[-1]) \
                        and not any(h.rule == "transaction-control" for h, _ in hits):
                    hits.append((_Hit("transaction-control", "the revision ends or restarts dataops's transaction"),
                                 text))
                elif not managed and begin and in_tx:
                    hits.append((_Hit("transaction-control", "a transaction is already open"), text))
                if begin:
                    in_tx = True
                elif k in ("TRANS_STMT_COMMIT", "TRANS_STMT_ROLLBACK"):
                    in_tx = False
                    enum_values.clear()
                continue
            if kind == "VariableSetStmt":
                if node.name == "lock_timeout":
                    timeout_set = not _sets_timeout_off(node)
                    if _sets_timeout_off(node):
                        hits.append((_Hit("lock-timeout", "the revision turns off the lock_timeout dataops set"),
                                     text))
                continue
            target = getattr(node, "relation", None)
            on_new = type(target).__name__ == "RangeVar" and _qualified(target) in self.new_tables
            if not managed and not timeout_set and kind in _STRONG_LOCK and not on_new:
                hits.append((_Hit("lock-timeout", "no SET lock_timeout before it in this SQL"), text))
                timeout_set = True  # once per file is enough
            if enum_values:
                used = {n.val.sval for n in _nodes(node) if type(n).__name__ == "A_Const"
                        and type(getattr(n, "val", None)).__name__ == "String"} & enum_values
                if used:
                    hits.append((_Hit("enum-value-used-in-transaction", f"'{sorted(used)[0]}' was added above"), text))
            for hit in self._statement(node, kind, in_tx, added_not_valid):
                hits.append((hit, text))
            for name in _long_identifiers(source):
                hits.append((_Hit("identifier-too-long", f"{name[:40]}... is {len(name.encode())} bytes"), text))
            if kind == "AlterEnumStmt" and node.newVal and in_tx:
                enum_values.add(node.newVal)
        if not managed and in_tx:
            hits.append((_Hit("transaction-control", "BEGIN without COMMIT: the transaction is left open"),
                         "(end of the SQL)"))
        return hits

    def _ours(self, rangevar) -> bool:
        return rangevar is not None and rangevar.schemaname == VERSION_SCHEMA

    def _existing(self, table: str) -> bool:
        return table not in self.new_tables

    def _statement(self, node, kind: str, in_tx: bool, added_not_valid: set) -> list[_Hit]:
        out: list[_Hit] = []
        if kind == "CreateStmt":
            if not self._ours(node.relation):
                self.new_tables.add(_qualified(node.relation))
                out += self._type_hygiene(node.tableElts or (), table_constraints=True)
        elif kind in ("CreateTableAsStmt", "CreateSeqStmt", "ViewStmt"):  # new relations: nobody else holds them yet
            rel = node.into.rel if kind == "CreateTableAsStmt" else node.sequence if kind == "CreateSeqStmt" else node.view
            self.new_tables.add(_qualified(rel))
        elif kind == "IndexStmt":
            table = _qualified(node.relation)
            if node.concurrent and in_tx:
                out.append(_Hit("concurrently-in-transaction", "", table))
            if not self._existing(table):
                if node.idxname:
                    self.new_indexes.add(f"{node.relation.schemaname or 'public'}.{node.idxname}")
            else:
                if not node.concurrent:
                    out.append(_Hit("index-not-concurrent", "", table))
                if node.unique:
                    cols = [_ident(p.name) if p.name else f"({_deparse(p.expr)})" for p in node.indexParams]
                    where = _deparse(node.whereClause) if node.whereClause is not None else None
                    out.append(_Hit("unique-index-existing-data", _duplicates_query(table, cols, where, False), table))
        elif kind == "DropStmt":
            out += self._drop(node, in_tx)
        elif kind == "DropdbStmt":
            out.append(_Hit("drop-database", f"database {node.dbname}"))
        elif kind == "RenameStmt":
            rtype = _enum_name(node.renameType)
            if node.relation is not None and not self._ours(node.relation):
                table = _qualified(node.relation)
                if self._existing(table):
                    if rtype == "OBJECT_COLUMN":
                        out.append(_Hit("rename-column", self._usage(table, node.subname), table))
                    elif rtype == "OBJECT_TABLE":
                        out.append(_Hit("rename-table", self._usage(table, None), table))
        elif kind == "AlterTableStmt" and not self._ours(node.relation):
            out += self._alter_table(node, in_tx, added_not_valid)
        elif kind == "ReindexStmt":
            params = [getattr(p, "defname", "") for p in (getattr(node, "params", None) or ())]
            table = _qualified(node.relation) if node.relation is not None else None
            if "concurrently" in params and in_tx:
                out.append(_Hit("concurrently-in-transaction", "", table))
            if "concurrently" not in params:
                out.append(_Hit("reindex-not-concurrent", "", table))
        elif kind == "VacuumStmt":
            opts = {getattr(o, "defname", "") for o in (node.options or ())}
            if node.is_vacuumcmd and "full" in opts:
                for rel in node.rels or (None,):
                    table = _qualified(rel.relation) if rel is not None and rel.relation is not None else None
                    if table is None or self._existing(table):
                        out.append(_Hit("vacuum-full", "" if table else "every table of the database", table))
        elif kind == "ClusterStmt":
            table = _qualified(node.relation) if node.relation is not None else None
            if table is None or self._existing(table):
                out.append(_Hit("cluster", "" if table else "every clustered table of the database", table))
        elif kind == "TruncateStmt":
            if _enum_name(node.behavior) == "DROP_CASCADE":
                out.append(_Hit("truncate-cascade", "", _qualified(node.relations[0])))
        elif kind == "CreateTrigStmt":
            table = _qualified(node.relation)
            if self._existing(table):
                out.append(_Hit("create-trigger", self._usage(table, None), table))
        elif kind == "AlterDomainStmt":
            if node.subtype == "C" and node.def_ is not None and not node.def_.skip_validation:
                out.append(_Hit("domain-constraint", f"domain {_dotted(node.typeName)}"))
        return out

    def _drop(self, node, in_tx: bool) -> list[_Hit]:
        out: list[_Hit] = []
        remove = _enum_name(node.removeType)
        if remove == "OBJECT_INDEX":
            if node.concurrent and in_tx:
                out.append(_Hit("concurrently-in-transaction"))
            for obj in node.objects or ():
                name = _dotted(obj)
                if not node.concurrent and name not in self.new_indexes:
                    out.append(_Hit("drop-index-not-concurrent", "", name))
        elif remove == "OBJECT_TABLE":
            for obj in node.objects or ():
                name = _dotted(obj)
                if self._existing(name):
                    out.append(_Hit("drop-table", self._usage(name, None), name))
        elif remove == "OBJECT_SCHEMA":
            names = [getattr(o, "sval", str(o)) for o in node.objects or ()]
            cascade = _enum_name(node.behavior) == "DROP_CASCADE"
            out.append(_Hit("drop-schema", f"schema {', '.join(names)}" + (" with CASCADE" if cascade else "")))
        return out

    def _alter_table(self, node, in_tx: bool, added_not_valid: set) -> list[_Hit]:
        table = _qualified(node.relation)
        existing = self._existing(table)
        out: list[_Hit] = []
        for cmd in node.cmds or ():
            sub = _enum_name(cmd.subtype)
            if sub == "AT_AddColumn":
                out += [h._replace(table=table) for h in self._add_column(cmd.def_, existing)]
            elif sub == "AT_AlterColumnType" and existing:
                out.append(_Hit("column-type-change", "", table))
            elif sub == "AT_DropColumn" and existing:
                out.append(_Hit("drop-column", self._usage(table, cmd.name), table))
            elif sub == "AT_AddConstraint":
                out += self._add_constraint(cmd.def_, table, existing, added_not_valid)
            elif sub == "AT_ValidateConstraint":
                if (table, cmd.name or "") in added_not_valid:
                    out.append(_Hit("validate-in-same-transaction", "", table))
                self.validated.add(table)
            elif sub == "AT_SetNotNull" and existing and table not in self.validated:
                out.append(_Hit("set-not-null-scan", "", table))
            elif sub == "AT_DropNotNull" and existing:
                out.append(_Hit("drop-not-null", f"column {cmd.name}", table))
            elif sub == "AT_DropConstraint" and existing and self._is_foreign_key(table, cmd.name or ""):
                out.append(_Hit("drop-foreign-key", f"constraint {cmd.name}", table))
            elif sub in ("AT_SetLogged", "AT_SetUnLogged") and existing:
                out.append(_Hit("set-logged", "", table))
            elif sub == "AT_DetachPartition":
                if cmd.def_.concurrent and in_tx:
                    out.append(_Hit("concurrently-in-transaction", "", table))
                if not cmd.def_.concurrent and existing:
                    out.append(_Hit("detach-partition-not-concurrent", "", table))
            elif sub == "AT_AddIdentity" and existing:
                out.append(_Hit("add-column-rewrite", "ADD GENERATED ... AS IDENTITY fills every row", table))
            elif sub == "AT_ClusterOn":
                pass  # only marks the index; CLUSTER itself is the rewrite
        return out

    def _add_constraint(self, con, table: str, existing: bool, added_not_valid: set) -> list[_Hit]:
        out: list[_Hit] = []
        ctype = _enum_name(con.contype)
        if not existing:
            return out
        if ctype in ("CONSTR_FOREIGN", "CONSTR_CHECK"):
            if con.skip_validation:
                added_not_valid.add((table, con.conname or ""))
            else:
                out.append(_Hit("constraint-not-valid", "", table))
        elif ctype in ("CONSTR_PRIMARY", "CONSTR_UNIQUE", "CONSTR_EXCLUSION") and not con.indexname:
            out.append(_Hit("constraint-without-using-index", "adding the constraint builds its index", table))
            if ctype != "CONSTR_EXCLUSION" and con.keys:
                cols = [_ident(k.sval) for k in con.keys]
                out.append(_Hit("unique-index-existing-data",
                                _duplicates_query(table, cols, None, ctype == "CONSTR_PRIMARY"), table))
        return out

    def _add_column(self, coldef, existing: bool) -> list[_Hit]:
        out: list[_Hit] = []
        cons = list(coldef.constraints or ())
        types = {_enum_name(c.contype) for c in cons}
        tname = _type_name(coldef.typeName)
        not_null = "CONSTR_NOTNULL" in types or "CONSTR_PRIMARY" in types or bool(coldef.is_not_null)
        has_default = bool({"CONSTR_DEFAULT", "CONSTR_IDENTITY", "CONSTR_GENERATED"} & types) or tname in _SERIAL
        if existing and not_null and not has_default:
            out.append(_Hit("add-not-null-column-without-default"))
        if existing:
            if tname in _SERIAL:
                out.append(_Hit("add-column-rewrite", f"{tname} fills every existing row from its sequence"))
            elif "CONSTR_IDENTITY" in types:
                out.append(_Hit("add-column-rewrite", "an identity column fills every existing row"))
            elif "CONSTR_GENERATED" in types:
                out.append(_Hit("add-column-rewrite", "a stored generated column is computed for every row"))
        for c in cons:
            ctype = _enum_name(c.contype)
            if ctype == "CONSTR_DEFAULT" and existing and _calls_volatile(c.raw_expr):
                out.append(_Hit("add-column-volatile-default"))
            if ctype in ("CONSTR_FOREIGN", "CONSTR_CHECK") and existing:
                out.append(_Hit("constraint-not-valid", "an inline REFERENCES/CHECK cannot be NOT VALID: add the "
                                                        "column first, then the constraint NOT VALID"))
            if ctype in ("CONSTR_PRIMARY", "CONSTR_UNIQUE") and existing:
                out.append(_Hit("constraint-without-using-index", "an inline UNIQUE/PRIMARY KEY builds its index"))
        out += self._type_hygiene([coldef], table_constraints=False)
        return out

    def _type_hygiene(self, elements, *, table_constraints: bool) -> list[_Hit]:
        """Warnings on column types: narrow keys, serial, timestamp, char(n)."""
        out: list[_Hit] = []
        pk_cols: set[str] = set()
        if table_constraints:
            for el in elements:
                if type(el).__name__ == "Constraint" and _enum_name(el.contype) == "CONSTR_PRIMARY":
                    pk_cols |= {k.sval for k in el.keys or ()}
        for el in elements:
            if type(el).__name__ != "ColumnDef" or el.typeName is None:
                continue
            tname = _type_name(el.typeName)
            types = {_enum_name(c.contype) for c in el.constraints or ()}
            key = el.colname in pk_cols or bool({"CONSTR_PRIMARY", "CONSTR_IDENTITY"} & types) or tname in _SERIAL
            if key and tname in _NARROW_KEY:
                out.append(_Hit("prefer-bigint-key", f"column {el.colname} is {tname}"))
            if tname in _SERIAL:
                out.append(_Hit("prefer-identity", f"column {el.colname} is {tname}"))
            if tname == "timestamp":
                out.append(_Hit("timestamp-without-time-zone", f"column {el.colname}"))
            if tname == "bpchar":
                out.append(_Hit("char-field", f"column {el.colname}"))
        return out

    def _is_foreign_key(self, table: str, name: str) -> bool:
        if self.live is not None:
            kind = self.live.constraint_kind(table, name)
            if kind is not None:
                return kind == "f"
        return bool(re.search(r"(_fkey|_fk)$|^fk_", name))

    def _usage(self, table: str, column: str | None) -> str:
        if self.live is None:
            return ""
        return self.live.usage(table, column) or ""


# -- what the live database says -------------------------------------------------------------

class LiveDatabase:
    """Read-only questions lint asks the target database: what uses a table or column, what a
    constraint is, how big a table is. One connection, answers cached."""

    def __init__(self, conn):
        self.conn = conn
        self._sizes: dict[str, tuple[str, int | None, str] | None] = {}

    def usage(self, table: str, column: str | None) -> str:
        return usage_lookup(self.conn)(table, column)

    def constraint_kind(self, table: str, name: str) -> str | None:
        row = self.conn.execute("SELECT contype::text FROM pg_constraint WHERE conrelid = to_regclass(%s) "
                                "AND conname = %s", (_regclass(table), name)).fetchone()
        return row[0] if row else None

    def size(self, relation: str) -> tuple[str, int | None, str] | None:
        """(table, rows, pretty size) for a table, or the table an index belongs to."""
        if relation not in self._sizes:
            try:
                self._sizes[relation] = self._size(_regclass(relation))
            except psycopg.Error:  # a lookup that fails leaves the finding without a size
                self._sizes[relation] = None
        return self._sizes[relation]

    def _size(self, relation: str):
        row = self.conn.execute(
            """SELECT quote_ident(n.nspname) || '.' || quote_ident(t.relname), t.oid
               FROM pg_class c LEFT JOIN pg_index i ON i.indexrelid = c.oid
               JOIN pg_class t ON t.oid = coalesce(i.indrelid, c.oid) JOIN pg_namespace n ON n.oid = t.relnamespace
               WHERE c.oid = to_regclass(%s)""", (relation,)).fetchone()
        if row is None:
            return None
        name, oid = row
        tuples, bytes_, never = self.conn.execute(
            """SELECT sum(greatest(c.reltuples, 0))::bigint, sum(pg_total_relation_size(c.oid))::bigint,
                      bool_or(c.reltuples < 0 OR (c.reltuples = 0 AND pg_relation_size(c.oid) > 0))
               FROM pg_class c
               WHERE c.relkind <> 'p' AND c.oid IN (SELECT relid FROM pg_partition_tree(%(t)s::oid) WHERE isleaf
                                                     UNION SELECT %(t)s::oid)""", {"t": oid}).fetchone()
        rows = int(tuples or 0)
        if never:  # never analyzed (or only indexed while empty): count, within a bound
            try:
                with self.conn.transaction():
                    self.conn.execute("SET LOCAL statement_timeout = '2s'")
                    rows = self.conn.execute(f"SELECT count(*) FROM {name}").fetchone()[0]  # regclass text: quoted
            except Exception:  # noqa: BLE001 - a slow count leaves the estimate
                rows = None
        pretty = self.conn.execute("SELECT pg_size_pretty(%s::bigint)", (bytes_ or 0,)).fetchone()[0]
        return name, rows, pretty


def usage_lookup(conn):
    """A `dependents` function for the linter: what in the live database still uses a table
    or column (views, and the table's activity since statistics were last reset)."""

    def lookup(table: str, column: str | None) -> str:
        rc = _regclass(table)
        views = [r[0] for r in conn.execute(
            """SELECT DISTINCT vn.nspname || '.' || v.relname
               FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid
               JOIN pg_class v ON v.oid = r.ev_class JOIN pg_namespace vn ON vn.oid = v.relnamespace
               WHERE d.classid = 'pg_rewrite'::regclass AND d.refobjid = to_regclass(%(t)s)
                 AND v.oid <> d.refobjid
                 AND (%(c)s::text IS NULL OR d.refobjsubid =
                      (SELECT attnum FROM pg_attribute WHERE attrelid = to_regclass(%(t)s) AND attname = %(c)s))
               ORDER BY 1""", {"t": rc, "c": column}).fetchall()]
        stats = conn.execute(
            """SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0), n_tup_ins + n_tup_upd + n_tup_del
               FROM pg_stat_user_tables WHERE relid = to_regclass(%s)""", (rc,)).fetchone()
        parts = []
        if views:
            parts.append(f"still used by view{'s' if len(views) > 1 else ''} {', '.join(views)}")
        if stats and (stats[0] or stats[1]):
            parts.append(f"{table} had {stats[0]:,} scans and {stats[1]:,} row writes since statistics were reset")
        return "; ".join(parts)

    return lookup


class _Usage:
    """Adapts a bare `dependents` function (the older interface) to LiveDatabase's shape."""

    def __init__(self, fn):
        self.usage = fn

    def constraint_kind(self, table, name):
        return None

    def size(self, relation):
        return None


# -- putting it together -------------------------------------------------------------------------

def _finding(revision: str, hit: _Hit, statement: str, allowed: set[str]) -> Finding:
    severity, reason, alternative = RULES[hit.rule]
    return Finding(revision, hit.rule, severity, statement, f"{reason} ({hit.extra})" if hit.extra else reason,
                   alternative, hit.rule in allowed, hit.table)


def _sized(f: Finding, live, small_table_rows: int | None, new_tables: set[str]) -> Finding:
    if f.table is None or live is None or f.table in new_tables:
        return f
    found = live.size(f.table)
    if found is None:
        return f
    table, rows, pretty = found
    rows_text = f"about {rows:,} rows" if rows is not None else "rows unknown (never analyzed, count too slow)"
    reason = f"{f.reason} [{table}: {rows_text}, {pretty}]"
    severity = f.severity
    if (small_table_rows is not None and rows is not None and rows < small_table_rows
            and f.rule in LOCK_RULES and severity == ERROR):
        severity = WARNING
        reason += f" (a warning: under migrations.lint_small_table_rows = {small_table_rows:,})"
    return replace(f, table=table, rows=rows, size=pretty, reason=reason, severity=severity)


def lint(plans: list[RevisionPlan], *, dependents=None, live=None,
         small_table_rows: int | None = None) -> list[Finding]:
    """Findings for the pending revisions, in plan order. `live` (a LiveDatabase) adds what
    still uses a dropped or renamed object and the size of each existing table a finding is
    about; `dependents` (see usage_lookup) adds only the former."""
    if live is None and dependents is not None:
        live = _Usage(dependents)
    linter = _Linter(live)
    findings: list[Finding] = []
    for plan in plans:
        allowed = allowed_rules(plan.path)
        hits = linter.revision(plan.sql, transactional=plan.transactional)
        if not has_downgrade(plan.path):
            hits.append((_Hit("missing-downgrade"), f"{Path(plan.path).name}: downgrade() is missing or empty"))
        fired = {h.rule for h, _ in hits}
        for name in sorted(allowed - fired):
            extra = "no such rule" if name not in RULES else "it did not fire in this revision"
            hits.append((_Hit("unused-allow", extra), f"# dataops: allow={name}"))
        findings += [_sized(_finding(plan.revision, h, s, allowed), live, small_table_rows, linter.new_tables)
                     for h, s in hits]
    return findings


def lint_sql(sql: str, *, name: str = "sql", live=None, small_table_rows: int | None = None) -> list[Finding]:
    """Findings for plain SQL meant to run outside dataops (psql -f, another tool): no
    lock_timeout is set for it and no transaction is opened for it. A psql script's
    meta-commands and COPY ... FROM stdin data are not SQL: they are set aside (a `\\i` or
    `\\connect` is named, since what it runs was not checked) instead of making the whole file
    unparsable, as they did for the public sample databases' scripts."""
    sql, skipped = strip_psql(sql)
    linter = _Linter(live)
    findings = [_sized(_finding(name, h, s, set()), live, small_table_rows, linter.new_tables)
                for h, s in linter.revision(sql, transactional=False, managed=False)]
    return findings + [_finding(name, _Hit("psql-meta-command", ""), line, set()) for line in skipped]


_DOLLAR = re.compile(r"\$[A-Za-z_][A-Za-z_0-9]*\$|\$\$")
_COPY_STDIN = re.compile(r"^\s*COPY\b.*\bFROM\s+stdin\b.*;\s*$", re.IGNORECASE)
_NOT_CHECKED = re.compile(r"^\\(i|ir|include|include_relative|c|connect|o|out|g|gx|gexec)\b")


def strip_psql(text: str) -> tuple[str, list[str]]:
    """`text` with psql's meta-commands (lines starting with a backslash, outside dollar quotes)
    and the data of COPY ... FROM stdin (up to its `\\.`) blanked, line numbers kept; and the
    meta-commands that run or send SQL elsewhere (`\\i`, `\\connect`, `\\gexec`...), which the
    lint cannot follow."""
    out, skipped = [], []
    quote: str | None = None  # the open dollar quote's tag
    in_copy = False
    for line in text.split("\n"):
        if in_copy:
            in_copy = line.strip() != "\\."
            out.append("")
            continue
        if quote is None and line.lstrip().startswith("\\"):
            command = line.strip()
            if _NOT_CHECKED.match(command):
                skipped.append(command)
            out.append("")
            continue
        for tag in _DOLLAR.findall(line):
            quote = None if tag == quote else (tag if quote is None else quote)
        if quote is None and _COPY_STDIN.match(line):
            in_copy = True
        out.append(line)
    return "\n".join(out), skipped


def heads_finding(path: Path) -> Finding | None:
    """A `multiple-heads` finding when the revision graph has more than one head."""
    from dataops.tasks.migration.migrate import script_directory

    try:
        heads = script_directory(path).get_heads()
    except Exception:  # noqa: BLE001 - a broken graph is reported by plan() with its own message
        return None
    if len(heads) <= 1:
        return None
    return _finding("-", _Hit("multiple-heads", f"heads {', '.join(sorted(heads))}"),
                    f"{len(heads)} heads in {path}", set())


def lint_against(mt: MigrationTarget, plans: list[RevisionPlan]) -> list[Finding]:
    """`lint` with the live database's answers: what still uses a dropped or renamed object,
    and how big each table a finding is about is (read only)."""
    from dataops.tasks import pg

    with pg.connect(mt.dsn, autocommit=True, timeout=mt.connect_timeout) as conn:
        return lint(plans, live=LiveDatabase(conn), small_table_rows=mt.options.lint_small_table_rows)


def errors_sentence(findings: list[Finding]) -> str | None:
    """The blocking findings in one sentence with the way out, or None if nothing blocks.
    Preflight and `dataops migrate ENV lint` both stop on it."""
    blocking = [f for f in findings if f.blocks]
    if not blocking:
        return None
    revs = ", ".join(sorted({f.revision for f in blocking}))
    return (f"{len(blocking)} error(s) in revision(s) {revs} (first: {blocking[0].rule}: {blocking[0].statement}); "
            "fix them, or allow a checked one with `# dataops: allow=<rule>` in the revision file")


def lint_text(findings: list[Finding]) -> str:
    if not findings:
        return "no findings"
    errors = sum(f.blocks for f in findings)
    return "\n".join(map(str, findings)) + f"\n{errors} error(s), {len(findings) - errors} other finding(s)"
