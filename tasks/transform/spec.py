"""Transform modules: small Python files in `transforms.path` that say what to change.

A transform is written by the team, reviewed like code, and run many times (dry run,
interrupted run, resume, revert), so it is plain data in a module rather than a script:

    \"\"\"Split users.full_name into first_name / last_name.\"\"\"   # first line: the description
    TABLE = "users"                       # or "schema.table"
    KEY = "id"                            # a single unique column; default: the primary key
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


@dataclass(frozen=True)
class TransformSpec:
    name: str
    path: Path
    description: str
    table: str  # schema.table
    where: str
    kind: Literal["sql", "pandas"]
    definition: str  # sha256 of the module's source: a resumed run must apply the same change
    key: str | None = None
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

    @property
    def schema_name(self) -> str:
        return self.table.split(".", 1)[0]

    @property
    def table_name(self) -> str:
        return self.table.split(".", 1)[1]


@dataclass(frozen=True)
class Target:
    """The transform's table as the database describes it."""

    schema: str
    table: str
    key: str
    key_type: str  # format_type(), e.g. bigint
    columns: tuple[str, ...]  # every non-generated column, in table order
    update_triggers: tuple[str, ...]  # user triggers that fire on UPDATE (they may write other columns)

    @property
    def integer_key(self) -> bool:
        return self.key_type in _INTEGER_TYPES

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
    schema, _, tname = table.strip().rpartition(".")
    key = get("KEY")
    if key is not None and (not isinstance(key, str) or not key):
        raise fail("KEY must be one column name (a composite key is not supported)")
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
        name=name, path=path, description=doc[0] if doc else "", table=f"{schema or 'public'}.{tname}",
        where=text("WHERE", "true"), kind=kind, definition=digest, key=key, set=set_, delete=delete,
        change=change, columns=columns, valid_sql=text("VALID"), valid_fn=valid_fn, snapshot=snapshot,
        revert=revert, revert_where=text("REVERT_WHERE", "true"), verify=text("VERIFY"),
    )


# -- against the database ---------------------------------------------------------------------

def bind(conn: psycopg.Connection, spec: TransformSpec) -> Target:
    """Check the transform against the database and describe its table; BadInput names the fix."""
    schema, table = spec.schema_name, spec.table_name
    found = conn.execute("""SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                            WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')""",
                         (schema, table)).fetchone()
    if found is None:
        raise BadInput(f'table "{schema}.{table}" does not exist (TABLE in {spec.path.name})')
    oid = found[0]
    cols = conn.execute("""SELECT attname, format_type(atttypid, atttypmod), attgenerated <> '' FROM pg_attribute
                           WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attnum""", (oid,)).fetchall()
    types = {c: t for c, t, _ in cols}
    plain = tuple(c for c, _, generated in cols if not generated)
    unique_keys = [r[0] for r in conn.execute(
        """SELECT array_agg(a.attname ORDER BY k.ord) FROM pg_index i
           JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, ord) ON true
           JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
           WHERE i.indrelid = %s AND (i.indisprimary OR i.indisunique) AND i.indpred IS NULL AND i.indexprs IS NULL
           GROUP BY i.indexrelid, i.indisprimary ORDER BY i.indisprimary DESC""", (oid,)).fetchall()]
    key = spec.key
    if key is None:
        if not unique_keys or len(unique_keys[0]) != 1:
            raise BadInput(f'table "{schema}.{table}" has no single-column primary key; set KEY in {spec.path.name} '
                           "to a unique, not-null column")
        key = unique_keys[0][0]
    if key not in types:
        raise BadInput(f'column "{key}" does not exist in table "{schema}.{table}" (KEY in {spec.path.name})')
    if [key] not in unique_keys:
        raise BadInput(f'KEY "{key}" of {spec.path.name} is not unique in table "{schema}.{table}"; batches need a '
                       "column with a primary key or unique index")
    for label, names in (("SET", spec.set or ()), ("COLUMNS", spec.columns or ()), ("REVERT", spec.revert or ()),
                         ("SNAPSHOT", spec.snapshot if isinstance(spec.snapshot, tuple) else ())):
        for c in names:
            if c not in types:
                raise BadInput(f'column "{c}" does not exist in table "{schema}.{table}"; run the migration that '
                               f"adds it first ({label} in {spec.path.name})")
            if label in ("SET", "REVERT") and c not in plain:
                raise BadInput(f'column "{c}" of "{schema}.{table}" is generated and cannot be written ({label})')
    if key in (spec.set or {}) or key in (spec.revert or {}):
        raise BadInput(f'{spec.path.name} writes the key column "{key}"; a transform must not change its batch key')
    triggers = tuple(r[0] for r in conn.execute(
        """SELECT tgname FROM pg_trigger WHERE tgrelid = %s AND NOT tgisinternal AND tgenabled <> 'D'
           AND (tgtype & 16) <> 0 AND (tgtype & 1) <> 0 ORDER BY tgname""", (oid,)).fetchall())  # row-level, UPDATE
    return Target(schema, table, key, types[key], plain, triggers)
