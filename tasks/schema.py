"""What the user schema of a database looks like, as data that can be compared.

A backup manifest records the fingerprint of the schema it captured; a restore is checked
by computing the fingerprint of the copy. That only works if the description is keyed by
names that survive pg_dump | pg_restore (never OIDs, never the database name) and if
everything that depends on the session (search_path, TimeZone, DateStyle) is pinned while
it is read. The functions take an open connection so that the caller decides the
transaction: inside a REPEATABLE READ transaction that imported pg_dump's snapshot, the
description is of exactly what was dumped. Nothing here writes to the database.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.rows import tuple_row

from dataops.errors import BadInput

# Bump when the shape of a snapshot changes: fingerprints of different formats never match,
# and this lets a verifier say why instead of reporting a spurious difference.
SNAPSHOT_FORMAT = 1

# How catalog text that a server version prints its own way is written into a snapshot. A
# manifest records the version its fingerprint was taken with (absent: 1), and a restored copy
# is fingerprinted the same way, so that old manifests still verify: like is compared with like.
#   1  view definitions as the server prints them. PostgreSQL 16 dropped the column qualifiers
#      of a query over one relation (15: `SELECT customer.email FROM zoo.customer`, 16: `SELECT
#      email FROM ...`), so a 15 database and its copy restored into 16 never matched. A copy
#      on 16 or newer checked against a version-1 fingerprint taken on 15 or older is read with
#      its views as 15 prints them (`source_major`), so those backups restore and verify too.
#   2  view definitions in the form 16 prints: see `neutral_view_definition`. On 16 this
#      is the server's own text, so a version-1 and a version-2 fingerprint of one database
#      taken there are equal; on 15 they differ wherever a view reads one relation.
# Everything else the snapshot reads (constraints, defaults, generated columns, indexes,
# triggers, policies, rules, function bodies) prints the same on 15 and 16: tests/test_pg15.py
# compares each kind on the schema zoo and the cases it adds.
FINGERPRINT_VERSION = 2
FINGERPRINT_VERSIONS = (1, 2)

# Output settings that change how values print (timestamps, floats, bytea, money).
# Pinned while reading, so that two sessions with different defaults agree.
STABLE_OUTPUT = {
    "DateStyle": "ISO, MDY",
    "IntervalStyle": "postgres",
    "TimeZone": "UTC",
    "extra_float_digits": "1",
    "bytea_output": "hex",
    "lc_monetary": "C",
}


@contextlib.contextmanager
def pinned_settings(conn: psycopg.Connection, settings: Mapping[str, str]) -> Iterator[None]:
    """Run a block with session settings changed, and put the caller's values back.

    set_config(..., false) rather than SET LOCAL: it also works in autocommit mode, and
    restoring explicitly leaves the caller's transaction as it found it. If the block
    fails inside a transaction, the values are not restored here: the rollback the caller
    must do anyway reverts them.
    """
    names = list(settings)
    cur = conn.cursor(row_factory=tuple_row)
    saved = [r[0] for r in cur.execute(
        "SELECT current_setting(n) FROM unnest(%s::text[]) WITH ORDINALITY AS u(n, i) ORDER BY i", (names,))]
    cur.execute("SELECT set_config(n, v, false) FROM unnest(%s::text[], %s::text[]) AS u(n, v)",
                (names, [settings[n] for n in names]))
    try:
        yield
    finally:
        if not conn.closed and conn.info.transaction_status != TransactionStatus.INERROR:
            cur.execute("SELECT set_config(n, v, false) FROM unnest(%s::text[], %s::text[]) AS u(n, v)",
                        (names, saved))


# -- reading the catalog -----------------------------------------------------------------

# pg_catalog, pg_toast, pg_temp_N all start with pg_; dataops_* hold this tool's own tables.
_USER_NS = "n.nspname <> 'information_schema' AND n.nspname !~ '^(pg_|dataops_)'"


def _not_extension_member(catalog: str, oid: str) -> str:
    # Objects an extension created come back with CREATE EXTENSION; the extension's entry
    # (name and version) stands for them.
    return (f"NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = '{catalog}'::regclass "
            f"AND d.objid = {oid} AND d.deptype = 'e')")


_REL = f"{_USER_NS} AND {_not_extension_member('pg_class', 'c.oid')}"

_CONSTRAINT_TYPES = {"c": "check", "f": "foreign key", "p": "primary key", "u": "unique",
                     "t": "constraint trigger", "x": "exclusion", "n": "not null"}
_FUNCTION_KINDS = {"f": "function", "p": "procedure", "a": "aggregate", "w": "window function"}
_VOLATILITY = {"i": "immutable", "s": "stable", "v": "volatile"}
_TRIGGER_STATES = {"O": "enabled", "D": "disabled", "R": "replica", "A": "always"}
_IDENTITY = {"a": "always", "d": "by default"}
_POLICY_COMMANDS = {"*": "all", "r": "select", "a": "insert", "w": "update", "d": "delete"}
_GENERATED = {"s": "stored", "v": "virtual"}

_COLLATION = ("CASE WHEN {coll} <> 0 AND {coll} <> {default} THEN "
              "(SELECT CASE WHEN cn.nspname = 'pg_catalog' THEN quote_ident(co.collname) "
              "ELSE quote_ident(cn.nspname) || '.' || quote_ident(co.collname) END "
              "FROM pg_collation co JOIN pg_namespace cn ON cn.oid = co.collnamespace WHERE co.oid = {coll}) END")


def catalog_snapshot(conn: psycopg.Connection, version: int = FINGERPRINT_VERSION, *,
                     source_major: int | None = None) -> dict[str, Any]:
    """The user schema as plain, sorted, JSON-ready data.

    Owners, privileges, comments, statistics and sequence values are left out on
    purpose: they legitimately differ between a database and a restored copy, and a
    fingerprint that flags them would be ignored. `version` (FINGERPRINT_VERSIONS) is the
    form of server-printed text: pass the one a recorded fingerprint was taken with and, for
    version 1, the major version of the server it was taken on (`source_major`): version 1
    is that server's own text.
    """
    check_fingerprint_version(version)
    views = _view_form(version, source_major, conn.info.server_version // 10000)
    with pinned_settings(conn, {**STABLE_OUTPUT, "search_path": ""}):
        # An empty search_path makes format_type, pg_get_expr and pg_get_*def qualify every
        # user object, so the text does not depend on the caller's search_path.
        cur = conn.cursor(row_factory=tuple_row)  # whatever row factory the caller's connection uses

        def q(query: str) -> list[tuple]:
            return cur.execute(query).fetchall()

        return {
            "format": SNAPSHOT_FORMAT,
            "schemas": [r[0] for r in q(f"""
                SELECT n.nspname FROM pg_namespace n
                WHERE {_USER_NS} AND {_not_extension_member('pg_namespace', 'n.oid')} ORDER BY 1""")],
            "extensions": _extensions(q),
            **_tables(q),
            "constraints": _constraints(q),
            "indexes": _indexes(q),
            "sequences": _sequences(q),
            "views": _views(q, views),
            "functions": _functions(q, conn.info.server_version),
            "triggers": _triggers(q),
            "enums": _enums(q),
            "domains": _domains(q),
            # Added in a later version of this snapshot, and only when the database has any: the
            # fingerprint of a database without them is what it was, so older manifests still match.
            **{k: v for k, v in (("types", _types(q)), ("policies", _policies(q)), ("rules", _rules(q))) if v},
        }


def _extensions(q) -> dict:
    rows = q("""SELECT e.extname, e.extversion, n.nspname FROM pg_extension e
                JOIN pg_namespace n ON n.oid = e.extnamespace ORDER BY 1""")
    return {name: {"version": version, "schema": schema} for name, version, schema in rows}


def _tables(q) -> dict:
    tables: dict[str, dict] = {}
    for schema, name, kind, persistence, parents, parent, bound, key, rls, forced in q(f"""
            SELECT n.nspname, c.relname, c.relkind, c.relpersistence,
                   ARRAY(SELECT pn.nspname || '.' || p.relname FROM pg_inherits i
                         JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace pn ON pn.oid = p.relnamespace
                         WHERE i.inhrelid = c.oid ORDER BY i.inhseqno),
                   c.relispartition, pg_get_expr(c.relpartbound, c.oid),
                   CASE WHEN c.relkind = 'p' THEN pg_get_partkeydef(c.oid) END,
                   c.relrowsecurity, c.relforcerowsecurity
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind IN ('r', 'p') AND {_REL} ORDER BY 1, 2"""):
        entry: dict[str, Any] = {"kind": "partitioned table" if kind == "p" else "table",
                                 "unlogged": persistence == "u", "columns": []}
        if parent:
            entry["partition_of"] = parents[0]
            entry["partition_bound"] = bound
        elif parents:
            entry["inherits"] = parents
        if key:
            entry["partition_key"] = key
        if rls:  # only when on, so that the entry of a table without it is what it always was
            entry["row_security"] = "forced" if forced else "enabled"
        tables[f"{schema}.{name}"] = entry

    columns: dict[str, dict] = {}
    collation = _COLLATION.format(coll="a.attcollation", default="t.typcollation")
    for schema, table, name, type_, not_null, default, identity, generated, coll in q(f"""
            SELECT n.nspname, c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                   pg_get_expr(ad.adbin, ad.adrelid), a.attidentity, a.attgenerated, {collation}
            FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
            JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_type t ON t.oid = a.atttypid
            LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
            WHERE c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped AND {_REL}
            ORDER BY 1, 2, a.attnum"""):
        tables[f"{schema}.{table}"]["columns"].append(name)
        columns[f"{schema}.{table}.{name}"] = {
            "type": type_, "not_null": not_null, "default": default,
            "identity": _IDENTITY.get(identity), "generated": _GENERATED.get(generated), "collation": coll,
        }
    return {"tables": tables, "columns": columns}


def _constraints(q) -> dict:
    # pg_get_constraintdef appends NOT VALID; `validated` already says it, and one fact
    # should make one difference.
    return {f"{schema}.{table}.{name}": {"table": f"{schema}.{table}", "type": _CONSTRAINT_TYPES.get(kind, kind),
                                          "definition": definition.removesuffix(" NOT VALID"), "validated": validated,
                                          "deferrable": deferrable, "deferred": deferred}
            for schema, table, name, kind, definition, validated, deferrable, deferred in q(f"""
            SELECT n.nspname, c.relname, co.conname, co.contype, pg_get_constraintdef(co.oid),
                   co.convalidated, co.condeferrable, co.condeferred
            FROM pg_constraint co JOIN pg_class c ON c.oid = co.conrelid
            JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE {_REL} ORDER BY 1, 2, 3""")}


def _indexes(q) -> dict:
    return {f"{schema}.{name}": {"table": f"{tschema}.{table}", "definition": definition,
                                 "valid": valid, "unique": unique}
            for schema, name, tschema, table, definition, valid, unique in q(f"""
            SELECT ins.nspname, ic.relname, n.nspname, c.relname, pg_get_indexdef(i.indexrelid),
                   i.indisvalid, i.indisunique
            FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
            JOIN pg_namespace ins ON ins.oid = ic.relnamespace
            JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind IN ('r', 'p', 'm') AND {_REL} ORDER BY 1, 2""")}


def _sequences(q) -> dict:
    return {f"{schema}.{name}": {"type": type_, "start": start, "increment": increment, "min": min_,
                                 "max": max_, "cache": cache, "cycle": cycle, "owned_by": owned_by}
            for schema, name, type_, start, increment, min_, max_, cache, cycle, owned_by in q(f"""
            SELECT n.nspname, c.relname, format_type(s.seqtypid, NULL), s.seqstart, s.seqincrement,
                   s.seqmin, s.seqmax, s.seqcache, s.seqcycle,
                   (SELECT tn.nspname || '.' || t.relname || '.' || a.attname FROM pg_depend d
                    JOIN pg_class t ON t.oid = d.refobjid JOIN pg_namespace tn ON tn.oid = t.relnamespace
                    JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
                    WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                      AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
                    ORDER BY 1 LIMIT 1)
            FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid
            JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE {_REL} ORDER BY 1, 2""")}


def _view_form(version: int, source_major: int | None, major: int):
    """How to write this server's view text for a fingerprint of `version` taken on `source_major`."""
    if version >= 2:
        return neutral_view_definition
    if source_major is not None and source_major < 16 <= major:
        return view_definition_as_15
    if source_major is not None and major < 16 <= source_major:
        return neutral_view_definition
    return lambda definition: definition


