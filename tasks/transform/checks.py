"""What is checked after the last batch of a transform, before it is called done.

Three things, each a reason to revert:
- the validation checks configured in `validation:` that concern the transform's table
  (dataops.tasks.validation.validate.run_checks; see checks_for) and passed before the first batch but fail
  now. Checks that already failed before are `dataops validate`'s news, not the transform's;
- the table's definition (columns, constraints, indexes, triggers) is as it was: a data
  transform must not change a schema;
- the transform's own VERIFY query returns no rows.
"""

from __future__ import annotations

import logging

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from dataops.errors import BadInput
from dataops.settings import Environment, Settings
from dataops.tasks.schema import catalog_snapshot, diff_snapshots
from dataops.tasks.transform.batches import frag
from dataops.tasks.transform.spec import Target, TransformSpec

log = logging.getLogger("dataops.transform")
EXAMPLES = 5


def table_description(conn: psycopg.Connection, target: Target) -> dict:
    """The part of the schema snapshot that describes the transform's table, so that a
    concurrent change elsewhere is not its business."""
    snap = catalog_snapshot(conn)
    label = target.label
    out = {"format": snap["format"], "tables": {k: v for k, v in snap["tables"].items() if k == label},
           "columns": {k: v for k, v in snap["columns"].items() if k.startswith(label + ".")}}
    for kind in ("constraints", "indexes", "triggers"):
        out[kind] = {k: v for k, v in snap.get(kind, {}).items() if v.get("table") == label}
    return out


def _label(target: Target) -> str:
    return target.table if target.schema == "public" else target.label


def checks_for(settings: Settings, target: Target) -> list:
    """The checks of the `validation:` section that concern the table: the ones PostgreSQL does
    not enforce by itself (not-null by intent, logical foreign keys, unique sets, row counts,
    custom SQL). Declared constraints need no check here: PostgreSQL enforces them on every
    batch, and the validation area's built-in scans of the whole database would cost a
    transform more than its batches on a large database."""
    from dataops.tasks.validation.checks import LogicalForeignKeyCheck, configured_checks

    label = _label(target)
    return [c for c in configured_checks(settings.validation)
            if c.table_label() in (None, label)
            or (isinstance(c, LogicalForeignKeyCheck) and c.fk.parent.table.label == label)]


def _key(result) -> str:
    return f"{result.kind}|{result.name}|{result.constraint or ''}"


def validation_failures(settings: Settings, env: Environment, target: Target) -> dict[str, str]:
    """Failing validation checks that concern the table: {key: one-line description}."""
    checks = checks_for(settings, target)
    if not checks:
        return {}
    from dataops.tasks.validation.validate import run_checks

    cfg = settings.validation
    report = run_checks(env, checks, examples=cfg.examples, statement_timeout_s=cfg.statement_timeout_s)
    return {_key(r): r.line() for r in report.failures}


def baseline(settings: Settings, env: Environment, conn: psycopg.Connection, target: Target) -> dict:
    """Taken before the first batch and stored with the run, so a resumed run compares with it too."""
    return {"table": table_description(conn, target),
            "failing_checks": sorted(validation_failures(settings, env, target))}


def verify_rows(conn: psycopg.Connection, spec: TransformSpec) -> list[tuple]:
    """Up to EXAMPLES rows of the transform's VERIFY query (it must return none)."""
    if not spec.verify:
        return []
    cur = conn.cursor(row_factory=tuple_row)
    try:
        return cur.execute(sql.SQL("SELECT * FROM {} AS verify LIMIT {}").format(
            frag(spec.verify), sql.Literal(EXAMPLES)), {}).fetchall()
    except psycopg.ProgrammingError as exc:
        raise BadInput(f"{spec.path.name}: VERIFY does not run: {str(exc).splitlines()[0]}") from None


def post_checks(settings: Settings, env: Environment, conn: psycopg.Connection, spec: TransformSpec, target: Target,
                before: dict | None) -> list[str]:
    """Problems found after the transform (empty: it passed)."""
    before = before or {}
    problems = []
    new = {k: line for k, line in validation_failures(settings, env, target).items()
           if k not in set(before.get("failing_checks", []))}
    problems += [f"validation: {line}" for line in list(new.values())[:3]]
    if before.get("table") is not None:
        diffs = diff_snapshots(before["table"], table_description(conn, target), "before", "after")
        if diffs:
            problems.append(f"the definition of {target.label} changed during the transform: {diffs[0]}"
                            + (f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""))
    rows = verify_rows(conn, spec)
    if rows:
        shown = ", ".join(str(r[0] if len(r) == 1 else r) for r in rows)
        problems.append(f"VERIFY of {spec.name} returned rows, e.g. {shown}")
    return problems


def still_to_do(conn: psycopg.Connection, spec: TransformSpec, target: Target) -> int:
    """Valid rows that a new run would still change: writes that arrived behind the
    checkpoint, or values the change leaves as they are. Reported, not a failure: the
    application may legitimately keep writing old-style rows until it is upgraded."""
    valid = frag(spec.valid_sql) if spec.valid_sql else sql.SQL("true")
    cond = [frag(spec.where), sql.SQL("coalesce({}, false)").format(valid)]
    if spec.set is not None:
        cols = list(spec.set)
        differs = sql.SQL("ROW({}) IS DISTINCT FROM ROW({})").format(
            sql.SQL(", ").join(map(sql.Identifier, cols)), sql.SQL(", ").join(frag(spec.set[c]) for c in cols))
        if spec.delete:
            differs = sql.SQL("({} OR coalesce({}, false))").format(differs, frag(spec.delete))
        cond.append(differs)
    q = sql.SQL("SELECT count(*) FROM {} WHERE {}").format(target.qualified, sql.SQL(" AND ").join(cond))
    return conn.execute(q, {}).fetchone()[0]  # {}: fragments are %-escaped for parameters
