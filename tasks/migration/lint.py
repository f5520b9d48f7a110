"""Lint pending revisions for changes that lock or break a live database.

Works on the SQL the plan renders (Alembic offline mode), parsed by pglast, PostgreSQL's own
parser as a library, so a statement is judged by what it is, not by how it is spelled.
Whether a statement runs inside a transaction is read from the same rendered stream
(autocommit blocks show up as COMMIT ... BEGIN).

A table created earlier in the same plan is new and empty: indexes, constraints and
NOT NULL columns on it are fine. Downgrades are not linted: undoing is dropping.

A finding that has been checked can be allowed in the revision file with a comment line
`# dataops: allow=<rule>[,<rule>...]`; allowed findings are still listed, but not as errors.
"""

from __future__ import annotations

import ast
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from dataops.tasks import pg
from dataops.tasks.migration.migrate import VERSION_SCHEMA, MigrationTarget, RevisionPlan

ERROR, WARNING = "error", "warning"

# rule -> (severity, reason, safe alternative)
RULES: dict[str, tuple[str, str, str]] = {
    "add-not-null-column-without-default": (
        ERROR,
        "adding a NOT NULL column without a default fails on a table that has rows",
        "add it nullable, backfill in batches, add CHECK (col IS NOT NULL) NOT VALID, VALIDATE CONSTRAINT, "
        "then SET NOT NULL (revisions 0005-0008 show it)"),
    "add-column-volatile-default": (
        ERROR,
        "a volatile default (random(), clock_timestamp(), gen_random_uuid()) rewrites the whole table under "
        "ACCESS EXCLUSIVE",
        "add the column without a default, then SET DEFAULT, then backfill in batches"),
    "index-not-concurrent": (
        ERROR,
        "building an index on an existing table this way blocks every write to it until the build ends",
        "CREATE [UNIQUE] INDEX CONCURRENTLY in a revision with transactional = False, inside "
        "op.get_context().autocommit_block() (revision 0004 shows it); for a constraint, then "
        "ADD CONSTRAINT ... USING INDEX"),
    "concurrently-in-transaction": (
        ERROR,
        "CONCURRENTLY cannot run inside a transaction block: the revision would fail",
        "set transactional = False in the revision and put the statement in op.get_context().autocommit_block()"),
    "column-type-change": (
        ERROR,
        "changing a column's type rewrites the table and its indexes under ACCESS EXCLUSIVE (all but a few "
        "binary-compatible changes)",
        "expand/contract: add a new column, write both, backfill in batches, switch reads, drop the old one in a "
        "later revision; if the change is rewrite-free (varchar(n) to a larger n or to text), allow it"),
    "drop-column": (
        ERROR,
        "code that is still running may read or write the column; dropping it breaks those queries at once",
        "expand/contract: stop using the column in the application and deploy that first, then drop it in a "
        "later revision and allow it there"),
    "drop-table": (
        ERROR,
        "code that is still running may use the table; dropping it breaks those queries at once",
        "expand/contract: stop using the table in the application and deploy that first, then drop it in a "
        "later revision and allow it there"),
    "rename-column": (
        ERROR,
        "running code still uses the old name and fails as soon as the rename commits",
        "expand/contract: add the new column, write both, backfill, switch reads, drop the old one later"),
    "rename-table": (
        ERROR,
        "running code still uses the old name and fails as soon as the rename commits",
        "expand/contract: create the new table (or a view with the new name), switch the application, "
        "drop the old name later"),
    "constraint-not-valid": (
        ERROR,
        "adding a FOREIGN KEY or CHECK scans the whole table while holding a lock that blocks writes "
        "(a foreign key locks the referenced table too)",
        "ADD CONSTRAINT ... NOT VALID (instant), then VALIDATE CONSTRAINT in a later revision "
        "(revisions 0007 and 0008 show it)"),
    "validate-in-same-transaction": (
        WARNING,
        "validating in the transaction that added the constraint keeps the ADD's strong lock through the scan",
        "VALIDATE CONSTRAINT in a later revision"),
    "set-not-null-scan": (
        WARNING,
        "SET NOT NULL scans the whole table under ACCESS EXCLUSIVE unless a valid CHECK (col IS NOT NULL) exists",
        "add CHECK (col IS NOT NULL) NOT VALID, VALIDATE it, then SET NOT NULL (revisions 0007 and 0008)"),
    "missing-downgrade": (
        ERROR,
        "the rollback flow undoes a failed migration with downgrade(); without one the only way back is "
        "restoring the backup, which loses every write since",
        "write downgrade() so that it undoes upgrade() exactly; `dataops migrate ENV test` proves it"),
    "unparsable-sql": (
        ERROR,
        "PostgreSQL's parser (pglast) cannot parse the statement, so nothing in it was checked",
        "fix the SQL; run `dataops migrate ENV plan` to see what the revision renders"),
}

