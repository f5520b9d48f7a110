"""Transform modules: small Python files in `transforms.path` that say what to change.

A transform is written by the team, reviewed like code, and run many times (dry run,
interrupted run, resume, revert), so it is plain data in a module rather than a script:

    \"\"\"Split users.full_name into first_name / last_name.\"\"\"   # first line: the description
    TABLE = "users"                       # or "schema.table", or '"Odd.Schema"."Mixed Case"' (quoted as in SQL)
    KEY = "id"                            # or ["region", "id"]: unique, NOT NULL columns; default: the primary key
    WHERE = "first_name IS NULL"          # which rows need work (SQL); default: every row
    VALID = "full_name LIKE '% %'"        # optional row check (SQL); other rows are skipped and reported
    SET = {"first_name": "split_part(full_name, ' ', 1)"}      # the change as SQL, column -> expression
    # or, instead of SET:  def change(df): ... return df_of_changed_columns   (pandas)
    # and, pandas only, optionally:  def valid(df): ... return a boolean Series (a row check in Python)
    DELETE = "..."                        # optional (SQL kind): rows matching it are deleted instead
    COLUMNS = ["full_name", "first_name"] # pandas kind: columns change() reads and may return
    SNAPSHOT = ["first_name", "updated_at"]   # or "*": copy these columns of the WHERE rows first
    REVERT = {"first_name": "NULL"}       # optional own revert (SQL, batched); else revert uses the snapshot
    REVERT_WHERE = "first_name IS NOT NULL"
    VERIFY = "SELECT id FROM users WHERE ..."   # after the last batch: must return no rows

Everything is checked here (unknown names are errors: a typo in VALID must not turn the
row check off) and against the database in `bind`, before any batch runs. SQL fragments are
the operator's own code, like a migration; identifiers taken from the module are quoted.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import psycopg
from psycopg import sql

from dataops.errors import BadInput

_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_SETTINGS = ("TABLE", "KEY", "WHERE", "VALID", "SET", "DELETE", "COLUMNS", "SNAPSHOT", "REVERT", "REVERT_WHERE",
             "VERIFY")
_FUNCTIONS = ("change", "valid")
_INTEGER_TYPES = ("smallint", "integer", "bigint")
_FLOAT_TYPES = ("real", "double precision")
# how a key column's values are written as text in the state tables (dataops.tasks.transform.keys)
_UTC_TYPES = ("timestamp with time zone",)
_JSON_TYPES = ("date", "timestamp without time zone", "time without time zone", "time with time zone")


@dataclass(frozen=True)
class TransformSpec:
    name: str
    path: Path
    description: str
    table: str  # schema.table, for people
    where: str
    kind: Literal["sql", "pandas"]
    definition: str  # sha256 of the module's source: a resumed run must apply the same change
    key: tuple[str, ...] | None = None
    set: dict[str, str] | None = None
    delete: str | None = None
    change: Callable | None = None
    columns: tuple[str, ...] | None = None
    valid_sql: str | None = None
    valid_fn: Callable | None = None
    snapshot: tuple[str, ...] | Literal["*"] | None = None
    revert: dict[str, str] | None = None
    revert_where: str = "true"
    verify: str | None = None
    schema_name: str = "public"
    table_name: str = ""


@dataclass(frozen=True)
class Target:
    """The transform's table as the database describes it."""

    schema: str
    table: str
    key: tuple[str, ...]  # the batch key: one column or several, in the order of their index
    key_types: tuple[str, ...]  # format_type() of each, e.g. bigint
    columns: tuple[str, ...]  # every non-generated column, in table order
    update_triggers: tuple[str, ...]  # user triggers that fire on UPDATE (they may write other columns)
    key_codecs: tuple[str, ...] = ()  # per key column: text | json | utc (see keys.encoded)
    partitioned: bool = False  # a partitioned table: batches run through every partition
    # (schema, table) of the table and its partitions that have user triggers of their own: a
    # revert's ALTER TABLE ... DISABLE TRIGGER USER on the parent does not reach a partition's own
    trigger_tables: tuple[tuple[str, str], ...] = ()

    @property
    def integer_key(self) -> bool:
        return len(self.key) == 1 and self.key_types[0] in _INTEGER_TYPES

    @property
    def trigger_switches(self) -> list[sql.Composed]:
        """What ALTER TABLE ... DISABLE/ENABLE TRIGGER USER names to silence every user trigger
        of its rows: the table, and each partition with triggers of its own."""
        if not self.partitioned:
            return [self.qualified]
        return [sql.SQL("{}.{}").format(sql.Identifier(s), sql.Identifier(t)) for s, t in self.trigger_tables]

    @property
    def key_label(self) -> str:
        return ", ".join(self.key)

    @property
    def qualified(self) -> sql.Composed:
        return sql.SQL("{}.{}").format(sql.Identifier(self.schema), sql.Identifier(self.table))

    @property
    def label(self) -> str:
        return f"{self.schema}.{self.table}"


