"""Refresh staging from production: a masked, validated copy that replaces staging in one step.

1. Guards and the plan (dataops.tasks.refresh.plan): environments allowed, every rule checked,
   no personal-looking column without a rule. Nothing is written before this passes.
2. A new database `<staging>__dataops_refresh_<hex>` beside staging on the target's
   server, with the source's schema up to its tables (`pg_dump --schema-only`,
   `--section=pre-data`), all read in one exported snapshot of the source.
3. Every table streamed into it with the masking applied in the stream
   (dataops.tasks.refresh.table_copy), then indexes, constraints and triggers (`--section=post-data`,
   in parallel), sequences set past the copied data, materialized views refreshed.
4. Checks on the new copy: row counts equal the source's (or the subset's) in the same
   snapshot, every foreign key validated, checksums of the unmasked columns equal the
   source's, and the leak scan (dataops.tasks.anonymize.leak_scan) finds no masked source value.
5. Only then the switch: both renames in one transaction, so staging is always either the
   old database or the new one. The old one is dropped afterwards.

A failure at any point discards the new copy; staging is untouched. A killed run leaves its
`__dataops_refresh_` database behind: the next run discards it (under an advisory lock that
also keeps two refreshes of one target from running at once).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from dataops.dsn import Dsn
from dataops.errors import BadInput, OperationFailed, SafetyRefusal, TransientError, first_line
from dataops.failpoints import failpoint
from dataops.settings import Environment, Settings
from dataops.tasks import pg
from dataops.tasks.anonymize.leak_scan import LeakReport, Matches, Workspace, build_report, match_digests
from dataops.tasks.anonymize.masking import fill_pools
from dataops.tasks.anonymize.rules import regclass
from dataops.tasks.anonymize.suggest import propose_rules
from dataops.tasks.checksums import checksum_text, row_hash_sql
from dataops.tasks.refresh.plan import RefreshPlan, TablePlan, count_subset, parts_for, plan_refresh
from dataops.tasks.refresh.table_copy import CopyJob, CopyResult, run_jobs
from dataops.tasks.schema import STABLE_OUTPUT, pinned_settings
from dataops.tasks.validation.checks import DeclaredForeignKeys

log = logging.getLogger("dataops.refresh")

SCRATCH_TAG = "__dataops_refresh_"


def scratch_prefix(target_db: str) -> str:
    return f"{target_db[:30]}{SCRATCH_TAG}"


# -- the source snapshot and the target lock ------------------------------------------------

@dataclass
class SourceSnapshot:
    env: Environment
    conn: psycopg.Connection
    id: str


@contextlib.contextmanager
def source_snapshot(settings: Settings, env: Environment) -> Iterator[SourceSnapshot]:
    """A read-only REPEATABLE READ transaction on the source whose snapshot every reader of
    the refresh imports: the plan, pg_dump, each COPY and the source checksums all see the
    same data. It stays open until the block ends."""
    with pg.connect(env.database_url, timeout=settings.postgres.connect_timeout, autocommit=True,
                    application_name="dataops-refresh") as conn:
        conn.execute("SET idle_in_transaction_session_timeout = 0")
        for name, value in STABLE_OUTPUT.items():
            conn.execute("SELECT set_config(%s, %s, false)", (name, value))
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        snap = conn.execute("SELECT pg_export_snapshot()").fetchone()[0]
        try:
            yield SourceSnapshot(env, conn, snap)
        finally:
            if not conn.closed:
                try:
                    conn.execute("ROLLBACK")
                except psycopg.OperationalError:  # the connection went (a restart): so did its transaction,
                    pass  # and the error that matters is the one the refresh met


def discard_leftovers(env: Environment) -> list[str]:
    """Discard the copies of earlier runs that died before their switch (call with the
    replacement lock held (pg.replacement_lock), so a copy still being built by a live run is never taken)."""
    dsn = env.database_url
    prefix = scratch_prefix(dsn.database)
    with pg.connect(dsn, autocommit=True, dbname=pg.MAINTENANCE_DB) as conn:
        names = [r[0] for r in conn.execute(
            "SELECT datname FROM pg_database WHERE left(datname, %s) = %s ORDER BY 1", (len(prefix), prefix))]
    for name in names:
        pg.drop_database(dsn, name)
        log.info("discarded %s, left over from an interrupted refresh", name)
    return names


# -- the report --------------------------------------------------------------------------------

@dataclass
class TableReport:
    table: str
    mode: str
    rows: int = 0
    source_rows: int = 0
    seconds: float = 0.0
    masked: str = ""
    subset: tuple[int, int] | None = None  # --check: (rows the subset keeps, rows in the table)

    def as_row(self, check_only: bool = False) -> dict:
        if check_only:
            kept = f"{self.subset[0]:,} of {self.subset[1]:,}" if self.subset is not None else "all"
            return {"table": self.table, "mode": self.mode, "rows kept": kept, "masked columns": self.masked}
        return {"table": self.table, "mode": self.mode, "rows": self.rows, "seconds": round(self.seconds, 2),
                "masked columns": self.masked}


@dataclass
class RefreshReport:
    source: str
    target: str
    check_only: bool
    tables: list[TableReport] = field(default_factory=list)
    masked: list[tuple[str, str, str]] = field(default_factory=list)  # (table, column, rule)
    unmasked_personal: list[str] = field(default_factory=list)
    defaulted: list[str] = field(default_factory=list)
    suggested: str = ""  # check only: YAML rules for the unmasked personal columns (dataops.tasks.anonymize.suggest)
    suggestion_check: str | None = None  # why the suggested rules would not pass the rule check yet, if so
    leaks: LeakReport | None = None
    phases: dict[str, float] = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)  # what was verified, one line each
    cleaned: list[str] = field(default_factory=list)
    backup_id: str | None = None
    seconds: float = 0.0

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tables)

    def summary(self) -> str:
        if self.check_only:
            state = "ready" if not self.unmasked_personal else f"{len(self.unmasked_personal)} unmasked personal column(s)"
            return (f"check {self.source} -> {self.target}: {len(self.tables)} tables, {len(self.masked)} masked "
                    f"columns; {state}")
        return (f"refreshed {self.target} from {self.source}: {len(self.tables)} tables, {self.rows:,} rows, "
                f"{len(self.masked)} masked columns in {self.seconds:.1f} s")


def _report_from_plan(plan: RefreshPlan, check_only: bool) -> RefreshReport:
    rep = RefreshReport(plan.source, plan.target, check_only)
    for row in plan.describe():
        rep.tables.append(TableReport(row["table"], row["mode"], masked=row["masked columns"]))
    rep.masked = plan.masking.masked_columns()
    rep.unmasked_personal = [str(f) for f in plan.masking.unmasked_personal]
    rep.defaulted = [str(f) for f in plan.masking.defaulted]
    return rep


# -- 1. plan ----------------------------------------------------------------------------------

def check_refresh(settings: Settings, source: Environment, target: Environment) -> RefreshReport:
    """`refresh-staging --check`: the rules and the PII guard's findings, without copying
    anything (unmasked columns are reported, not refused: CI lists them all at once)."""
    with source_snapshot(settings, source) as snap:
        plan = plan_refresh(settings, snap.conn, source, target)
        report = _report_from_plan(plan, check_only=True)
        by_label = {t.table: t for t in report.tables}
        for tp in plan.copied:
            if tp.filtered:
                by_label[tp.label].subset = count_subset(snap.conn, tp)
        if plan.masking.unmasked_personal:  # rules to paste, printed by --check: never applied
            report.suggested, report.suggestion_check = propose_rules(
                settings, snap.conn, plan.masking, {k: tp.table for k, tp in plan.tables.items()},
                {tp.label for tp in plan.copied})
    return report


def plan_and_guard(settings: Settings, snap: SourceSnapshot, source: Environment, target: Environment) -> RefreshPlan:
    """The plan, refused while a personal-looking column has no rule: nothing is written before."""
    plan = plan_refresh(settings, snap.conn, source, target)
    if plan.masking.unmasked_personal:
        raise SafetyRefusal(plan.masking.guard_message(f"refresh of {plan.target}"))
    return plan


# -- 2. the new copy, up to its tables ----------------------------------------------------------

@dataclass
class NewCopy:
    server: Dsn  # the target's server (any database on it)
    name: str
    schema_file: str

    @property
    def dsn(self) -> Dsn:
        return self.server.with_database(self.name)


def create_copy(settings: Settings, plan: RefreshPlan, snap: SourceSnapshot, target: Environment) -> NewCopy:
    """Dump the source's schema in the snapshot, create the scratch database, restore the
    pre-data section (types, tables, sequences, functions, views) into it."""
    src = snap.env.database_url
    major, _ = pg.server_version(src, settings.postgres.connect_timeout)
    # the target database may not exist yet (a first refresh): ask the server through its maintenance database
    tmajor, _ = pg.server_version(target.database_url.with_database(pg.MAINTENANCE_DB), settings.postgres.connect_timeout)
    pg_dump = pg.client_binary("pg_dump", major, settings.postgres.bin_dir)
    pg_restore = pg.client_binary("pg_restore", tmajor, settings.postgres.bin_dir)
    workdir = tempfile.mkdtemp(prefix="dataops-refresh-")
    schema_file = str(Path(workdir) / "schema.dump")
    conninfo, env = src.libpq_args()
    args = [pg_dump, "--schema-only", "--format=custom", "--no-sync", f"--snapshot={snap.id}",
            "--lock-wait-timeout=60000", "--no-publications", "--no-subscriptions",
            "--exclude-schema=dataops_snapshots", f"--file={schema_file}", f"--dbname={conninfo}"]
    excluded = {label for label, tp in plan.tables.items() if tp.mode == "exclude"}
    args += [f"--exclude-table={regclass(tp.table.schema, tp.table.name)}"  # quoted: taken literally, not as a pattern
             for tp in plan.tables.values() if tp.mode == "exclude"]
    args += [f"--exclude-table={p.rel.regclass}" for p in plan.partitions.values() if p.root in excluded]
    _run(args, env, "pg_dump --schema-only")
    name = scratch_prefix(target.database_url.database) + secrets.token_hex(4)
    pg.create_database(target.database_url, name)
    new = NewCopy(target.database_url, name, schema_file)
    try:
        restore_section(settings, new, "pre-data", pg_restore)
    except BaseException:
        discard_copy(new)
        raise
    return new


def restore_section(settings: Settings, new: NewCopy, section: str, binary: str | None = None, jobs: int = 1) -> None:
    if binary is None:
        major, _ = pg.server_version(new.dsn, settings.postgres.connect_timeout)
        binary = pg.client_binary("pg_restore", major, settings.postgres.bin_dir)
    conninfo, env = new.dsn.libpq_args()

    def run(jobs: int) -> None:
        _run([binary, f"--section={section}", "--no-owner", "--no-privileges", "--no-publications",
              "--no-subscriptions", "--exit-on-error", f"--jobs={max(1, jobs)}", f"--dbname={conninfo}",
              new.schema_file], env, f"pg_restore --section={section}")

    toc = _toc(binary, new.schema_file) if jobs > 1 and section == "post-data" else []
    if any(" TABLE ATTACH " in line for line in toc):
        # Partitions: pg_restore keeps parallel items apart by the tables they name, but an index,
        # key, trigger or foreign key on a partitioned table also locks every partition, which it
        # does not know of. Beside an item on a partition it deadlocked, on the zoo: first a
        # foreign key (so they went one at a time, after the rest), then, in a clean-clone run of
        # make test, the rest itself. A schema with partitions builds its post-data in one session.
        run(1)
        return
    run(jobs)


def _toc(binary: str, archive: str) -> list[str]:
    """The archive's table of contents (`pg_restore -l`), one entry per line, for --use-list."""
    proc = subprocess.run([binary, "-l", archive], capture_output=True, text=True)
    if proc.returncode != 0:
        raise OperationFailed(f"pg_restore -l failed: {proc.stderr.strip().splitlines()[-1:] or 'no message'}")
    return [line + "\n" for line in proc.stdout.splitlines() if line.strip() and not line.startswith(";")]


