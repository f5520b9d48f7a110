"""Validation as plain functions, for the CLI, the validate-database flow and every flow that
changes a database (migrate, transform, restore, refresh) to call before and after it acts.

    run_checks(db, checks)                       integrity checks -> CheckReport
    table_checksums(db, tables, columns)         order-independent checksums -> {table: TableChecksum}
    schema_fingerprint(db)                       sha256 of the schema snapshot
    diff_schemas(a, b)                           [Difference], one per differing object
    compare_environments(a, b)                   schema diff + row counts + checksums where schemas match
    database_state(db)                           fingerprint, counts, checksums and checks of one moment
    compare_with_expected(db, tables, fp)        a restored copy against a backup manifest

`db` (a `Database`) is an `Environment` from dataops.yaml or a bare `Dsn` (a scratch database). Every
function reads inside one REPEATABLE READ, READ ONLY transaction per database, so what it
reports describes one moment, and nothing is ever written: PostgreSQL itself refuses a
write in a read-only transaction, custom SQL included. The Prefect task wrappers
(`*_task`) retry only transient faults (a dropped connection), never a failed check.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import psycopg
from psycopg import IsolationLevel
from psycopg.rows import tuple_row

from dataops.dsn import Dsn
from dataops.errors import BadInput, OperationFailed
from dataops.settings import Environment
from dataops.tasks import pg
from dataops.tasks.checksums import TableChecksum, parse_label, table_checksum
from dataops.tasks.checksums import table_checksums as _conn_table_checksums
from dataops.tasks.reporting import text_table
from dataops.tasks.schema import FINGERPRINT_VERSION, Difference, catalog_snapshot, diff_snapshots, fingerprint
from dataops.tasks.validation.checks import (
    ERROR,
    FAIL,
    KIND_LABELS,
    PASS,
    SKIP,
    WARN,
    Check,
    CheckContext,
    CheckResult,
    all_checks,
    run_check,
    sort_results,
)
from dataops.validation_settings import ValidationSettings

# What validation reads: an environment, or a bare DSN (a scratch database being verified).
Database = Environment | Dsn


class ValidationFailed(OperationFailed):
    """A check failed or two environments differ. Carries the full report, so that a caller
    holding the failed flow run's exception can still print it."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report or {}

    def __reduce__(self):
        return (_rebuild_failed, (self.message, self.report))


def _rebuild_failed(message: str, report: dict) -> "ValidationFailed":
    return ValidationFailed(message, report)


# -- connections ----------------------------------------------------------------------------

def _dsn(target: Database) -> Dsn:
    return target.database_url if isinstance(target, Environment) else target


def target_name(target: Database) -> str:
    return target.name if isinstance(target, Environment) and target.name else _dsn(target).database


@contextlib.contextmanager
def read_only_snapshot(target: Database, *, statement_timeout_s: float | None = None,
                       connect_timeout: int = 10) -> Iterator[psycopg.Connection]:
    """A connection inside one REPEATABLE READ, READ ONLY transaction, rolled back at the end.

    Refuses (BadInput) a role that row-level security would hide rows from: checks, counts and
    checksums of part of a table would describe a database that does not exist."""
    with pg.connect(_dsn(target), timeout=connect_timeout, application_name="dataops-validate") as conn:
        conn.isolation_level = IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        cur = conn.cursor(row_factory=tuple_row)
        cur.execute("SELECT 1")  # psycopg opens the transaction with BEGIN ... READ ONLY
        pg.require_all_rows(conn, f"read every row of {target_name(target)}")
        if statement_timeout_s:
            cur.execute("SELECT set_config('statement_timeout', %s, true)", (f"{int(statement_timeout_s * 1000)}ms",))
        try:
            yield conn
        finally:
            if not conn.closed:
                conn.rollback()


# -- integrity checks ------------------------------------------------------------------------