def list_transforms(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise BadInput(f"transforms folder {folder} not found; create it or set transforms.path in dataops.yaml")
    return sorted(p.stem for p in folder.glob("*.py") if _NAME.match(p.stem))


def load_transform(folder: Path, name: str) -> TransformSpec:
    if not _NAME.match(name):
        raise BadInput(f"transform name {name!r} must be a module name: lowercase letters, digits and _")
    path = folder / f"{name}.py"
    if not path.is_file():
        known = ", ".join(list_transforms(folder)) or "none"
        raise BadInput(f"unknown transform {name!r} in {folder} (known: {known})")
    source = path.read_text()
    return _load(str(path), hashlib.sha256(source.encode()).hexdigest())


@lru_cache(maxsize=64)
def _load(path: str, digest: str) -> TransformSpec:
    """Cached by content: worker tasks load the same module once per process."""
    name = Path(path).stem
    module_name = f"dataops_transform_{name}_{digest[:8]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - whatever the module raised, the fix is in the module
        line = f" (line {exc.lineno})" if isinstance(exc, SyntaxError) else ""
        raise BadInput(f"{path}: cannot load the transform: {type(exc).__name__}: {exc}{line}") from None
    sys.modules.pop(module_name, None)
    return _from_module(module, Path(path), name, digest)


def _from_module(module: Any, path: Path, name: str, digest: str) -> TransformSpec:
    def fail(message: str) -> BadInput:
        return BadInput(f"{path}: {message}")

    names = {k for k in vars(module) if k.isupper() and not k.startswith("_")}
    unknown = sorted(names - set(_SETTINGS))
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], _SETTINGS, n=1)
        hint = f"; did you mean {close[0]}?" if close else f"; known: {', '.join(_SETTINGS)}"
        raise fail(f"unknown setting {unknown[0]}{hint}")
    get = lambda k: getattr(module, k, None)  # noqa: E731

    def text(key: str, default: str | None = None) -> str | None:
        v = get(key)
        if v is None:
            return default
        if not isinstance(v, str) or not v.strip():
            raise fail(f"{key} must be a non-empty string of SQL")
        return v.strip().rstrip(";")

    def column_map(key: str) -> dict[str, str] | None:
        v = get(key)
        if v is None:
            return None
        if not isinstance(v, dict) or not v or not all(isinstance(c, str) and isinstance(e, str) and e.strip()
                                                       for c, e in v.items()):
            raise fail(f"{key} must map column names to SQL expressions, e.g. {{\"first_name\": \"...\"}}")
        return {c: e.strip() for c, e in v.items()}

    table = get("TABLE")
    if not isinstance(table, str) or not table.strip():
        raise fail('TABLE is required, e.g. TABLE = "users" or "schema.table"')
    parts = _table_parts(table.strip())
    if parts is None:
        raise fail(f'TABLE {table!r} is not a table name: write "table", "schema.table", or quote names that hold '
                   'dots or quotes as in SQL, e.g. \'"Odd.Schema"."Mixed Case.Table"\'')
    schema, tname = parts
    key = get("KEY")
    if key is not None:
        if isinstance(key, str) and key:
            key = (key,)
        elif (isinstance(key, (list, tuple)) and key and all(isinstance(c, str) and c for c in key)
              and len(set(key)) == len(key)):
            key = tuple(key)
        else:
            raise fail('KEY must be a column name or a list of column names, e.g. KEY = ["region", "id"]')
    change, valid_fn = get("change"), get("valid")
    set_ = column_map("SET")
    if (set_ is None) == (change is None):
        raise fail("give exactly one of SET (the change as SQL) or a change(df) function (pandas)")
    if change is not None and not callable(change):
        raise fail("change must be a function taking a DataFrame")
    kind = "sql" if set_ is not None else "pandas"
    delete = text("DELETE")
    if delete and kind != "sql":
        raise fail("DELETE needs the SQL kind (SET); a pandas change() only updates")
    if valid_fn is not None and (kind != "pandas" or not callable(valid_fn)):
        raise fail("valid(df) is for pandas transforms; an SQL transform uses VALID = \"<SQL condition>\"")
    columns = get("COLUMNS")
    if columns is not None:
        if kind != "pandas":
            raise fail("COLUMNS is for pandas transforms (the columns change() reads and returns)")
        if not isinstance(columns, (list, tuple)) or not columns or not all(isinstance(c, str) for c in columns):
            raise fail("COLUMNS must be a list of column names")
        columns = tuple(dict.fromkeys(columns))
    snapshot = get("SNAPSHOT")
    if snapshot is not None and snapshot != "*":
        if not isinstance(snapshot, (list, tuple)) or not snapshot or not all(isinstance(c, str) for c in snapshot):
            raise fail('SNAPSHOT must be a list of column names, or "*" for every column')
        snapshot = tuple(dict.fromkeys(snapshot))
    if delete and snapshot != "*":
        raise fail('a transform that deletes rows needs SNAPSHOT = "*", so that revert can put them back')
    if isinstance(snapshot, tuple) and set_ is not None:  # pandas: checked on what change() returns
        missing = [c for c in set_ if c not in snapshot]
        if missing:
            raise fail(f"SNAPSHOT does not include {missing[0]}, which the change writes; add it (and any column "
                       "a trigger sets on UPDATE, such as updated_at)")
    revert = column_map("REVERT")
    doc = (module.__doc__ or "").strip().splitlines()
    return TransformSpec(
        name=name, path=path, description=doc[0] if doc else "", table=f"{schema}.{tname}",
        where=text("WHERE", "true"), kind=kind, definition=digest, key=key, set=set_, delete=delete,
        change=change, columns=columns, valid_sql=text("VALID"), valid_fn=valid_fn, snapshot=snapshot,
        revert=revert, revert_where=text("REVERT_WHERE", "true"), verify=text("VERIFY"),
        schema_name=schema, table_name=tname,
    )