def _views(q, form) -> dict:
    return {f"{schema}.{name}": {"kind": "materialized view" if kind == "m" else "view",
                                 "definition": form(definition)}
            for schema, name, kind, definition in q(f"""
            SELECT n.nspname, c.relname, c.relkind, pg_get_viewdef(c.oid)
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind IN ('v', 'm') AND {_REL} ORDER BY 1, 2""")}


def _functions(q, server_version: int) -> dict:
    # SQL-standard bodies (BEGIN ATOMIC, PostgreSQL 14+) live in prosqlbody, not prosrc.
    body = ("CASE WHEN p.prosqlbody IS NOT NULL THEN pg_get_function_sqlbody(p.oid) ELSE p.prosrc END"
            if server_version >= 140000 else "p.prosrc")
    return {f"{schema}.{name}({args})": {
                "kind": _FUNCTION_KINDS.get(kind, kind), "result": result, "language": language,
                "source_md5": source_md5, "volatility": _VOLATILITY.get(volatility, volatility),
                "strict": strict, "security_definer": secdef, "config": sorted(config or [])}
            for schema, name, args, kind, result, language, source_md5, volatility, strict, secdef, config in q(f"""
            SELECT n.nspname, p.proname, pg_get_function_identity_arguments(p.oid), p.prokind,
                   pg_get_function_result(p.oid), l.lanname, md5({body}), p.provolatile, p.proisstrict,
                   p.prosecdef, p.proconfig
            FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace JOIN pg_language l ON l.oid = p.prolang
            WHERE {_USER_NS} AND {_not_extension_member('pg_proc', 'p.oid')} ORDER BY 1, 2, 3""")}