@dataclass
class CheckReport:
    environment: str
    database: str
    fingerprint: str
    results: list[CheckResult]
    seconds: float

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if r.failed]

    @property
    def warnings(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == WARN]

    @property
    def skipped(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == SKIP]

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        n, bad, warn, skip = len(self.results), len(self.failures), len(self.warnings), len(self.skipped)
        n -= skip
        tail = (f", {_count(warn, 'warning')}" if warn else "") + (f", {skip} skipped (not populated)" if skip else "")
        if bad:
            return f"{bad} of {_count(n, 'check')} failed{tail}"
        return f"{_count(n, 'check')} passed{tail}"

    def raise_if_failed(self, when: str = "") -> None:
        """For flows that must stop (before changing anything, or after) when a check fails."""
        if self.ok:
            return
        first = "; ".join(r.line() for r in self.failures[:3])
        more = f" (and {len(self.failures) - 3} more)" if len(self.failures) > 3 else ""
        raise ValidationFailed(f"{self.environment}{' ' + when if when else ''}: {self.summary()}: {first}{more}",
                               {"checks": [r.as_dict() for r in self.results]})

    def as_dict(self) -> dict[str, Any]:
        return {"environment": self.environment, "database": self.database, "fingerprint": self.fingerprint,
                "ok": self.ok, "summary": self.summary(), "seconds": round(self.seconds, 3),
                "checks": [r.as_dict() for r in sort_results(self.results)]}


def _resolve_checks(checks: Sequence[Check] | ValidationSettings | None) -> tuple[list[Check], ValidationSettings]:
    if checks is None:
        cfg = ValidationSettings()
        return all_checks(cfg), cfg
    if isinstance(checks, ValidationSettings):
        return all_checks(checks), checks
    return list(checks), ValidationSettings()


def _run_in(conn: psycopg.Connection, checks: Sequence[Check], examples: int) -> list[CheckResult]:
    for check in checks:  # every name is checked before anything runs
        check.resolve(conn)
    ctx = CheckContext(conn, examples=examples)
    results: list[CheckResult] = []
    for check in checks:
        t0 = time.monotonic()
        found = run_check(ctx, check)  # a savepoint (each object of a group in one of its own)
        took = (time.monotonic() - t0) / max(len(found), 1)
        results.extend(_with_seconds(r, took) for r in found)
    return results


def _with_seconds(r: CheckResult, seconds: float) -> CheckResult:
    return replace(r, seconds=round(seconds, 4))


def run_checks(db: Database, checks: Sequence[Check] | ValidationSettings | None = None, *,
               examples: int | None = None, statement_timeout_s: float | None = None) -> CheckReport:
    """Run integrity checks on `db` in one read-only snapshot, and its schema fingerprint.

    checks: None runs the built-in checks; a ValidationSettings (the `validation:` section)
    runs its built-ins plus everything it configures; a list of Check objects runs exactly
    those. An unknown table or column in a check is BadInput, raised before any check runs.
    A failed check does not raise: look at `.ok`, or call `.raise_if_failed()`.
    """
    todo, cfg = _resolve_checks(checks)
    t0 = time.monotonic()
    with read_only_snapshot(db, statement_timeout_s=statement_timeout_s or cfg.statement_timeout_s) as conn:
        fp = fingerprint(catalog_snapshot(conn))
        results = _run_in(conn, todo, cfg.examples if examples is None else examples)
    return CheckReport(target_name(db), _dsn(db).database, fp, results, time.monotonic() - t0)


# -- checksums, fingerprints, differences ---------------------------------------------------------

def table_checksums(db: Database, tables: Sequence[str] | None = None,
                    columns: Mapping[str, Sequence[str]] | None = None,
                    exclude: Mapping[str, Sequence[str]] | None = None) -> dict[str, TableChecksum]:
    """Checksums of `tables` (default: every user table), all read in one snapshot.

    columns / exclude map a table to the columns to hash / to leave out (anonymized ones);
    a table or column that does not exist is BadInput naming it.
    """
    with read_only_snapshot(db) as conn:
        return _conn_table_checksums(conn, list(tables) if tables is not None else None,
                                     {k: list(v) for k, v in (columns or {}).items()},
                                     {k: list(v) for k, v in (exclude or {}).items()})