def _run(args: list[str], env: dict[str, str], what: str) -> None:
    proc = subprocess.run(args, env={**os.environ, **env}, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "error" in ln.lower()), lines[-1] if lines else "no message")
        command = next((ln.strip() for ln in lines if ln.strip().startswith("Command was:")), "")
        raise OperationFailed(f"{what} failed: {detail.strip()}" + (f" ({command[:200]})" if command else ""))


def discard_copy(new: NewCopy) -> None:
    """Drop the new copy of a failed refresh. Called while its error is raised: a server that is
    away (restarting) keeps that error in front, and the next refresh discards the copy."""
    try:
        pg.drop_database(new.server, new.name)
    except (TransientError, psycopg.OperationalError) as exc:
        log.warning("could not drop the new copy %s now (%s); the next refresh discards it", new.name, first_line(exc))
    finally:
        shutil.rmtree(Path(new.schema_file).parent, ignore_errors=True)


# -- 3. data ----------------------------------------------------------------------------------

@dataclass
class ColumnIds:
    """A small number per masked column: the leak scan's files carry it instead of names."""
    ids: dict[tuple[str, str], int] = field(default_factory=dict)

    def of(self, table: str, column: str) -> int:
        return self.ids.setdefault((table, column), len(self.ids))

    def names(self) -> list[tuple[str, str]]:
        return [k for k, _ in sorted(self.ids.items(), key=lambda kv: kv[1])]


