"""The rules PostgreSQL evaluates: noise, regex, choice, generalize, json paths and cases.

These are SQL expressions in both places a rule runs: in the source's `COPY (SELECT ...)`
of a refresh and in the UPDATE of `dataops anonymize`. One expression, so the two agree
value for value by construction, and a `cases` condition (`country = 'DE'`) is evaluated
by PostgreSQL in both, never re-implemented in Python. The keyed hash is the same HMAC as
everywhere else (Keyed.sql_digest), computed over the value's text as COPY prints it. The
price: the source server spends the CPU of these expressions (~5-15 us a value).

Each expression binds the value once with a scalar subquery (`(SELECT ... FROM (SELECT
<value> AS v OFFSET 0) s)`), since PostgreSQL does not share repeated subexpressions: a
json rule with three paths would otherwise copy the document expression 3^3 times. The
OFFSET 0 keeps the planner from pulling the subquery up, which would substitute the
expression back in (five nested paths crashed a PostgreSQL 16 backend that way).
"""

from __future__ import annotations

import itertools
import json
import re

from psycopg import sql

from dataops.errors import BadInput

SQL_KINDS = frozenset({"noise", "regex", "choice", "generalize", "json", "cases"})
NUMBER_TYPES = {"int2", "int4", "int8", "numeric", "float4", "float8"}
INT_LIMITS = {"int2": (-(1 << 15), (1 << 15) - 1), "int4": (-(1 << 31), (1 << 31) - 1),
              "int8": (-(1 << 63), (1 << 63) - 1)}
TWO_55 = 1 << 55
_aliases = itertools.count()


def _alias() -> sql.Identifier:
    return sql.Identifier(f"_dm{next(_aliases)}")


def bind(value: sql.Composable, body) -> sql.Composed:
    """`body(v)` with `v` standing for `value`, which PostgreSQL then computes once."""
    a = _alias()
    return sql.SQL("(SELECT {} FROM (SELECT {} AS v OFFSET 0) AS {})").format(body(sql.SQL("{}.v").format(a)), value, a)


def int56(d: sql.Composable) -> sql.Composed:
    return sql.SQL("('x' || encode(substring({} from 1 for 7), 'hex'))::bit(56)::bigint").format(d)


def unit(d: sql.Composable) -> sql.Composed:
    """A number in [-1, 1) from the digest, exact (numeric): the noise's direction and size."""
    return sql.SQL("({}::numeric / {} - 1)").format(int56(d), sql.Literal(TWO_55))


def digest(m, v: sql.Composable) -> sql.Composed:
    return m.keyed.sql_digest(sql.SQL("concat({})").format(v))


def numeric_bounds(type_text: str) -> tuple[int, int] | None:
    """(precision, scale) of numeric(p,s), else None."""
    found = re.search(r"numeric\((\d+)(?:,\s*(-?\d+))?\)", type_text)
    return (int(found.group(1)), int(found.group(2) or 0)) if found else None


def clamp(m, x: sql.Composable) -> sql.Composable:
    """Keep a number inside what the column holds: integer ranges and numeric(p,s)."""
    c = m.column
    if c.base in INT_LIMITS:
        lo, hi = INT_LIMITS[c.base]
        return sql.SQL("least(greatest(round({}), {}), {})").format(x, sql.Literal(lo), sql.Literal(hi))
    bounds = numeric_bounds(c.type) if c.base == "numeric" else None
    if bounds:
        p, s = bounds
        top = sql.SQL("({}::numeric - {}::numeric)").format(sql.Literal(10 ** (p - s)), sql.Literal(f"1e{-s}"))
        return sql.SQL("least(greatest(round({x}, {s}), -{t}), {t})").format(x=x, s=sql.Literal(s), t=top)
    return x


# -- one kind each ---------------------------------------------------------------------------------