def _table_parts(text: str) -> tuple[str, str] | None:
    """(schema, table) from TABLE: `users`, `sales.orders`, or with SQL's double quotes around
    names holding dots or quotes (`"Odd.Schema"."Mixed Case.Table"`, `""` for a quote). Names are
    taken as written, never folded to lower case, as before quotes were understood."""
    if '"' not in text:
        schema, _, name = text.rpartition(".")
        return (schema or "public", name) if name else None
    parts, i = [], 0
    while i < len(text):
        if text[i] == '"':
            m = re.match(r'"((?:[^"]|"")+)"', text[i:])
            if m is None:
                return None
            parts.append(m.group(1).replace('""', '"'))
            i += m.end()
        else:
            end = text.find(".", i)
            end = len(text) if end < 0 else end
            if '"' in text[i:end] or end == i:
                return None
            parts.append(text[i:end])
            i = end
        if i < len(text):
            if text[i] != "." or i == len(text) - 1:
                return None
            i += 1
    if len(parts) == 1:
        return "public", parts[0]
    return (parts[0], parts[1]) if len(parts) == 2 else None


# -- against the database ---------------------------------------------------------------------

def _sql_name(name: str) -> str:
    """An identifier as it is written in SQL: quoted unless it is plain lower case."""
    return name if re.fullmatch(r"[a-z_][a-z0-9_$]*", name) else '"' + name.replace('"', '""') + '"'