def _triggers(q) -> dict:
    return {f"{schema}.{table}.{name}": {"table": f"{schema}.{table}", "definition": definition,
                                          "enabled": _TRIGGER_STATES.get(state, state)}
            for schema, table, name, definition, state in q(f"""
            SELECT n.nspname, c.relname, t.tgname, pg_get_triggerdef(t.oid), t.tgenabled
            FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE NOT t.tgisinternal AND {_REL} ORDER BY 1, 2, 3""")}


def _enums(q) -> dict:
    # Labels in sort order, never enumsortorder's values: ALTER TYPE ... ADD VALUE BEFORE
    # leaves fractional sort orders that a restore renumbers.
    return {f"{schema}.{name}": {"labels": list(labels)} for schema, name, labels in q(f"""
            SELECT n.nspname, t.typname, ARRAY(SELECT e.enumlabel FROM pg_enum e
                                               WHERE e.enumtypid = t.oid ORDER BY e.enumsortorder)
            FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
            WHERE t.typtype = 'e' AND {_USER_NS} AND {_not_extension_member('pg_type', 't.oid')}
            ORDER BY 1, 2""")}


def _domains(q) -> dict:
    collation = _COLLATION.format(coll="t.typcollation", default="b.typcollation")
    return {f"{schema}.{name}": {"type": type_, "not_null": not_null, "default": default,
                                 "collation": coll, "constraints": list(checks)}
            for schema, name, type_, not_null, default, coll, checks in q(f"""
            SELECT n.nspname, t.typname, format_type(t.typbasetype, t.typtypmod), t.typnotnull, t.typdefault,
                   {collation},
                   ARRAY(SELECT co.conname || ': ' || pg_get_constraintdef(co.oid) FROM pg_constraint co
                         WHERE co.contypid = t.oid ORDER BY co.conname)
            FROM pg_type t JOIN pg_type b ON b.oid = t.typbasetype JOIN pg_namespace n ON n.oid = t.typnamespace
            WHERE t.typtype = 'd' AND {_USER_NS} AND {_not_extension_member('pg_type', 't.oid')}
            ORDER BY 1, 2""")}