def schema_snapshot(db: Database) -> dict[str, Any]:
    with read_only_snapshot(db) as conn:
        return catalog_snapshot(conn)


def schema_fingerprint(db: Database) -> str:
    """sha256 of the schema: tables, columns and types, defaults, constraints, indexes,
    sequences, views, functions, triggers, enums, domains, extensions."""
    return fingerprint(schema_snapshot(db))


def diff_schemas(a: Database | Mapping[str, Any], b: Database | Mapping[str, Any], a_name: str | None = None,
                 b_name: str | None = None) -> list[Difference]:
    """Every schema difference between two databases (or snapshots), containers first."""
    snap_a = a if isinstance(a, Mapping) else schema_snapshot(a)
    snap_b = b if isinstance(b, Mapping) else schema_snapshot(b)
    a_name = a_name or (target_name(a) if not isinstance(a, Mapping) else "a")
    b_name = b_name or (target_name(b) if not isinstance(b, Mapping) else "b")
    if a_name == b_name:
        a_name, b_name = f"{a_name} (a)", f"{b_name} (b)"
    return diff_snapshots(snap_a, snap_b, a_name, b_name)


# -- two environments ---------------------------------------------------------------------------

SAME, ROWS_DIFFER, DATA_DIFFERS, SCHEMA_DIFFERS = "same", "rows differ", "data differs", "schema differs"


@dataclass(frozen=True)
class TableComparison:
    table: str
    status: str  # same, rows differ, data differs, schema differs, missing in <name>
    rows_a: int | None
    rows_b: int | None
    checksum_a: str | None = None
    checksum_b: str | None = None
    columns: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == SAME


@dataclass
class EnvironmentComparison:
    a: str
    b: str
    fingerprint_a: str
    fingerprint_b: str
    differences: list[Difference]
    tables: list[TableComparison]
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.differences and all(t.ok for t in self.tables)

    def summary(self) -> str:
        if self.ok:
            return f"{self.a} and {self.b} agree: same schema, {_count(len(self.tables), 'table')} with equal rows"
        parts = []
        if self.differences:
            parts.append(f"schemas differ ({_count(len(self.differences), 'difference')})")
        bad = [t for t in self.tables if not t.ok]
        if bad:
            parts.append(f"{_count(len(bad), 'table')} differ{'s' if len(bad) == 1 else ''}")
        return f"{self.a} and {self.b} differ: " + ", ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "ok": self.ok, "summary": self.summary(),
                "fingerprints": {self.a: self.fingerprint_a, self.b: self.fingerprint_b},
                "schema_differences": [{"kind": d.kind, "object": d.object, "change": d.change, "detail": d.detail,
                                        "text": str(d)} for d in self.differences],
                "tables": [{"table": t.table, "status": t.status, "rows": {self.a: t.rows_a, self.b: t.rows_b},
                            "checksums": {self.a: t.checksum_a, self.b: t.checksum_b}, "columns": list(t.columns)}
                           for t in self.tables],
                "seconds": round(self.seconds, 3)}


def _table_shape(snap: Mapping[str, Any], qualified_name: str) -> Any:
    table = snap.get("tables", {}).get(qualified_name)
    if table is None:
        return None
    cols = snap.get("columns", {})
    return table, [cols.get(f"{qualified_name}.{c}") for c in table["columns"]]


