"""From `anonymize:` in dataops.yaml to checked, compiled masking for one database.

Everything that can make a masking run fail is found here, before a single row moves:
unknown tables and columns, unknown Faker providers, rules that cannot fit their column
(null on NOT NULL, a constant on a unique column, Faker values longer than varchar(n)),
and personal-looking columns nobody wrote a rule for. The last is the PII guard: a new
column `users.passport_no` must stop the nightly refresh, not reach staging unmasked.

Detection is by column name (a list of words that mark personal data), by type (inet,
macaddr) and by content (a sample of values that look like emails, phone numbers or IP
addresses), so `notes.contact` full of emails is caught even though its name is harmless.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from dataops.errors import BadInput
from dataops.settings import AnonymizeSettings, ColumnRule, Settings
from dataops.tasks.anonymize.masking import TEXT_TYPES, Column, Keyed, Masker, compile_rule

# Schemas never read or copied: the tool's table snapshots hold raw copies of production rows.
SKIPPED_SCHEMAS = ("pg_catalog", "information_schema", "dataops_snapshots")


@dataclass(frozen=True)
class TableInfo:
    schema: str
    name: str
    relkind: str  # r ordinary, p partitioned
    columns: tuple[Column, ...]  # stored columns in attnum order (generated ones left out: COPY skips them)
    pages: int
    est_rows: int

    @property
    def label(self) -> str:
        return label_of(self.schema, self.name)

    @property
    def qualified(self) -> sql.Composed:
        return sql.SQL("{}.{}").format(sql.Identifier(self.schema), sql.Identifier(self.name))

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
    """User tables with their copyable columns, keyed by label ('users', 'audit.events')."""
    cur = conn.cursor(row_factory=tuple_row)
    rows = cur.execute(
        """
        SELECT n.nspname, c.relname, c.relkind, c.relpages, c.reltuples::bigint,
               a.attname, format_type(a.atttypid, a.atttypmod), bt.typname, a.attnotnull,
               CASE WHEN bt.typname IN ('varchar', 'bpchar') AND coalesce(nullif(t.typtypmod, -1), a.atttypmod) > 4
                    THEN coalesce(nullif(t.typtypmod, -1), a.atttypmod) - 4 END,
               EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisunique
                       AND (a.attnum = ANY (i.indkey) OR EXISTS (
                            SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                            AND d.objid = i.indexrelid AND d.refobjid = c.oid AND d.refobjsubid = a.attnum)))
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
        JOIN pg_type t ON t.oid = a.atttypid
        JOIN pg_type bt ON bt.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
        WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
          AND n.nspname <> ALL (%s) AND n.nspname NOT LIKE 'pg\\_%%'
          AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                          AND d.deptype = 'e')
        ORDER BY n.nspname, c.relname, a.attnum
        """, (list(SKIPPED_SCHEMAS),)).fetchall()
    tables: dict[str, dict] = {}
    for schema, name, kind, pages, est, col, typ, base, not_null, max_len, unique in rows:
        t = tables.setdefault(label_of(schema, name), {"schema": schema, "name": name, "relkind": kind,
                                                        "pages": max(pages, 0), "est_rows": max(est, 0), "columns": []})
        t["columns"].append(Column(col, typ, base, not_null, unique, max_len))
    return {label: TableInfo(**{**t, "columns": tuple(t["columns"])}) for label, t in tables.items()}


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


def resolve_table(key: str, tables: dict[str, TableInfo], where: str) -> str:
    """A table named in the config ('users', 'public.users', 'audit.events') to its label."""
    schema, table = split_label(key.strip())
    label = label_of(schema, table)
    if label not in tables:
        close = difflib.get_close_matches(label, list(tables), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise BadInput(f'{where}: table "{schema}.{table}" does not exist{hint}')
    return label


# -- what looks personal ----------------------------------------------------------------------

_NAME_HINTS: list[tuple[re.Pattern, str]] = [(re.compile(p), why) for p, why in (
    (r"(^|_)ip($|_)|ip_?addr|remote_addr|client_ip|mac_?addr", "IP/MAC address"),
    (r"e_?mail", "email"),
    (r"(^|_)(first|last|full|given|family|middle|maiden|display|legal|real|user|nick|sur|fore|contact|customer)_?names?($|_)"
     r"|^(surname|forename|username|nickname)$", "person name"),
    (r"phone|mobile|(^|_)tel($|_)|telephone|(^|_)fax($|_)|msisdn", "phone"),
    (r"address|street|(^|_)city($|_)|(^|_)zip(_?code)?($|_)|postal|postcode", "address"),
    (r"birth|(^|_)dob($|_)", "birth date"),
    (r"(^|_)ssn($|_)|social_security|national_id|passport|tax_?id|driver_?licen[cs]e|id_?number|(^|_)nin($|_)",
     "national id"),
    (r"password|passwd|(^|_)pwd($|_)|secret|token|api_?key|access_?key|private_?key|credential|(^|_)otp($|_)",
     "secret"),
    (r"iban|account_?(number|no)($|_)|card_?(number|no)($|_)|credit_?card|(^|_)cvv($|_)", "financial"),
    (r"latitude|longitude|(^|_)geo_?(location|point)?($|_)|(^|_)(lat|lng|lon)($|_)", "location"),
    (r"user_?agent", "user agent"),
    (r"gender|ethnic|religio|medical|diagnos|health|salary", "sensitive"),
)]
# A bare `name` is personal in tables about people, not in `products` or `feature_flags`.
_PEOPLE_TABLES = re.compile(r"user|customer|person|people|member|employee|contact|patient|author|account|profile"
                            r"|client|student|staff|subscriber|applicant|candidate")
_PERSONAL_TYPES = {"inet": "IP address", "cidr": "IP address", "macaddr": "MAC address", "macaddr8": "MAC address"}
_CONTENT_HINTS = [
    (re.compile(r"^[^@\s]+@[^@\s]+\.[A-Za-z]{2,}$"), "values look like emails"),
    (re.compile(r"^\d{3}-\d{2}-\d{4}$"), "values look like SSNs"),
    (re.compile(r"^\d{1,3}(\.\d{1,3}){3}$"), "values look like IP addresses"),
    (re.compile(r"^(?=(?:\D*\d){7,15}\D*$)\+?[\d\s().-]{7,}(\s*(x|ext\.?)\s*\d+)?$"), "values look like phone numbers"),
]
CONTENT_SAMPLE = 200


_TEXTUAL = TEXT_TYPES | {"json", "jsonb", "bytea", "xml"}
_NUMERIC = {"int2", "int4", "int8", "numeric"}
# Which types can hold what a name suggests: `email_verified boolean` holds no email.
_CAN_HOLD = {"email": _TEXTUAL, "person name": _TEXTUAL, "address": _TEXTUAL, "user agent": _TEXTUAL,
             "secret": _TEXTUAL, "phone": _TEXTUAL | _NUMERIC, "national id": _TEXTUAL | _NUMERIC,
             "financial": _TEXTUAL | _NUMERIC, "birth date": _TEXTUAL | {"date", "timestamp", "timestamptz"},
             "IP/MAC address": _TEXTUAL | {"inet", "cidr", "macaddr", "macaddr8"},
             "location": _TEXTUAL | _NUMERIC | {"float4", "float8", "point", "geometry", "geography"}}


def name_reason(table: str, column: str, base_type: str) -> str | None:
    """Why a column looks personal from its name or type alone, or None."""
    lowered = column.lower()
    for pattern, why in _NAME_HINTS:
        if pattern.search(lowered) and base_type in _CAN_HOLD.get(why, {base_type}):
            return f"name suggests {why}"
    if lowered == "name" and _PEOPLE_TABLES.search(table.lower()) and base_type in _TEXTUAL:
        return "name suggests person name"
    if base_type in _PERSONAL_TYPES:
        return f"type {base_type} holds {_PERSONAL_TYPES[base_type]}es"
    return None


def content_reasons(conn: psycopg.Connection, table: TableInfo, columns: list[Column]) -> dict[str, str]:
    """Columns of `table` whose sampled values mostly look personal (emails, phones, IPs, SSNs)."""
    text_cols = [c for c in columns if c.base in TEXT_TYPES]
    if not text_cols:
        return {}
    query = sql.SQL("SELECT {} FROM {} LIMIT {}").format(
        sql.SQL(", ").join(sql.Identifier(c.name) for c in text_cols), table.qualified, sql.Literal(CONTENT_SAMPLE))
    rows = conn.cursor(row_factory=tuple_row).execute(query).fetchall()
    found = {}
    for i, col in enumerate(text_cols):
        values = [r[i].strip() for r in rows if r[i] is not None and r[i].strip()]
        if len(values) < 5:
            continue
        for pattern, why in _CONTENT_HINTS:
            if sum(1 for v in values if pattern.match(v)) * 2 >= len(values):
                found[col.name] = why
                break
    return found


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
                 copied: set[str] | None = None, sample_content: bool = True) -> MaskingPlan:
    """Check every rule against the database behind `conn` and compile it.

    `copied`: the tables whose rows will be written (default: all); personal columns of
    the others (excluded, truncated) need no rule. Reads only: safe on production.
    """
    cfg = settings.anonymize
    keyed = require_salt(cfg)
    copied = set(tables) if copied is None else copied
    rules: dict[str, dict[str, tuple[ColumnRule, str]]] = {}
    for key, cols in cfg.rules.items():
        label = resolve_table(key, tables, f"anonymize.rules.{key}")
        for col, rule in cols.items():
            where = f"anonymize.rules.{key}.{col}"
            if tables[label].column(col) is None:
                names = [c.name for c in tables[label].columns]
                close = difflib.get_close_matches(col, names, n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                raise BadInput(f'{where}: column "{col}" does not exist in table "{tables[label].schema}.'
                               f'{tables[label].name}"{hint}')
            rules.setdefault(label, {})[col] = (rule, where)

    unmasked, defaulted = [], []
    for label in sorted(copied):
        table = tables[label]
        if table.schema.startswith("dataops_"):
            continue  # the tool's own metadata (migration versions and audit), not application data
        ruled = rules.get(label, {})
        open_cols = [c for c in table.columns if c.name not in ruled]
        found = {c.name: r for c in open_cols if (r := name_reason(table.name, c.name, c.base))}
        if sample_content:
            rest = [c for c in open_cols if c.name not in found]
            found.update(content_reasons(conn, table, rest))
        for col_name, reason in found.items():
            finding = Finding(label, col_name, reason)
            col = table.column(col_name)
            if cfg.default == "fail":
                unmasked.append(finding)
                continue
            rule = ColumnRule(null=True) if cfg.default == "null" and not col.not_null else ColumnRule(hash={})
            rules.setdefault(label, {})[col_name] = (rule, f"anonymize.default ({label}.{col_name})")
            defaulted.append(Finding(label, col_name, f"{reason}; masked by default: {rule.kind}"))

    plan: dict[str, TableMasking] = {}
    for label, cols in rules.items():
        table = tables[label]
        index = {c.name: i for i, c in enumerate(table.columns)}
        masked = {c for c, (r, _) in cols.items() if r.kind != "keep"}
        tm = TableMasking(table)
        for col_name, (rule, where) in cols.items():
            if rule.kind == "keep":
                tm.kept.append(col_name)
                continue
            tm.maskers[col_name] = compile_rule(rule, table.column(col_name), keyed=keyed, locale=cfg.locale,
                                                pool_size=cfg.pool_size, columns=index, masked=masked, where=where)
        if tm.maskers or tm.kept:
            plan[label] = tm
    check_casts(conn, plan)
    deletes = {resolve_table(k, tables, f"anonymize.delete.{k}"): v for k, v in cfg.delete.items()}
    for label, cond in deletes.items():
        check_condition(conn, tables[label], cond, f"anonymize.delete.{label}")
    return MaskingPlan(keyed, {k: v for k, v in plan.items() if v.maskers}, unmasked, defaulted, deletes)


def check_casts(conn: psycopg.Connection, plan: dict[str, TableMasking]) -> None:
    """Faker values and constants must be valid input for their column's type: try a sample
    now rather than fail in the middle of a COPY."""
    cur = conn.cursor(row_factory=tuple_row)
    for label, tm in plan.items():
        for col, m in tm.maskers.items():
            if m.column.base in TEXT_TYPES:  # any text is valid input (lengths are checked by the rule)
                continue
            samples = m.pool[:20] if m.pool else ([m.constant] if m.constant is not None else [])
            if not samples:
                continue
            for value in samples:
                try:
                    with conn.transaction():
                        cur.execute(sql.SQL("SELECT CAST({} AS {})").format(sql.Literal(value), sql.SQL(m.column.type)))
                except psycopg.Error as exc:
                    first = str(exc).strip().splitlines()[0]
                    raise BadInput(f"anonymize.rules.{label}.{col}: {m.label} gives {value!r}, not a valid "
                                   f"{m.column.type} ({first}); pick a rule that fits the column") from None


def check_condition(conn: psycopg.Connection, table: TableInfo, condition: str, where: str) -> None:
    """A SQL condition from the config must parse and name real columns: EXPLAIN it, read-only."""
    try:
        with conn.transaction():
            conn.execute(sql.SQL("EXPLAIN SELECT 1 FROM {} WHERE {}").format(table.qualified, sql.SQL(condition)))
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0]
        raise BadInput(f"{where}: the condition does not work on {table.schema}.{table.name}: {first}") from None