def build_jobs(plan: RefreshPlan, snap: SourceSnapshot, new: NewCopy, workspace: Workspace,
               column_ids: ColumnIds, psql: str | None = None) -> list[CopyJob]:
    source_conninfo = snap.env.database_url.conninfo(application_name="dataops-refresh-copy")
    target_conninfo = new.dsn.conninfo(application_name="dataops-refresh-load")
    pipe = (psql, snap.env.database_url.libpq_args(), new.dsn.libpq_args()) if psql else None
    jobs = []
    for tp in plan.copied:
        t = tp.table
        masking = plan.masking.tables.get(tp.label)
        maskers = masking.maskers if masking else {}
        select = []
        python = []
        originals, extras = [], {}  # rules PostgreSQL evaluates: the source value rides at the row's end
        by_sql = False  # rules PostgreSQL evaluates in a table that streams without Python
        refs = {c.name: sql.SQL("t0.{}").format(sql.Identifier(c.name)) for c in t.columns}  # for templates, cases
        for i, col in enumerate(t.columns):
            ident = sql.Identifier(col.name)
            m = maskers.get(col.name)
            if m is not None and m.by_postgres and not m.row_free:
                select.append(sql.SQL("{} AS {}").format(m.sql(sql.SQL("t0.{}").format(ident), refs=refs), ident))
                extras[i] = len(t.columns) + len(originals)
                originals.append(sql.SQL("t0.{}").format(ident))
                python.append((i, column_ids.of(tp.label, col.name), m))
            elif m is not None and m.row_free:  # masked in the SELECT; counted by SQL (source_checksums)
                select.append(sql.SQL("{} AS {}").format(m.sql(sql.SQL("t0.{}").format(ident), refs=refs), ident))
                column_ids.of(tp.label, col.name)
                by_sql = by_sql or m.by_postgres
            else:
                select.append(sql.SQL("t0.{}").format(ident))
                if m is not None:
                    python.append((i, column_ids.of(tp.label, col.name), m))
        cols = sql.SQL(", ").join(sql.Identifier(c.name) for c in t.columns)
        with_ = sql.SQL("WITH RECURSIVE {} ").format(sql.SQL(", ").join(tp.ctes)) if tp.ctes else sql.SQL("")
        table_jobs = []
        # A partitioned table is copied leaf by leaf, each into the same leaf of the copy (the
        # schema came from the same dump, so the bounds are the same); checked as one table.
        for piece in tp.pieces:
            parts = parts_for(piece, bool(python) or by_sql, plan.jobs)  # masking CPU: worth both cores
            for part in range(parts):
                where = [tp.keep] if tp.keep is not None else []
                if parts > 1:
                    lo, hi = piece.blocks * part // parts, piece.blocks * (part + 1) // parts
                    if part > 0:
                        where.append(sql.SQL("t0.ctid >= {}::tid").format(sql.Literal(f"({lo},0)")))
                    if part < parts - 1:  # the last part is open-ended: the table may have grown since
                        where.append(sql.SQL("t0.ctid < {}::tid").format(sql.Literal(f"({hi},0)")))
                if not where and all(not m.in_sql and not m.by_postgres for m in maskers.values()):
                    copy_out = sql.SQL("COPY {} ({}) TO STDOUT").format(piece.rel.qualified, cols)  # its own rows only
                else:
                    copy_out = sql.SQL("COPY ({}SELECT {} FROM {} AS t0{}) TO STDOUT").format(
                        with_, sql.SQL(", ").join(select + originals), piece.rel.scan,
                        sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL(""))
                copy_in = sql.SQL("COPY {} ({}) FROM STDIN").format(piece.rel.qualified, cols)
                table_jobs.append((copy_out, copy_in, max(1, piece.est_rows // parts)))
        for n, (copy_out, copy_in, est) in enumerate(table_jobs, 1):
            jobs.append(CopyJob(
                id=tp.label if len(table_jobs) == 1 else f"{tp.label}#{n}", label=tp.label,
                source=source_conninfo, target=target_conninfo, snapshot=snap.id,
                copy_out=copy_out.as_string(snap.conn), copy_in=copy_in.as_string(snap.conn), maskers=python,
                leak_dir=workspace.path, leak_bits=workspace.bits, est_rows=est,
                psql=None if python else pipe, extras=extras))
    return jobs


def expected_masked_values(plan: RefreshPlan) -> int:
    return sum(plan.tables[label].est_rows * len(tm.in_python)
               for label, tm in plan.masking.tables.items() if plan.tables[label].mode == "copy")


def copy_data(plan: RefreshPlan, snap: SourceSnapshot, new: NewCopy, workspace: Workspace,
              column_ids: ColumnIds, settings: Settings | None = None) -> list[CopyResult]:
    psql = None
    try:
        major, _ = pg.server_version(new.dsn)
        psql = pg.client_binary("psql", major, settings.postgres.bin_dir if settings else None)
    except BadInput:
        log.info("no psql %s client found: unmasked tables go through Python too", major)
    jobs = build_jobs(plan, snap, new, workspace, column_ids, psql)

    def done(r: CopyResult) -> None:
        log.info("copied %s: %d rows in %.1f s", r.id, r.rows, r.finished - r.started)

    maskers = [m for tm in plan.masking.tables.values() for m in tm.maskers.values()]
    try:
        # The Faker pools (~0.5 s each) are built while the jobs that need none start.
        with ThreadPoolExecutor(1, thread_name_prefix="dataops-pools") as filler:
            pools = filler.submit(fill_pools, maskers)
            return run_jobs(jobs, plan.jobs, on_done=done, before_masking=pools.result)
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OperationFailed(f"copying the data failed: {first}") from None


def source_checksums(settings: Settings, plan: RefreshPlan, snap: SourceSnapshot) -> dict[str, tuple[int, str]]:
    """Rows and checksum of the unmasked columns of every copied table (subset applied), in
    the snapshot: what the copy must hold. Runs beside the copy, on its own connection."""
    out = {}
    with pg.connect(snap.env.database_url, autocommit=True, application_name="dataops-refresh-check") as conn:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snap.id)))
        with pinned_settings(conn, STABLE_OUTPUT):
            for tp in plan.copied:
                counted = [sql.SQL("count(t0.{})").format(sql.Identifier(c)) for c in _counted_by_sql(plan, tp.label)]
                out[tp.label] = _checksum(conn, tp, _unmasked(plan, tp.label), tp.keep, tp.ctes, counted)
        conn.execute("COMMIT")
    return out


