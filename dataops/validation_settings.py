"""The `validation:` section of dataops.yaml: checks the schema does not declare.

    validation:
      not_null: [users.email]                      # NOT NULL by intent, not (yet) by constraint
      foreign_keys: ["user_emails.user_id -> users.id", "app.events(user_id) -> users(id)"]
      unique: ["user_emails(user_id, email)"]
      row_counts: {users: {min: 1, max: 10000000}}
      custom:
        - name: no future orders
          sql: "SELECT id FROM orders WHERE created_at > now() + interval '1 day'"   # must return no rows
        - name: one site_name setting
          sql: "SELECT count(*) FROM settings WHERE key = 'site_name'"
          expect: {value: 1}                         # must return this single value
      checksum_exclude: {users: [email, phone]}      # left out when comparing with --against
      statement_timeout_s: 60

Only the syntax is checked here (a malformed entry is a config error naming its key);
whether the tables and columns exist is checked against the database when the checks run.
Names are matched exactly as written; `table` means `public.table`; a name with dots or
capitals is written in double quotes (`"Odd.Name"`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

_IDENT = r'(?:"(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)'
_PART = re.compile(rf"\s*({_IDENT})\s*")
BUILTIN_KINDS = ("foreign_keys", "unique_keys", "sequences", "invalid_indexes", "not_valid_constraints")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class TableRef:
    schema: str
    table: str

    @property
    def label(self) -> str:
        return self.table if self.schema == "public" else f"{self.schema}.{self.table}"

    def __str__(self) -> str:
        return f"{self.schema}.{self.table}"


@dataclass(frozen=True)
class ColumnsRef:
    table: TableRef
    columns: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.table.label}({', '.join(self.columns)})"


def _unquote(part: str) -> str:
    return part[1:-1].replace('""', '"') if part.startswith('"') else part


def _dotted(text: str) -> list[str] | None:
    """'a.b."C"' -> ['a', 'b', 'C']; None if it is not a dotted name."""
    parts, pos = [], 0
    while True:
        m = _PART.match(text, pos)
        if not m:
            return None
        parts.append(_unquote(m.group(1)))
        pos = m.end()
        if pos == len(text):
            return parts
        if text[pos] != ".":
            return None
        pos += 1


def parse_table(text: str) -> TableRef:
    parts = _dotted(text)
    if not parts or len(parts) > 2:
        raise ValueError(f"{text!r} is not a table name; write table or schema.table")
    return TableRef(*(parts if len(parts) == 2 else ["public", parts[0]]))


def parse_column(text: str) -> ColumnsRef:
    """'users.email' or 'app.users.email'."""
    parts = _dotted(text)
    if not parts or len(parts) not in (2, 3):
        raise ValueError(f"{text!r} is not a column; write table.column or schema.table.column")
    table = TableRef(*(parts[:2] if len(parts) == 3 else ["public", parts[0]]))
    return ColumnsRef(table, (parts[-1],))


def parse_columns(text: str, *, allow_dotted: bool = True) -> ColumnsRef:
    """'table(a, b)', 'schema.table(a)' or (if allow_dotted) 'table.a'."""
    text = text.strip()
    m = re.fullmatch(r"(.+?)\((.*)\)", text, flags=re.S)
    if not m:
        if allow_dotted:
            try:
                return parse_column(text)
            except ValueError:
                pass
        raise ValueError(f"{text!r} is not a column list; write table(column, ...) or schema.table(column, ...)")
    table = parse_table(m.group(1))
    cols = []
    for raw in m.group(2).split(","):
        parts = _dotted(raw)
        if not parts or len(parts) != 1:
            raise ValueError(f"{text!r}: {raw.strip()!r} is not a column name")
        cols.append(parts[0])
    if len(set(cols)) != len(cols):
        raise ValueError(f"{text!r} names a column twice")
    return ColumnsRef(table, tuple(cols))


@dataclass(frozen=True)
class LogicalForeignKey:
    child: ColumnsRef
    parent: ColumnsRef
    text: str


def parse_foreign_key(text: str) -> LogicalForeignKey:
    if text.count("->") != 1:
        raise ValueError(f"{text!r} is not a foreign key; write child_table.column -> parent_table.column "
                         "or child(a, b) -> parent(x, y)")
    left, right = (s.strip() for s in text.split("->"))
    child, parent = parse_columns(left), parse_columns(right)
    if len(child.columns) != len(parent.columns):
        raise ValueError(f"{text!r}: {len(child.columns)} child column(s) but {len(parent.columns)} parent column(s)")
    return LogicalForeignKey(child, parent, " ".join(text.split()))


def _checked(parse):
    def check(v: str) -> str:
        parse(v)
        return v
    return AfterValidator(check)


_ColumnText = Annotated[str, _checked(parse_column)]
_ColumnsText = Annotated[str, _checked(parse_columns)]
_ForeignKeyText = Annotated[str, _checked(parse_foreign_key)]


class RowCountBounds(_Strict):
    min: int | None = Field(default=None, ge=0)
    max: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> "RowCountBounds":
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both, e.g. {min: 1, max: 10000000}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is greater than max {self.max}")
        return self


class ExpectValue(_Strict):
    value: int | float | str | bool | None


class CustomCheck(_Strict):
    name: str = Field(min_length=1, max_length=120)
    sql: str = Field(min_length=1, description="read-only SQL; run inside the checks' READ ONLY transaction")
    expect: Literal["zero_rows"] | ExpectValue = Field(
        default="zero_rows", description="zero_rows: must return no rows; {value: N}: must return one row, one column, N")
    table: str | None = Field(default=None, description="shown with the result; optional")

    @field_validator("sql")
    @classmethod
    def _sql(cls, v: str) -> str:
        body = v.strip().rstrip(";").strip()
        if not body:
            raise ValueError("is empty")
        return body


class ValidationSettings(_Strict):
    not_null: list[_ColumnText] = Field(default_factory=list, description="table.column that must hold no NULLs")
    foreign_keys: list[_ForeignKeyText] = Field(default_factory=list,
                                                description="child.col -> parent.col the schema does not declare")
    unique: list[_ColumnsText] = Field(default_factory=list, description="table(col, ...) that must hold no duplicates")
    row_counts: dict[str, RowCountBounds] = Field(default_factory=dict, description="table -> {min, max}")
    custom: list[CustomCheck] = Field(default_factory=list)
    builtin: list[Literal[BUILTIN_KINDS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(BUILTIN_KINDS), description="checks found from the database itself")
    checksum_columns: dict[str, list[str]] = Field(default_factory=dict, description="table -> only these columns")
    checksum_exclude: dict[str, list[str]] = Field(default_factory=dict, description="table -> leave these out")
    examples: int = Field(default=5, ge=0, le=100, description="example keys shown per failed check")
    statement_timeout_s: float = Field(default=60, gt=0, le=86400, description="per check query")

    @field_validator("row_counts", "checksum_columns", "checksum_exclude")
    @classmethod
    def _tables(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in v:
            parse_table(str(key))
        return v

    @field_validator("custom")
    @classmethod
    def _unique_names(cls, v: list[CustomCheck]) -> list[CustomCheck]:
        seen = set()
        for c in v:
            if c.name in seen:
                raise ValueError(f"two custom checks are named {c.name!r}; names must be unique")
            seen.add(c.name)
        return v

    # parsed forms, for the checks
    def not_null_refs(self) -> list[ColumnsRef]:
        return [parse_column(s) for s in self.not_null]

    def foreign_key_refs(self) -> list[LogicalForeignKey]:
        return [parse_foreign_key(s) for s in self.foreign_keys]

    def unique_refs(self) -> list[ColumnsRef]:
        return [parse_columns(s) for s in self.unique]