def compare_environments(a: Database, b: Database, *, tables: Sequence[str] | None = None,
                         columns: Mapping[str, Sequence[str]] | None = None,
                         exclude: Mapping[str, Sequence[str]] | None = None,
                         checksums: bool = True) -> EnvironmentComparison:
    """Environment parity: the schema diff, then per table the row counts, and the checksums
    of the tables whose definition is the same on both sides. Each side is read in one
    snapshot; both snapshots are taken before any table is scanned."""
    a_name, b_name = target_name(a), target_name(b)
    if a_name == b_name:
        a_name, b_name = f"{a_name} (a)", f"{b_name} (b)"
    t0 = time.monotonic()
    with read_only_snapshot(a) as ca, read_only_snapshot(b) as cb:
        snap_a, snap_b = catalog_snapshot(ca), catalog_snapshot(cb)
        differences = diff_snapshots(snap_a, snap_b, a_name, b_name)
        in_a = {pg.table_label(s, t): (s, t) for s, t in pg.user_tables(ca)}
        in_b = {pg.table_label(s, t): (s, t) for s, t in pg.user_tables(cb)}
        labels = sorted(set(in_a) | set(in_b))
        if tables is not None:
            wanted = [pg.table_label(*parse_label(t)) for t in tables]
            for t in wanted:
                if t not in in_a and t not in in_b:
                    raise BadInput(f'table "{".".join(parse_label(t))}" does not exist')
            labels = wanted
        for arg, mapping in (("checksum_columns", columns), ("checksum_exclude", exclude)):
            for key in mapping or {}:
                label = pg.table_label(*parse_label(key))
                if label not in in_a and label not in in_b:
                    raise BadInput(f'{arg} names table "{".".join(parse_label(key))}", which does not exist')
        cols = {pg.table_label(*parse_label(k)): list(v) for k, v in (columns or {}).items()}
        excl = {pg.table_label(*parse_label(k)): list(v) for k, v in (exclude or {}).items()}
        out = []
        with ThreadPoolExecutor(1, thread_name_prefix="dataops-compare") as pool:
            for label in labels:
                schema, table = in_a.get(label) or in_b[label]
                if label not in in_a or label not in in_b:
                    missing = a_name if label not in in_a else b_name
                    present = cb if label not in in_a else ca
                    n = _count_rows(present, schema, table)
                    out.append(TableComparison(label, f"missing in {missing}", n if label in in_a else None,
                                               n if label in in_b else None))
                    continue
                qualified_name = f"{schema}.{table}"
                same_shape = _table_shape(snap_a, qualified_name) == _table_shape(snap_b, qualified_name)
                if not same_shape or not checksums:
                    ra, rb = _count_rows(ca, schema, table), _count_rows(cb, schema, table)
                    status = SCHEMA_DIFFERS if not same_shape else (SAME if ra == rb else ROWS_DIFFER)
                    out.append(TableComparison(label, status, ra, rb))
                    continue
                kw = {"columns": cols.get(label), "exclude": excl.get(label)}
                other = pool.submit(table_checksum, cb, schema, table, **kw)  # both sides scan at once
                sa, sb = table_checksum(ca, schema, table, **kw), other.result()
                status = SAME if sa.checksum == sb.checksum else (ROWS_DIFFER if sa.rows != sb.rows else DATA_DIFFERS)
                out.append(TableComparison(label, status, sa.rows, sb.rows, sa.checksum, sb.checksum, sa.columns))
    return EnvironmentComparison(a_name, b_name, fingerprint(snap_a), fingerprint(snap_b), differences, out,
                                 time.monotonic() - t0)


def _count_rows(conn: psycopg.Connection, schema: str, table: str) -> int:
    from psycopg import sql

    return conn.cursor(row_factory=tuple_row).execute(
        sql.SQL("SELECT count(*) FROM {}").format(pg.row_source(conn, schema, table))).fetchone()[0]


# -- for the flows that change a database -----------------------------------------------------

@dataclass
class DatabaseState:
    """One moment of a database: what a flow records before it changes anything, and
    compares with afterwards."""

    fingerprint: str
    counts: dict[str, int] = field(default_factory=dict)
    checksums: dict[str, str] = field(default_factory=dict)  # table -> "<rows>:<hash>"
    results: list[CheckResult] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        return [r.line() for r in self.results if r.failed]

    @property
    def ok(self) -> bool:
        return not self.problems