def noise(m, v: sql.Composable) -> sql.Composable:
    r, base = m.rule.noise, m.column.base
    d = digest(m, v)
    if base in ("date", "timestamp", "timestamptz"):
        days = max(1, int(r.bound))
        if base == "date":  # whole days, never 0 (as shift_days)
            k = sql.SQL("({} % {})").format(int56(d), sql.Literal(2 * days))
            step = sql.SQL("(CASE WHEN {k} < {n} THEN {k} - {n} ELSE {k} - {n} + 1 END)::int").format(
                k=k, n=sql.Literal(days))
        else:  # seconds, up to bound days either way
            step = sql.SQL("make_interval(secs => round({} * {})::float8)").format(unit(d), sql.Literal(r.bound * 86400))
        return sql.SQL("CASE WHEN NOT isfinite({v}) THEN {v} ELSE {v} + {s} END").format(v=v, s=step)
    if base in INT_LIMITS and r.bound is not None:  # whole steps, never 0
        b = max(1, int(r.bound))
        k = sql.SQL("({} % {})").format(int56(d), sql.Literal(2 * b))
        off = sql.SQL("(CASE WHEN {k} < {n} THEN {k} - {n} ELSE {k} - {n} + 1 END)").format(k=k, n=sql.Literal(b))
        return clamp(m, sql.SQL("({}::numeric + {})").format(v, off))
    if base in ("float4", "float8"):
        move = (sql.SQL("{}::float8 * {}::float8").format(sql.Literal(r.bound), unit(d)) if r.bound is not None else
                sql.SQL("{v} * {p}::float8 * {u}::float8").format(v=v, p=sql.Literal(r.percent / 100), u=unit(d)))
        return sql.SQL("({} + {})").format(v, move)
    move = (sql.SQL("{}::numeric * {}").format(sql.Literal(r.bound), unit(d)) if r.bound is not None else
            sql.SQL("{v}::numeric * {p}::numeric * {u}").format(v=v, p=sql.Literal(r.percent / 100), u=unit(d)))
    x = sql.SQL("({}::numeric + {})").format(v, move)
    if base == "numeric" and not numeric_bounds(m.column.type):
        return sql.SQL("CASE WHEN {v} = 'NaN'::numeric THEN {v} ELSE round({x}, scale({v})) END").format(v=v, x=x)
    return sql.SQL("CASE WHEN {v}::numeric = 'NaN'::numeric THEN {v}::numeric ELSE {x} END").format(
        v=v, x=clamp(m, x))


def regex(m, v: sql.Composable) -> sql.Composable:
    r = m.rule.regex
    out = sql.SQL("regexp_replace(concat({}), {}, {}, {})").format(v, sql.Literal(r.pattern), sql.Literal(r.replace),
                                                                   sql.Literal(r.flags))
    if m.column.max_length:  # a replacement longer than the match must still fit varchar(n)
        out = sql.SQL("left({}, {})").format(out, sql.Literal(m.column.max_length))
    return out


def choice_values(m) -> list[str]:
    return [("true" if x else "false") if isinstance(x, bool) else str(x) for x in m.rule.choice.values]


def choice(m, v: sql.Composable) -> sql.Composable:
    r = m.rule.choice
    values = sql.SQL("{}::text[]").format(sql.Literal(choice_values(m)))
    d = digest(m, v)
    if r.weights is None:
        return sql.SQL("({})[1 + {} % {}]").format(values, int56(d), sql.Literal(len(r.values)))
    starts = list(itertools.accumulate([0] + r.weights[:-1]))  # value i covers [starts[i], starts[i] + weight)
    return sql.SQL("({})[width_bucket({} % {}, {}::bigint[])]").format(
        values, int56(d), sql.Literal(sum(r.weights)), sql.Literal(starts))


