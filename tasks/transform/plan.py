"""Before a run: compile the transform against its table, split the key range, and the dry
run (rows needing work, invalid rows with examples, a preview of a few changes), all without
writing anything."""

from __future__ import annotations

import psycopg
from prefect import task
from psycopg import sql

from dataops.errors import BadInput
from dataops.settings import Environment, Settings
from dataops.tasks.retries import RETRY_TRANSIENT
from dataops.tasks.transform import keys
from dataops.tasks.transform.batches import Options, PandasBatcher, SqlBatcher, frag
from dataops.tasks.transform.checks import still_to_do
from dataops.tasks.transform.keys import key_range
from dataops.tasks.transform.revert import own_revert_spec
from dataops.tasks.transform.spec import (
    Target,
    TransformSpec,
    bind,
    load_transform,
)
from dataops.tasks.transform.state import latest_run

PREVIEW_ROWS = 5


def spec_for(settings: Settings, name: str) -> TransformSpec:
    return load_transform(settings.transforms_dir, name)


def connect(settings: Settings, env: Environment, purpose: str, **kw):
    from dataops.tasks import pg

    return pg.connect(env.database_url, timeout=settings.postgres.connect_timeout,
                      application_name=f"dataops-transform:{purpose}"[:63], **kw)


def batcher_for(spec: TransformSpec, target: Target, run_id: int = 0):
    return SqlBatcher(spec, target, run_id) if spec.kind == "sql" else PandasBatcher(spec, target)


def compile_check(conn: psycopg.Connection, spec: TransformSpec, target: Target) -> None:
    """EXPLAIN every statement the transform will run, so a typo in WHERE, SET or VERIFY is a
    BadInput before the first batch rather than a failure in the middle. Writes nothing."""
    row = conn.execute(sql.SQL("SELECT {} FROM {} ORDER BY {} LIMIT 1").format(
        keys.encoded(target), target.qualified, keys.columns(target))).fetchone()
    first = row[0] if row else [None] * len(target.key)
    params = {"lo": first, "hi": first, "run": 0}
    checks: list[tuple[str, sql.Composable, dict]] = []
    if spec.kind == "sql":
        checks.append(("WHERE/VALID/SET/DELETE", SqlBatcher(spec, target).statement(True), params))
    else:
        checks.append(("WHERE/VALID", PandasBatcher(spec, target).select(True), params))
    if spec.revert:
        checks.append(("REVERT/REVERT_WHERE", SqlBatcher(own_revert_spec(spec), target).statement(True), params))
    if spec.verify:
        checks.append(("VERIFY", frag(spec.verify), {}))
    for label, stmt, p in checks:
        try:
            with conn.transaction():
                conn.execute(sql.SQL("EXPLAIN {}").format(stmt), p)
        except psycopg.Error as exc:
            text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise BadInput(f"{spec.path.name}: {label} does not run on {target.label}: {text}") from None


def split_ranges(conn: psycopg.Connection, target: Target, workers: int, keys_table=None) -> list[tuple]:
    """`workers` disjoint (lo, hi, rows) ranges over the key: lo exclusive, hi inclusive; the
    first starts at the beginning and the last is open-ended, so rows inserted during the run
    are covered too. An integer key is cut into equal spans of values; any other key (text,
    uuid, dates, several columns) at the keys that many rows apart, read on its index."""
    keys_table = keys_table if keys_table is not None else target.qualified

    def count(lo, hi) -> int:
        return conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE {}").format(keys_table, key_range(target, lo, hi)),
                            {"lo": lo, "hi": hi}).fetchone()[0]

    if workers == 1:
        return [(None, None, count(None, None))]
    if target.integer_key:
        edges = _integer_edges(conn, target, workers, keys_table)
    else:
        edges = _row_edges(conn, target, workers, keys_table)
    if edges is None:
        return [(None, None, 0)]
    out = []
    for i in range(len(edges) + 1):
        lo = None if i == 0 else edges[i - 1]
        hi = None if i == len(edges) else edges[i]
        out.append((lo, hi, count(lo, hi)))
    return out


