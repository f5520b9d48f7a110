"""The audit trail of migrations, kept in the migrated database itself.

One row per run (a migration, a downgrade, a rollback), written when the run starts and
updated as it goes, so a run that dies still leaves who, when and how far it got. The
rollback flow reads what it must go back to from here (the revision, schema fingerprint and
backup taken before the run), so it works from a fresh process with nothing but the run id.

The table lives in `dataops_migrations`, outside fingerprints and table lists. A restore
brings back the backup's copy of it, which predates the run: the rollback flow writes the
rows it holds again afterwards (`save` is an upsert of the whole row).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from psycopg.rows import dict_row

from dataops.dsn import Dsn
from dataops.tasks import pg
from dataops.tasks.migration.migrate import VERSION_SCHEMA

TABLE = f"{VERSION_SCHEMA}.audit"

# Phases in order; a rollback has work to do only from "applying" on.
PHASES = ("preflight", "backup", "approval", "applying", "validating", "done")

_DDL = f"""
CREATE SCHEMA IF NOT EXISTS {VERSION_SCHEMA};
CREATE TABLE IF NOT EXISTS {TABLE} (
    run_id              text PRIMARY KEY,          -- the Prefect flow run id
    action              text NOT NULL,             -- migrate | downgrade | rollback
    environment         text NOT NULL,
    who                 text NOT NULL,             -- user@host that ran it
    approver            text,
    comment             text,
    started_at          timestamptz NOT NULL,
    finished_at         timestamptz,
    duration_s          double precision,
    target              text,
    from_revision       text,
    to_revision         text,
    applied             text[] NOT NULL DEFAULT '{{}}',
    phase               text NOT NULL,
    outcome             text NOT NULL,             -- running | succeeded | failed | rejected | ...
    detail              text,
    backup_id           text,
    fingerprint_before  text,
    fingerprint_after   text,
    checksums_before    jsonb,
    parent_run_id       text                       -- a rollback: the run it undoes
)
"""

_FIELDS = ("run_id", "action", "environment", "who", "approver", "comment", "started_at", "finished_at", "duration_s",
           "target", "from_revision", "to_revision", "applied", "phase", "outcome", "detail", "backup_id",
           "fingerprint_before", "fingerprint_after", "checksums_before", "parent_run_id")


@dataclass
class AuditRecord:
    run_id: str
    action: str
    environment: str
    who: str
    started_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    phase: str = "preflight"
    outcome: str = "running"
    approver: str | None = None
    comment: str | None = None
    finished_at: datetime | None = None
    duration_s: float | None = None
    target: str | None = None
    from_revision: str | None = None
    to_revision: str | None = None
    applied: list[str] = field(default_factory=list)
    detail: str | None = None
    backup_id: str | None = None
    fingerprint_before: str | None = None
    fingerprint_after: str | None = None
    checksums_before: dict[str, str] | None = None
    parent_run_id: str | None = None

    def finish(self, outcome: str, detail: str | None = None, phase: str | None = None) -> "AuditRecord":
        self.outcome = outcome
        self.finished_at = datetime.now(timezone.utc)
        self.duration_s = round((self.finished_at - self.started_at).total_seconds(), 3)
        if detail is not None:
            self.detail = detail
        if phase is not None:
            self.phase = phase
        return self

    def summary(self) -> dict:
        """The row as shown in artifacts: no checksums, short fingerprints."""
        d = {k: v for k, v in asdict(self).items() if k != "checksums_before"}
        for k in ("fingerprint_before", "fingerprint_after"):
            d[k] = (d[k] or "")[:16]
        for k in ("started_at", "finished_at"):
            d[k] = d[k].strftime("%Y-%m-%d %H:%M:%S UTC") if d[k] else ""
        d["applied"] = ", ".join(self.applied)
        return d


def ensure_table(dsn: Dsn) -> None:
    with pg.connect(dsn, autocommit=True, application_name="dataops-migrate-audit") as conn:
        conn.execute(_DDL)


def save(dsn: Dsn, record: AuditRecord) -> None:
    """Insert or replace the run's row (whole row: see the module docstring on restores)."""
    ensure_table(dsn)
    values = asdict(record)
    values["checksums_before"] = json.dumps(values["checksums_before"]) if values["checksums_before"] else None
    cols = ", ".join(_FIELDS)
    params = ", ".join(f"%({f})s" for f in _FIELDS)
    updates = ", ".join(f"{f} = EXCLUDED.{f}" for f in _FIELDS if f != "run_id")
    with pg.connect(dsn, autocommit=True, application_name="dataops-migrate-audit") as conn:
        conn.execute(f"INSERT INTO {TABLE} ({cols}) VALUES ({params}) ON CONFLICT (run_id) DO UPDATE SET {updates}",
                     values)


def load(dsn: Dsn, run_id: str) -> AuditRecord | None:
    with pg.connect(dsn, autocommit=True, application_name="dataops-migrate-audit") as conn:
        if conn.execute("SELECT to_regclass(%s)", (TABLE,)).fetchone()[0] is None:
            return None
        row = conn.cursor(row_factory=dict_row).execute(
            f"SELECT {', '.join(_FIELDS)} FROM {TABLE} WHERE run_id = %s", (run_id,)).fetchone()
    return _record(row) if row else None


def history(dsn: Dsn, limit: int = 20) -> list[AuditRecord]:
    """The newest runs first."""
    with pg.connect(dsn, autocommit=True, application_name="dataops-migrate-audit") as conn:
        if conn.execute("SELECT to_regclass(%s)", (TABLE,)).fetchone()[0] is None:
            return []
        rows = conn.cursor(row_factory=dict_row).execute(
            f"SELECT {', '.join(_FIELDS)} FROM {TABLE} ORDER BY started_at DESC LIMIT %s", (limit,)).fetchall()
    return [_record(r) for r in rows]


def _record(row: dict) -> AuditRecord:
    row = dict(row)
    row["applied"] = list(row["applied"] or [])
    return AuditRecord(**row)
