"""One key range of a transform, applied in short transactions.

Why batches look the way they do:
- Keyset, never OFFSET: the next batch is "the next N keys after the checkpoint", found on
  the key's index, so batch 1,000 costs what batch 1 costs. A key of several columns is
  compared as a row, (a, b) > (x, y) (dataops.tasks.transform.keys).
- Each batch is one transaction holding its change and its checkpoint, so a crash loses
  at most the batch in flight, and that batch left no trace.
- The size adapts: each batch's duration steers the next one toward 40% of
  max_batch_seconds, so row locks are held briefly whatever the rows cost. A statement
  timeout slightly above the bound is the safety net; a batch that hits it (or waits too
  long for a row lock) is rolled back and retried smaller.
- Set-based writes only: an SQL change is one UPDATE (and DELETE) per batch; a pandas
  change goes back through COPY into a temporary table and one UPDATE ... FROM.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Protocol

import psycopg
from psycopg import sql
from pydantic import ValidationError

from dataops.errors import BadInput, TransientError
from dataops.failpoints import failpoint
from dataops.settings import TransformSettings
from dataops.tasks.transform import keys
from dataops.tasks.transform.keys import key_range
from dataops.tasks.transform.spec import Target, TransformSpec
from dataops.tasks.transform.state import EXAMPLES_KEPT, BatchCounts, RangeState, checkpoint

log = logging.getLogger("dataops.transform")

TARGET_FRACTION = 0.4  # aim each transaction at this share of max_batch_seconds: room for a slower batch
MIN_BATCH = 10
GROWTH = 10  # later batches may grow to this many times batch_size
MAX_RETRIES = 6  # consecutive timed-out batches before giving up (TransientError: the task may retry)
WORK_FRACTION = 0.85  # of max_batch_seconds for the batch's statements; the rest is for checkpoint and commit


class OutOfTime(Exception):
    """The batch used up its budget before its last statement: roll back, retry smaller."""


_RETRYABLE = (psycopg.errors.QueryCanceled, psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected,
              psycopg.errors.SerializationFailure, OutOfTime)


class Deadline:
    """The batch transaction's time budget, enforced statement by statement: each statement
    gets what is left of it as its statement_timeout (local to the transaction), so a batch
    that meets a slow moment is cancelled and retried smaller instead of holding its locks
    past the bound. Without it, only the next batch would adapt."""

    def __init__(self, opts: Options):
        self.opts = opts
        self.end = time.monotonic() + opts.max_batch_seconds * WORK_FRACTION

    def arm(self, conn: psycopg.Connection) -> None:
        left = self.end - time.monotonic()
        if left < 0.005:
            raise OutOfTime()
        conn.execute("SELECT set_config('statement_timeout', %s, true)", (f"{max(int(left * 1000), 1)}ms",))

    def disarm(self, conn: psycopg.Connection) -> None:
        """Back to the session's limit, for the checkpoint: it must not fail for lack of budget."""
        conn.execute("SELECT set_config('statement_timeout', %s, true)", (_statement_limit(self.opts),))


TUNING = ("batch_size", "max_batch_seconds", "throttle_ms", "workers")


@dataclass(frozen=True)
class Overrides:
    """The tuning given for one run or revert (flow parameters, CLI options) over `transforms:`
    in dataops.yaml; None keeps the configured value. Checked here, against the bounds of the
    config itself, so that a bad value is refused before anything connects."""

    batch_size: int | None = None
    max_batch_seconds: float | None = None
    throttle_ms: int | None = None
    workers: int | None = None

    def __post_init__(self) -> None:
        given = self.given()
        try:
            checked = TransformSettings.model_validate(given)
        except ValidationError as err:
            e = err.errors()[0]
            name = e["loc"][0]
            raise BadInput(f"{name}: {e['msg'].removeprefix('Value error, ')} (got {given.get(name)!r})") from None
        for k in given:  # as the config would hold it: 2 -> 2.0 seconds
            object.__setattr__(self, k, getattr(checked, k))

    def given(self) -> dict:
        """The overrides that were given, by name."""
        return {k: getattr(self, k) for k in TUNING if getattr(self, k) is not None}

    def as_params(self) -> dict:
        """All four by name, for a flow's parameters."""
        return {k: getattr(self, k) for k in TUNING}