def _counted_by_sql(plan: RefreshPlan, label: str) -> list[str]:
    """Columns PostgreSQL masks in the copy's SELECT with no row passing through Python
    (Masker.row_free): the leak report's count of their values comes from this scan."""
    tm = plan.masking.tables.get(label)
    return [c for c, m in (tm.maskers.items() if tm else []) if m.row_free and m.by_postgres]


def _unmasked(plan: RefreshPlan, label: str) -> list[str]:
    tm = plan.masking.tables.get(label)
    return [c.name for c in plan.tables[label].table.columns if not tm or c.name not in tm.maskers]


def _checksum(conn: psycopg.Connection, tp: TablePlan, columns: list[str], keep=None, ctes=(),
              extra: list[sql.Composable] = ()) -> tuple:
    """count(*) and the checksum of `columns` (dataops.tasks.checksums' row hash, the one validate
    uses) over the rows `keep` selects, plus extras."""
    row, _ = row_hash_sql(conn, tp.table.schema, tp.table.name, columns) if columns else ("0", ())
    with_ = sql.SQL("WITH RECURSIVE {} ").format(sql.SQL(", ").join(ctes)) if ctes else sql.SQL("")
    query = sql.SQL("{}SELECT count(*), sum({}){} FROM {} AS t0{}").format(  # ONLY a plain table's own rows
        with_, sql.SQL(row), sql.SQL("").join(sql.SQL(", ") + e for e in extra), tp.rel.scan,
        sql.SQL(" WHERE {}").format(keep) if keep is not None else sql.SQL(""))
    rows, total, *rest = conn.cursor(row_factory=tuple_row).execute(query).fetchone()
    return (rows, checksum_text(rows, total), *rest)