_ALLOW = re.compile(r"#[ \t]*dataops:[ \t]*allow[ \t]*=[ \t]*([a-z0-9, \t-]+)", re.IGNORECASE)
_VOLATILE = {"random", "clock_timestamp", "gen_random_uuid", "uuid_generate_v1", "uuid_generate_v4", "timeofday",
             "nextval"}


@dataclass(frozen=True)
class Finding:
    revision: str
    rule: str
    severity: str
    statement: str
    reason: str
    alternative: str
    allowed: bool = False

    @property
    def blocks(self) -> bool:
        return self.severity == ERROR and not self.allowed

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        tag = "allowed" if self.allowed else self.severity
        return (f"{self.revision} {tag} {self.rule}: {self.statement}\n    why: {self.reason}\n"
                f"    instead: {self.alternative}")


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


# -- the SQL rules -------------------------------------------------------------------------

def _qualified(rangevar) -> str:
    return f"{rangevar.schemaname or 'public'}.{rangevar.relname}"


def _short(sql: str) -> str:
    one = " ".join(re.sub(r"--[^\n]*", " ", sql).split())
    return one if len(one) <= 160 else one[:157] + "..."


def _enum_name(value) -> str:
    return getattr(value, "name", str(value))


class _Linter:
    def __init__(self, dependents=None):
        self.new_tables: set[str] = set()
        self.validated: set[str] = set()  # tables with a VALIDATE CONSTRAINT earlier in the plan
        self.dependents = dependents  # (table, column|None) -> words on what uses it, or None

    def revision(self, plan: RevisionPlan) -> list[tuple[str, str, str]]:
        """(rule, statement text, extra reason) for one revision's rendered SQL."""
        from pglast import parse_sql
        from pglast.parser import ParseError

        try:
            stmts = parse_sql(plan.sql)
        except ParseError as exc:
            return [("unparsable-sql", _short(plan.sql), f"parser: {exc}")]
        hits: list[tuple[str, str, str]] = []
        in_tx = False
        added_not_valid: set[tuple[str, str]] = set()
        for raw in stmts:
            node = raw.stmt
            kind = type(node).__name__
            text = plan.sql.encode()[raw.stmt_location:raw.stmt_location + raw.stmt_len].decode() \
                if raw.stmt_len else plan.sql.encode()[raw.stmt_location:].decode()
            if kind == "TransactionStmt":
                k = _enum_name(node.kind)
                if k in ("TRANS_STMT_BEGIN", "TRANS_STMT_START"):
                    in_tx = True
                elif k in ("TRANS_STMT_COMMIT", "TRANS_STMT_ROLLBACK"):
                    in_tx = False
                continue
            for rule, extra in self._statement(node, kind, in_tx, added_not_valid):
                hits.append((rule, _short(text), extra))
        return hits

    def _ours(self, rangevar) -> bool:
        return rangevar is not None and rangevar.schemaname == VERSION_SCHEMA

    def _statement(self, node, kind: str, in_tx: bool, added_not_valid: set) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        if kind == "CreateStmt":
            if not self._ours(node.relation):
                self.new_tables.add(_qualified(node.relation))
        elif kind == "IndexStmt":
            table = _qualified(node.relation)
            if node.concurrent and in_tx:
                out.append(("concurrently-in-transaction", ""))
            if not node.concurrent and table not in self.new_tables:
                out.append(("index-not-concurrent", ""))
        elif kind == "DropStmt":
            remove = _enum_name(node.removeType)
            if remove == "OBJECT_INDEX" and node.concurrent and in_tx:
                out.append(("concurrently-in-transaction", ""))
            if remove == "OBJECT_TABLE":
                for obj in node.objects or ():
                    parts = [getattr(p, "sval", str(p)) for p in obj]
                    name = ".".join(parts if len(parts) > 1 else ["public", *parts])
                    if name not in self.new_tables:
                        out.append(("drop-table", self._usage(name, None)))
        elif kind == "RenameStmt":
            rtype = _enum_name(node.renameType)
            if node.relation is not None and not self._ours(node.relation):
                table = _qualified(node.relation)
                if table not in self.new_tables:
                    if rtype == "OBJECT_COLUMN":
                        out.append(("rename-column", self._usage(table, node.subname)))
                    elif rtype == "OBJECT_TABLE":
                        out.append(("rename-table", self._usage(table, None)))
        elif kind == "AlterTableStmt" and not self._ours(node.relation):
            out += self._alter_table(node, in_tx, added_not_valid)
        elif kind == "ReindexStmt":
            params = [getattr(p, "defname", "") for p in (getattr(node, "params", None) or ())]
            if "concurrently" in params and in_tx:
                out.append(("concurrently-in-transaction", ""))
        return out

    def _alter_table(self, node, in_tx: bool, added_not_valid: set) -> list[tuple[str, str]]:
        table = _qualified(node.relation)
        existing = table not in self.new_tables
        out: list[tuple[str, str]] = []
        for cmd in node.cmds or ():
            sub = _enum_name(cmd.subtype)
            if sub == "AT_AddColumn":
                out += self._add_column(cmd.def_, existing)
            elif sub == "AT_AlterColumnType" and existing:
                out.append(("column-type-change", ""))
            elif sub == "AT_DropColumn" and existing:
                out.append(("drop-column", self._usage(table, cmd.name)))
            elif sub == "AT_AddConstraint":
                con = cmd.def_
                ctype = _enum_name(con.contype)
                if ctype in ("CONSTR_FOREIGN", "CONSTR_CHECK") and existing:
                    if con.skip_validation:
                        added_not_valid.add((table, con.conname or ""))
                    else:
                        out.append(("constraint-not-valid", ""))
                elif ctype in ("CONSTR_PRIMARY", "CONSTR_UNIQUE", "CONSTR_EXCLUSION") and existing \
                        and not con.indexname:
                    out.append(("index-not-concurrent", "adding the constraint builds its index"))
            elif sub == "AT_ValidateConstraint":
                if (table, cmd.name or "") in added_not_valid:
                    out.append(("validate-in-same-transaction", ""))
                self.validated.add(table)
            elif sub == "AT_SetNotNull" and existing and table not in self.validated:
                out.append(("set-not-null-scan", ""))
        return out

    def _add_column(self, coldef, existing: bool) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        cons = list(coldef.constraints or ())
        types = {_enum_name(c.contype) for c in cons}
        not_null = "CONSTR_NOTNULL" in types or "CONSTR_PRIMARY" in types or bool(coldef.is_not_null)
        has_default = bool({"CONSTR_DEFAULT", "CONSTR_IDENTITY", "CONSTR_GENERATED"} & types)
        if existing and not_null and not has_default:
            out.append(("add-not-null-column-without-default", ""))
        for c in cons:
            if _enum_name(c.contype) == "CONSTR_DEFAULT" and existing and _calls_volatile(c.raw_expr):
                out.append(("add-column-volatile-default", ""))
            if _enum_name(c.contype) in ("CONSTR_FOREIGN", "CONSTR_CHECK") and existing:
                out.append(("constraint-not-valid", "an inline REFERENCES/CHECK cannot be NOT VALID: add the column "
                                                    "first, then the constraint NOT VALID"))
            if _enum_name(c.contype) in ("CONSTR_PRIMARY", "CONSTR_UNIQUE") and existing:
                out.append(("index-not-concurrent", "an inline UNIQUE/PRIMARY KEY builds its index"))
        return out

    def _usage(self, table: str, column: str | None) -> str:
        if self.dependents is None:
            return ""
        return self.dependents(table, column) or ""


