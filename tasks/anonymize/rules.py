"""From `anonymize:` in dataops.yaml to checked, compiled masking for one database.

Everything that can make a masking run fail is found here, before a single row moves:
unknown tables and columns, unknown Faker providers, rules that cannot fit their column
(null on NOT NULL, a constant on a unique column, too few Faker values short enough for
varchar(n), values a domain's CHECK refuses, a rule on a generated column), key columns
masked on one side of a foreign key only, and personal-looking columns nobody wrote a
rule for. The last is the PII guard (detection in dataops.tasks.anonymize.pii): a new
column `users.passport_no` must stop the nightly refresh, not reach staging unmasked.

Faker pools are fitted to the column: a `{faker: city}` rule on varchar(15) picks among
the Faker cities of at most 15 characters; it is refused only when too few fit.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from dataops.errors import BadInput, first_line
from dataops.settings import AnonymizeSettings, ColumnRule, Settings
from dataops.tasks.anonymize.masking import (
    DATE_TYPES,
    HASHABLE,
    MIN_DISTINCT,
    TEXT_TYPES,
    Column,
    Keyed,
    Masker,
    compile_rule,
    uniquify,
    walk,
)
from dataops.tasks.anonymize.pii import content_reasons, name_reason, table_reasons  # noqa: F401 (re-exported)

# Schemas never read or copied: the tool's table snapshots hold raw copies of production rows.
SKIPPED_SCHEMAS = ("pg_catalog", "information_schema", "dataops_snapshots")
OUTPUT_SAMPLE = 200  # rows a rule is tried on when its output may not fit the column


class Named:
    """A relation's names, for a dataclass with `schema` and `name` fields (TableInfo here, the
    refresh catalog's Rel): the label users write in dataops.yaml, the quoted name for SQL."""

    schema: str
    name: str

    @property
    def label(self) -> str:
        return label_of(self.schema, self.name)

    @property
    def qualified(self) -> sql.Composed:
        return sql.SQL("{}.{}").format(sql.Identifier(self.schema), sql.Identifier(self.name))

    @property
    def regclass(self) -> str:
        return regclass(self.schema, self.name)


@dataclass(frozen=True)
class TableInfo(Named):
    schema: str
    name: str
    relkind: str  # r ordinary, p partitioned
    columns: tuple[Column, ...]  # stored columns in attnum order (generated ones left out: COPY skips them)
    pages: int
    est_rows: int
    generated: tuple[str, ...] = ()  # GENERATED ALWAYS AS (...) STORED columns: computed, never copied or masked
    partitions: tuple[str, ...] = ()  # labels of its partitions at every level (a partitioned table)

    def column(self, name: str) -> Column | None:
        return next((c for c in self.columns if c.name == name), None)


@dataclass(frozen=True)
class ForeignKey:
    name: str
    child: str  # table label
    child_columns: tuple[str, ...]
    parent: str
    parent_columns: tuple[str, ...]
    validated: bool


def label_of(schema: str, table: str) -> str:
    return table if schema == "public" else f"{schema}.{table}"


def regclass(schema: str, name: str) -> str:
    """Text for a ::regclass cast that names exactly this relation, whatever its name holds."""
    quote = lambda s: '"' + s.replace('"', '""') + '"'  # noqa: E731
    return f"{quote(schema)}.{quote(name)}"


def split_label(label: str) -> tuple[str, str]:
    schema, _, table = label.rpartition(".")
    return schema or "public", table


# -- reading the catalog --------------------------------------------------------------------

