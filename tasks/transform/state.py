"""The tool's own record of transform runs, in the schema `dataops_transforms`.

Why it lives in the database it describes: the checkpoint of a batch is written in the
same transaction as the batch's change, so after a crash (even `kill -9`) the record and
the table agree: a committed batch has its checkpoint, a rolled-back one has not. A resumed
run starts after the last checkpoint of each key range; no batch is applied twice, none is
skipped.

    runs     one row per run or revert: status, parameters, snapshot, baseline of the checks
    ranges   one row per disjoint key range of a run: the checkpoint (last key done) and counts
    deleted  keys of the rows a run deleted, written with the batch that deleted them

Key values (range bounds, checkpoints, deleted keys) are text[], one element per key column
(dataops.tasks.transform.keys); the tables of the single-column version, text, are converted
in place by ensure_schema.

Session-level advisory locks, held by the run's own connection for as long as it runs (see
transform_lock): one run of a transform at a time (keyed by its name), one transform of a
table at a time (keyed by the table), and no migration meanwhile (a lock every transform
shares and a migration takes alone). A killed process loses its connection and with it the
locks, so nothing needs cleaning up by hand.
"""

from __future__ import annotations

import contextlib
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from dataops.errors import OperationFailed
from dataops.settings import Environment
from dataops.tasks import pg

SCHEMA = "dataops_transforms"
LOCK_CLASS = 0x7866726D  # 'xfrm': recognisable as classid in pg_locks
EXAMPLES_KEPT = 10

# statuses of runs
RUNNING = "running"  # started; if nobody holds the lock, it was interrupted and `run` resumes it
COMPLETED = "completed"
CHECKS_FAILED = "checks-failed"  # the post-run checks failed; the revert is due
REVERTED = "reverted"  # a revert run undid it

_DDL = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE TABLE IF NOT EXISTS {SCHEMA}.runs (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    transform       text NOT NULL,
    action          text NOT NULL CHECK (action IN ('run', 'revert')),
    reverts         bigint,  -- a revert: the run it undoes
    status          text NOT NULL,
    definition      text NOT NULL,
    table_name      text NOT NULL,
    key_column      text[] NOT NULL,  -- the batch key's columns, in order
    params          jsonb NOT NULL DEFAULT '{{}}',
    snapshot        jsonb,
    baseline        jsonb,
    flow_run_id     text,
    stop_requested  boolean NOT NULL DEFAULT false,
    started_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    detail          text
);
CREATE INDEX IF NOT EXISTS runs_transform_idx ON {SCHEMA}.runs (transform, id);
CREATE TABLE IF NOT EXISTS {SCHEMA}.ranges (
    run_id          bigint NOT NULL,  -- runs.id; no FOREIGN KEY, so that no tool counts this tool's tables as the app's
    range_no        integer NOT NULL,
    lo              text[],  -- key values, one element per key column (dataops.tasks.transform.keys)
    hi              text[],
    last_key        text[],
    total           bigint NOT NULL DEFAULT 0,
    scanned         bigint NOT NULL DEFAULT 0,
    matched         bigint NOT NULL DEFAULT 0,
    changed         bigint NOT NULL DEFAULT 0,
    deleted         bigint NOT NULL DEFAULT 0,
    inserted        bigint NOT NULL DEFAULT 0,
    invalid         bigint NOT NULL DEFAULT 0,
    unchanged       bigint NOT NULL DEFAULT 0,
    batches         integer NOT NULL DEFAULT 0,
    busy_s          double precision NOT NULL DEFAULT 0,
    longest_tx_s    double precision NOT NULL DEFAULT 0,
    invalid_examples text[] NOT NULL DEFAULT '{{}}',
    finished        boolean NOT NULL DEFAULT false,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, range_no)
);
CREATE TABLE IF NOT EXISTS {SCHEMA}.deleted (
    run_id          bigint NOT NULL,
    key             text[] NOT NULL,  -- rows a run deleted: its revert re-inserts these and no others
    PRIMARY KEY (run_id, key)
);
"""

COUNTERS = ("scanned", "matched", "changed", "deleted", "inserted", "invalid", "unchanged")


@dataclass(kw_only=True)
class RowCounts:
    """What batches did to rows (the COUNTERS): one batch's, or the running sum a range keeps."""

    scanned: int = 0
    matched: int = 0
    changed: int = 0
    deleted: int = 0
    inserted: int = 0
    invalid: int = 0
    unchanged: int = 0
    invalid_examples: list[str] = field(default_factory=list)