def finish_copy(settings: Settings, plan: RefreshPlan, new: NewCopy) -> None:
    """Indexes, constraints (foreign keys validated as they are added) and triggers, then
    sequences past the copied data and the materialized views that hold data in the source
    refreshed (from the masked rows)."""
    restore_section(settings, new, "post-data", jobs=plan.jobs)
    with pg.connect(new.dsn, autocommit=True) as conn:
        set_sequences(conn, plan)
        pending = list(plan.matviews)  # those with data in the source; WITH NO DATA ones stay so
        for _ in range(len(pending)):  # views on views: retry in dependency order
            failed = []
            for v in pending:
                try:
                    conn.execute(sql.SQL("REFRESH MATERIALIZED VIEW {}").format(sql.SQL(v)))
                except psycopg.errors.ObjectNotInPrerequisiteState:
                    failed.append(v)
            if not failed:
                break
            pending = failed


def set_sequences(conn: psycopg.Connection, plan: RefreshPlan) -> None:
    for seq in plan.sequences:
        last, called = seq.last_value, seq.is_called
        if seq.owner and seq.increment > 0:
            schema, table, column = seq.owner
            top = conn.execute(sql.SQL("SELECT max({}) FROM {}.{}").format(
                sql.Identifier(column), sql.Identifier(schema), sql.Identifier(table))).fetchone()[0]
            if top is not None and (top > last or (top == last and not called)):
                last, called = top, True
        conn.execute("SELECT setval(%s::regclass, %s, %s)", (regclass(seq.schema, seq.name), last, called))