def _integer_edges(conn, target: Target, workers: int, keys_table) -> list[list[str]] | None:
    """The inner bounds of `workers` equal spans between the smallest and largest key."""
    k = sql.Identifier(target.key[0])
    low, high = conn.execute(sql.SQL("SELECT min({k}), max({k}) FROM {t}").format(k=k, t=keys_table)).fetchone()
    if low is None:
        return None
    span = high - low + 1
    w = max(1, min(workers, span))
    return [[str(low - 1 + span * i // w)] for i in range(1, w)]


def _row_edges(conn, target: Target, workers: int, keys_table) -> list[list[str]] | None:
    """The keys at 1/w, 2/w ... of the rows in key order (fewer if keys repeat across edges)."""
    total = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(keys_table)).fetchone()[0]
    if total == 0:
        return None
    w = max(1, min(workers, total))
    edges: list[list[str]] = []
    for i in range(1, w):
        row = conn.execute(sql.SQL("SELECT {enc} FROM {t} ORDER BY {k} OFFSET %s LIMIT 1").format(
            enc=keys.encoded(target), t=keys_table, k=keys.columns(target)), (total * i // w - 1,)).fetchone()
        if row and (not edges or row[0] != edges[-1]):
            edges.append(row[0])
    return edges


# -- dry run ------------------------------------------------------------------------------------

def plan(settings: Settings, env: Environment, name: str, opts: Options) -> dict:
    """What a run would do, read in one READ ONLY transaction: rows needing work, invalid
    rows (with examples), ranges, the snapshot, and a preview of a few changes."""
    spec = spec_for(settings, name)
    with connect(settings, env, f"{name}:plan") as conn:
        conn.read_only = True
        target = bind(conn, spec)
        compile_check(conn, spec, target)
        t = target.qualified
        valid = sql.SQL("coalesce({}, false)").format(frag(spec.valid_sql)) if spec.valid_sql else sql.SQL("true")
        total = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(t)).fetchone()[0]
        matched, invalid, examples = conn.execute(sql.SQL(
            "SELECT count(*), count(*) FILTER (WHERE NOT {v}), "
            "(array_agg({shown} ORDER BY {k}) FILTER (WHERE NOT {v}))[1:5] FROM {t} WHERE {w}").format(
            v=valid, k=keys.columns(target), shown=keys.shown(target), t=t, w=frag(spec.where)), {}).fetchone()
        ranges = split_ranges(conn, target, opts.workers)
        preview = _preview(conn, spec, target)
        todo = still_to_do(conn, spec, target) if spec.kind == "sql" else None
        last = latest_run(conn, name)
        conn.rollback()
    return {
        "transform": name, "environment": env.name, "description": spec.description, "kind": spec.kind,
        "table": target.label, "key": target.key_label, "rows": total, "needing_work": matched,
        "invalid": invalid or 0, "invalid_examples": list(examples or []), "would_change": todo,
        "ranges": [{"lo": lo, "hi": hi, "rows": n} for lo, hi, n in ranges],
        "snapshot": None if spec.snapshot is None else ("*" if spec.snapshot == "*" else list(spec.snapshot)),
        "revert": "own REVERT" if spec.revert else ("snapshot" if spec.snapshot else "none"),
        "preview": preview, "options": opts.as_dict(),
        "last_run": None if last is None else {"id": last.id, "action": last.action, "status": last.status},
    }


def _preview(conn: psycopg.Connection, spec: TransformSpec, target: Target) -> list[dict]:
    k, shown = keys.columns(target), keys.shown_column(target)
    valid = sql.SQL("coalesce({}, false)").format(frag(spec.valid_sql)) if spec.valid_sql else sql.SQL("true")
    if spec.kind == "sql":
        cols = list(spec.set)
        delete = sql.SQL("coalesce({}, false)").format(frag(spec.delete)) if spec.delete else sql.SQL("false")
        differs = sql.SQL("ROW({}) IS DISTINCT FROM ROW({})").format(
            sql.SQL(", ").join(map(sql.Identifier, cols)), sql.SQL(", ").join(frag(spec.set[c]) for c in cols))
        rows = conn.execute(sql.SQL(
            "SELECT {shown}, {cols}, {exprs}, {d} FROM {t} WHERE {w} AND {v} AND ({differs} OR {d}) "
            "ORDER BY {k} LIMIT {n}").format(
            k=k, shown=shown, cols=sql.SQL(", ").join(map(sql.Identifier, cols)),
            exprs=sql.SQL(", ").join(frag(spec.set[c]) for c in cols), d=delete, t=target.qualified,
            w=frag(spec.where), v=valid, differs=differs, n=sql.Literal(PREVIEW_ROWS)), {}).fetchall()
        n = len(cols)
        return [{"key": r[0], "before": {c: _show(v) for c, v in zip(cols, r[1:1 + n])},
                 "after": "(deleted)" if r[-1] else {c: _show(v) for c, v in zip(cols, r[1 + n:1 + 2 * n])}}
                for r in rows]
    import pandas as pd

    b = PandasBatcher(spec, target)
    rows = conn.execute(sql.SQL("SELECT {k}, {cols}, {shown} FROM {t} WHERE {w} AND {v} ORDER BY {k} "
                                "LIMIT 50").format(
        k=k, cols=sql.SQL(", ").join(map(sql.Identifier, b.columns)), shown=shown, v=valid, t=target.qualified,
        w=frag(spec.where)), {}).fetchall()
    if not rows:
        return []
    df = pd.DataFrame.from_records([r[:-1] for r in rows], columns=[*target.key, *b.columns])
    shown_keys = pd.Series([r[-1] for r in rows], index=df.index)
    if spec.valid_fn is not None:
        df = df[spec.valid_fn(df.copy())]
    out = b._check_output(spec.change(df.copy()), df)
    changes = []
    for idx in out.index:
        before = {c: _show(df.at[idx, c]) for c in out.columns}
        after = {c: _show(out.at[idx, c]) for c in out.columns}
        if before != after:
            changes.append({"key": shown_keys.at[idx], "before": before, "after": after})
        if len(changes) == PREVIEW_ROWS:
            break
    return changes


def _show(v) -> str | None:
    try:
        import pandas as pd

        if v is None or (not isinstance(v, (list, dict)) and pd.isna(v)):
            return None
    except (TypeError, ValueError):
        pass
    return str(v)


# -- Prefect tasks ------------------------------------------------------------------------------------

@task(name="plan-transform", **RETRY_TRANSIENT)
def plan_task(settings: Settings, env: Environment, name: str, opts: Options) -> dict:
    return plan(settings, env, name, opts)