def bind(conn: psycopg.Connection, spec: TransformSpec) -> Target:
    """Check the transform against the database and describe its table; BadInput names the fix.
    Reads only: a table the transform cannot work on is refused before anything is written."""
    schema, table = spec.schema_name, spec.table_name
    label = f'"{schema}.{table}"'
    found = conn.execute("""SELECT c.oid, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                            WHERE n.nspname = %s AND c.relname = %s""", (schema, table)).fetchone()
    if found is None:
        raise BadInput(f"table {label} does not exist (TABLE in {spec.path.name})")
    oid, relkind = found
    if relkind not in ("r", "p"):
        what = {"v": "a view", "m": "a materialized view", "f": "a foreign table", "S": "a sequence"}.get(relkind,
                                                                                                       "not a table")
        raise BadInput(f"{label} is {what}; a transform changes the rows of a table (TABLE in {spec.path.name})")
    children = conn.execute("""SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                               WHERE i.inhparent = %s AND NOT c.relispartition""", (oid,)).fetchone()[0]
    if children:
        raise BadInput(f"table {label} has {children} inheritance child table(s), whose rows an UPDATE of it changes "
                       "too and whose keys its primary key does not cover; transform each table of the hierarchy "
                       f"by itself (TABLE in {spec.path.name})")
    cols = conn.execute("""SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attgenerated <> '', a.attnotnull,
                                  format_type(coalesce(nullif(t.typbasetype, 0), a.atttypid), NULL)
                           FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
                           WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum""",
                        (oid,)).fetchall()
    types = {c: t for c, t, *_ in cols}
    base_types = {c: b for c, _, _, _, b in cols}
    not_null = {c for c, _, _, nn, _ in cols if nn}
    plain = tuple(c for c, _, generated, *_ in cols if not generated)
    # unique indexes usable as a key: no predicate, no expression, valid; only their key columns (not INCLUDE)
    unique_keys = [(tuple(r[0]), r[1]) for r in conn.execute(
        """SELECT array_agg(a.attname ORDER BY k.ord), i.indisprimary FROM pg_index i
           JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, ord) ON k.ord <= i.indnkeyatts
           JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
           WHERE i.indrelid = %s AND (i.indisprimary OR i.indisunique) AND i.indpred IS NULL
             AND i.indexprs IS NULL AND i.indisvalid
           GROUP BY i.indexrelid, i.indisprimary
           ORDER BY i.indisprimary DESC, count(*), i.indexrelid::regclass::text""", (oid,)).fetchall()]
    if spec.key is None:
        usable = [k for k, primary in unique_keys if primary or all(c in not_null for c in k)]
        if not usable:
            raise BadInput(f"table {label} has no primary key and no unique index on NOT NULL columns, so a "
                           f"transform cannot walk it in batches; add a primary key (ALTER TABLE {_sql_name(schema)}."
                           f"{_sql_name(table)} ADD PRIMARY KEY (...)), or a unique index on NOT NULL columns and "
                           f"set KEY in {spec.path.name}")
        key = usable[0]
    else:
        for c in spec.key:
            if c not in types:
                raise BadInput(f'column "{c}" does not exist in table {label} (KEY in {spec.path.name})')
        matching = [k for k, _ in unique_keys if set(k) == set(spec.key)]
        if not matching:
            what = "column" if len(spec.key) == 1 else "columns"
            raise BadInput(f'KEY "{", ".join(spec.key)}" of {spec.path.name} is not unique in table {label}; batches '
                           f"need {what} with a primary key or unique index on exactly them")
        key = matching[0]  # in the index's order, so that the keyset walks the index
        nullable = [c for c in key if c not in not_null]
        if nullable:
            raise BadInput(f'KEY column "{nullable[0]}" of table {label} may be NULL, and a row with a NULL key is in '
                           f"no batch; make it NOT NULL, or choose another KEY in {spec.path.name}")
    floats = [c for c in key if base_types[c] in _FLOAT_TYPES]
    if floats:
        raise BadInput(f'key column "{floats[0]}" of table {label} is {types[floats[0]]}, whose values do not '
                       f"round-trip exactly through a checkpoint; set KEY in {spec.path.name} to other unique columns")
    for what, names in (("SET", spec.set or ()), ("COLUMNS", spec.columns or ()), ("REVERT", spec.revert or ()),
                        ("SNAPSHOT", spec.snapshot if isinstance(spec.snapshot, tuple) else ())):
        for c in names:
            if c not in types:
                raise BadInput(f'column "{c}" does not exist in table "{schema}.{table}"; run the migration that '
                               f"adds it first ({what} in {spec.path.name})")
            if what in ("SET", "REVERT") and c not in plain:
                raise BadInput(f'column "{c}" of "{schema}.{table}" is generated and cannot be written ({what})')
    written = [c for c in key if c in (spec.set or {}) or c in (spec.revert or {})]
    if written:
        raise BadInput(f'{spec.path.name} writes the key column "{written[0]}"; a transform must not change its '
                       "batch key")
    # row-level UPDATE triggers of the table, or of any of its partitions
    triggers = tuple(r[0] for r in conn.execute(
        """SELECT DISTINCT tgname FROM pg_trigger
           WHERE (tgrelid = %s OR tgrelid IN (SELECT relid FROM pg_partition_tree(%s::oid::regclass)))
           AND NOT tgisinternal AND tgenabled <> 'D' AND (tgtype & 16) <> 0 AND (tgtype & 1) <> 0
           ORDER BY tgname""", (oid, oid)).fetchall())
    trigger_tables = tuple(tuple(r) for r in conn.execute(
        """SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE (c.oid = %s OR c.oid IN (SELECT relid FROM pg_partition_tree(%s::oid::regclass)))
             AND EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = c.oid AND NOT g.tgisinternal)
           ORDER BY c.oid = %s DESC, 1, 2""", (oid, oid, oid)).fetchall())
    codecs = tuple("utc" if base_types[c] in _UTC_TYPES else "json" if base_types[c] in _JSON_TYPES else "text"
                   for c in key)
    return Target(schema, table, key, tuple(types[c] for c in key), plain, triggers, codecs, relkind == "p",
                  trigger_tables)