@dataclass
class RangeState(RowCounts):
    run_id: int
    range_no: int
    lo: list[str] | None  # exclusive; None: from the first key
    hi: list[str] | None  # inclusive; None: open-ended (rows inserted during the run are included)
    last_key: list[str] | None = None  # checkpoint: every key up to here is done
    total: int = 0
    batches: int = 0
    busy_s: float = 0.0
    longest_tx_s: float = 0.0
    finished: bool = False
    updated_at: datetime | None = None


@dataclass
class RunState:
    id: int
    transform: str
    action: str
    status: str
    definition: str
    table_name: str
    key_column: list[str]
    params: dict
    reverts: int | None = None
    snapshot: dict | None = None
    baseline: dict | None = None  # table definition and failing checks before the first batch
    flow_run_id: str | None = None
    stop_requested: bool = False
    started_at: datetime | None = None
    finished_at: datetime | None = None
    detail: str | None = None
    ranges: list[RangeState] = field(default_factory=list)

    def total(self, counter: str) -> int:
        return sum(getattr(r, counter) for r in self.ranges)

    @property
    def longest_tx_s(self) -> float:
        return max((r.longest_tx_s for r in self.ranges), default=0.0)

    @property
    def batches(self) -> int:
        return sum(r.batches for r in self.ranges)

    @property
    def invalid_examples(self) -> list[str]:
        return [k for r in self.ranges for k in r.invalid_examples]

    @property
    def pending(self) -> list[RangeState]:
        return [r for r in self.ranges if not r.finished]


# Before composite keys, key values were one text each; they become one-element arrays, so an
# interrupted run of an earlier version resumes (its single-column key reads back the same).
_TO_ARRAYS = (("ranges", "lo"), ("ranges", "hi"), ("ranges", "last_key"), ("deleted", "key"), ("runs", "key_column"))


def ensure_schema(conn: psycopg.Connection) -> None:
    """Create the state tables once, or bring an earlier version's up to date; a transaction-level
    lock keeps two first runs from racing."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (LOCK_CLASS,))
        if conn.execute("SELECT to_regclass(%s)", (f"{SCHEMA}.deleted",)).fetchone()[0] is None:  # the newest
            conn.execute(_DDL)
        for table, column in _TO_ARRAYS:
            if _column_type(conn, table, column) == "text":
                conn.execute(f"ALTER TABLE {SCHEMA}.{table} ALTER {column} TYPE text[] "
                             f"USING CASE WHEN {column} IS NOT NULL THEN ARRAY[{column}] END")


def _column_type(conn: psycopg.Connection, table: str, column: str) -> str:
    return conn.execute("SELECT format_type(atttypid, NULL) FROM pg_attribute WHERE attrelid = %s::regclass "
                        "AND attname = %s", (f"{SCHEMA}.{table}", column)).fetchone()[0]


def has_schema(conn: psycopg.Connection) -> bool:
    return conn.execute("SELECT to_regclass(%s)", (f"{SCHEMA}.ranges",)).fetchone()[0] is not None


# -- the locks a run holds -------------------------------------------------------------------

def lock_key(name: str) -> int:
    """A signed int4 from the transform's name, the same on every machine."""
    value = zlib.crc32(f"dataops-transform:{name}".encode())
    return value - (1 << 32) if value >= (1 << 31) else value


SCHEMA_LOCK = pg.SCHEMA_LOCK  # held shared for the run: see tasks/pg.py
APP_PREFIX = pg.TRANSFORM_APP
transform_of = pg.transform_of

_SESSION = """a.pid, a.application_name, a.usename, a.client_addr::text,
       to_char(a.backend_start AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')"""
