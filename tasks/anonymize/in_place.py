"""Anonymize a database in place: the rules of `anonymize:` applied with set-based UPDATEs.

For a database that already holds a copy of production data (a restored backup on a
developer's server, say), never for production itself. The masked values are the ones a
refresh writes (the same HMAC and pools, in SQL: see dataops.tasks.anonymize.masking), so a database
anonymized in place and one refreshed from the same source agree value for value.

One transaction: sensitive rows are deleted (`anonymize.delete`), then each table is
updated in one statement whose RETURNING clause streams every (old, new) pair of the
masked columns to the leak scan; a leak rolls everything back. User triggers are off
during the update (an `updated_at` trigger would stamp every row). Afterwards VACUUM FULL
rewrites the tables, since an UPDATE leaves the old row versions, personal data included,
in the table's files until they are reused.

So a process killed before the commit leaves the database as it was, and one killed after it
leaves it masked with those old row versions still on disk: running it again masks the masked
values once more (no original comes back, but they no longer match a refresh's) and vacuums;
VACUUM FULL of the tables alone is enough too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg
from prefect import task
from psycopg import sql
from psycopg.rows import tuple_row

from dataops.errors import OperationFailed, SafetyRefusal
from dataops.failpoints import failpoint
from dataops.settings import Environment, Settings
from dataops.tasks import pg
from dataops.tasks.anonymize.leak_scan import Collector, LeakReport, Workspace, build_report, match_digests
from dataops.tasks.anonymize.masking import NULL, unescape
from dataops.tasks.anonymize.rules import MaskingPlan, TableMasking, plan_masking, read_tables
from dataops.tasks.retries import RUN_ONCE
from dataops.tasks.schema import STABLE_OUTPUT

log = logging.getLogger("dataops.anonymize")
POOL_TABLE = sql.Identifier("dataops_anonymize_pool")


def guard_environment(env: Environment) -> None:
    if env.is_production:
        raise SafetyRefusal(f"environment '{env.name}' has role production (environments.{env.name}.role); anonymize "
                            "rewrites data in place and never runs on production. Refresh staging from it instead")


@dataclass
class AnonymizeReport:
    environment: str
    tables: dict[str, int] = field(default_factory=dict)  # rows updated per table
    deleted: dict[str, int] = field(default_factory=dict)
    masked: list[tuple[str, str, str]] = field(default_factory=list)
    defaulted: list[str] = field(default_factory=list)
    leaks: LeakReport | None = None
    seconds: float = 0.0
    vacuum_seconds: float = 0.0

    def summary(self) -> str:
        deleted = sum(self.deleted.values())
        return (f"anonymized {self.environment}: {len(self.masked)} columns in {len(self.tables)} tables, "
                f"{sum(self.tables.values()):,} rows updated, {deleted:,} rows deleted in {self.seconds:.1f} s")


def anonymize(settings: Settings, env: Environment, *, vacuum: bool = True,
              progress: Callable[[str], None] | None = None) -> AnonymizeReport:
    say = progress or (lambda msg: log.info("%s", msg))
    guard_environment(env)  # the flow refuses first; a plain call must be refused too
    t0 = time.monotonic()
    report = AnonymizeReport(env.name)
    with pg.connect(env.database_url, timeout=settings.postgres.connect_timeout,
                    application_name="dataops-anonymize") as conn:
        for name, value in STABLE_OUTPUT.items():
            conn.execute("SELECT set_config(%s, %s, true)", (name, value))
        tables = read_tables(conn)
        plan = plan_masking(settings, conn, tables)
        if plan.unmasked_personal:
            raise SafetyRefusal(plan.guard_message(f"anonymize {env.name}"))
        report.masked = plan.masked_columns()
        report.defaulted = [str(f) for f in plan.defaulted]
        touched = sorted(set(plan.tables) | set(plan.deletes))
        if touched:  # no writes by others while we rewrite; readers may go on
            conn.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(
                sql.SQL(", ").join(tables[t].qualified for t in touched)))
        for label, cond in plan.deletes.items():
            try:
                with conn.transaction():
                    cur = conn.execute(sql.SQL("DELETE FROM {} WHERE {}").format(tables[label].qualified, sql.SQL(cond)))
            except psycopg.errors.ForeignKeyViolation as exc:
                raise OperationFailed(f"anonymize.delete.{label}: {str(exc).splitlines()[0]}; delete the referencing "
                                      "rows too, or narrow the condition") from None
            report.deleted[label] = cur.rowcount
            say(f"deleted {cur.rowcount:,} rows of {label}")
        _load_pools(conn, plan)
        names: list[tuple[str, str]] = []
        unchanged: dict[int, int] = {}
        values: dict[int, int] = {}
        sql_checked: dict[str, tuple[int, int]] = {}
        expected = sum(tm.table.est_rows * len(tm.in_python) for tm in plan.tables.values())
        with Workspace(expected) as ws:
            for label, tm in plan.tables.items():
                rows = _update_table(conn, plan, tm, names, unchanged, values, ws.collector(f"t{len(names)}"))
                report.tables[label] = rows
                for col, m in tm.maskers.items():
                    if m.kind in ("null", "constant"):
                        names.append((label, col))
                        sql_checked[f"{label}.{col}"] = _sql_check(conn, tm, col)
                say(f"masked {len(tm.maskers)} columns of {label} in {rows:,} rows")
            report.leaks = build_report(plan, names, unchanged, values, match_digests(plan, names, ws), sql_checked)
        if not report.leaks.ok:
            conn.rollback()
            raise OperationFailed(f"anonymize {env.name} rolled back: {report.leaks.summary()}")
        failpoint("anonymize.before_commit")  # a kill here: every delete and update rolls back, nothing masked
        conn.commit()
    failpoint("anonymize.after_commit")  # masked, but the old row versions are in the files until the VACUUM FULL
    if vacuum and report.tables:
        v0 = time.monotonic()
        with pg.connect(env.database_url, autocommit=True) as conn:
            for label in list(report.tables) + [t for t in report.deleted if t not in report.tables]:
                conn.execute(sql.SQL("VACUUM (FULL, ANALYZE) {}").format(tables[label].qualified))
        report.vacuum_seconds = time.monotonic() - v0
    report.seconds = time.monotonic() - t0
    say(report.summary())
    return report


def _load_pools(conn: psycopg.Connection, plan: MaskingPlan) -> None:
    conn.execute(sql.SQL("CREATE TEMP TABLE {} (pool int, i int, v text, PRIMARY KEY (pool, i)) ON COMMIT DROP").format(
        POOL_TABLE))
    with conn.cursor().copy(sql.SQL("COPY {} (pool, i, v) FROM STDIN").format(POOL_TABLE)) as copy:
        for pid, m in _pooled(plan):
            for i, v in enumerate(m.pool):
                copy.write_row((pid, i, v))
    conn.execute(sql.SQL("ANALYZE {}").format(POOL_TABLE))


def _pooled(plan: MaskingPlan):
    n = 0
    for tm in plan.tables.values():
        for m in tm.maskers.values():
            if m.pool is not None:
                yield n, m
                n += 1


def _pool_ids(plan: MaskingPlan) -> dict[int, int]:
    return {id(m): pid for pid, m in _pooled(plan)}


def _update_table(conn: psycopg.Connection, plan: MaskingPlan, tm: TableMasking, names: list, unchanged: dict,
                  values: dict, collector: Collector) -> int:
    """One UPDATE for all masked columns of a table; (old, new) of the Python-checked ones
    stream back through RETURNING into the leak scan."""
    t = tm.table
    x, dg, pk = sql.Identifier("x"), sql.Identifier("dg"), sql.Identifier("pk")
    pool_ids = _pool_ids(plan)
    digests, picks, new_cols, returning, tracked = [], [], [], [], []
    for k, (col, m) in enumerate(tm.maskers.items()):
        src = sql.SQL("x.{}").format(sql.Identifier(col))
        d = pick = None
        if m.needs_digest:
            digests.append(sql.SQL("{} AS {}").format(m.digest_sql(src), sql.Identifier(f"d{k}")))
            d = sql.SQL("dg.{}").format(sql.Identifier(f"d{k}"))
        if m.kind == "faker":
            picks.append(sql.SQL("{} AS {}").format(m.pick_sql(d, POOL_TABLE, pool_ids[id(m)]), sql.Identifier(f"p{k}")))
            pick = sql.SQL("pk.{}").format(sql.Identifier(f"p{k}"))
        refs = {name: sql.SQL("x.{}").format(sql.Identifier(name)) for name in m.refs}
        new_cols.append(sql.SQL("{} AS {}").format(m.sql(src, d, pick, refs), sql.Identifier(f"n{k}")))
        if not m.in_sql:
            new_cols.append(sql.SQL("{} AS {}").format(src, sql.Identifier(f"o{k}")))
            returning += [sql.SQL("m.{}").format(sql.Identifier(f"o{k}")), sql.SQL("t.{}").format(sql.Identifier(col))]
            col_id = len(names)
            names.append((t.label, col))
            tracked.append((col_id, m))
    lateral = sql.SQL("")
    if digests:
        lateral += sql.SQL(" CROSS JOIN LATERAL (SELECT {} OFFSET 0) AS {}").format(sql.SQL(", ").join(digests), dg)
    if picks:
        lateral += sql.SQL(" CROSS JOIN LATERAL (SELECT {} OFFSET 0) AS {}").format(sql.SQL(", ").join(picks), pk)
    sets = sql.SQL(", ").join(sql.SQL("{} = m.{}").format(sql.Identifier(col), sql.Identifier(f"n{k}"))
                              for k, col in enumerate(tm.maskers))
    # (tableoid, ctid) names a row of this table or, when it is partitioned, of one of its partitions
    only = sql.SQL("ONLY ") if t.relkind == "r" else sql.SQL("")
    update = sql.SQL("UPDATE {only}{t} AS t SET {sets} FROM (SELECT x.tableoid AS toid, x.ctid AS rid, {new} "
                     "FROM {only}{t} AS {x}{lat}) AS m WHERE t.tableoid = m.toid AND t.ctid = m.rid RETURNING {ret}").format(
        only=only, t=t.qualified, sets=sets, new=sql.SQL(", ").join(new_cols), x=x, lat=lateral,
        ret=sql.SQL(", ").join(returning) if returning else sql.SQL("1"))
    conn.execute(sql.SQL("ALTER TABLE {} DISABLE TRIGGER USER").format(t.qualified))
    digest = plan.keyed.digest
    counts = [[0, 0] for _ in tracked]  # unchanged, values
    rows = 0
    with conn.cursor().copy(sql.SQL("COPY ({}) TO STDOUT").format(update)) as copy:
        for data in copy:
            rows += 1
            if not tracked:
                continue
            fields = bytes(data)[:-1].split(b"\t")
            for j, (col_id, m) in enumerate(tracked):
                old, new = fields[2 * j], fields[2 * j + 1]
                if old == NULL:
                    continue
                counts[j][1] += 1
                v, o = unescape(old), unescape(new)
                if m.kind != "shift_days":
                    collector.add_source(digest(v)[24:32])
                if o == v:
                    counts[j][0] += 1
                elif m.kind in ("hash", "template", "partial") or (m.kind == "faker" and m.unique):
                    collector.add_output(digest(o)[24:32], col_id.to_bytes(2, "little"))
            collector.flush()
    collector.flush(final=True)
    conn.execute(sql.SQL("ALTER TABLE {} ENABLE TRIGGER USER").format(t.qualified))
    for (col_id, _), (same, seen) in zip(tracked, counts):
        unchanged[col_id], values[col_id] = same, seen
    return rows


def _sql_check(conn: psycopg.Connection, tm: TableMasking, col: str) -> tuple[int, int]:
    m = tm.maskers[col]
    ident = sql.Identifier(col)
    bad = (sql.SQL("count({})").format(ident) if m.kind == "null" else
           sql.SQL("count(*) FILTER (WHERE {c} IS NOT NULL AND concat({c}) <> {v})").format(c=ident, v=sql.Literal(m.constant)))
    rows, wrong = conn.cursor(row_factory=tuple_row).execute(
        sql.SQL("SELECT count(*), {} FROM {}").format(bad, tm.table.qualified)).fetchone()
    return rows, wrong


# -- Prefect tasks ----------------------------------------------------------------------------
# Run once: after its commit a second run would mask the masked values again, and they would no
# longer match what a refresh from the same source writes.

@task(name="anonymize-in-place", **RUN_ONCE)
def anonymize_task(settings: Settings, env: Environment) -> AnonymizeReport:
    return anonymize(settings, env)