def database_state(db: Database, *, checks: Sequence[Check] | ValidationSettings | None = None,
                   checksums: bool = True, run: bool = True, exclude: Mapping[str, Sequence[str]] | None = None,
                   connect_timeout: int = 10, fingerprint_version: int = FINGERPRINT_VERSION,
                   fingerprint_source_major: int | None = None) -> DatabaseState:
    """Fingerprint, row counts, checksums (if asked) and check results, all in one snapshot.

    run=False skips the integrity checks (a fingerprint and counts only).
    """
    todo, cfg = _resolve_checks(checks)
    with read_only_snapshot(db, statement_timeout_s=cfg.statement_timeout_s, connect_timeout=connect_timeout) as conn:
        fp = fingerprint(catalog_snapshot(conn, fingerprint_version, source_major=fingerprint_source_major))
        if checksums:
            sums = _conn_table_checksums(conn, exclude={k: list(v) for k, v in (exclude or {}).items()})
            counts = {t: c.rows for t, c in sums.items()}
            sums_text = {t: c.checksum for t, c in sums.items()}
        else:
            counts, sums_text = pg.row_counts(conn), {}
        results = _run_in(conn, todo, cfg.examples) if run else []
    return DatabaseState(fp, counts, sums_text, results)


def compare_with_expected(db: Database, tables: Mapping[str, int], expected_fingerprint: str,
                          checksums: Mapping[str, str] | None = None, *,
                          source: str = "the expected state", fingerprint_version: int = FINGERPRINT_VERSION,
                          fingerprint_source_major: int | None = None) -> tuple[dict[str, int], list[str]]:
    """A database (a restored copy) against what was recorded (a backup manifest): (row
    counts, problems). Problems name the table and both numbers; none means it matches.
    `source` names the record in the messages ("the manifest"); `fingerprint_version` and
    `fingerprint_source_major` say how and on which server major its fingerprint was taken."""
    state = database_state(db, checksums=bool(checksums), run=False, fingerprint_version=fingerprint_version,
                           fingerprint_source_major=fingerprint_source_major)
    problems = []
    if state.fingerprint != expected_fingerprint:
        problems.append(f"schema fingerprint {state.fingerprint[:12]} differs from {source}'s "
                        f"{expected_fingerprint[:12]}")
    for table in sorted(set(state.counts) | set(tables)):
        got, want = state.counts.get(table), tables.get(table)
        if got != want:
            problems.append(f"table {table}: {got if got is not None else 'missing'} rows, "
                            f"{source} says {want if want is not None else 'absent'}")
    for table, want_sum in sorted((checksums or {}).items()):
        got_sum = state.checksums.get(table)
        if got_sum is not None and got_sum != want_sum and state.counts.get(table) == tables.get(table):
            problems.append(f"table {table}: checksum {got_sum}, {source} says {want_sum}")
    return state.counts, problems


# -- the report of `dataops validate` ----------------------------------------------------------

def build_report(checks: CheckReport, comparison: EnvironmentComparison | None = None,
                 started_at: datetime | None = None, *, also: Sequence[CheckResult] = ()) -> dict[str, Any]:
    """`also`: results found outside the database's snapshot (backup freshness). They count as
    checks, and a failed one's detail joins the verdict: the verdict is the failed run's message,
    which is what the alert shows, and these details name their own remedy."""
    if also:
        checks = replace(checks, results=[*checks.results, *also])
    ok = checks.ok and (comparison is None or comparison.ok)
    parts = [checks.summary(), *(r.detail for r in also if r.failed)]
    if comparison is not None:
        parts.append(comparison.summary())
    verdict = ("OK: " if ok else "FAILED: ") + f"{checks.environment}: " + "; ".join(parts)
    return {
        "environment": checks.environment,
        "database": checks.database,
        "against": comparison.b if comparison else None,
        "ok": ok,
        "verdict": verdict,
        "started_at": (started_at or datetime.now(timezone.utc)).isoformat(timespec="seconds"),
        "seconds": round(checks.seconds + (comparison.seconds if comparison else 0), 3),
        "fingerprint": checks.fingerprint,
        "summary": {"checks": len(checks.results), "failed": len(checks.failures), "warnings": len(checks.warnings),
                    "passed": sum(r.status == PASS for r in checks.results),
                    "skipped": sum(r.status == SKIP for r in checks.results)},
        "checks": [r.as_dict() for r in sort_results(checks.results)],
        "comparison": comparison.as_dict() if comparison else None,
    }