@dataclass(frozen=True)
class Options:
    """The tuning a run works with: the config's, with the run's overrides on top."""

    batch_size: int = 5000
    max_batch_seconds: float = 1.0
    throttle_ms: int = 0
    workers: int = 1

    @classmethod
    def from_settings(cls, cfg: TransformSettings, overrides: Overrides | None = None) -> "Options":
        values = {k: getattr(cfg, k) for k in TUNING}
        values.update(overrides.given() if overrides is not None else {})
        return cls(**values)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in TUNING}


def next_batch_size(size: int, seconds: float, opts: Options) -> int:
    """Scale toward TARGET_FRACTION of the bound; at most x1.5 up or /4 down per batch, so one
    odd batch (a checkpoint, a cold page) does not swing the size, and a slowdown is met fast."""
    target = opts.max_batch_seconds * TARGET_FRACTION
    factor = 1.5 if seconds <= 0 else min(1.5, max(0.25, target / seconds))
    return int(min(max(size * factor, MIN_BATCH), max(opts.batch_size * GROWTH, MIN_BATCH)))


def _statement_limit(opts: Options) -> str:
    return f"{int(opts.max_batch_seconds * 1200) + 100}ms"


def session_limits(conn: psycopg.Connection, opts: Options) -> None:
    """Per worker connection, the safety net under the batch's own Deadline: no statement runs
    much past the bound, no lock wait eats the whole budget, a stuck client cannot sit on its
    row locks."""
    bound_ms = int(opts.max_batch_seconds * 1000)
    conn.execute("SELECT set_config('statement_timeout', %s, false), set_config('lock_timeout', %s, false), "
                 "set_config('idle_in_transaction_session_timeout', %s, false)",
                 (_statement_limit(opts), f"{max(bound_ms // 2, 50)}ms", f"{max(bound_ms * 5, 5000)}ms"))


def frag(text: str) -> sql.SQL:
    """An SQL fragment from a transform module, safe to combine with %(name)s parameters."""
    return sql.SQL("(" + text.replace("%", "%%") + ")")


Key = list[str]  # a key value as the state tables keep it (dataops.tasks.transform.keys)


class Batcher(Protocol):
    def bound(self, conn: psycopg.Connection, last: Key | None, hi: Key | None, n: int) -> tuple[int, Key | None]: ...

    def apply(self, conn: psycopg.Connection, lo: Key | None, hi: Key, deadline: Deadline) -> BatchCounts: ...


class KeysetBound:
    """The end of the next batch: the n-th key after `last` on the key's index."""

    keys_table: sql.Composable
    target: Target

    def bound(self, conn: psycopg.Connection, last: Key | None, hi: Key | None, n: int) -> tuple[int, Key | None]:
        t = self.target
        q = sql.SQL("WITH b AS MATERIALIZED (SELECT {k} FROM {t} WHERE {r} ORDER BY {k} LIMIT %(n)s) "
                    "SELECT (SELECT count(*) FROM b), {enc} FROM b ORDER BY {desc} LIMIT 1").format(
            k=keys.columns(t), t=self.keys_table, r=key_range(t, last, hi), enc=keys.encoded(t),
            desc=keys.descending(t))
        row = conn.execute(q, {"lo": last, "hi": hi, "n": n}).fetchone()
        return (0, None) if row is None else (row[0], row[1])