def read_tables(conn: psycopg.Connection) -> dict[str, TableInfo]:
    """User tables with their copyable columns, keyed by label ('users', 'audit.events').

    A column's base type and length limit are read through domains, nested ones too: a
    domain over a domain over varchar(10) is varchar with 10 characters."""
    cur = conn.cursor(row_factory=tuple_row)
    rows = cur.execute(
        """
        WITH RECURSIVE dom AS (
            SELECT t.oid AS top, t.typbasetype AS base, t.typtypmod AS mod, 1 AS depth
            FROM pg_type t WHERE t.typtype = 'd'
            UNION ALL
            SELECT dom.top, t.typbasetype, CASE WHEN dom.mod <> -1 THEN dom.mod ELSE t.typtypmod END, dom.depth + 1
            FROM dom JOIN pg_type t ON t.oid = dom.base AND t.typtype = 'd'
        ), resolved AS (
            SELECT DISTINCT ON (top) top, base, mod FROM dom ORDER BY top, depth DESC
        )
        SELECT n.nspname, c.relname, c.relkind, c.relpages, c.reltuples::bigint,
               a.attname, format_type(a.atttypid, a.atttypmod), bt.typname, a.attnotnull,
               CASE WHEN bt.typname IN ('varchar', 'bpchar') AND coalesce(nullif(r.mod, -1), a.atttypmod) > 4
                    THEN coalesce(nullif(r.mod, -1), a.atttypmod) - 4 END,
               EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisunique
                       AND (a.attnum = ANY (i.indkey) OR EXISTS (
                            SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                            AND d.objid = i.indexrelid AND d.refobjid = c.oid AND d.refobjsubid = a.attnum))),
               t.typtype = 'd', a.attidentity, a.attgenerated,
               ARRAY(SELECT CASE WHEN pn.nspname = 'public' THEN pc.relname ELSE pn.nspname || '.' || pc.relname END
                     FROM pg_partition_tree(c.oid) pt
                     JOIN pg_class pc ON pc.oid = pt.relid JOIN pg_namespace pn ON pn.oid = pc.relnamespace
                     WHERE pt.level > 0 AND c.relkind = 'p' AND a.attnum = 1)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
        JOIN pg_type t ON t.oid = a.atttypid
        LEFT JOIN resolved r ON r.top = t.oid
        JOIN pg_type bt ON bt.oid = coalesce(r.base, t.oid)
        WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
          AND n.nspname <> ALL (%s) AND n.nspname NOT LIKE 'pg\\_%%'
          AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                          AND d.deptype = 'e')
        ORDER BY n.nspname, c.relname, a.attnum
        """, (list(SKIPPED_SCHEMAS),)).fetchall()
    tables: dict[str, dict] = {}
    for (schema, name, kind, pages, est, col, typ, base, not_null, max_len, unique, is_domain, identity, generated,
         parts) in rows:
        t = tables.setdefault(label_of(schema, name), {"schema": schema, "name": name, "relkind": kind,
                                                        "pages": max(pages, 0), "est_rows": max(est, 0), "columns": [],
                                                        "generated": [], "partitions": []})
        t["partitions"] += parts
        if generated:
            t["generated"].append(col)
            continue
        t["columns"].append(Column(col, typ, base, not_null, unique, max_len, typ if is_domain else None, identity))
    return {label: TableInfo(**{**t, "columns": tuple(t["columns"]), "generated": tuple(t["generated"]),
                                "partitions": tuple(t["partitions"])}) for label, t in tables.items()}


def read_foreign_keys(conn: psycopg.Connection) -> list[ForeignKey]:
    cur = conn.cursor(row_factory=tuple_row)
    rows = cur.execute(
        """
        SELECT co.conname, cn.nspname, cc.relname, pn.nspname, pc.relname, co.convalidated,
               ARRAY(SELECT a.attname FROM unnest(co.conkey) WITH ORDINALITY k(n, o)
                     JOIN pg_attribute a ON a.attrelid = co.conrelid AND a.attnum = k.n ORDER BY k.o),
               ARRAY(SELECT a.attname FROM unnest(co.confkey) WITH ORDINALITY k(n, o)
                     JOIN pg_attribute a ON a.attrelid = co.confrelid AND a.attnum = k.n ORDER BY k.o)
        FROM pg_constraint co
        JOIN pg_class cc ON cc.oid = co.conrelid JOIN pg_namespace cn ON cn.oid = cc.relnamespace
        JOIN pg_class pc ON pc.oid = co.confrelid JOIN pg_namespace pn ON pn.oid = pc.relnamespace
        WHERE co.contype = 'f' AND co.conparentid = 0 AND cn.nspname <> ALL (%s)
        ORDER BY 2, 3, 1
        """, (list(SKIPPED_SCHEMAS),)).fetchall()
    return [ForeignKey(name, label_of(cs, ct), tuple(ccols), label_of(ps, pt), tuple(pcols), valid)
            for name, cs, ct, ps, pt, valid, ccols, pcols in rows]