_HOLDER = f"""
SELECT {_SESSION}
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s::oid AND l.objid = %s::oid AND l.objsubid = 2
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND (%s::text IS NULL OR l.mode = %s) AND l.pid <> pg_backend_pid()
ORDER BY a.backend_start"""
_TEXT_HOLDERS = f"""
WITH k AS (SELECT hashtextextended(%s, 0) AS v)
SELECT l.mode, {_SESSION}
FROM k, pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.classid = ((k.v >> 32) & 4294967295)::oid AND l.objid = (k.v & 4294967295)::oid
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.pid <> pg_backend_pid()
ORDER BY a.backend_start"""


def _holders(conn: psycopg.Connection, pair: tuple[int, int], mode: str | None = None) -> list[tuple]:
    return conn.execute(_HOLDER, (pair[0] & 0xFFFFFFFF, pair[1] & 0xFFFFFFFF, mode, mode)).fetchall()


def running_transforms(conn: psycopg.Connection) -> list[str]:
    """The transforms running on this database, each with its session: for a migration's refusal."""
    return [f"transform {transform_of(r[1])}: {pg.holder_words(r)}" for r in _holders(conn, SCHEMA_LOCK, "ShareLock")]


def _table_key(oid: int) -> str:
    return f"dataops-transform-table:{oid}"


def _lock_tables(conn: psycopg.Connection, schema: str, rel: str) -> None:
    """The per-table lock: the table's own alone, each partition ancestor's shared. Two transforms
    of one table (under different names) would fight over its rows, and their reverts undo each
    other's; the same goes for a transform of a partitioned table and one of its partitions.
    Transforms of two partitions of one table may run at once."""
    table = f"{schema}.{rel}"
    found = conn.execute("""SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                            WHERE n.nspname = %s AND c.relname = %s""", (schema, rel)).fetchone()
    if found is None:
        return  # bind() refuses it next, before anything is written
    oid = found[0]
    ancestors = conn.execute("""SELECT a.relid::oid, n.nspname || '.' || c.relname
                                FROM pg_partition_ancestors(%s::oid::regclass) a JOIN pg_class c ON c.oid = a.relid
                                JOIN pg_namespace n ON n.oid = c.relnamespace
                                WHERE a.relid::oid <> %s::oid""", (oid, oid)).fetchall()
    if not conn.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (_table_key(oid),)).fetchone()[0]:
        raise OperationFailed(_table_busy(conn, _table_key(oid), table, own=True))
    for parent, label in ancestors:
        key = _table_key(parent)
        if not conn.execute("SELECT pg_try_advisory_lock_shared(hashtextextended(%s, 0))", (key,)).fetchone()[0]:
            raise OperationFailed(_table_busy(conn, key, label, own=False) + f" ({table} is one of its partitions)")


def _table_busy(conn: psycopg.Connection, key: str, label: str, *, own: bool) -> str:
    rows = conn.execute(_TEXT_HOLDERS, (key,)).fetchall()
    alone = [r for r in rows if r[0] == "ExclusiveLock"]
    row = (alone or rows or [None])[0]
    if row is None:
        return f"another transform of {label} has just finished; run it again"
    of = label if row[0] == "ExclusiveLock" else f"a partition of {label}"
    return (f"another transform ({transform_of(row[2])}) of {of} is running ({pg.holder_words(row[1:])}); "
            "wait for it to finish: two transforms of the same rows would fight over them, and their reverts "
            "would undo each other's")


def _share_schema(conn: psycopg.Connection, env: Environment, name: str) -> None:
    if not conn.execute("SELECT pg_try_advisory_lock_shared(%s, %s)", SCHEMA_LOCK).fetchone()[0]:
        rows = _holders(conn, SCHEMA_LOCK, "ExclusiveLock")
        holder = pg.holder_words(rows[0] if rows else None)
        raise OperationFailed(f"a migration is running on {env.name} ({holder}); transform {name} does not start "
                              "while the schema changes: run it again when the migration has finished")


