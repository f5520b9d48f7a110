"""Anonymize a database in place: the rules of `anonymize:` applied with set-based UPDATEs.

For a database that already holds a copy of production data (a restored backup on a
developer's server, say), never for production itself. The masked values are the ones a
refresh writes (the same HMAC and pools, in SQL: see dataops.tasks.anonymize.masking), so a database
anonymized in place and one refreshed from the same source agree value for value.

One transaction: sensitive rows are deleted (`anonymize.delete`), then each table is
updated in one statement whose RETURNING clause streams every (old, new) pair of the
masked columns to the leak scan; a leak rolls everything back. A partitioned table is
updated through its parent, so its rules reach every partition. User triggers and rewrite
rules on UPDATE are off during the update (an `updated_at` trigger would stamp every row,
an audit rule would copy the old values elsewhere); generated columns are recomputed by
PostgreSQL from the masked values. Foreign keys over masked columns are dropped for the
updates and added back (and so checked) before the commit: the rules check found both
sides masked alike. Large objects whose ids a masked oid column held are unlinked.
Row-level security is off for the session (a policy that hid rows would leave them
unmasked: PostgreSQL refuses instead). Afterwards VACUUM FULL rewrites the tables, since
an UPDATE leaves the old row versions, personal data included, in the table's files
until they are reused.

So a process killed before the commit leaves the database as it was, and one killed after it
leaves it masked with those old row versions still on disk: running it again masks the masked
values once more (no original comes back, but they no longer match a refresh's) and vacuums;
VACUUM FULL of the tables alone is enough too. A lost connection (pg_terminate_backend, a
restart) fails the run with one line saying which of the two it left: nothing changed when it
was lost before the commit, and when it was lost during the commit the server is asked.
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

from dataops.errors import DataopsError, OperationFailed, SafetyRefusal, first_line
from dataops.failpoints import failpoint
from dataops.settings import Environment, Settings
from dataops.tasks import pg
from dataops.tasks.anonymize.leak_scan import Collector, LeakReport, Workspace, build_report, match_digests
from dataops.tasks.anonymize.masking import NULL, unescape
from dataops.tasks.anonymize.report import DistinctCounts, MaskingReport
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
    masking: MaskingReport | None = None  # counts of `--report` (dataops.tasks.anonymize.report)

    def summary(self) -> str:
        deleted = sum(self.deleted.values())
        return (f"anonymized {self.environment}: {len(self.masked)} columns in {len(self.tables)} tables, "
                f"{sum(self.tables.values()):,} rows updated, {deleted:,} rows deleted in {self.seconds:.1f} s")


def anonymize(settings: Settings, env: Environment, *, vacuum: bool = True,
              progress: Callable[[str], None] | None = None, count: bool = False) -> AnonymizeReport:
    say = progress or (lambda msg: log.info("%s", msg))
    guard_environment(env)  # the flow refuses first; a plain call must be refused too
    t0 = time.monotonic()
    report = AnonymizeReport(env.name)
    xid, committing = None, False
    try:
        with pg.connect(env.database_url, timeout=settings.postgres.connect_timeout,
                        application_name="dataops-anonymize") as conn:
            xid = conn.execute("SELECT txid_current()").fetchone()[0]  # to ask the server after a lost commit
            tables, unlinked = _mask(settings, conn, env, report, say, count)
            failpoint("anonymize.before_commit")  # a kill here: every delete and update rolls back, nothing masked
            committing = True
            conn.commit()
    except psycopg.OperationalError as exc:
        if not lost_connection(exc):
            raise
        raise lost_connection_error(settings, env, xid, committing, exc, list(report.tables)) from None
    failpoint("anonymize.after_commit")  # masked, but the old row versions are in the files until the VACUUM FULL
    if vacuum and report.tables:
        v0 = time.monotonic()
        with pg.connect(env.database_url, autocommit=True) as conn:
            for label in list(report.tables) + [t for t in report.deleted if t not in report.tables]:
                conn.execute(sql.SQL("VACUUM (FULL, ANALYZE) {}").format(tables[label].qualified))
            if unlinked:  # the unlinked objects' pages are dead rows of pg_largeobject until it is rewritten
                try:
                    conn.execute("VACUUM (FULL) pg_catalog.pg_largeobject")
                except psycopg.Error as exc:
                    log.warning("could not VACUUM FULL pg_largeobject (%s); the %d unlinked large objects stay in "
                                "its files until a superuser does", first_line(exc), unlinked)
        report.vacuum_seconds = time.monotonic() - v0
    report.seconds = time.monotonic() - t0
    say(report.summary())
    return report


def _mask(settings: Settings, conn: psycopg.Connection, env: Environment, report: AnonymizeReport,
          say: Callable[[str], None], count: bool = False) -> tuple[dict, int]:
    """Every delete and update of the run, in the open transaction of `conn` (the caller commits);
    returns the tables read and the number of large objects unlinked."""
    for name, value in STABLE_OUTPUT.items():
        conn.execute("SELECT set_config(%s, %s, true)", (name, value))
    conn.execute("SET LOCAL row_security = off")  # a policy that would hide rows is an error, not a gap
    tables = read_tables(conn)
    plan = plan_masking(settings, conn, tables, in_place=True)
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
    keys = _drop_keys(conn, plan)
    rules = _disable_rules(conn, plan)
    large_objects = _large_objects(conn, plan)
    names: list[tuple[str, str]] = []
    unchanged: dict[int, int] = {}
    values: dict[int, int] = {}
    sql_checked: dict[str, tuple[int, int]] = {}
    counts = DistinctCounts(conn, plan) if count else None  # after the deletes, under the lock
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
    if counts:
        report.masking = counts.finish(conn, env.name, report.leaks, report.deleted, report.defaulted)
    for stmt in rules:
        conn.execute(stmt)
    _add_keys(conn, keys)
    unlinked = _unlink(conn, large_objects)
    if not report.leaks.ok:
        conn.rollback()
        raise OperationFailed(f"anonymize {env.name} rolled back: {report.leaks.summary()}")
    return tables, unlinked


def lost_connection(exc: BaseException) -> bool:
    """The session ended under us (pg_terminate_backend, a restart, a failover, the network): its
    SQLSTATE is an operator intervention (57P..) or a connection exception (08...), or there is
    none (libpq found the connection closed). A statement timeout (57014) is not one."""
    state = getattr(exc, "sqlstate", None)
    return isinstance(exc, psycopg.OperationalError) and (state is None or state.startswith(("57P", "08")))


def lost_connection_error(settings: Settings, env: Environment, xid: int | None, committing: bool,
                          exc: BaseException, tables: list[str]) -> OperationFailed:
    """What a lost connection left, in one line. Before the commit was sent, nothing (PostgreSQL
    rolls back a transaction whose session ends); during the commit, the server is asked what
    became of the transaction (txid_status), since a commit can land and its answer be lost."""
    why = first_line(exc)
    status = None
    if committing and xid is not None:
        try:
            with pg.connect(env.database_url, autocommit=True, timeout=settings.postgres.connect_timeout) as conn:
                status = conn.execute("SELECT txid_status(%s)", (xid,)).fetchone()[0]
        except (DataopsError, psycopg.Error):  # the server is away: it cannot say
            pass
    if not committing or status == "aborted":
        return OperationFailed(f"anonymize {env.name} lost its connection before its commit ({why}); nothing was "
                               "changed (one transaction, rolled back); run it again")
    vacuum = f"VACUUM FULL of {', '.join(tables)}" if tables else "VACUUM FULL of the masked tables"
    if status == "committed":
        return OperationFailed(f"anonymize {env.name} lost its connection during its commit ({why}), which went "
                               f"through: {env.name} is anonymized, but the old row versions are still in the files; "
                               f"run {vacuum}")
    return OperationFailed(f"anonymize {env.name} lost its connection during its commit ({why}); whether it went "
                           f"through is unknown (SELECT txid_status({xid}) on {env.name} says): if committed, run "
                           f"{vacuum}; if aborted, nothing was changed and it can run again")


def _drop_keys(conn: psycopg.Connection, plan: MaskingPlan) -> list[tuple[str, str, str]]:
    """Drop the foreign keys over masked columns (either side); returns (table, name,
    definition) to add them back. Updated one table at a time, a masked key would point at
    no row in between (or be rewritten twice by ON UPDATE CASCADE)."""
    masked = [(tm.table.schema, tm.table.name, col) for tm in plan.tables.values() for col in tm.maskers]
    if not masked:
        return []
    rows = conn.cursor(row_factory=tuple_row).execute(
        """
        SELECT DISTINCT co.conrelid::regclass::text, co.conname, pg_get_constraintdef(co.oid)
        FROM pg_constraint co
        WHERE co.contype = 'f' AND co.conparentid = 0 AND EXISTS (
            SELECT 1 FROM (VALUES %s) m(s, t, c)
            JOIN pg_class mc ON mc.relname = m.t JOIN pg_namespace mn ON mn.oid = mc.relnamespace AND mn.nspname = m.s
            JOIN pg_attribute a ON a.attname = m.c
            WHERE (a.attrelid = co.conrelid AND a.attnum = ANY (co.conkey)
                   OR a.attrelid = co.confrelid AND a.attnum = ANY (co.confkey))
              AND (a.attrelid = mc.oid OR a.attrelid IN (SELECT relid FROM pg_partition_tree(mc.oid))))
        """.replace("%s", ", ".join(["(%s, %s, %s)"] * len(masked))), [v for m in masked for v in m]).fetchall()
    for table, name, _ in rows:
        conn.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(sql.SQL(table), sql.Identifier(name)))
    return rows


def _add_keys(conn: psycopg.Connection, keys: list[tuple[str, str, str]]) -> None:
    for table, name, definition in keys:
        try:
            with conn.transaction():
                conn.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                    sql.SQL(table), sql.Identifier(name), sql.SQL(definition)))
        except psycopg.Error as exc:
            if lost_connection(exc):  # says nothing of the key: anonymize() reports what it left
                raise
            raise OperationFailed(f"anonymize rolled back: foreign key {name} on {table} no longer holds after "
                                  f"masking ({first_line(exc)}); give both of its columns the same rule") from None


def _disable_rules(conn: psycopg.Connection, plan: MaskingPlan) -> list[sql.Composed]:
    """Disable the rewrite rules ON UPDATE of the updated tables (and their partitions): an
    audit rule would copy the old values elsewhere, an INSTEAD rule would swallow the
    update. Returns the statements that enable them again."""
    labels = [(tm.table.schema, tm.table.name) for tm in plan.tables.values()]
    if not labels:
        return []
    rows = conn.cursor(row_factory=tuple_row).execute(
        """
        SELECT r.ev_class::regclass::text, r.rulename, r.ev_enabled FROM pg_rewrite r
        JOIN pg_class c ON c.oid = r.ev_class
        WHERE r.ev_type = '2' AND r.ev_enabled <> 'D' AND r.ev_class IN (
            SELECT pt.relid FROM (VALUES %s) m(s, t)
            JOIN pg_namespace n ON n.nspname = m.s JOIN pg_class mc ON mc.relnamespace = n.oid AND mc.relname = m.t
            CROSS JOIN LATERAL (SELECT mc.oid AS relid UNION SELECT relid FROM pg_partition_tree(mc.oid)) pt)
        """.replace("%s", ", ".join(["(%s, %s)"] * len(labels))), [v for x in labels for v in x]).fetchall()
    again = []
    for table, rule, enabled in rows:
        conn.execute(sql.SQL("ALTER TABLE {} DISABLE RULE {}").format(sql.SQL(table), sql.Identifier(rule)))
        how = {"O": "", "R": "REPLICA ", "A": "ALWAYS "}[enabled]
        again.append(sql.SQL("ALTER TABLE {} ENABLE " + how + "RULE {}").format(sql.SQL(table), sql.Identifier(rule)))
    return again


def _large_objects(conn: psycopg.Connection, plan: MaskingPlan) -> list[int]:
    """Ids of the large objects that masked oid columns point at now (their data would stay
    readable by id after the column is nulled)."""
    found: set[int] = set()
    for tm in plan.tables.values():
        for col, m in tm.maskers.items():
            if m.column.base == "oid":
                query = sql.SQL("SELECT DISTINCT {c} FROM {t} WHERE {c} IS NOT NULL").format(
                    c=sql.Identifier(col), t=tm.table.qualified)
                found |= {r[0] for r in conn.cursor(row_factory=tuple_row).execute(query)}
    return sorted(found)


def _unlink(conn: psycopg.Connection, oids: list[int]) -> int:
    """Unlink the large objects that exist among `oids`; returns how many."""
    if not oids:
        return 0
    return len(conn.execute("SELECT lo_unlink(o) FROM unnest(%s::oid[]) o "
                            "WHERE EXISTS (SELECT 1 FROM pg_largeobject_metadata m WHERE m.oid = o)",
                            (oids,)).fetchall())


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
    silenced = pg.silence_user_triggers(conn, [t.qualified])  # an operator's disabled trigger stays off after
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
                if m.track_source:
                    collector.add_source(digest(v)[24:32])
                if o == v:
                    counts[j][0] += 1
                elif m.track_output and new != NULL:
                    collector.add_output(digest(o)[24:32], col_id.to_bytes(2, "little"))
            collector.flush()
    collector.flush(final=True)
    pg.restore_user_triggers(conn, silenced)
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
def anonymize_task(settings: Settings, env: Environment, count: bool = False) -> AnonymizeReport:
    return anonymize(settings, env, count=count)