class SqlBatcher(KeysetBound):
    """SET (and DELETE) as one statement per batch; the counts come from the same snapshot
    (every part of a WITH sees the rows as they were before the statement)."""

    def __init__(self, spec: TransformSpec, target: Target, run_id: int = 0):
        self.spec, self.target, self.run_id = spec, target, run_id
        self.keys_table = target.qualified
        valid = sql.SQL("coalesce({}, false)").format(frag(spec.valid_sql)) if spec.valid_sql else sql.SQL("true")
        delete = sql.SQL("coalesce({}, false)").format(frag(spec.delete)) if spec.delete else None
        self._valid, self._delete = valid, delete
        self._queries: dict[bool, sql.Composed] = {}

    def statement(self, with_lo: bool) -> sql.Composed:
        if with_lo not in self._queries:
            spec, t = self.spec, self.target
            rng = key_range(t, "lo" if with_lo else None, "hi")
            where = frag(spec.where)
            cols = list(spec.set)
            exprs = [frag(spec.set[c]) for c in cols]
            sets = sql.SQL(", ").join(sql.SQL("{} = {}").format(sql.Identifier(c), e) for c, e in zip(cols, exprs))
            differs = sql.SQL("ROW({}) IS DISTINCT FROM ROW({})").format(
                sql.SQL(", ").join(map(sql.Identifier, cols)), sql.SQL(", ").join(exprs))
            not_deleted = sql.SQL("NOT {}").format(self._delete) if self._delete else sql.SQL("true")
            parts = [sql.SQL("upd AS (UPDATE {t} SET {sets} WHERE {rng} AND {where} AND {valid} AND {nd} AND {differs} "
                             "RETURNING 1)").format(t=t.qualified, sets=sets, rng=rng, where=where, valid=self._valid,
                                                    nd=not_deleted, differs=differs)]
            deleted = sql.SQL("0")
            if self._delete:
                parts.append(sql.SQL("del AS (DELETE FROM {t} WHERE {rng} AND {where} AND {valid} AND {d} "
                                     "RETURNING {k} AS k)").format(
                    t=t.qualified, rng=rng, where=where, valid=self._valid, d=self._delete, k=keys.encoded(t)))
                if self.run_id:  # a real run records the keys, so that its revert re-inserts exactly those rows
                    parts.append(sql.SQL("kept AS (INSERT INTO dataops_transforms.deleted (run_id, key) "
                                         "SELECT %(run)s, k FROM del)"))
                deleted = sql.SQL("(SELECT count(*) FROM del)")
            self._queries[with_lo] = sql.SQL(
                "WITH {parts} SELECT count(*), count(*) FILTER (WHERE NOT {valid}), "
                "(array_agg({shown} ORDER BY {k}) FILTER (WHERE NOT {valid}))[1:{n}], "
                "(SELECT count(*) FROM upd), {deleted} FROM {t} WHERE {rng} AND {where}").format(
                parts=sql.SQL(", ").join(parts), valid=self._valid, k=keys.columns(t), shown=keys.shown(t),
                n=sql.Literal(EXAMPLES_KEPT),
                deleted=deleted, t=t.qualified, rng=rng, where=where)
        return self._queries[with_lo]

    def apply(self, conn: psycopg.Connection, lo: Key | None, hi: Key, deadline: Deadline) -> BatchCounts:
        deadline.arm(conn)
        matched, invalid, examples, changed, deleted = conn.execute(
            self.statement(lo is not None), {"lo": lo, "hi": hi, "run": self.run_id}).fetchone()
        return BatchCounts(matched=matched, changed=changed, deleted=deleted, invalid=invalid,
                           unchanged=matched - invalid - changed - deleted, invalid_examples=list(examples or []))