# -- 4. validation -------------------------------------------------------------------------------

def integrity_checks(dsn: Dsn):
    """Every foreign key and sequence of the new copy, by the validation area's checks
    (orphans per declared foreign key, sequences past their column's values)."""
    from dataops.tasks.validation.checks import SequencesBehind
    from dataops.tasks.validation.validate import run_checks

    # Its foreign keys were added after the load (post-data), so PostgreSQL checked every row
    # of the validated ones; NOT VALID ones (NOT VALID in the source too) are still counted.
    return run_checks(dsn, [DeclaredForeignKeys(trust_validated=True), SequencesBehind()])


def target_checksums(plan: RefreshPlan, new: NewCopy) -> dict[str, tuple]:
    """Rows and checksum of the unmasked columns of every table of the new copy, plus the
    count of values a null or constant rule did not produce. Needs no index: it runs while
    the indexes and constraints are being built."""

    def one(tp: TablePlan) -> tuple:
        tm = plan.masking.tables.get(tp.label)
        extra = []
        for col, m in (tm.maskers.items() if tm else []):
            ident = sql.Identifier(col)
            if m.kind == "null":
                extra.append(sql.SQL("count(t0.{})").format(ident))
            elif m.kind == "constant":
                extra.append(sql.SQL("count(*) FILTER (WHERE t0.{c} IS NOT NULL AND concat(t0.{c}) <> {v})").format(
                    c=ident, v=sql.Literal(m.constant)))
        with pg.connect(new.dsn, autocommit=True, application_name="dataops-refresh-check") as conn, \
                pinned_settings(conn, STABLE_OUTPUT):
            return _checksum(conn, tp, _unmasked(plan, tp.label), extra=extra)

    with ThreadPoolExecutor(max(1, plan.jobs - 1)) as pool:  # leave a core to the index builds beside it
        return dict(zip([tp.label for tp in plan.copied], pool.map(one, plan.copied)))