def generalize(m, v: sql.Composable) -> sql.Composable:
    g, base = m.rule.generalize, m.column.base
    if g.step is not None:
        return clamp(m, sql.SQL("(floor({v}::numeric / {s}) * {s})").format(v=v, s=sql.Literal(g.step)))
    if g.to is not None:
        out = sql.SQL("date_trunc({}, {})").format(sql.Literal(g.to), v)
        return sql.SQL("{}::date").format(out) if base == "date" else out
    out = sql.SQL("left({}, {})").format(v, sql.Literal(g.prefix))
    if g.fill:
        out = sql.SQL("{o} || repeat({f}, greatest(char_length({v}) - {n}, 0))").format(
            o=out, f=sql.Literal(g.fill), v=v, n=sql.Literal(g.prefix))
    return out


def standalone(m, v: sql.Composable, refs: dict | None = None, cast: bool = True) -> sql.Composable:
    """Any rule as one expression of the value alone: a Faker pick comes from the pool
    written into the query as an array (the source of a refresh is read-only: no pool table)."""
    if m.kind == "keep":
        return v
    if m.kind == "faker":
        pool = m.pool
        d = _alias()
        # A jsonb array, not text[]: subscripting a text[] constant walks its elements (35 us a value
        # for a pool of 5,000), a jsonb array finds the element by its offset (3 us).
        pick = sql.SQL("({}::jsonb ->> ({} % {})::int)").format(sql.Literal(json.dumps(pool)),
                                                               int56(sql.SQL("{}.d").format(d)), sql.Literal(len(pool)))
        inner = m.sql(sql.SQL("{}.v").format(d), sql.SQL("{}.d").format(d), pick, refs, cast)
        return sql.SQL("(SELECT {} FROM (SELECT {} AS v, {} AS d OFFSET 0) AS {})").format(inner, v, digest(m, v), d)
    return m.sql(v, None, None, refs, cast)


def cases(m, v: sql.Composable, refs: dict | None, cast: bool) -> sql.Composable:
    whens = []
    for case, sub in zip(m.rule.cases, m.subs):
        out = standalone(sub, v, refs, cast)
        whens.append(sql.SQL("WHEN ({}) THEN {}").format(sql.SQL(case.when), out if cast else sql.SQL("({})::text").format(out)))
    last = standalone(m.subs[-1], v, refs, cast)
    return sql.SQL("CASE {} ELSE {} END").format(sql.SQL(" ").join(whens),
                                                 last if cast else sql.SQL("({})::text").format(last))


# -- json paths --------------------------------------------------------------------------------------

_SEGMENT = re.compile(r'\s*(?:"((?:[^"]|"")*)"|([^."\[\]]+))?((?:\[(?:\*|\d+)\])*)\s*(?:\.|$)')


def parse_path(path: str, where: str) -> tuple:
    """'contact.email', 'phones[*]', 'items[*].sku', 'a[0].b', '"odd.key".x' to segments:
    keys (str), '*' (every element of an array) and indexes (int)."""
    segs: list = []
    pos = 0
    text = path.strip()
    while pos < len(text):
        found = _SEGMENT.match(text, pos)
        if not found or found.end() == pos:
            raise BadInput(f"{where}: json path {path!r} does not parse; write keys with dots and [*] for every array "
                           'element, e.g. contact.email or items[*].sku ("quoted.key" for keys holding dots)')
        key = found.group(1).replace('""', '"') if found.group(1) is not None else found.group(2)
        if key is None and not found.group(3):
            raise BadInput(f"{where}: json path {path!r} has an empty key; write keys with dots between them, e.g. "
                           "contact.email")
        if key is not None:
            segs.append("*" if key == "*" and found.group(1) is None else key)
        for index in re.findall(r"\[(\*|\d+)\]", found.group(3)):
            segs.append("*" if index == "*" else int(index))
        pos = found.end()
    if not segs:
        raise BadInput(f"{where}: json path {path!r} is empty; name a key, e.g. contact.email")
    return tuple(segs)