def _calls_volatile(expr) -> bool:
    from pglast import ast as pgast
    from pglast.visitors import Visitor

    found = []

    class V(Visitor):
        def visit_FuncCall(self, ancestors, node):  # noqa: N802 - pglast's naming
            name = getattr(node.funcname[-1], "sval", "")
            if name in _VOLATILE:
                found.append(name)

    if expr is None:
        return False
    V()(pgast.SelectStmt(targetList=(pgast.ResTarget(val=expr),)))
    return bool(found)


def usage_lookup(conn):
    """A `dependents` function for the linter: what in the live database still uses a table
    or column (views, and the table's activity since statistics were last reset)."""

    def lookup(table: str, column: str | None) -> str:
        views = [r[0] for r in conn.execute(
            """SELECT DISTINCT vn.nspname || '.' || v.relname
               FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid
               JOIN pg_class v ON v.oid = r.ev_class JOIN pg_namespace vn ON vn.oid = v.relnamespace
               WHERE d.classid = 'pg_rewrite'::regclass AND d.refobjid = to_regclass(%(t)s)
                 AND v.oid <> d.refobjid
                 AND (%(c)s::text IS NULL OR d.refobjsubid =
                      (SELECT attnum FROM pg_attribute WHERE attrelid = to_regclass(%(t)s) AND attname = %(c)s))
               ORDER BY 1""", {"t": table, "c": column}).fetchall()]
        stats = conn.execute(
            """SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0), n_tup_ins + n_tup_upd + n_tup_del
               FROM pg_stat_user_tables WHERE relid = to_regclass(%s)""", (table,)).fetchone()
        parts = []
        if views:
            parts.append(f"still used by view{'s' if len(views) > 1 else ''} {', '.join(views)}")
        if stats and (stats[0] or stats[1]):
            parts.append(f"{table} had {stats[0]:,} scans and {stats[1]:,} row writes since statistics were reset")
        return "; ".join(parts)

    return lookup


def lint(plans: list[RevisionPlan], *, dependents=None) -> list[Finding]:
    """Findings for the pending revisions, in plan order. `dependents` (see usage_lookup) adds
    what still uses a dropped or renamed object."""
    linter = _Linter(dependents)
    findings: list[Finding] = []
    for plan in plans:
        allowed = allowed_rules(plan.path)
        hits = linter.revision(plan)
        if not has_downgrade(plan.path):
            hits.append(("missing-downgrade", f"{Path(plan.path).name}: downgrade() is missing or empty", ""))
        for rule, statement, extra in hits:
            severity, reason, alternative = RULES[rule]
            findings.append(Finding(plan.revision, rule, severity, statement,
                                    f"{reason} ({extra})" if extra else reason, alternative, rule in allowed))
    return findings


def lint_against(mt: MigrationTarget, plans: list[RevisionPlan]) -> list[Finding]:
    """`lint` with the live database's answer to what still uses a dropped or renamed object
    (read only)."""
    with pg.connect(mt.dsn, autocommit=True, timeout=mt.connect_timeout) as conn:
        return lint(plans, dependents=usage_lookup(conn))


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