def validate_copy(plan: RefreshPlan, new: NewCopy, results: list[CopyResult], expected: dict[str, tuple[int, str]],
                  actual: dict[str, tuple], matches: Matches,
                  column_ids: ColumnIds) -> tuple[list[str], list[str], LeakReport]:
    """(problems, checks done, leak report) of the new copy against the source snapshot:
    `expected` from source_checksums, `actual` from target_checksums, `matches` from
    match_leaks."""
    problems, checks = [], []
    streamed: dict[str, int] = {}
    for r in results:
        streamed[r.label] = streamed.get(r.label, 0) + r.rows
    integrity = integrity_checks(new.dsn)
    sql_checked: dict[str, tuple[int, int]] = {}  # "table.column" -> (rows checked, bad values)
    by_sql: dict[int, int] = {}  # column id -> source values masked in the SELECT, counted there
    for tp in plan.copied:
        rows, checksum, *extras = actual[tp.label]
        want_rows, want_sum, *counted = expected[tp.label]
        for col, n in zip(_counted_by_sql(plan, tp.label), counted):
            by_sql[column_ids.of(tp.label, col)] = int(n)
        if rows != want_rows or streamed.get(tp.label, 0) != want_rows:
            problems.append(f"table {tp.label}: {rows} rows in the copy, {streamed.get(tp.label, 0)} streamed, "
                            f"{want_rows} in the source")
        elif checksum != want_sum:
            problems.append(f"table {tp.label}: checksum of the unmasked columns differs from the source")
        tm = plan.masking.tables.get(tp.label)
        sql_rules = [(c, m) for c, m in (tm.maskers.items() if tm else []) if m.kind in ("null", "constant")]
        for (col, m), bad in zip(sql_rules, extras):
            sql_checked[f"{tp.label}.{col}"] = (rows, int(bad))
    checks.append(f"row counts: {len(plan.copied)} tables equal the source snapshot"
                  + (" (with the subset)" if any(tp.filtered for tp in plan.copied) else ""))
    checks.append(f"checksums of the unmasked columns equal the source's in {len(plan.copied)} tables")

    fks = [r for r in integrity.results if r.kind == "foreign_key"]
    wanted = sum(1 for e in plan.foreign_keys if e.child in plan.tables and plan.tables[e.child].mode != "exclude")
    if len(fks) != wanted:
        problems.append(f"{len(fks)} foreign keys in the copy, {wanted} in the source")
    problems += [f"{r.kind} {r.name}: {r.detail}" for r in integrity.failures]
    recounted = sum(1 for r in fks if "NOT VALID" in r.detail)
    checks.append(f"integrity: {integrity.summary()} (every foreign key holds: {len(fks) - recounted} validated by "
                  f"PostgreSQL as they were added after the load, {recounted} NOT VALID checked for orphaned rows; "
                  "sequences past their columns)")

    leaks = leak_scan(plan, results, matches, column_ids, sql_checked, by_sql)
    if not leaks.ok:
        problems.append(leaks.summary())
    return problems, checks, leaks


def match_leaks(plan: RefreshPlan, workspace: Workspace, column_ids: ColumnIds) -> Matches:
    """The digests the copy wrote, matched. Needs only the files, not the new copy, so it
    runs beside the index builds instead of after them (~1 CPU-s at 12M rows)."""
    return match_digests(plan.masking, column_ids.names(), workspace)


def leak_scan(plan: RefreshPlan, results: list[CopyResult], matches: Matches, column_ids: ColumnIds,
              sql_checked: dict[str, tuple[int, int]], by_sql: dict[int, int] | None = None) -> LeakReport:
    unchanged: dict[int, int] = {}
    values: dict[int, int] = dict(by_sql or {})
    for r in results:
        for cid, n in r.unchanged.items():
            unchanged[cid] = unchanged.get(cid, 0) + n
        for cid, n in r.values.items():
            values[cid] = values.get(cid, 0) + n
    return build_report(plan.masking, column_ids.names(), unchanged, values, matches, sql_checked,
                        counted_by_sql=set(by_sql or {}))


# -- 5. the switch -------------------------------------------------------------------------------

def switch(new: NewCopy, target: Environment) -> None:
    """Put the new copy in place of the target database (pg.swap_database: both renames in one
    transaction, so a failure or a kill leaves the old target in place), then drop the old one."""
    dsn = target.database_url
    old = pg.swap_database(dsn, new.name, dsn.database, step="refresh")
    shutil.rmtree(Path(new.schema_file).parent, ignore_errors=True)
    failpoint("refresh.after_switch")
    if old:
        try:
            pg.drop_database(dsn, old)
        except Exception as exc:  # noqa: BLE001 - the switch is done; the next swap drops it
            log.warning("could not drop the previous %s (now %s): %s; the next refresh drops it", dsn.database, old, exc)


# -- the whole refresh as one call ------------------------------------------------------------------