def _at(doc: sql.Composable, segs: tuple, leaf) -> sql.Composable:
    if not segs:
        return leaf(doc)
    seg, rest = segs[0], segs[1:]
    if seg == "*":
        e = _alias()
        inner = _at(sql.SQL("{}.v").format(e), rest, leaf)
        return sql.SQL("CASE WHEN jsonb_typeof({d}) = 'array' THEN (SELECT coalesce(jsonb_agg({i} ORDER BY {e}.o), "
                       "'[]'::jsonb) FROM jsonb_array_elements({d}) WITH ORDINALITY AS {e}(v, o)) ELSE {d} END").format(
            d=doc, i=inner, e=e)
    if isinstance(seg, int):
        test = sql.SQL("jsonb_typeof({d}) = 'array' AND jsonb_array_length({d}) > {n}").format(d=doc, n=sql.Literal(seg))
        child = sql.SQL("{} -> {}").format(doc, sql.Literal(seg))
    else:
        test = sql.SQL("jsonb_typeof({d}) = 'object' AND {d} ? {k}").format(d=doc, k=sql.Literal(seg))
        child = sql.SQL("{} -> {}").format(doc, sql.Literal(seg))
    return sql.SQL("CASE WHEN {t} THEN jsonb_set({d}, {p}::text[], {c}) ELSE {d} END").format(
        t=test, d=doc, p=sql.Literal([str(seg)]), c=bind(child, lambda v: _at(v, rest, leaf)))


def _leaf(sub, refs):
    """The masked json value of a leaf: scalars by the rule (numbers stay numbers under noise
    and step), an array's elements one by one, a json null left null, an object as its text."""

    def scalar(e: sql.Composable) -> sql.Composable:
        text = sql.SQL("(CASE WHEN jsonb_typeof({e}) IN ('object', 'array') THEN {e}::text ELSE {e} #>> '{{}}' END)"
                       ).format(e=e)
        if sub.kind == "keep":
            return e
        if sub.kind == "null":
            return sql.SQL("'null'::jsonb")
        if sub.column.base == "numeric":  # noise, generalize step: numbers only, other leaves left as they are
            return sql.SQL("CASE WHEN jsonb_typeof({e}) = 'number' THEN to_jsonb({m}) ELSE {e} END").format(
                e=e, m=standalone(sub, sql.SQL("({} #>> '{{}}')::numeric").format(e), refs))
        return sql.SQL("to_jsonb(({})::text)").format(standalone(sub, text, refs))

    def leaf(e: sql.Composable) -> sql.Composable:
        x = _alias()
        each = scalar(sql.SQL("{}.v").format(x))
        return sql.SQL("CASE jsonb_typeof({e}) WHEN 'null' THEN {e} WHEN 'array' THEN (SELECT coalesce(jsonb_agg({s} "
                       "ORDER BY {x}.o), '[]'::jsonb) FROM jsonb_array_elements({e}) WITH ORDINALITY AS {x}(v, o)) "
                       "ELSE {one} END").format(e=e, s=each, x=x, one=scalar(e))

    return leaf


def json_paths(m, v: sql.Composable, refs: dict | None) -> sql.Composable:
    doc = sql.SQL("{}::jsonb").format(v)
    for segs, sub in zip(m.paths, m.subs):
        doc = bind(doc, lambda d, segs=segs, sub=sub: _at(d, segs, _leaf(sub, refs)))
    return doc


def rule_sql(m, col: sql.Composable, refs: dict | None = None, cast: bool = True) -> sql.Composable:
    """The masked value of `col` under a rule PostgreSQL evaluates (NULL stays NULL)."""
    build = {"noise": noise, "regex": regex, "choice": choice, "generalize": generalize}.get(m.kind)
    if m.kind == "cases":
        expr = cases(m, col, refs, cast)
    elif m.kind == "json":
        expr = json_paths(m, col, refs)
    else:
        expr = bind(col, lambda v: build(m, v))
    if not cast:
        return sql.SQL("CASE WHEN {} IS NULL THEN NULL ELSE ({}) END").format(col, expr)
    typ = sql.SQL("text") if m.column.base in ("text", "varchar", "bpchar", "citext", "name") else sql.SQL(m.column.type)
    return sql.SQL("CASE WHEN {} IS NULL THEN NULL ELSE ({})::{} END").format(col, expr, typ)