def _types(q) -> dict:
    """Composite and range types (enums and domains have keys of their own)."""
    out: dict[str, dict] = {}
    for schema, name, attributes in q(f"""
            SELECT n.nspname, t.typname,
                   ARRAY(SELECT quote_ident(a.attname) || ' ' || format_type(a.atttypid, a.atttypmod)
                         FROM pg_attribute a WHERE a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped
                         ORDER BY a.attnum)
            FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace JOIN pg_class c ON c.oid = t.typrelid
            WHERE t.typtype = 'c' AND c.relkind = 'c' AND {_USER_NS} AND {_not_extension_member('pg_type', 't.oid')}
            ORDER BY 1, 2"""):
        out[f"{schema}.{name}"] = {"kind": "composite", "attributes": list(attributes)}
    for schema, name, subtype in q(f"""
            SELECT n.nspname, t.typname, format_type(r.rngsubtype, NULL)
            FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace JOIN pg_range r ON r.rngtypid = t.oid
            WHERE t.typtype = 'r' AND {_USER_NS} AND {_not_extension_member('pg_type', 't.oid')}
            ORDER BY 1, 2"""):
        out[f"{schema}.{name}"] = {"kind": "range", "subtype": subtype}
    return out


def _policies(q) -> dict:
    return {f"{schema}.{table}.{name}": {"table": f"{schema}.{table}", "command": _POLICY_COMMANDS.get(command, command),
                                          "permissive": permissive,
                                          "roles": sorted(roles), "using": using, "check": check}
            for schema, table, name, command, permissive, roles, using, check in q(f"""
            SELECT n.nspname, c.relname, p.polname, p.polcmd, p.polpermissive,
                   ARRAY(SELECT CASE WHEN r = 0 THEN 'public' ELSE pg_get_userbyid(r)::text END
                         FROM unnest(p.polroles) r),
                   pg_get_expr(p.polqual, p.polrelid), pg_get_expr(p.polwithcheck, p.polrelid)
            FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE {_REL} ORDER BY 1, 2, 3""")}