class PlainSteps:
    """The steps of a refresh as plain calls; the flow passes Prefect tasks instead
    (flows/refresh_staging.py), so the order lives in one place: refresh() below."""

    plan = staticmethod(plan_and_guard)
    discard_leftovers = staticmethod(discard_leftovers)
    create_copy = staticmethod(create_copy)
    copy_data = staticmethod(copy_data)
    finish_copy = staticmethod(finish_copy)
    validate = staticmethod(validate_copy)
    switch = staticmethod(switch)

    @staticmethod
    def backup(settings: Settings, target: Environment) -> str:
        from dataops.tasks.backup.dump import backup

        return backup(settings, target).id

    @staticmethod
    def source_checksums(pool: ThreadPoolExecutor, settings: Settings, plan: RefreshPlan, snap: SourceSnapshot):
        return pool.submit(source_checksums, settings, plan, snap)  # .result() later

    @staticmethod
    def target_checksums(pool: ThreadPoolExecutor, plan: RefreshPlan, new: NewCopy):
        return pool.submit(target_checksums, plan, new)

    @staticmethod
    def match_leaks(pool: ThreadPoolExecutor, plan: RefreshPlan, workspace: Workspace, column_ids: ColumnIds):
        return pool.submit(match_leaks, plan, workspace, column_ids)


def refresh(settings: Settings, source: Environment, target: Environment, *, steps=PlainSteps,
            progress: Callable[[str], None] | None = None) -> RefreshReport:
    """Plan, copy, check, switch; a failure anywhere leaves the target as it was. `source`
    and `target` come from resolve_environments (dataops.tasks.refresh.plan), whose guards they passed."""
    say = progress or (lambda msg: log.info("%s", msg))
    t0 = time.monotonic()
    with source_snapshot(settings, source) as snap:
        phase = time.monotonic()
        plan = steps.plan(settings, snap, source, target)
        report = _report_from_plan(plan, check_only=False)
        report.phases["plan"] = time.monotonic() - phase
        if settings.refresh.backup_target_first:  # the foundation's backup, once the rules are known to be good
            phase = time.monotonic()
            report.backup_id = steps.backup(settings, target)
            report.phases["backup of the target"] = time.monotonic() - phase
            say(f"backed up {target.name}: {report.backup_id}")
        with pg.replacement_lock(target.database_url, target.name, "refresh", settings.postgres.connect_timeout):
            report.cleaned = steps.discard_leftovers(target)
            phase = time.monotonic()
            new = steps.create_copy(settings, plan, snap, target)
            failpoint("refresh.after_create")
            report.phases["schema"] = time.monotonic() - phase
            say(f"building the new copy in database {new.name}")
            try:
                with Workspace(expected_masked_values(plan)) as ws, ThreadPoolExecutor(3) as side:
                    ids = ColumnIds()
                    phase = time.monotonic()
                    expected = steps.source_checksums(side, settings, plan, snap)
                    results = steps.copy_data(plan, snap, new, ws, ids, settings)
                    failpoint("refresh.after_copy")
                    report.phases["copy"] = time.monotonic() - phase
                    phase = time.monotonic()
                    actual = steps.target_checksums(side, plan, new)  # these two beside the index builds
                    matches = steps.match_leaks(side, plan, ws, ids)
                    steps.finish_copy(settings, plan, new)
                    failpoint("refresh.after_indexes")
                    report.phases["indexes and constraints"] = time.monotonic() - phase
                    phase = time.monotonic()
                    problems, checks, leaks = steps.validate(plan, new, results, expected.result(), actual.result(),
                                                             matches.result(), ids)
                    failpoint("refresh.after_checks")
                    report.phases["validation"] = time.monotonic() - phase
                fill_tables(report, plan, results)
                report.checks, report.leaks = checks, leaks
                if problems:
                    raise OperationFailed(f"the new copy of {target.name} failed its checks: {'; '.join(problems[:3])}; "
                                          f"'{target.name}' was left unchanged")
                phase = time.monotonic()
                steps.switch(new, target)
                report.phases["switch"] = time.monotonic() - phase
            except BaseException:
                discard_copy(new)
                raise
    report.seconds = time.monotonic() - t0
    say(report.summary())
    return report


def fill_tables(report: RefreshReport, plan: RefreshPlan, results: list[CopyResult]) -> None:
    by_label: dict[str, list[CopyResult]] = {}
    for r in results:
        by_label.setdefault(r.label, []).append(r)
    for t in report.tables:
        parts = by_label.get(t.table, [])
        t.rows = sum(p.rows for p in parts)
        t.seconds = (max(p.finished for p in parts) - min(p.started for p in parts)) if parts else 0.0
