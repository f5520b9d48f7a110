"""Rules proposed for the personal-looking columns that have none: `refresh-staging --check`
prints them as YAML to paste under anonymize.rules in dataops.yaml.

A suggestion, never applied: the guard still refuses the refresh until someone has read the
rules and put them in the config. What a rule should be is a judgement (is this free text a
product description or a nurse's note?); what the tool can do is propose one that works, so
that pasting it gives a passing `--check`, not a second round of errors.

Per kind of personal data (the PII guard's kinds, dataops.tasks.anonymize.pii), in order of
preference, and the first that fits the column wins:
- email: Faker email, `unique: true` when the column is unique (a login stays a login);
- phone: a partial mask keeping the last 2 digits (the shape stays, for UI tests); a unique
  column gets a keyed hash, since partial masks collide;
- person names: Faker first_name / last_name / name by the column's words;
- birth dates: shift_days 365 (ages stay realistic); birth places: Faker city;
- postal address: Faker city / postcode / street_address by the column's words;
- IP addresses: the keyed hash (10.x.y.z for inet), MAC addresses and locations: null;
- national ids, financial data, secrets: the keyed hash (distinct stays distinct, unreadable);
- photos, free text, sensitive data: null.
"Fits" is checked as the guard's own rule check does it: the rule is compiled against the
column (varchar(n) width, NOT NULL, unique, the Faker values that fit), its outputs tried
against domains' CHECKs, and a NOT NULL column falls back to a rule that writes a value. The
two sides of a foreign key get the same rule, so joins still hold. Reads only: it runs in
the check's snapshot of production.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import psycopg
import yaml
from psycopg import sql

from dataops.errors import BadInput, first_line
from dataops.settings import ColumnRule, Settings
from dataops.tasks.anonymize.masking import (
    DATE_TYPES,
    HASHABLE,
    INET_TYPES,
    INT_RANGES,
    TEXT_TYPES,
    Column,
    compile_rule,
)
from dataops.tasks.anonymize.pii import _kind as personal_kind
from dataops.tasks.anonymize.pii import words
from dataops.tasks.anonymize.rules import (
    MaskingPlan,
    TableInfo,
    TableMasking,
    check_outputs,
    key_pairs,
    plan_masking,
    read_foreign_keys,
    resolve_table,
)


@dataclass
class Suggestion:
    table: str  # label
    column: str
    rule: dict | None  # as it goes into dataops.yaml; None: no rule fits, one must be written
    why: str  # the guard's reason, and what shaped the rule

    @property
    def line(self) -> str:
        return f"{self.table}.{self.column}: " + (_flow(self.rule) if self.rule is not None else "(none fits)")


_NUMBERS = {"int2", "int4", "int8", "numeric", "float4", "float8"}
_CONTENT_KINDS = {"values look like emails": "email", "values look like SSNs": "national id",
                  "values look like IP addresses": "IP/MAC address", "values look like phone numbers": "phone"}


def kind_of(table: TableInfo, col: Column, reason: str) -> str:
    """The kind of personal data behind a finding: the name's kind, else the content's, else
    free text (the only finding with neither)."""
    return personal_kind(table.name, col.name, col.base) or _CONTENT_KINDS.get(reason) or "free text"


def _hash(col: Column) -> dict:
    if col.base in TEXT_TYPES and col.max_length:
        return {"hash": {"length": min(16, col.max_length)}}
    return {"hash": {}}


def _nullable_else(col: Column, *fallbacks: dict) -> list[dict]:
    return ([{"null": True}] if not col.not_null else []) + list(fallbacks)


def candidates(kind: str, col: Column) -> list[dict]:
    """Rules to try for a column, best first."""
    w = words(col.name)
    text, unique = col.base in TEXT_TYPES, col.unique
    hashable = [_hash(col)] if col.base in HASHABLE and not (unique and (col.base in INT_RANGES or col.base in INET_TYPES)) else []
    if kind == "email" and text:
        return [{"faker": "email", "unique": True} if unique else {"faker": "email"}, *hashable]
    if kind == "phone":
        return ([] if unique or not text else [{"partial": {"keep_last": 2}}]) + hashable + _nullable_else(col)
    if kind == "person name" and text:
        provider = ("first_name" if re.search(r"(?:^|_)(?:first|given|fore|christian|f)(?:_|$)", w) else
                    "last_name" if re.search(r"(?:^|_)(?:last|family|sur|maiden|l)(?:_|$)|surname", w) else "name")
        return [{"faker": provider, "unique": True} if unique else {"faker": provider}, *hashable]
    if kind == "birth date":
        return [{"shift_days": 365}] if col.base in DATE_TYPES else _nullable_else(col, *hashable)
    if kind == "birth place" and text:
        return [*_nullable_else(col), {"faker": "city"}] if unique else [{"faker": "city"}, *hashable]
    if kind == "postal address" and text:
        provider = ("postcode" if re.search(r"zip|post|postal", w) else
                    "city" if re.search(r"(?:^|_)(?:city|town)(?:_|$)|city$|town$", w) else "street_address")
        return [{"faker": provider, "unique": True} if unique else {"faker": provider}, *hashable]
    if kind == "user agent" and text and not unique:
        return [{"faker": "user_agent"}, *hashable]
    if kind in ("IP/MAC address", "inet", "cidr") and col.base in INET_TYPES | TEXT_TYPES:
        return hashable + _nullable_else(col)
    if kind in ("national id", "financial", "secret"):
        return hashable + _nullable_else(col)
    # photos, free text, locations, MAC addresses, sensitive data: nothing of them is needed in staging
    zero = [{"constant": 0}] if col.base in _NUMBERS and not unique else []
    return _nullable_else(col, *zero, *hashable)


def _fits(conn: psycopg.Connection, plan: MaskingPlan, table: TableInfo, col: Column, rule: dict,
          settings: Settings) -> bool:
    """The rule compiles against the column and its outputs are valid for its type (the rule
    check's own functions); read-only."""
    cfg = settings.anonymize
    try:
        where = f"anonymize.rules.{table.label}.{col.name}"
        m = compile_rule(ColumnRule.model_validate(rule), col, keyed=plan.keyed, locale=cfg.locale,
                         pool_size=cfg.pool_size, columns={c.name: i for i, c in enumerate(table.columns)},
                         masked={col.name}, where=where)
        check_outputs(conn, {table.label: TableMasking(table, {col.name: m}, where={col.name: where})})
    except BadInput:
        return False
    return True


def _printed(conn: psycopg.Connection, value, col: Column) -> str:
    """A constant as the column's type prints it (0 in numeric(10,2) is 0.00): the check after
    the copy compares the written text with the constant."""
    return conn.execute(sql.SQL("SELECT CAST({} AS {})::text").format(sql.Literal(str(value)), sql.SQL(col.type))
                        ).fetchone()[0]


def _last_resort(col: Column) -> dict | None:
    """A rule that writes a value valid for any column of these types, or None."""
    if not col.not_null:
        return {"null": True}
    if col.base in DATE_TYPES:
        return {"shift_days": 365}
    if col.base == "bytea":
        return {"constant": ""}
    if col.base in _NUMBERS and not col.unique:  # a salary, a score: zero says nothing
        return {"constant": 0}
    if col.base == "bool" and not col.unique:
        return {"constant": False}
    return None


def suggest_rules(settings: Settings, conn: psycopg.Connection, plan: MaskingPlan, tables: dict[str, TableInfo],
                  copied: set[str] | None = None) -> list[Suggestion]:
    """A rule for each column the guard found without one (plan.unmasked_personal), fitted to
    the column; the other side of a foreign key with a suggested rule gets the same rule."""
    found: dict[tuple[str, str], Suggestion] = {}
    for f in plan.unmasked_personal:
        table = tables[f.table]
        col = table.column(f.column)
        kind = kind_of(table, col, f.reason)
        tries = [*candidates(kind, col), _last_resort(col)]
        rule = next((r for r in tries if r is not None and _fits(conn, plan, table, col, r, settings)), None)
        if rule is not None and "constant" in rule and col.base in _NUMBERS:
            rule = {"constant": _printed(conn, rule["constant"], col)}
        shape = col.type + (" NOT NULL" if col.not_null else "") + (", unique" if col.unique else "")
        found[(f.table, f.column)] = Suggestion(f.table, f.column, rule, f"{shape}: {f.reason}")
    _same_on_both_sides(settings, conn, found, tables, copied)
    return sorted(found.values(), key=lambda s: (s.table, [c.name for c in tables[s.table].columns].index(s.column)))


def _configured(settings: Settings, tables: dict[str, TableInfo]) -> dict[tuple[str, str], ColumnRule]:
    out = {}
    for key, cols in settings.anonymize.rules.items():
        try:
            label = resolve_table(key, tables, f"anonymize.rules.{key}")
        except BadInput:
            continue
        out.update({(label, c): r for c, r in cols.items()})
    return out


def _same_on_both_sides(settings: Settings, conn: psycopg.Connection, found: dict[tuple[str, str], Suggestion],
                        tables: dict[str, TableInfo], copied: set[str] | None) -> None:
    """A masked key must be masked alike where it is referenced (and where it references):
    the parent's rule wins; an unruled, unflagged other side is added with that rule."""
    configured = _configured(settings, tables)
    pairs = key_pairs(read_foreign_keys(conn), set(tables) if copied is None else copied, tables)
    for _ in range(len(pairs) + 1):  # a chain of keys passes the rule along
        changed = False
        for fk, cc, pc in pairs:
            child, parent = (fk.child, cc), (fk.parent, pc)
            if child not in found and parent not in found:
                continue
            if parent in configured:
                rule = configured[parent].model_dump(exclude_defaults=True)
                source = f"as {fk.parent}.{pc} in dataops.yaml"
            elif parent in found:
                rule, source = found[parent].rule, f"as {fk.parent}.{pc}"
            elif child in configured:
                continue  # the rule check names that one
            else:
                rule, source = found[child].rule, f"as {fk.child}.{cc}"
            if rule is None:
                continue
            for side, other in ((child, parent), (parent, child)):
                if side in configured or (side in found and found[side].rule == rule):
                    continue
                if side == child and rule.get("null"):
                    continue
                why = found[side].why + "; " if side in found else ""
                found[side] = Suggestion(*side, dict(rule), f"{why}masked {source} ({fk.name}), so joins hold")
                changed = True
        if not changed:
            return


# -- YAML ------------------------------------------------------------------------------------

_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_YAML_WORDS = {"null", "true", "false", "yes", "no", "on", "off", "y", "n", "~"}


def _scalar(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    s = str(v)
    if _PLAIN.fullmatch(s) and s.lower() not in _YAML_WORDS:
        return s
    return yaml.safe_dump(s, default_style='"').strip().removesuffix("\n...").strip()


def _flow(rule: dict) -> str:
    if rule == {"null": True}:
        return "null"
    return "{" + ", ".join(f"{k}: {_flow(v) if isinstance(v, dict) else _scalar(v)}" for k, v in rule.items()) + "}"


def table_key(table: TableInfo) -> str:
    """The config key of a table: its label, or SQL-quoted parts when its names hold dots or
    quotes (resolve_table reads both)."""
    if "." in table.name or '"' in table.name or "." in table.schema or '"' in table.schema:
        q = lambda s: '"' + s.replace('"', '""') + '"'  # noqa: E731
        return f"{q(table.schema)}.{q(table.name)}"
    return table.label


def to_yaml(suggestions: list[Suggestion], tables: dict[str, TableInfo], settings: Settings) -> str:
    """The suggestions as YAML for anonymize.rules (tables at the top level), each rule with
    its reason as a comment; tables that already have rules in dataops.yaml are marked, since
    a second key of the same name would replace them."""
    if not suggestions:
        return ""
    have = {label for label, _ in _configured(settings, tables)}
    lines = []
    for label in dict.fromkeys(s.table for s in suggestions):
        key = table_key(tables[label])
        note = "  # already in anonymize.rules: add these columns to it" if label in have else ""
        lines.append(f"{_scalar(key)}:{note}")
        for s in (s for s in suggestions if s.table == label):
            reason = s.why.replace("\n", " ")
            if s.rule is None:
                lines.append(f"  # {_scalar(s.column)}: no rule fits this NOT NULL column ({reason}); write one")
            else:
                lines.append(f"  {_scalar(s.column)}: {_flow(s.rule)}  # {reason}")
    return "\n".join(lines) + "\n"


def check_suggestions(settings: Settings, conn: psycopg.Connection, suggestions: list[Suggestion],
                      tables: dict[str, TableInfo], copied: set[str] | None = None) -> str | None:
    """The rule check run with the suggestions added to the config: None when it passes, else
    its one line (a suggestion is only worth pasting if it passes)."""
    rules = {k: dict(v) for k, v in settings.anonymize.rules.items()}
    keys = {label: key for key in rules for label in [_label_or_none(key, tables)] if label}
    for s in suggestions:
        if s.rule is None:
            return f"no rule fits {s.table}.{s.column}; write one"
        key = keys.setdefault(s.table, table_key(tables[s.table]))
        rules.setdefault(key, {})[s.column] = ColumnRule.model_validate(s.rule)
    trial = settings.model_copy(update={"anonymize": settings.anonymize.model_copy(update={"rules": rules})})
    try:
        plan = plan_masking(trial, conn, tables, copied, sample_content=False)
    except BadInput as exc:
        return exc.message
    except psycopg.Error as exc:  # pragma: no cover - the plan already ran once on this snapshot
        return first_line(exc)
    left = plan.unmasked_personal
    return f"still without a rule: {', '.join(str(f) for f in left)}" if left else None


def _label_or_none(key: str, tables: dict[str, TableInfo]) -> str | None:
    try:
        return resolve_table(key, tables, "anonymize.rules")
    except BadInput:
        return None


def propose_rules(settings: Settings, conn: psycopg.Connection, plan: MaskingPlan, tables: dict[str, TableInfo],
                  copied: set[str] | None = None) -> tuple[str, str | None]:
    """(YAML of the suggested rules, None or why they would not pass the rule check yet)."""
    suggestions = suggest_rules(settings, conn, plan, tables, copied)
    return to_yaml(suggestions, tables, settings), check_suggestions(settings, conn, suggestions, tables, copied)