def _rules(q) -> dict:
    # A view's own "_RETURN" rule is its definition, already under views.
    return {f"{schema}.{table}.{name}": {"table": f"{schema}.{table}", "definition": definition,
                                          "enabled": _TRIGGER_STATES.get(state, state)}
            for schema, table, name, definition, state in q(f"""
            SELECT n.nspname, c.relname, r.rulename, pg_get_ruledef(r.oid), r.ev_enabled
            FROM pg_rewrite r JOIN pg_class c ON c.oid = r.ev_class JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE r.rulename <> '_RETURN' AND {_REL} ORDER BY 1, 2, 3""")}


# -- view text that does not depend on the server version -------------------------------------

def neutral_view_definition(definition: str) -> str:
    """A view's definition (pg_get_viewdef) as PostgreSQL 16 prints it, whichever server printed it.

    16 leaves out the qualifier of a column where the query reads exactly one relation (one FROM
    item, no join), because the view's range table no longer holds OLD and NEW; 15 writes it
    (`customer.email`). Removing that qualifier is safe exactly there: an unqualified name can
    only mean that one relation. Only the outer query's own clauses are touched, never a
    subquery, a CTE, a set operation's branches or the FROM item, which both versions print
    alike (qualified inside, where an outer column may be meant). Whole-row references
    (`item.*`) keep their name. The text is cut at the locations pglast (PostgreSQL's own
    parser) reports, so the rest is the server's text unchanged; a text that does not parse,
    or a qualifier not where it should be, is returned as it is: a spurious difference is
    better than a missed one.
    """
    from pglast import ast as pg_ast  # here, not at import: every command imports this module

    found = _one_relation_query(definition)
    if found is None:
        return definition
    top, name = found
    cuts = []
    for ref in _own_column_refs(top):
        fields = ref.fields or ()
        if len(fields) == 2 and all(isinstance(f, pg_ast.String) for f in fields) and fields[0].sval == name:
            end = _qualifier_end(definition, ref.location, name)
            if end is None:
                return definition
            cuts.append((ref.location, end))
    for start, end in sorted(set(cuts), reverse=True):
        definition = definition[:start] + definition[end:]
    return definition