def artifact_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per check (and per compared table), for a Prefect table artifact."""
    rows = [{"status": c["status"].upper(), "check": KIND_LABELS.get(c["kind"], c["kind"]), "table": c["table"] or "",
             "constraint": c["constraint"] or "", "name": c["name"], "rows": c["rows"], "detail": c["detail"],
             "examples": "; ".join(c["examples"])} for c in report["checks"]]
    comp = report.get("comparison")
    if comp:
        for d in comp["schema_differences"]:
            rows.append({"status": "FAIL", "check": "schema parity", "table": "", "constraint": "", "name": d["object"],
                         "rows": 0, "detail": d["text"], "examples": ""})
        for t in comp["tables"]:
            rows.append({"status": "PASS" if t["status"] == SAME else "FAIL", "check": "table parity",
                         "table": t["table"], "constraint": "", "name": t["table"],
                         "rows": t["rows"][comp["a"]] if t["rows"][comp["a"]] is not None else 0,
                         "detail": _table_detail(t, comp["a"], comp["b"]), "examples": ""})
    return rows


def _table_detail(t: dict[str, Any], a: str, b: str) -> str:
    ra, rb = t["rows"][a], t["rows"][b]
    rows = f"{_num(ra)} rows in {a}, {_num(rb)} in {b}"
    if t["status"] == SAME:
        return f"{rows}; checksums equal" if t["checksums"][a] else rows
    if t["status"] == DATA_DIFFERS:
        return f"{rows}; checksums differ ({t['checksums'][a]} vs {t['checksums'][b]})"
    return f"{t['status']}: {rows}"


def _num(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _count(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def format_report(report: dict[str, Any], *, show_passed: bool = True) -> str:
    """The terminal view: a table of checks, the schema differences, the table comparison,
    and the verdict as the last line."""
    lines = [f"Validation of {report['environment']} (database {report['database']}), "
             f"schema fingerprint {report['fingerprint'][:16]}", ""]
    rows = [{"STATUS": c["status"].upper(), "CHECK": KIND_LABELS.get(c["kind"], c["kind"]), "TABLE": c["table"] or "-",
             "NAME": c["constraint"] or c["name"], "ROWS": f"{c['rows']:,}",
             "DETAIL": c["detail"] + (f"; e.g. {'; '.join(c['examples'])}" if c["examples"] and c["status"] != PASS
                                      else "")}
            for c in report["checks"] if show_passed or c["status"] != PASS]
    if rows:
        lines.append(text_table(rows))
    comp = report.get("comparison")
    if comp:
        lines += ["", f"Against {comp['b']}: fingerprints {comp['fingerprints'][comp['a']][:16]} ({comp['a']}) vs "
                      f"{comp['fingerprints'][comp['b']][:16]} ({comp['b']})"]
        if comp["schema_differences"]:
            lines.append(f"Schema differences ({len(comp['schema_differences'])}):")
            lines += [f"  {d['text']}" for d in comp["schema_differences"]]
        else:
            lines.append("Schemas are the same.")
        if comp["tables"]:
            a, b = comp["a"], comp["b"]
            lines.append(text_table([{"TABLE": t["table"], f"ROWS {a}": _num(t["rows"][a]), f"ROWS {b}": _num(t["rows"][b]),
                                      "CHECKSUM": ("equal" if t["status"] == SAME and t["checksums"][a] else
                                                   "differs" if t["status"] in (DATA_DIFFERS, ROWS_DIFFER)
                                                   and t["checksums"][a] else "-"),
                                      "STATUS": t["status"]} for t in comp["tables"]]))
    lines += ["", report["verdict"]]
    return "\n".join(lines)



__all__ = ["CheckReport", "CheckResult", "DatabaseState", "EnvironmentComparison", "TableComparison",
           "ValidationFailed", "build_report", "compare_environments", "compare_with_expected", "database_state",
           "diff_schemas", "format_report", "run_checks", "schema_fingerprint", "table_checksums", "FAIL", "ERROR"]