@contextlib.contextmanager
def transform_lock(env: Environment, name: str, table: tuple[str, str] | None = None, *,
                   timeout: int = 10) -> Iterator[psycopg.Connection]:
    """Hold the transform's locks on a connection of its own for the duration of the block: its
    name's (one run or revert of a transform at a time), its table's (one transform of a table at
    a time, see _lock_tables) and the schema lock shared (no migration meanwhile).

    Each is tried, never waited for: a busy one is refused at once, naming the session that
    holds it, rather than queueing behind it. Nothing is written before they are all held.
    """
    key = lock_key(name)
    with pg.connect(env.database_url, autocommit=True, timeout=timeout,
                    application_name=f"{APP_PREFIX}{name}"[:63]) as conn:
        if not conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (LOCK_CLASS, key)).fetchone()[0]:
            rows = _holders(conn, (LOCK_CLASS, key))
            raise OperationFailed(f"transform {name} is already running on {env.name} "
                                  f"({pg.holder_words(rows[0] if rows else None)}); wait for it to "
                                  "finish, or end that session if it is stuck")
        try:
            _share_schema(conn, env, name)
            if table is not None:
                _lock_tables(conn, *table)
            yield conn
        finally:
            if not conn.closed:
                try:
                    conn.execute("SELECT pg_advisory_unlock_all()")
                except psycopg.Error:  # closing the connection releases them anyway
                    pass


# -- reading and writing runs ----------------------------------------------------------------

_RUN_COLS = ("id, transform, action, status, definition, table_name, key_column, params, reverts, snapshot, "
             "baseline, flow_run_id, stop_requested, started_at, finished_at, detail")


def load_run(conn: psycopg.Connection, run_id: int) -> RunState | None:
    cur = conn.cursor(row_factory=dict_row)
    row = cur.execute(f"SELECT {_RUN_COLS} FROM {SCHEMA}.runs WHERE id = %s", (run_id,)).fetchone()
    if row is None:
        return None
    run = RunState(**row)
    run.ranges = [RangeState(**r) for r in cur.execute(
        f"SELECT * FROM {SCHEMA}.ranges WHERE run_id = %s ORDER BY range_no", (run_id,)).fetchall()]
    return run


def latest_run(conn: psycopg.Connection, name: str, action: str | None = None) -> RunState | None:
    if not has_schema(conn):
        return None
    row = conn.execute(f"SELECT id FROM {SCHEMA}.runs WHERE transform = %s AND (%s::text IS NULL OR action = %s) "
                       "ORDER BY id DESC LIMIT 1", (name, action, action)).fetchone()
    return load_run(conn, row[0]) if row else None


def create_run(conn: psycopg.Connection, *, transform: str, action: str, definition: str, table_name: str,
               key_column: list[str], params: dict, ranges: list[tuple[list[str] | None, list[str] | None, int]],
               reverts: int | None = None, snapshot: dict | None = None, baseline: dict | None = None,
               flow_run_id: str | None = None) -> int:
    """Insert a run and its ranges ((lo, hi, total) each) in the caller's transaction."""
    run_id = conn.execute(
        f"""INSERT INTO {SCHEMA}.runs (transform, action, reverts, status, definition, table_name, key_column, params,
                                       snapshot, baseline, flow_run_id)
            VALUES (%s, %s, %s, %s, %s, %s, %s::text[], %s, %s, %s, %s) RETURNING id""",
        (transform, action, reverts, RUNNING, definition, table_name, list(key_column), json.dumps(params),
         json.dumps(snapshot) if snapshot else None, json.dumps(baseline) if baseline else None,
         flow_run_id)).fetchone()[0]
    with conn.cursor() as cur:
        cur.executemany(f"INSERT INTO {SCHEMA}.ranges (run_id, range_no, lo, hi, total) "
                        "VALUES (%s, %s, %s::text[], %s::text[], %s)",
                        [(run_id, i, lo, hi, total) for i, (lo, hi, total) in enumerate(ranges)])
    return run_id