class PandasBatcher(KeysetBound):
    """Read the batch's rows (locked FOR NO KEY UPDATE, so nobody's write is lost between
    the read and the write-back), run change(df) on the valid ones, and write back only
    the rows whose values differ: COPY into a temporary table, then one UPDATE ... FROM."""

    TEMP = "dataops_transform_batch"

    def __init__(self, spec: TransformSpec, target: Target):
        self.spec, self.target = spec, target
        self.keys_table = target.qualified
        self.columns = [c for c in (spec.columns or target.columns) if c not in target.key]
        self._valid = sql.SQL("coalesce({}, false)").format(frag(spec.valid_sql)) if spec.valid_sql else sql.SQL("true")

    def select(self, with_lo: bool) -> sql.Composed:
        """The key's columns, the COLUMNS, the key as shown, whether VALID holds."""
        t = self.target
        return sql.SQL("SELECT {k}, {cols}, {shown}, {valid} FROM {t} WHERE {rng} AND {where} ORDER BY {k} "
                       "FOR NO KEY UPDATE").format(
            k=keys.columns(t), cols=sql.SQL(", ").join(map(sql.Identifier, self.columns)), shown=keys.shown_column(t),
            valid=self._valid, t=t.qualified, rng=key_range(t, "lo" if with_lo else None, "hi"),
            where=frag(self.spec.where))

    def apply(self, conn: psycopg.Connection, lo: Key | None, hi: Key, deadline: Deadline) -> BatchCounts:
        import pandas as pd

        spec, t = self.spec, self.target
        deadline.arm(conn)
        rows = conn.execute(self.select(lo is not None), {"lo": lo, "hi": hi}).fetchall()
        if not rows:
            return BatchCounts()
        names = [*t.key, *self.columns]
        df = pd.DataFrame.from_records([r[:-2] for r in rows], columns=names)
        shown = pd.Series([r[-2] for r in rows], index=df.index)
        ok = pd.Series([r[-1] for r in rows], index=df.index, dtype=bool)
        if spec.valid_fn is not None and ok.any():
            extra = spec.valid_fn(df[ok].copy())
            if not isinstance(extra, pd.Series) or extra.dtype != bool:
                raise BadInput(f"{spec.path}: valid(df) must return a boolean Series aligned with df")
            ok.loc[extra.index] &= extra
        invalid_keys = list(shown[~ok].head(EXAMPLES_KEPT))
        counts = BatchCounts(matched=len(df), invalid=int((~ok).sum()), invalid_examples=invalid_keys)
        if not ok.any():
            return counts
        before = df[ok]
        out = spec.change(before.copy())
        out = self._check_output(out, before)
        if out.empty or len(out.columns) == 0:
            counts.unchanged = len(before)
            return counts
        old = before.loc[out.index, list(out.columns)]
        same = ((old == out) | (old.isna() & out.isna())).all(axis=1)
        write = out[~same]
        counts.changed = len(write)
        counts.unchanged = len(before) - counts.changed
        if counts.changed:
            self._write(conn, before.loc[write.index, list(t.key)], write, lo, hi, deadline)
        return counts

    def _check_output(self, out, before):
        import pandas as pd

        spec = self.spec
        if isinstance(out, pd.Series) and out.name in self.columns:
            out = out.to_frame()
        if not isinstance(out, pd.DataFrame):
            raise BadInput(f"{spec.path}: change(df) must return a DataFrame of the changed columns "
                           f"(got {type(out).__name__})")
        wrong = [c for c in out.columns if c not in self.columns]
        if wrong:
            raise BadInput(f"{spec.path}: change(df) returned column {wrong[0]!r}, which is not in COLUMNS "
                           f"({', '.join(self.columns)})" if wrong[0] not in self.target.key else
                           f"{spec.path}: change(df) must not return the key column {wrong[0]!r}")
        if isinstance(spec.snapshot, tuple):
            unsaved = [c for c in out.columns if c not in spec.snapshot]
            if unsaved:
                raise BadInput(f"{spec.path}: change(df) returned column {unsaved[0]!r}, which SNAPSHOT does not "
                               "include; add it, or revert could not put it back")
        if not out.index.isin(before.index).all():
            raise BadInput(f"{spec.path}: change(df) returned rows that are not in the batch; keep df's index")
        return out

    def _write(self, conn: psycopg.Connection, key_values, write, lo: Key | None, hi: Key,
               deadline: Deadline) -> None:
        """key_values: the key columns of the rows to write, aligned with `write`."""
        t = self.target
        cols = list(write.columns)
        deadline.arm(conn)
        conn.execute(sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {tmp} ON COMMIT DELETE ROWS AS "
                             "SELECT {k}, {cols} FROM {t} WITH NO DATA").format(
            tmp=sql.Identifier(self.TEMP), k=keys.columns(t),
            cols=sql.SQL(", ").join(map(sql.Identifier, self.columns)), t=t.qualified))
        values = []
        for frame, names in ((key_values, list(t.key)), (write, cols)):
            for c in names:
                series = frame[c]
                arr = series.astype(object).to_numpy(copy=True)
                arr[series.isna().to_numpy()] = None
                values.append(arr.tolist())
        copy_sql = sql.SQL("COPY {tmp} ({cols}) FROM STDIN").format(
            tmp=sql.Identifier(self.TEMP), cols=sql.SQL(", ").join(map(sql.Identifier, [*t.key, *cols])))
        deadline.arm(conn)
        with conn.cursor() as cur, cur.copy(copy_sql) as copy:
            for row in zip(*values):
                copy.write_row(row)
        deadline.arm(conn)
        conn.execute(sql.SQL("UPDATE {t} AS x SET {sets} FROM {tmp} b WHERE {join} AND {rng}").format(
            t=t.qualified, sets=sql.SQL(", ").join(sql.SQL("{c} = b.{c}").format(c=sql.Identifier(c)) for c in cols),
            tmp=sql.Identifier(self.TEMP), join=keys.same_key(t, "x", "b"),
            rng=key_range(t, lo, hi, alias="x")), {"lo": lo, "hi": hi})