def view_definition_as_15(definition: str) -> str:
    """The inverse of neutral_view_definition: a view's definition as PostgreSQL 15 (and older)
    prints it, every column of the outer query over one relation qualified by that relation's
    name, quoted as quote_ident does. Only for comparing with a version-1 fingerprint taken on 15."""
    from pglast import ast as pg_ast

    found = _one_relation_query(definition)
    if found is None:
        return definition
    top, name = found
    qualifier = quote_ident(name) + "."
    starts = sorted({ref.location for ref in _own_column_refs(top)
                     if len(ref.fields or ()) == 1 and isinstance(ref.fields[0], pg_ast.String)}, reverse=True)
    for start in starts:
        definition = definition[:start] + qualifier + definition[start:]
    return definition


def _one_relation_query(definition: str) -> tuple[Any, str] | None:
    """(the outer SELECT, the name its one FROM item goes by) when `definition` is a query over
    one relation, the case 15 and 16 print differently; else None."""
    from pglast import ast as pg_ast
    from pglast import parse_sql
    from pglast.enums import SetOperation

    try:
        (raw,) = parse_sql(definition)
    except Exception:  # pglast's parser errors, or more than one statement
        return None
    top = raw.stmt
    if (not isinstance(top, pg_ast.SelectStmt) or top.op != SetOperation.SETOP_NONE
            or len(top.fromClause or ()) != 1 or isinstance(top.fromClause[0], pg_ast.JoinExpr)):
        return None
    name = _from_item_name(top.fromClause[0])
    return None if name is None else (top, name)


@functools.cache
def _quoted_keywords() -> frozenset[str]:
    from pglast.keywords import COL_NAME_KEYWORDS, RESERVED_KEYWORDS, TYPE_FUNC_NAME_KEYWORDS

    return frozenset(RESERVED_KEYWORDS) | frozenset(TYPE_FUNC_NAME_KEYWORDS) | frozenset(COL_NAME_KEYWORDS)


def quote_ident(name: str) -> str:
    """PostgreSQL's quote_ident: bare when lower-case letters, digits and underscores that are not a
    keyword other than an unreserved one (pglast's keyword lists)."""
    if re.fullmatch(r"[a-z_][a-z0-9_]*", name) and name not in _quoted_keywords():
        return name
    return '"' + name.replace('"', '""') + '"'


def _from_item_name(item: Any) -> str | None:
    """The name a single FROM item is referred to by: its alias, else a table's own name."""
    from pglast import ast as pg_ast

    alias = getattr(item, "alias", None)
    if alias is not None:
        return alias.aliasname
    if isinstance(item, pg_ast.RangeVar):
        return item.relname
    return None


def _own_column_refs(select: Any) -> Iterator[Any]:
    """ColumnRefs in the clauses of `select` itself: not in its FROM item, WITH or subqueries."""
    from pglast import ast as pg_ast

    stack = [getattr(select, field) for field in type(select).__slots__ if field not in ("fromClause", "withClause")]
    while stack:
        node = stack.pop()
        if isinstance(node, (list, tuple)):
            stack.extend(node)
        elif isinstance(node, pg_ast.ColumnRef):
            yield node
        elif isinstance(node, pg_ast.Node) and not isinstance(node, pg_ast.SelectStmt):
            stack.extend(getattr(node, field) for field in type(node).__slots__)