def set_status(conn: psycopg.Connection, run_id: int, status: str, detail: str | None = None, *,
               finished: bool = True, flow_run_id: str | None = None) -> None:
    conn.execute(f"""UPDATE {SCHEMA}.runs SET status = %s, detail = coalesce(%s, detail),
                     finished_at = CASE WHEN %s THEN now() END, flow_run_id = coalesce(%s, flow_run_id)
                     WHERE id = %s""", (status, detail, finished, flow_run_id, run_id))


@dataclass(kw_only=True)
class BatchCounts(RowCounts):
    """One batch's counts, added to its range's by checkpoint()."""


def checkpoint(conn: psycopg.Connection, r: RangeState, new_last: list[str] | None, counts: BatchCounts, tx_s: float,
               finished: bool) -> bool:
    """Advance the range's checkpoint in the batch's own transaction (the caller commits);
    returns whether the run was asked to stop (a worker on another range failed).

    The update names the checkpoint it expects to move from: if another process moved it
    (which the lock should make impossible), the batch is rolled back instead of applied twice.
    """
    cur = conn.execute(
        f"""UPDATE {SCHEMA}.ranges SET last_key = coalesce(%(new)s::text[], last_key),
                scanned = scanned + %(scanned)s, matched = matched + %(matched)s, changed = changed + %(changed)s,
                deleted = deleted + %(deleted)s, inserted = inserted + %(inserted)s, invalid = invalid + %(invalid)s,
                unchanged = unchanged + %(unchanged)s, batches = batches + %(batch)s, busy_s = busy_s + %(tx)s,
                longest_tx_s = greatest(longest_tx_s, %(tx)s),
                invalid_examples = (invalid_examples || %(examples)s::text[])[1:{EXAMPLES_KEPT}],
                finished = %(finished)s, updated_at = now()
            WHERE run_id = %(run)s AND range_no = %(no)s AND last_key IS NOT DISTINCT FROM %(old)s::text[]
            RETURNING (SELECT stop_requested FROM {SCHEMA}.runs WHERE id = %(run)s)""",
        {"new": new_last, "old": r.last_key, "run": r.run_id, "no": r.range_no, "tx": tx_s, "finished": finished,
         "batch": 1 if counts.scanned or counts.inserted else 0,
         "examples": counts.invalid_examples[:EXAMPLES_KEPT], **{c: getattr(counts, c) for c in COUNTERS}})
    row = cur.fetchone()
    if row is None:
        raise OperationFailed(f"the checkpoint of range {r.range_no} of run {r.run_id} moved under this worker; "
                              "another process is applying the same transform (the batch was rolled back)")
    if new_last is not None:
        r.last_key = new_last
    for c in COUNTERS:
        setattr(r, c, getattr(r, c) + getattr(counts, c))
    r.batches += 1 if counts.scanned or counts.inserted else 0
    r.busy_s += tx_s
    r.longest_tx_s = max(r.longest_tx_s, tx_s)
    r.invalid_examples = (r.invalid_examples + counts.invalid_examples)[:EXAMPLES_KEPT]
    r.finished = finished
    return bool(row[0])


def request_stop(conn: psycopg.Connection, run_id: int, stop: bool = True) -> None:
    """Ask every worker of the run to stop after its current batch (seen at its next checkpoint)."""
    conn.execute(f"UPDATE {SCHEMA}.runs SET stop_requested = %s WHERE id = %s", (stop, run_id))


def progress(conn: psycopg.Connection, run_id: int) -> dict[str, Any]:
    """Sums over the run's ranges, for progress reports (read by a monitor, any process)."""
    cur = conn.cursor(row_factory=dict_row)
    return cur.execute(f"""SELECT coalesce(sum(total), 0)::bigint AS total, coalesce(sum(scanned), 0)::bigint AS scanned,
                                  coalesce(sum(changed + deleted + inserted), 0)::bigint AS changed,
                                  coalesce(sum(invalid), 0)::bigint AS invalid, count(*) FILTER (WHERE finished) AS done,
                                  count(*) AS ranges
                           FROM {SCHEMA}.ranges WHERE run_id = %s""", (run_id,)).fetchone()
