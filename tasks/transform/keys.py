"""How a transform names rows: by its key, one column or several (a composite primary key, or
a unique index on NOT NULL columns), as SQL.

Batches are keyset ranges over the whole key, compared as a row: `(a, b) > (x, y)` walks the
key's index in its order whatever the number of columns, and is what `ORDER BY a, b` sorts by.

A key value is kept in the state tables (checkpoints, range bounds, deleted rows) as text[],
one element per key column, and read back by casting each element to the column's type. The
text is the same whatever the session's settings: date and time types are written as JSON
writes them (ISO 8601 in any DateStyle), timestamptz in UTC, so that a checkpoint is exact and
a revert in another session finds the keys a run recorded by equality of text.
"""

from __future__ import annotations

from psycopg import sql

from dataops.tasks.transform.spec import Target


def _col(c: str, alias: str | None) -> sql.Identifier:
    return sql.Identifier(alias, c) if alias else sql.Identifier(c)


def columns(t: Target, alias: str | None = None) -> sql.Composed:
    """a, b: for SELECT lists, ORDER BY and indexes."""
    return sql.SQL(", ").join(_col(c, alias) for c in t.key)


def descending(t: Target, alias: str | None = None) -> sql.Composed:
    return sql.SQL(", ").join(sql.SQL("{} DESC").format(_col(c, alias)) for c in t.key)


def _encode(expr: sql.Composable, codec: str) -> sql.Composable:
    if codec == "utc":
        return sql.SQL("CASE WHEN isfinite({e}) THEN (to_jsonb({e} AT TIME ZONE 'UTC') #>> '{{}}') || '+00' "
                       "ELSE {e}::text END").format(e=expr)
    if codec == "json":
        return sql.SQL("(to_jsonb({}) #>> '{{}}')").format(expr)
    return sql.SQL("{}::text").format(expr)


def encoded(t: Target, alias: str | None = None) -> sql.Composed:
    """ARRAY[a::text, b::text]: the key as the state tables keep it."""
    codecs = t.key_codecs or ("text",) * len(t.key)
    return sql.SQL("ARRAY[{}]::text[]").format(sql.SQL(", ").join(_encode(_col(c, alias), codec)
                                                                 for c, codec in zip(t.key, codecs)))


def recorded(t: Target, alias: str | None = None) -> list[sql.Composable]:
    """The ways a run may have recorded a key in dataops_transforms.deleted: encoded(), and for
    a single-column date or time key also as an earlier version did (its ::text)."""
    out = [encoded(t, alias)]
    if len(t.key) == 1 and (t.key_codecs or ("text",))[0] != "text":
        out.append(sql.SQL("ARRAY[{}::text]").format(_col(t.key[0], alias)))
    return out


def shown(t: Target, alias: str | None = None) -> sql.Composable:
    """The key as people read it: 42, or (eu,42) for a composite key."""
    if len(t.key) == 1:
        return sql.SQL("{}::text").format(_col(t.key[0], alias))
    return sql.SQL("ROW({})::text").format(columns(t, alias))


def shown_column(t: Target) -> sql.Composed:
    """shown() in a SELECT list, named apart from the key column (ORDER BY it would be ambiguous)."""
    return sql.SQL("{} AS {}").format(shown(t), sql.Identifier("dataops key"))


def decoded(t: Target, param: str) -> list[sql.Composable]:
    """Each element of the text[] parameter `param`, cast to its key column's type."""
    return [sql.SQL("((%({p})s::text[])[{i}])::{typ}").format(p=sql.SQL(param), i=sql.Literal(i + 1),
                                                             typ=sql.SQL(typ))
            for i, typ in enumerate(t.key_types)]


def _compare(t: Target, op: str, param: str, alias: str | None) -> sql.Composable:
    values = decoded(t, param)
    if len(t.key) == 1:
        return sql.SQL("{} {} {}").format(_col(t.key[0], alias), sql.SQL(op), values[0])
    return sql.SQL("({}) {} ({})").format(columns(t, alias), sql.SQL(op), sql.SQL(", ").join(values))


def key_range(t: Target, lo, hi, alias: str | None = None) -> sql.Composable:
    """key > %(lo)s AND key <= %(hi)s, compared as a row; a None bound is left out (lo and hi
    say only whether there is one: the values are the parameters lo and hi, text[])."""
    parts = []
    if lo is not None:
        parts.append(_compare(t, ">", "lo", alias))
    if hi is not None:
        parts.append(_compare(t, "<=", "hi", alias))
    return sql.SQL(" AND ").join(parts) if parts else sql.SQL("true")


def same_key(t: Target, a: str, b: str) -> sql.Composed:
    """a.k1 = b.k1 AND a.k2 = b.k2"""
    return sql.SQL(" AND ").join(sql.SQL("{} = {}").format(_col(c, a), _col(c, b)) for c in t.key)
