"""The masking report of `dataops anonymize ENV --report`: proof, in counts only, that each
masked column was masked and that keys stayed keys.

Per masked column: the rule, the non-null rows and distinct values before and after, whether
uniqueness had to be kept and was, and the leak scan's counts for it (values compared,
leaked, left unchanged by their rule). A reviewer who must show an auditor that masking
happened (Replibyte #269) gets numbers, never data: the report holds table and column
names, rule labels (the config's own words: a template's text, never a constant's value),
counts and the environment's name. No value of the database, masked or not, and no DSN.

Where the counts come from: two aggregate queries per masked table, both inside anonymize's
one transaction. "Before" is counted after `anonymize.delete` removed its rows and after the
tables were locked against writers (SHARE ROW EXCLUSIVE), so before and after describe the
same rows and no concurrent write can slip between them; "after" is counted once every
UPDATE ran, before the commit. The counts are computed by PostgreSQL and only the numbers
come back. They cost one extra scan per masked table before and one after (with a sort per
masked column for count(DISTINCT)), which is why they run only when a report is asked for.

Uniqueness: distinct values must stay distinct when the rule promises it (`unique: true`,
which a Faker rule on a unique column gets by itself) or when the column is covered by a
unique index and held no duplicates before (a unique key must stay unique): then the
distinct count and the non-null rows after must equal those before (so a column that was
unique still is, and one with duplicates keeps exactly as many). Otherwise it is reported
as LOST, and the report is not ok.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from dataops.errors import BadInput
from dataops.failpoints import failpoint
from dataops.tasks.anonymize.leak_scan import LeakReport
from dataops.tasks.anonymize.rules import MaskingPlan, TableMasking
from dataops.tasks.reporting import markdown_table

REPORT_SUFFIXES = (".json", ".md")


@dataclass
class ColumnCounts:
    table: str
    column: str
    rule: str
    rows_before: int  # non-null values
    distinct_before: int
    rows_after: int = 0
    distinct_after: int = 0
    must_stay_unique: bool = False
    checked: int | None = None  # leak scan: written values compared with the source's (null/constant: rows)
    leaked: int | None = None
    unchanged: int | None = None

    @property
    def uniqueness(self) -> str:
        if not self.must_stay_unique:
            return "not required"
        same = self.distinct_after == self.distinct_before and self.rows_after == self.rows_before
        return "kept" if same else "LOST"

    def as_row(self) -> dict:
        return {"table": self.table, "column": self.column, "rule": self.rule, "rows": self.rows_before,
                "distinct before": self.distinct_before, "distinct after": self.distinct_after,
                "uniqueness": self.uniqueness, "unchanged": "" if self.unchanged is None else self.unchanged,
                "leaked": "" if self.leaked is None else self.leaked}


@dataclass
class MaskingReport:
    environment: str
    columns: list[ColumnCounts] = field(default_factory=list)
    deleted: dict[str, int] = field(default_factory=dict)  # rows deleted per table (anonymize.delete)
    defaulted: list[str] = field(default_factory=list)  # columns masked by anonymize.default, and why
    leak_scan: str = ""
    salt_fingerprint: str = ""  # which salt (Keyed.fingerprint: not reversible), so two reports can be compared
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def lost(self) -> list[ColumnCounts]:
        return [c for c in self.columns if c.uniqueness == "LOST"]

    @property
    def leaked(self) -> int:
        return sum(c.leaked or 0 for c in self.columns)

    @property
    def ok(self) -> bool:
        return not self.lost and self.leaked == 0

    def summary(self) -> str:
        unique = [c for c in self.columns if c.must_stay_unique]
        lost = self.lost
        verdict = ("uniqueness kept" if not lost else
                   "uniqueness LOST in " + ", ".join(f"{c.table}.{c.column}" for c in lost))
        return (f"masking report for {self.environment}: {len(self.columns)} masked columns, "
                f"{len(unique) - len(lost)} of {len(unique)} unique columns still unique ({verdict}), "
                f"{self.leaked:,} leaked values")

    def as_dict(self) -> dict:
        return {"environment": self.environment, "created_at": self.created_at, "ok": self.ok,
                "summary": self.summary(), "salt_fingerprint": self.salt_fingerprint, "leak_scan": self.leak_scan,
                "columns": [{**asdict(c), "uniqueness": c.uniqueness} for c in self.columns],
                "deleted": self.deleted, "defaulted": self.defaulted}

    @classmethod
    def from_dict(cls, d: dict) -> MaskingReport:
        fields = set(ColumnCounts.__dataclass_fields__)
        return cls(d["environment"], [ColumnCounts(**{k: v for k, v in c.items() if k in fields}) for c in d["columns"]],
                   dict(d.get("deleted", {})), list(d.get("defaulted", [])), d.get("leak_scan", ""),
                   d.get("salt_fingerprint", ""), d.get("created_at", ""))

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2) + "\n"

    def to_markdown(self) -> str:
        lines = [f"# Masking report: {self.environment}", "", f"**{self.summary()}**", "",
                 f"- created {self.created_at}; salt fingerprint `{self.salt_fingerprint}`",
                 f"- {self.leak_scan}" if self.leak_scan else "- leak scan: not run",
                 "- counts are of the same rows before and after masking, in anonymize's one transaction; "
                 "`unchanged`: rows the rule mapped to themselves; `leaked`: written values equal to a source value",
                 "", "## Columns", "", markdown_table([c.as_row() for c in self.columns])]
        if self.deleted:
            lines += ["", "## Rows deleted first (anonymize.delete)", "",
                      markdown_table([{"table": t, "rows deleted": n} for t, n in self.deleted.items()])]
        if self.defaulted:
            lines += ["", "## Masked by anonymize.default", ""] + [f"- {d}" for d in self.defaulted]
        return "\n".join(lines) + "\n"


def _count(conn: psycopg.Connection, tm: TableMasking) -> dict[str, tuple[int, int]]:
    """column -> (non-null values, distinct values) of the masked columns of one table, in one
    scan. Distinct by text form in the C collation: exact for every type (json, point and xml
    have no equality operator; the text form of equal values is equal), and no locale sort."""
    cols = list(tm.maskers)
    t = tm.table
    only = sql.SQL("ONLY ") if t.relkind == "r" else sql.SQL("")  # a partitioned table counts its partitions
    aggs = []
    for col in cols:
        c = sql.Identifier(col)
        aggs += [sql.SQL("count({})").format(c), sql.SQL('count(DISTINCT {}::text COLLATE "C")').format(c)]
    row = conn.cursor(row_factory=tuple_row).execute(
        sql.SQL("SELECT {} FROM {}{}").format(sql.SQL(", ").join(aggs), only, t.qualified)).fetchone()
    return {col: (row[2 * i], row[2 * i + 1]) for i, col in enumerate(cols)}


class DistinctCounts:
    """Counts taken in the open transaction of anonymize: construct it before the UPDATEs,
    call `finish` after them (before the commit)."""

    def __init__(self, conn: psycopg.Connection, plan: MaskingPlan):
        self.plan = plan
        self.before = {label: _count(conn, tm) for label, tm in plan.tables.items()}

    def finish(self, conn: psycopg.Connection, environment: str, leaks: LeakReport | None,
               deleted: dict[str, int], defaulted: list[str]) -> MaskingReport:
        scanned = {(c.table, c.column): c for c in (leaks.columns if leaks else [])}
        report = MaskingReport(environment, deleted=dict(deleted), defaulted=list(defaulted),
                               leak_scan=leaks.summary() if leaks else "", salt_fingerprint=self.plan.keyed.fingerprint)
        for label, tm in self.plan.tables.items():
            after = _count(conn, tm)
            for col, m in tm.maskers.items():
                rows, distinct = self.before[label][col]
                unique_before = m.column.unique and rows > 0 and distinct == rows
                cc = ColumnCounts(label, col, m.label, rows, distinct, *after[col],
                                  must_stay_unique=m.kind != "null" and (m.unique or unique_before))
                leak = scanned.get((label, col))
                if leak is not None:
                    cc.checked, cc.leaked, cc.unchanged = leak.checked, leak.leaked, leak.unchanged
                report.columns.append(cc)
        return report


def check_report_path(path: str) -> Path:
    """Where `--report PATH` will write, refused before anything runs when it cannot: the
    folder must exist and be writable, the path must not be a folder, and its suffix says
    the format (.json or .md)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise BadInput(f"report path {path} is a folder; name a file in it, such as {p / 'masking-report.json'}")
    if p.suffix.lower() not in REPORT_SUFFIXES:
        raise BadInput(f"report path {path}: name it .json (JSON) or .md (Markdown)")
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise BadInput(f"report path {path}: folder {folder} does not exist; create it or name another")
    if not os.access(folder, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise BadInput(f"report path {path} is not writable; name a file in a folder you can write to")
    return p


def write_report(report: MaskingReport, path: Path) -> None:
    """JSON or Markdown by the suffix; written whole or not at all (a temporary file renamed)."""
    text = report.to_json() if path.suffix.lower() == ".json" else report.to_markdown()
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # left by a run killed before its rename
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        failpoint("anonymize.report_before_rename")  # a kill here: no report at PATH, a hidden temporary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