_QUOTED_NAME = re.compile(r'\s*(?:"((?:[^"]|"")*)"|([^".]+))\s*(?:\.|$)')


def _split_key(key: str) -> tuple[str, str]:
    """'users', 'audit.events', or with SQL quotes for names that hold dots or capitals:
    '"Odd.Schema"."Mixed Case.Table"' (a key without quotes splits at its last dot)."""
    if '"' not in key:
        return split_label(key)
    parts, pos = [], 0
    while pos < len(key):
        m = _QUOTED_NAME.match(key, pos)
        if not m or m.end() == pos:
            return split_label(key)
        parts.append(m.group(1).replace('""', '"') if m.group(1) is not None else m.group(2).strip())
        pos = m.end()
    if len(parts) == 1:
        return "public", parts[0]
    return (parts[0], parts[1]) if len(parts) == 2 else split_label(key)


def resolve_table(key: str, tables: dict[str, TableInfo], where: str) -> str:
    """A table named in the config ('users', 'public.users', 'audit.events',
    '"Odd.Schema"."Mixed Case.Table"') to its label."""
    schema, table = _split_key(key.strip())
    label = label_of(schema, table)
    if label not in tables:
        parent = next((t for t, info in tables.items() if label in info.partitions), None)
        if parent is not None:
            raise BadInput(f'{where}: table "{schema}.{table}" is a partition of {parent}; write its rules on '
                           f"{parent}, they apply to every partition")
        close = difflib.get_close_matches(label, list(tables), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise BadInput(f'{where}: table "{schema}.{table}" does not exist{hint}')
    return label


# -- the plan -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Finding:
    table: str
    column: str
    reason: str

    def __str__(self) -> str:
        return f"{self.table}.{self.column} ({self.reason})"


@dataclass
class TableMasking:
    table: TableInfo
    maskers: dict[str, Masker] = field(default_factory=dict)  # column -> masker, keep rules left out
    kept: list[str] = field(default_factory=list)  # columns with an explicit keep rule
    where: dict[str, str] = field(default_factory=dict)  # column -> where its rule was given, for errors

    @property
    def in_python(self) -> list[Masker]:
        return [m for m in self.maskers.values() if not m.in_sql]


@dataclass
class MaskingPlan:
    keyed: Keyed
    tables: dict[str, TableMasking]  # only tables with at least one masked column
    unmasked_personal: list[Finding]  # personal-looking, no rule: the guard refuses these
    defaulted: list[Finding]  # personal-looking, masked by anonymize.default
    deletes: dict[str, str]  # table label -> SQL condition of rows to drop

    def masked_columns(self) -> list[tuple[str, str, str]]:
        return [(t, c, m.label) for t, tm in self.tables.items() for c, m in tm.maskers.items()]

    def guard_message(self, what: str) -> str:
        cols = ", ".join(str(f) for f in self.unmasked_personal[:20])
        more = f" and {len(self.unmasked_personal) - 20} more" if len(self.unmasked_personal) > 20 else ""
        return (f"{what} refused: {len(self.unmasked_personal)} personal-looking column(s) have no masking rule: "
                f"{cols}{more}; add a rule for each under anonymize.rules in dataops.yaml (`keep` to copy one as is), "
                "or set anonymize.default to null or hash")


def require_salt(cfg: AnonymizeSettings) -> Keyed:
    if cfg.salt is None:
        raise BadInput("anonymize.salt is not set; add `salt: ${DATAOPS_ANON_SALT}` under anonymize: in dataops.yaml "
                       "and export DATAOPS_ANON_SALT=$(openssl rand -hex 32)")
    return Keyed(cfg.salt.get_secret_value())


def plan_masking(settings: Settings, conn: psycopg.Connection, tables: dict[str, TableInfo],
                 copied: set[str] | None = None, sample_content: bool = True, in_place: bool = False) -> MaskingPlan:
    """Check every rule against the database behind `conn` and compile it.

    `copied`: the tables whose rows will be written (default: all); personal columns of
    the others (excluded, truncated) need no rule. `in_place`: the rules will be applied
    by UPDATE (dataops anonymize), which cannot change GENERATED ALWAYS identity columns.
    Reads only: safe on production.
    """
    cfg = settings.anonymize
    keyed = require_salt(cfg)
    copied = set(tables) if copied is None else copied
    rules: dict[str, dict[str, tuple[ColumnRule, str]]] = {}
    for key, cols in cfg.rules.items():
        label = resolve_table(key, tables, f"anonymize.rules.{key}")
        table = tables[label]
        for col, rule in cols.items():
            where = f"anonymize.rules.{key}.{col}"
            column = table.column(col)
            if col in table.generated:
                if rule.kind == "keep":
                    continue
                raise BadInput(f'{where}: column "{col}" is generated (GENERATED ALWAYS AS ... STORED): it is computed '
                               "from other columns, never copied or updated; mask the columns it is computed from and "
                               "drop this rule")
            if column is None:
                names = [c.name for c in table.columns]
                close = difflib.get_close_matches(col, names, n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                raise BadInput(f'{where}: column "{col}" does not exist in table "{table.schema}.'
                               f'{table.name}"{hint}')
            if in_place and column.identity == "a" and rule.kind != "keep":
                raise BadInput(f"{where}: column is GENERATED ALWAYS AS IDENTITY, which an UPDATE cannot change; "
                               "anonymize in place cannot mask it (keep it, or use refresh-staging)")
            rules.setdefault(label, {})[col] = (rule, where)
    pairs = key_pairs(read_foreign_keys(conn), copied, tables)
    propagate(pairs, rules)

    unmasked, defaulted = [], []
    for label in sorted(copied):
        table = tables[label]
        if table.schema.startswith("dataops_"):
            continue  # the tool's own metadata (migration versions and audit), not application data
        ruled = rules.get(label, {})
        open_cols = [c for c in table.columns if c.name not in ruled]
        found = table_reasons(table.name, table.columns, only={c.name for c in open_cols},
                              kept={c for c, (r, _) in ruled.items() if r.kind == "keep"})
        if sample_content:
            rest = [c for c in open_cols if c.name not in found]
            found.update(content_reasons(conn, table, rest))
        for col_name, reason in found.items():
            finding = Finding(label, col_name, reason)
            if cfg.default == "fail":
                unmasked.append(finding)
                continue
            where = f"anonymize.default ({label}.{col_name})"
            rule = default_rule(cfg.default, table.column(col_name), where, reason)
            rules.setdefault(label, {})[col_name] = (rule, where)
            defaulted.append(Finding(label, col_name, f"{reason}; masked by default: {rule.kind}"))

    plan: dict[str, TableMasking] = {}
    compile_args = {"keyed": keyed, "locale": cfg.locale, "pool_size": cfg.pool_size}
    for label, cols in rules.items():
        table = tables[label]
        index = {c.name: i for i, c in enumerate(table.columns)}
        masked = {c for c, (r, _) in cols.items() if r.kind != "keep"}
        tm = TableMasking(table)
        for col_name, (rule, where) in cols.items():
            if rule.kind == "keep":
                tm.kept.append(col_name)
                continue
            tm.maskers[col_name] = compile_rule(rule, table.column(col_name), columns=index, masked=masked,
                                                where=where, **compile_args)
            tm.where[col_name] = where
        if tm.maskers or tm.kept:
            plan[label] = tm
    agree_keys(pairs, plan)
    check_sql_rules(conn, plan)
    check_outputs(conn, plan)
    check_keys(pairs, plan)
    deletes = {resolve_table(k, tables, f"anonymize.delete.{k}"): v for k, v in cfg.delete.items()}
    for label, cond in deletes.items():
        check_condition(conn, tables[label], cond, f"anonymize.delete.{label}")
    return MaskingPlan(keyed, {k: v for k, v in plan.items() if v.maskers}, unmasked, defaulted, deletes)


def propagate(pairs: list[tuple["ForeignKey", str, str]], rules: dict[str, dict[str, tuple[ColumnRule, str]]]) -> None:
    """A masked key masks its references: a column that references a masked column (and has no
    rule of its own) gets the same rule, along chains of keys too, so joins on it still match
    (Greenmask's apply_for_references). A reference with a different rule of its own is
    refused by check_keys, naming both."""
    for _ in range(len(pairs) + 1):
        changed = False
        for fk, cc, pc in pairs:
            parent = rules.get(fk.parent, {}).get(pc)
            if parent is None or parent[0].kind == "keep" or cc in rules.get(fk.child, {}):
                continue
            rule, where = parent
            origin = where.split(" (")[0]
            rules.setdefault(fk.child, {})[cc] = (rule, f"{origin} (applied to {fk.child}.{cc}, which references it "
                                                        f"by foreign key {fk.name})")
            changed = True
        if not changed:
            return


def check_sql_rules(conn: psycopg.Connection, plan: dict[str, "TableMasking"]) -> None:
    """The parts of the rules PostgreSQL evaluates that must work on any row, tried on none:
    every cases condition (EXPLAIN on the table) and every regular expression."""
    for label, tm in plan.items():
        for col, top in tm.maskers.items():
            where = tm.where.get(col, f"anonymize.rules.{label}.{col}")
            for m in walk(top):
                if m.kind == "cases":
                    for i, case in enumerate(m.rule.cases):
                        check_condition(conn, tm.table, case.when, f"{m.where or where}.cases[{i}].when")
                elif m.kind == "regex":
                    r = m.rule.regex
                    try:
                        with conn.transaction():
                            conn.execute(sql.SQL("SELECT regexp_replace('x', {}, {}, {})").format(
                                sql.Literal(r.pattern), sql.Literal(r.replace), sql.Literal(r.flags)))
                    except psycopg.Error as exc:
                        raise BadInput(f"{m.where or where}: the regular expression does not work in PostgreSQL: "
                                       f"{first_line(exc)}; fix the pattern (PostgreSQL's ARE syntax)") from None


def default_rule(default: str, col: Column, where: str, reason: str) -> ColumnRule:
    """The rule anonymize.default (null or hash) gives a personal column without one: null
    where the column allows it and null was asked for, else the keyed hash where the type
    takes one, a date shift for dates, null, or an empty bytea."""
    if default == "null" and not col.not_null:
        return ColumnRule(null=True)
    if col.base in HASHABLE:  # as long as the column takes, up to the usual 16 hex digits
        return ColumnRule(hash={"length": min(16, col.max_length)} if col.max_length else {})
    if col.base in DATE_TYPES:
        return ColumnRule(shift_days=365)
    if not col.not_null:
        return ColumnRule(null=True)
    if col.base == "bytea":
        return ColumnRule(constant="")
    raise BadInput(f"{where}: {reason}; anonymize.default {default} cannot mask a NOT NULL {col.type} column; "
                   "write a rule for it under anonymize.rules")


def check_outputs(conn: psycopg.Connection, plan: dict[str, TableMasking]) -> None:
    """Masked values must be valid for their column, found now rather than in the middle of
    a COPY or an UPDATE: Faker pools are tried whole (a domain's CHECKs may refuse some
    values: the pool keeps the ones they accept), constants as they are, and the other
    rules on a sample of real rows when the column is a domain or a template fills
    varchar(n). Text is valid input for any undomained text column (lengths are checked by
    the rule)."""
    for label, tm in plan.items():
        for col, m in tm.maskers.items():
            c, where = m.column, tm.where.get(col, f"anonymize.rules.{label}.{col}")
            plain_text = c.base in TEXT_TYPES and c.domain is None
            if m.kind == "faker" and not plain_text:
                _fit_pool_to_type(conn, m, where)
            elif m.kind == "constant" and not (plain_text and c.max_length is None):
                bad = invalid_values(conn, [m.constant], c)
                if bad:
                    raise BadInput(f"{where}: the constant {m.constant!r} is not a valid {c.type} ({bad[0][1]}); "
                                   "pick one that fits the column")
                # as the column prints it (0 in a numeric(10,2) is 0.00): the leak scan compares printed values
                m.constant = conn.cursor(row_factory=tuple_row).execute(sql.SQL("SELECT concat(CAST({} AS {}))").format(
                    sql.Literal(m.constant), sql.SQL(c.type))).fetchone()[0]
            elif m.kind == "choice" and not plain_text:
                from dataops.tasks.anonymize.sql_rules import choice_values

                bad = invalid_values(conn, choice_values(m), c)
                if bad:
                    raise BadInput(f"{where}: the choice value {bad[0][0]!r} is not a valid {c.type} ({bad[0][1]}); "
                                   "list values that fit the column")
            if m.by_postgres or m.kind in ("template", "hash", "partial", "shift_days") and (
                    c.domain is not None or (m.kind == "template" and c.max_length)):
                query = sql.SQL("SELECT DISTINCT v FROM (SELECT concat({}) AS v FROM {} AS x LIMIT {}) s "
                                "WHERE v <> ''").format(m.sql(sql.Identifier(col), cast=False), tm.table.qualified,
                                                        sql.Literal(OUTPUT_SAMPLE))
                try:
                    with conn.transaction():
                        values = [r[0] for r in conn.cursor(row_factory=tuple_row).execute(query)]
                except psycopg.Error as exc:
                    raise BadInput(f"{where}: {m.label} fails on the column's values: {first_line(exc)}") from None
                bad = invalid_values(conn, values, c) if not (m.by_postgres and plain_text and not c.max_length) else []
                if bad:
                    raise BadInput(f"{where}: {m.label} gives {bad[0][0]!r} for a row, not a valid {c.type} "
                                   f"({bad[0][1]}); pick a rule that fits the column")


def _fit_pool_to_type(conn: psycopg.Connection, m: Masker, where: str) -> None:
    c = m.column
    values = [uniquify(v, m.keyed.digest(v.encode())) if m.unique else v for v in m.pool]
    bad = invalid_values(conn, values, c)
    if not bad:
        return
    if c.domain is None:  # a Faker provider that does not give this type at all
        raise BadInput(f"{where}: {m.label} gives {bad[0][0]!r}, not a valid {c.type} ({bad[0][1]}); pick a rule "
                       "that fits the column")
    refused = {v for v, _ in bad}
    keep = [p for p, v in zip(m.pool, values) if v not in refused]
    distinct, need = len(set(keep)), min(MIN_DISTINCT, len(set(m.pool)))
    if distinct < need:
        raise BadInput(f"{where}: only {len(keep):,} of {len(values):,} Faker {m.rule.faker} values pass the checks "
                       f"of {c.type} ({distinct} distinct, at least {need} needed; refused: {bad[0][0]!r}: "
                       f"{bad[0][1]}); use a template, hash or another Faker provider")
    m.set_pool(keep, f"values {c.type} accepts")


def invalid_values(conn: psycopg.Connection, values: list[str], column: Column) -> list[tuple[str, str]]:
    """(value, why) for each distinct value that is not valid input for the column's type:
    too long for varchar(n), refused by a domain's CHECK, not parseable."""
    distinct = list(dict.fromkeys(values))
    if not distinct:
        return []
    if conn.info.server_version >= 160000:  # pg_input_is_valid: all at once, no error raised
        rows = conn.cursor(row_factory=tuple_row).execute(
            "SELECT v FROM unnest(%s::text[]) AS v WHERE NOT pg_input_is_valid(v, %s)", (distinct, column.type)
        ).fetchall()
        suspects = [r[0] for r in rows]
    else:
        suspects = distinct
    bad = []
    for v in suspects:  # the reason, by a cast (older servers: the test itself, one value at a time)
        if column.max_length and column.base in TEXT_TYPES and len(v) > column.max_length:
            bad.append((v, f"{len(v)} characters"))  # an explicit cast would cut it, not refuse it
            continue
        try:
            with conn.transaction():
                conn.execute(sql.SQL("SELECT CAST({} AS {})").format(sql.Literal(v), sql.SQL(column.type)))
        except psycopg.Error as exc:
            bad.append((v, first_line(exc)))
    return bad


def key_pairs(fks: list[ForeignKey], copied: set[str],
              tables: dict[str, TableInfo]) -> list[tuple[ForeignKey, str, str]]:
    """(foreign key, child column, parent column) of every key whose rows are written; a key
    declared on a partition counts as its partitioned table's (whose rules mask it)."""
    root = {p: label for label, t in tables.items() for p in t.partitions}
    pairs = []
    for fk in fks:
        fk = ForeignKey(fk.name, root.get(fk.child, fk.child), fk.child_columns, root.get(fk.parent, fk.parent),
                        fk.parent_columns, fk.validated)
        if fk.child in copied:
            pairs += [(fk, cc, pc) for cc, pc in zip(fk.child_columns, fk.parent_columns)]
    return pairs


def _masker(plan: dict[str, TableMasking], label: str, col: str) -> Masker | None:
    tm = plan.get(label)
    return tm.maskers.get(col) if tm else None


def agree_keys(pairs: list[tuple[ForeignKey, str, str]], plan: dict[str, TableMasking]) -> None:
    """Faker rules on the two sides of a foreign key that differ only in what their columns
    force (the unique suffix of a key, the width of varchar(n)) are made to agree: both get
    the suffix and the narrower width, so a value masks alike on both sides."""
    for _ in range(len(pairs) + 1):  # agreeing may ripple along a chain of keys
        changed = False
        for fk, cc, pc in pairs:
            mc, mp = _masker(plan, fk.child, cc), _masker(plan, fk.parent, pc)
            if mc is None or mp is None or mc.kind != "faker" or mp.kind != "faker":
                continue
            if mc.pool_spec[:3] != mp.pool_spec[:3] or mc.signature == mp.signature:
                continue
            for one, other in ((mc, mp), (mp, mc)):
                if other.unique and not one.unique:
                    one.make_unique()
                    changed = True
            rooms = [r for r in (mc.room(), mp.room()) if r is not None]
            if rooms:
                for m in (mc, mp):
                    changed |= m.fit_room(min(rooms))
        if not changed:
            return


def check_keys(pairs: list[tuple[ForeignKey, str, str]], plan: dict[str, TableMasking]) -> None:
    """A masked column on either side of a foreign key needs the same masking on the other
    side, or the written rows point at no row (a NULL child is fine)."""
    for fk, cc, pc in pairs:
        mc, mp = _masker(plan, fk.child, cc), _masker(plan, fk.parent, pc)
        if mc is None and mp is None:
            continue
        link = f"{fk.child}.{cc} references {fk.parent}.{pc} ({fk.name})"
        if mp is None:
            if mc.kind == "null":
                continue
            raise BadInput(f"{plan[fk.child].where[cc]}: {link}, which is not masked: the masked values would point "
                           f"at no row; give {fk.parent}.{pc} the same rule (or use null here)")
        if mc is None:
            raise BadInput(f"{plan[fk.parent].where[pc]}: {link}; give {fk.child}.{cc} the same rule, or its rows "
                           "would point at no row")
        if "cases" in (mc.kind, mp.kind):
            raise BadInput(f"{plan[fk.child].where[cc]}: {link}; a cases rule on a key column decides by other "
                           "columns, so a value could mask differently in the two tables; use one hash or faker rule "
                           "for the key")
        if mc.kind == "template" and (mc.refs or mp.refs):
            raise BadInput(f"{plan[fk.child].where[cc]}: {link}; a template that names other columns gives different "
                           "values in the two tables; use {hash} only, or the same hash or faker rule on both")
        if mc.signature != mp.signature:
            raise BadInput(f"{plan[fk.child].where[cc]}: {link}, masked differently ({mc.label} here, {mp.label} "
                           "there); give both the same rule so the masked values still match")


def check_condition(conn: psycopg.Connection, table: TableInfo, condition: str, where: str) -> None:
    """A SQL condition from the config must parse and name real columns: EXPLAIN it, read-only."""
    try:
        with conn.transaction():
            conn.execute(sql.SQL("EXPLAIN SELECT 1 FROM {} WHERE {}").format(table.qualified, sql.SQL(condition)))
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0]
        raise BadInput(f"{where}: the condition does not work on {table.schema}.{table.name}: {first}") from None