@dataclass
class RangeOutcome:
    range_no: int
    finished: bool
    batches: int  # in this session
    longest_tx_s: float  # in this session, commit included
    seconds: float
    stopped: bool = False  # another worker failed and the run asked the others to stop


def process_range(conn: psycopg.Connection, batcher: Batcher, r: RangeState, opts: Options, *,
                  label: str = "", revert: bool = False) -> RangeOutcome:
    """Apply batches to one key range from its checkpoint to its end. `conn` is autocommit;
    each batch is an explicit transaction holding the change and the checkpoint.
    `revert` only names the failpoints: a revert's batches are a run's batches."""
    t_start = time.monotonic()
    size, failures, batches, longest, stop = opts.batch_size, 0, 0, 0.0, False
    while not r.finished:
        if stop:
            return RangeOutcome(r.range_no, False, batches, longest, time.monotonic() - t_start, stopped=True)
        try:
            start = r.last_key if r.last_key is not None else r.lo
            n, new_last = batcher.bound(conn, start, r.hi, size)
            t0 = time.monotonic()
            with conn.transaction():
                if n:
                    deadline = Deadline(opts)
                    counts = batcher.apply(conn, start, new_last, deadline)
                    counts.scanned = n
                    deadline.disarm(conn)
                else:
                    counts = BatchCounts()
                # a kill here: the batch's change is rolled back with its checkpoint, never left without it
                if revert:
                    failpoint("revert.before_checkpoint")
                else:
                    failpoint("transform.before_checkpoint")
                stop = checkpoint(conn, r, new_last, counts, time.monotonic() - t0, finished=n < size)
            tx = time.monotonic() - t0
            if revert:  # committed: the next run starts after this batch
                failpoint("revert.after_checkpoint")
            else:
                failpoint("transform.after_checkpoint")
        except _RETRYABLE as exc:
            failures += 1
            if failures > MAX_RETRIES:
                raise TransientError(
                    f"{label}: range {r.range_no} gave up after {failures} batches in a row hit the "
                    f"{opts.max_batch_seconds:g} s bound or a lock wait ({type(exc).__name__}); run again when the "
                    "table is less busy, or raise transforms.max_batch_seconds") from None
            size = max(MIN_BATCH, size // 4)
            log.warning("%s: range %d: batch rolled back (%s); retrying with %d rows", label, r.range_no,
                        type(exc).__name__, size)
            time.sleep(min(0.1 * 2 ** failures, 2.0))
            continue
        failures = 0
        if n:
            batches += 1
            longest = max(longest, tx)
            size = next_batch_size(size, tx, opts)
        if opts.throttle_ms and not r.finished:
            time.sleep(opts.throttle_ms / 1000)
    return RangeOutcome(r.range_no, True, batches, longest, time.monotonic() - t_start)