def _qualifier_end(text: str, start: int, name: str) -> int | None:
    """Where `name.` ends when it is printed at `start` (pglast's locations count characters),
    plain or double-quoted as quote_ident writes it; None if it is not there."""
    for printed in (name, '"' + name.replace('"', '""') + '"'):
        if text.startswith(printed + ".", start):
            return start + len(printed) + 1
    return None


# -- fingerprints -------------------------------------------------------------------------

def check_fingerprint_version(version: int) -> None:
    if version not in FINGERPRINT_VERSIONS:
        raise BadInput(f"schema fingerprint version {version} is newer than this dataops knows "
                       f"({', '.join(map(str, FINGERPRINT_VERSIONS))}); upgrade dataops to read it")


def fingerprint(snapshot: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON, so equal schemas give equal strings on any machine."""
    canonical = json.dumps(snapshot, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def schema_fingerprint(conn: psycopg.Connection, version: int = FINGERPRINT_VERSION, *,
                       source_major: int | None = None) -> str:
    return fingerprint(catalog_snapshot(conn, version, source_major=source_major))


# -- differences ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Difference:
    kind: str  # table, column, constraint, index, sequence, view, function, trigger, enum, ...
    object: str  # schema-qualified name, e.g. public.users.email
    change: str  # "missing in <b>", "missing in <a>" or "differs"
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind} {self.object} {self.change}" + (f": {self.detail}" if self.detail else "")


# (snapshot key, kind as shown), in the order a reader wants them: containers first.
_KINDS = [("extensions", "extension"), ("schemas", "schema"),
          ("enums", "enum"), ("domains", "domain"), ("types", "type"), ("tables", "table"), ("columns", "column"),
          ("constraints", "constraint"), ("indexes", "index"), ("triggers", "trigger"), ("policies", "policy"),
          ("rules", "rule"), ("sequences", "sequence"), ("views", "view"), ("functions", "function")]
_TABLE_CHILDREN = {"columns", "constraints", "indexes", "triggers", "policies", "rules"}


def diff_snapshots(a: Mapping[str, Any], b: Mapping[str, Any], a_name: str = "a",
                   b_name: str = "b") -> list[Difference]:
    """Every difference between two snapshots, one line each, containers first.

    The columns, constraints, indexes and triggers of a missing table are not listed one
    by one: "table public.x missing in b" already says it, and fifty more lines would bury
    the other differences.
    """
    if a.get("format") != b.get("format"):
        # Other shapes cannot be compared field by field; this line is the whole answer.
        return [Difference("snapshot", "format", "differs",
                           f"{a.get('format')} ({a_name}) vs {b.get('format')} ({b_name}); "
                           "take both snapshots with the same version of dataops")]
    out: list[Difference] = []
    hidden_a = _children_of_missing_tables(a, b)
    hidden_b = _children_of_missing_tables(b, a)
    for key, kind in _KINDS:
        left, right = _as_map(a.get(key)), _as_map(b.get(key))
        for name in sorted(set(left) | set(right)):
            if name not in right:
                if (key, name) not in hidden_a:
                    out.append(Difference(kind, name, f"missing in {b_name}", _summary(left[name])))
            elif name not in left:
                if (key, name) not in hidden_b:
                    out.append(Difference(kind, name, f"missing in {a_name}", _summary(right[name])))
            else:
                for detail in _field_differences(key, left[name], right[name], a_name, b_name):
                    out.append(Difference(kind, name, "differs", detail))
    return out


def _as_map(value: Any) -> dict:
    if value is None:
        return {}
    if isinstance(value, list):  # schemas
        return {v: {} for v in value}
    return dict(value)


def _children_of_missing_tables(snap: Mapping[str, Any], other: Mapping[str, Any]) -> set[tuple[str, str]]:
    """(kind key, name) of the columns, constraints, indexes and triggers of the tables of
    `snap` that `other` lacks."""
    tables = snap.get("tables", {})
    missing = set(tables) - set(other.get("tables", {}))
    if not missing:
        return set()
    hidden = {("columns", f"{t}.{c}") for t in missing for c in tables[t]["columns"]}
    for key in _TABLE_CHILDREN - {"columns"}:
        hidden |= {(key, name) for name, value in snap.get(key, {}).items() if value.get("table") in missing}
    return hidden


def _summary(value: Any) -> str:
    if not isinstance(value, dict):
        return ""
    if "definition" in value and "kind" not in value:
        return _one_line(value["definition"])
    if "columns" in value and "kind" in value:
        n = len(value["columns"])
        return f"{value['kind']}, {n} column{'s' if n != 1 else ''}"
    if "labels" in value:
        return ", ".join(value["labels"])
    if "permissive" in value:  # a policy
        return (f"{'permissive' if value['permissive'] else 'restrictive'} for {value['command']} to "
                f"{', '.join(value['roles'])}" + (f" using {value['using']}" if value["using"] else "")
                + (f" with check {value['check']}" if value["check"] else ""))
    for field in ("type", "kind"):
        if value.get(field):
            return str(value[field])
    if value.get("version"):
        return f"version {value['version']}"
    return ""


def _field_differences(key: str, left: Any, right: Any, a_name: str, b_name: str) -> list[str]:
    if left == right:
        return []
    if not isinstance(left, dict) or not isinstance(right, dict):
        return [f"{_render(left)} ({a_name}) vs {_render(right)} ({b_name})"]
    details = []
    for field in sorted(set(left) | set(right)):
        va, vb = left.get(field), right.get(field)
        if va == vb:
            continue
        label = field.replace("_", " ")
        if key == "tables" and field == "columns":
            # Missing and extra columns are reported as columns; here only their order counts.
            common = set(va or []) & set(vb or [])
            oa, ob = [c for c in va or [] if c in common], [c for c in vb or [] if c in common]
            if oa != ob:
                details.append(f"column order: {', '.join(oa)} ({a_name}) vs {', '.join(ob)} ({b_name})")
        elif isinstance(va, list) and isinstance(vb, list):
            details.append(_list_difference(label, va, vb, a_name, b_name))
        else:
            details.append(_scalar_difference(label, va, vb, a_name, b_name))
    return details


def _list_difference(label: str, va: list, vb: list, a_name: str, b_name: str) -> str:
    only_a = [x for x in va if x not in vb]
    only_b = [x for x in vb if x not in va]
    parts = []
    if only_a:
        parts.append(f"{', '.join(_quote(x) for x in only_a)} missing in {b_name}")
    if only_b:
        parts.append(f"{', '.join(_quote(x) for x in only_b)} missing in {a_name}")
    if not parts:
        parts.append(f"order {', '.join(map(_quote, va))} ({a_name}) vs {', '.join(map(_quote, vb))} ({b_name})")
    return f"{label}: " + "; ".join(parts)


def _scalar_difference(label: str, va: Any, vb: Any, a_name: str, b_name: str) -> str:
    ra, rb = _render(va), _render(vb)
    if len(ra) > 80 or len(rb) > 80:
        ra, rb = _excerpts(ra, rb)
    return f"{label}: {ra} ({a_name}) vs {rb} ({b_name})"


def _render(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return _one_line(str(value))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _quote(value: Any) -> str:
    return f"'{value}'"


def _excerpts(x: str, y: str, before: int = 30, width: int = 70) -> tuple[str, str]:
    """The two texts cut around their first difference: a view definition is too long
    for one line, and the part that differs is what the reader needs."""
    i = next((k for k, (cx, cy) in enumerate(zip(x, y)) if cx != cy), min(len(x), len(y)))
    start = max(0, i - before)

    def cut(s: str) -> str:
        return ("..." if start else "") + s[start:start + width] + ("..." if start + width < len(s) else "")

    return cut(x), cut(y)
