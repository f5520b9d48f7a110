"""Running and reverting transforms: the plain functions behind the flows and the CLI.

A run's life:
1. Under the transform's lock: resume the interrupted run if there is one (same module
   source, else refused), or start a new one: split the key range into `workers` disjoint
   ranges, take the snapshot the transform asks for, record the table's definition. The run
   row, its ranges and the snapshot are committed together, so a crash leaves either all of
   them or none.
2. Each range is worked through in batches (tasks.transform_batches), by as many workers.
3. After the last batch: the checks (tasks.transform_checks); a failure marks the run
   checks-failed, and the flow's failure hook reverts it.

`transform()` and `revert()` do all of it in-process (threads for the ranges); the flows
compose the same steps as Prefect tasks, so that ranges become task runs that a Dask task
runner can spread across machines.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import psycopg
from prefect import task
from prefect.cache_policies import NO_CACHE
from psycopg import sql

from dataops.errors import BadInput, OperationFailed, is_transient, retry_if_transient
from dataops.settings import Settings
from tasks import pg
from tasks.snapshot import take_snapshot
from tasks.transform_batches import (Options, PandasBatcher, RangeOutcome, SqlBatcher, frag, key_range,
                                     process_range, session_limits)
from tasks.transform_checks import baseline, post_checks, still_to_do
from tasks.transform_revert import batcher_for_revert, index_snapshot, own_revert_spec, snapshot_to_json
from tasks.transform_spec import Target, TransformSpec, bind, load_transform, transforms_dir
from tasks.transform_state import (CHECKS_FAILED, COMPLETED, REVERTED, RUNNING, RunState, create_run, ensure_schema,
                                   latest_run, load_run, progress, request_stop, set_status, transform_lock)

log = logging.getLogger("dataops.transform")
PREVIEW_ROWS = 5


def spec_for(settings: Settings, name: str) -> TransformSpec:
    return load_transform(transforms_dir(settings), name)


def _connect(settings: Settings, env: str, purpose: str, **kw):
    return pg.connect(settings.env(env).database_url, timeout=settings.postgres.connect_timeout,
                      application_name=f"dataops-transform:{purpose}"[:63], **kw)


def batcher_for(spec: TransformSpec, target: Target):
    return SqlBatcher(spec, target) if spec.kind == "sql" else PandasBatcher(spec, target)


def compile_check(conn: psycopg.Connection, spec: TransformSpec, target: Target) -> None:
    """EXPLAIN every statement the transform will run, so a typo in WHERE, SET or VERIFY is a
    BadInput before the first batch rather than a failure in the middle. Writes nothing."""
    first = conn.execute(sql.SQL("SELECT min({})::text FROM {}").format(sql.Identifier(target.key),
                                                                       target.qualified)).fetchone()[0]
    params = {"lo": first, "hi": first}
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
    are covered too."""
    keys_table = keys_table if keys_table is not None else target.qualified
    k = sql.Identifier(target.key)

    def count(lo, hi) -> int:
        return conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE {}").format(keys_table, key_range(target, lo, hi)),
                            {"lo": lo, "hi": hi}).fetchone()[0]

    if workers == 1:
        return [(None, None, count(None, None))]
    if not target.integer_key:
        raise BadInput(f"workers > 1 needs an integer key; {target.label}.{target.key} is {target.key_type}; "
                       "run with workers 1")
    low, high = conn.execute(sql.SQL("SELECT min({k}), max({k}) FROM {t}").format(k=k, t=keys_table)).fetchone()
    if low is None:
        return [(None, None, 0)]
    span = high - low + 1
    w = max(1, min(workers, span))
    edges = [low - 1 + span * i // w for i in range(w + 1)]
    out = []
    for i in range(w):
        lo = None if i == 0 else str(edges[i])
        hi = None if i == w - 1 else str(edges[i + 1])
        out.append((lo, hi, count(lo, hi)))
    return out


# -- dry run ------------------------------------------------------------------------------------

def plan(settings: Settings, env: str, name: str, opts: Options) -> dict:
    """What a run would do, read in one READ ONLY transaction: rows needing work, invalid
    rows (with examples), ranges, the snapshot, and a preview of a few changes."""
    spec = spec_for(settings, name)
    with _connect(settings, env, f"{name}:plan") as conn:
        conn.read_only = True
        target = bind(conn, spec)
        compile_check(conn, spec, target)
        t = target.qualified
        valid = sql.SQL("coalesce({}, false)").format(frag(spec.valid_sql)) if spec.valid_sql else sql.SQL("true")
        total = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(t)).fetchone()[0]
        matched, invalid, examples = conn.execute(sql.SQL(
            "SELECT count(*), count(*) FILTER (WHERE NOT {v}), "
            "(array_agg({k}::text ORDER BY {k}) FILTER (WHERE NOT {v}))[1:5] FROM {t} WHERE {w}").format(
            v=valid, k=sql.Identifier(target.key), t=t, w=frag(spec.where)), {}).fetchone()
        ranges = split_ranges(conn, target, opts.workers)
        preview = _preview(conn, spec, target)
        todo = still_to_do(conn, spec, target) if spec.kind == "sql" else None
        last = latest_run(conn, name)
        conn.rollback()
    return {
        "transform": name, "environment": env, "description": spec.description, "kind": spec.kind,
        "table": target.label, "key": target.key, "rows": total, "needing_work": matched,
        "invalid": invalid or 0, "invalid_examples": list(examples or []), "would_change": todo,
        "ranges": [{"lo": lo, "hi": hi, "rows": n} for lo, hi, n in ranges],
        "snapshot": None if spec.snapshot is None else ("*" if spec.snapshot == "*" else list(spec.snapshot)),
        "revert": "own REVERT" if spec.revert else ("snapshot" if spec.snapshot else "none"),
        "preview": preview, "options": opts.as_dict(),
        "last_run": None if last is None else {"id": last.id, "action": last.action, "status": last.status},
    }


def _preview(conn: psycopg.Connection, spec: TransformSpec, target: Target) -> list[dict]:
    k = sql.Identifier(target.key)
    valid = sql.SQL("coalesce({}, false)").format(frag(spec.valid_sql)) if spec.valid_sql else sql.SQL("true")
    if spec.kind == "sql":
        cols = list(spec.set)
        delete = sql.SQL("coalesce({}, false)").format(frag(spec.delete)) if spec.delete else sql.SQL("false")
        differs = sql.SQL("ROW({}) IS DISTINCT FROM ROW({})").format(
            sql.SQL(", ").join(map(sql.Identifier, cols)), sql.SQL(", ").join(frag(spec.set[c]) for c in cols))
        rows = conn.execute(sql.SQL(
            "SELECT {k}::text, {cols}, {exprs}, {d} FROM {t} WHERE {w} AND {v} AND ({differs} OR {d}) "
            "ORDER BY {k} LIMIT {n}").format(
            k=k, cols=sql.SQL(", ").join(map(sql.Identifier, cols)),
            exprs=sql.SQL(", ").join(frag(spec.set[c]) for c in cols), d=delete, t=target.qualified,
            w=frag(spec.where), v=valid, differs=differs, n=sql.Literal(PREVIEW_ROWS)), {}).fetchall()
        n = len(cols)
        return [{"key": r[0], "before": {c: _show(v) for c, v in zip(cols, r[1:1 + n])},
                 "after": "(deleted)" if r[-1] else {c: _show(v) for c, v in zip(cols, r[1 + n:1 + 2 * n])}}
                for r in rows]
    import pandas as pd

    b = PandasBatcher(spec, target)
    rows = conn.execute(sql.SQL("SELECT {k}, {cols}, {v} FROM {t} WHERE {w} AND {v} ORDER BY {k} LIMIT 50").format(
        k=k, cols=sql.SQL(", ").join(map(sql.Identifier, b.columns)), v=valid, t=target.qualified,
        w=frag(spec.where)), {}).fetchall()
    if not rows:
        return []
    df = pd.DataFrame.from_records([r[:-1] for r in rows], columns=[target.key, *b.columns])
    if spec.valid_fn is not None:
        df = df[spec.valid_fn(df.copy())]
    out = b._check_output(spec.change(df.copy()), df)
    shown = []
    for idx in out.index:
        before = {c: _show(df.at[idx, c]) for c in out.columns}
        after = {c: _show(out.at[idx, c]) for c in out.columns}
        if before != after:
            shown.append({"key": str(df.at[idx, target.key]), "before": before, "after": after})
        if len(shown) == PREVIEW_ROWS:
            break
    return shown


def _show(v) -> str | None:
    try:
        import pandas as pd

        if v is None or (not isinstance(v, (list, dict)) and pd.isna(v)):
            return None
    except (TypeError, ValueError):
        pass
    return str(v)


# -- a run ----------------------------------------------------------------------------------------

def prepare_run(settings: Settings, env: str, name: str, opts: Options, flow_run_id: str | None = None) -> RunState:
    """Resume the interrupted run, or start a new one. The caller holds the transform's lock."""
    spec = spec_for(settings, name)
    with _connect(settings, env, f"{name}:prepare", autocommit=True) as conn:
        ensure_schema(conn)
        target = bind(conn, spec)
        compile_check(conn, spec, target)
        last = latest_run(conn, name)
        if last is not None and last.status == RUNNING:
            if last.action == "revert":
                raise BadInput(f"a revert of {name} on {env} was interrupted; finish it first: "
                               f"dataops transform {env} revert {name}")
            if last.definition != spec.definition:
                raise BadInput(f"{spec.path} changed since run {last.id} of {name} started on {env}, which was "
                               f"interrupted; put the old version back to finish it, or revert it first "
                               f"(dataops transform {env} revert {name})")
            request_stop(conn, last.id, False)
            set_status(conn, last.id, RUNNING, finished=False, flow_run_id=flow_run_id)
            done = last.total("scanned")
            log.info("resuming run %d of %s on %s: %d of %d ranges left, %d rows done", last.id, name, env,
                     len(last.pending), len(last.ranges), done)
            return load_run(conn, last.id)
        if last is not None and last.action == "run" and last.status == CHECKS_FAILED:
            raise BadInput(f"run {last.id} of {name} on {env} failed its checks and is not reverted; revert it first: "
                           f"dataops transform {env} revert {name}")
        ranges = split_ranges(conn, target, opts.workers)
        if isinstance(spec.snapshot, tuple) and target.update_triggers:
            log.info("%s has UPDATE trigger(s) %s: SNAPSHOT must list every column they write (it has %s)",
                     target.label, ", ".join(target.update_triggers), ", ".join(spec.snapshot))
        before = baseline(settings, env, conn, target)
        with conn.transaction():
            snap = None
            if spec.snapshot is not None:
                snap = take_snapshot(conn, target.label, columns=None if spec.snapshot == "*" else list(spec.snapshot),
                                     where=spec.where, key=[target.key],
                                     label=f"xf_{name}")
                index_snapshot(conn, snap)
                log.info("snapshot %s of %s: %d rows, columns %s", snap.name, target.label, snap.rows,
                         ", ".join(snap.columns))
            run_id = create_run(conn, transform=name, action="run", definition=spec.definition,
                                table_name=target.label, key_column=target.key, params=opts.as_dict(),
                                ranges=ranges, snapshot=snapshot_to_json(snap) if snap else None,
                                baseline=before, flow_run_id=flow_run_id)
        log.info("run %d of %s on %s: %s, %d range(s), %d rows", run_id, name, env, target.label, len(ranges),
                 sum(r[2] for r in ranges))
        return load_run(conn, run_id)


def run_range(settings: Settings, env: str, name: str, run_id: int, range_no: int, opts: Options) -> RangeOutcome:
    """One worker: its own connection, its range from the checkpoint to the end."""
    spec = spec_for(settings, name)
    with _connect(settings, env, f"{name}:r{range_no}", autocommit=True) as conn:
        session_limits(conn, opts)
        run = load_run(conn, run_id)
        if run is None:
            raise OperationFailed(f"run {run_id} of {name} is not in {env}'s dataops_transforms.runs")
        r = next(x for x in run.ranges if x.range_no == range_no)
        target = bind(conn, spec)
        if run.action == "run":
            batcher = batcher_for(spec, target)
        else:
            batcher = batcher_for_revert(run.params["method"], spec, target, run.snapshot)
        try:
            return process_range(conn, batcher, r, opts, label=f"{run.action} {name} on {env}")
        except Exception as exc:
            if not is_transient(exc) and not conn.closed and not conn.broken:
                request_stop(conn, run_id)  # no retry will help: the other ranges stop after their current batch
            raise


def finish_run(settings: Settings, env: str, name: str, run_id: int) -> tuple[RunState, list[str]]:
    """Checks after the last batch; records completed or checks-failed. Returns (run, problems)."""
    spec = spec_for(settings, name)
    with _connect(settings, env, f"{name}:checks", autocommit=True) as conn:
        run = load_run(conn, run_id)
        if run.pending:
            raise OperationFailed(f"run {run_id} of {name} has {len(run.pending)} unfinished range(s); "
                                  f"run it again to resume: dataops transform {env} run {name}")
        target = bind(conn, spec)
        problems = post_checks(settings, env, conn, spec, target, run.baseline)
        set_status(conn, run_id, CHECKS_FAILED if problems else COMPLETED, "; ".join(problems) or None)
        return load_run(conn, run_id), problems


# -- a revert -------------------------------------------------------------------------------------

def prepare_revert(settings: Settings, env: str, name: str, opts: Options, flow_run_id: str | None = None) -> RunState:
    """Resume an interrupted revert, or start reverting the newest run not yet reverted.
    The caller holds the transform's lock."""
    spec = spec_for(settings, name)
    with _connect(settings, env, f"{name}:prepare-revert", autocommit=True) as conn:
        ensure_schema(conn)
        target = bind(conn, spec)
        last = latest_run(conn, name)
        if last is not None and last.action == "revert" and last.status == RUNNING:
            request_stop(conn, last.id, False)
            set_status(conn, last.id, RUNNING, finished=False, flow_run_id=flow_run_id)
            log.info("resuming revert %d of run %d of %s on %s", last.id, last.reverts, name, env)
            return load_run(conn, last.id)
        row = conn.execute("SELECT id FROM dataops_transforms.runs WHERE transform = %s AND action = 'run' "
                           "AND status <> %s ORDER BY id DESC LIMIT 1", (name, REVERTED)).fetchone()
        if row is None:
            raise BadInput(f"nothing to revert: {name} has no run on {env} that is not already reverted")
        victim = load_run(conn, row[0])
        if spec.revert:
            method, keys_table, snapshot = "own", None, None
            compile_check(conn, spec, target)
        elif victim.snapshot:
            from tasks.snapshot import SCHEMA as SNAPSHOT_SCHEMA

            method, snapshot = "snapshot", victim.snapshot
            keys_table = pg.qualified(SNAPSHOT_SCHEMA, snapshot["name"])
            if conn.execute("SELECT to_regclass(%s)", (f"{SNAPSHOT_SCHEMA}.{snapshot['name']}",)).fetchone()[0] is None:
                raise OperationFailed(f"snapshot {SNAPSHOT_SCHEMA}.{snapshot['name']} of run {victim.id} is gone; "
                                      "restore the table from a backup instead")
        else:
            raise BadInput(f"{spec.path.name} has no REVERT and run {victim.id} took no snapshot (SNAPSHOT); "
                           "there is nothing to revert it with")
        ranges = split_ranges(conn, target, opts.workers, keys_table)
        with conn.transaction():
            rev_id = create_run(conn, transform=name, action="revert", reverts=victim.id, definition=spec.definition,
                                table_name=target.label, key_column=target.key,
                                params={**opts.as_dict(), "method": method}, ranges=ranges, snapshot=snapshot,
                                flow_run_id=flow_run_id)
        log.info("revert %d of run %d of %s on %s, from %s: %d range(s)", rev_id, victim.id, name, env,
                 "its REVERT" if method == "own" else f"snapshot {snapshot['name']}", len(ranges))
        return load_run(conn, rev_id)


def finish_revert(settings: Settings, env: str, name: str, revert_id: int) -> RunState:
    with _connect(settings, env, f"{name}:finish-revert", autocommit=True) as conn:
        rev = load_run(conn, revert_id)
        if rev.pending:
            raise OperationFailed(f"revert {revert_id} of {name} has {len(rev.pending)} unfinished range(s); "
                                  f"run it again to resume: dataops transform {env} revert {name}")
        with conn.transaction():
            set_status(conn, revert_id, COMPLETED)
            set_status(conn, rev.reverts, REVERTED, f"reverted by run {revert_id}")
        return load_run(conn, revert_id)


# -- progress -------------------------------------------------------------------------------------

class ProgressMonitor:
    """Reads the checkpoints every `every_s` and reports rows done and left, rate and ETA.

    It reads the database rather than counting in memory, so it sees every worker, in
    this process or on another machine."""

    def __init__(self, settings: Settings, env: str, run: RunState, report, every_s: float = 5.0):
        self.settings, self.env, self.run, self.report, self.every_s = settings, env, run, report, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"progress-{run.transform}", daemon=True)
        self._t0 = time.monotonic()
        self._start_rows = run.total("scanned")

    def __enter__(self) -> "ProgressMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        try:
            with _connect(self.settings, self.env, f"{self.run.transform}:progress", autocommit=True) as conn:
                while not self._stop.wait(self.every_s):
                    self.report(*self.line(progress(conn, self.run.id)))
        except Exception as exc:  # noqa: BLE001 - progress reports must never fail the run
            log.warning("progress reports of %s stopped: %s", self.run.transform, exc)

    def line(self, p: dict) -> tuple[float, str]:
        total, done = max(p["total"], p["scanned"]), p["scanned"]
        elapsed = time.monotonic() - self._t0
        rate = (done - self._start_rows) / elapsed if elapsed > 0 else 0.0
        left = max(total - done, 0)
        eta = f"{left / rate:,.0f} s" if rate > 0 else "unknown"
        fraction = 100.0 * done / total if total else 100.0
        return fraction, (f"{self.run.action} {self.run.transform} on {self.env}: {done:,} of {total:,} rows "
                          f"({fraction:.0f}%), {left:,} left, {p['changed']:,} changed, {p['invalid']:,} invalid, "
                          f"{rate:,.0f} rows/s, ETA {eta}")


# -- summaries --------------------------------------------------------------------------------------

@dataclass
class Session:
    """What this process saw of a run (a resumed run's earlier sessions are in the checkpoints)."""

    seconds: float
    longest_tx_s: float


def summarize(run: RunState, env: str, session: Session | None = None, problems: list[str] | None = None) -> dict:
    out = {
        "transform": run.transform, "environment": env, "run_id": run.id, "action": run.action, "status": run.status,
        "table": run.table_name, "reverts": run.reverts,
        "rows": max(run.total("total"), run.total("scanned")), "scanned": run.total("scanned"),
        "needing_work": run.total("matched"), "changed": run.total("changed"), "deleted": run.total("deleted"),
        "inserted": run.total("inserted"), "invalid": run.total("invalid"),
        "invalid_examples": run.invalid_examples[:5], "unchanged": run.total("unchanged"), "batches": run.batches,
        "ranges": len(run.ranges), "busy_s": round(sum(r.busy_s for r in run.ranges), 3),
        "longest_tx_s": round(max(run.longest_tx_s, session.longest_tx_s if session else 0.0), 4),
        "max_batch_seconds": run.params.get("max_batch_seconds"),
        "snapshot": (run.snapshot or {}).get("name"), "problems": problems or [],
        "detail": run.detail,
    }
    if session is not None:
        out["seconds"] = round(session.seconds, 3)
        out["rows_per_s"] = round(out["scanned"] / session.seconds) if session.seconds > 0 else None
    return out


# -- everything in-process (tests, benchmarks, scripts) -----------------------------------------------

def _run_ranges(settings: Settings, env: str, name: str, run: RunState, opts: Options) -> Session:
    t0 = time.monotonic()
    longest = 0.0
    pending = run.pending
    if pending:
        with ThreadPoolExecutor(max_workers=len(pending), thread_name_prefix=f"xf-{name}") as pool:
            futures = [pool.submit(run_range, settings, env, name, run.id, r.range_no, opts) for r in pending]
            errors = []
            for f in as_completed(futures):
                try:
                    longest = max(longest, f.result().longest_tx_s)
                except Exception as exc:  # noqa: BLE001 - the first error is raised after the others stop
                    errors.append(exc)
            if errors:
                raise errors[0]
    return Session(time.monotonic() - t0, longest)


def transform(settings: Settings, env: str, name: str, *, batch_size: int | None = None,
              max_batch_seconds: float | None = None, throttle_ms: int | None = None, workers: int | None = None,
              progress_every_s: float = 5.0) -> dict:
    """Run (or resume) a transform without Prefect. Raises OperationFailed when the checks
    fail (the run is then marked checks-failed; `revert()` undoes it)."""
    opts = Options.from_settings(settings.transforms, batch_size=batch_size, max_batch_seconds=max_batch_seconds,
                                 throttle_ms=throttle_ms, workers=workers)
    with transform_lock(settings.env(env).database_url, name, env, timeout=settings.postgres.connect_timeout):
        t0 = time.monotonic()
        run = prepare_run(settings, env, name, opts)
        with ProgressMonitor(settings, env, run, lambda _f, line: log.info("%s", line), progress_every_s):
            session = _run_ranges(settings, env, name, run, opts)
        run, problems = finish_run(settings, env, name, run.id)
        session.seconds = time.monotonic() - t0
    summary = summarize(run, env, session, problems)
    if problems:
        raise OperationFailed(f"checks after {name} on {env} failed: {'; '.join(problems)}; undo it with "
                              f"dataops transform {env} revert {name}")
    return summary


def revert(settings: Settings, env: str, name: str, *, batch_size: int | None = None,
           max_batch_seconds: float | None = None, throttle_ms: int | None = None, workers: int | None = None) -> dict:
    opts = Options.from_settings(settings.transforms, batch_size=batch_size, max_batch_seconds=max_batch_seconds,
                                 throttle_ms=throttle_ms, workers=workers)
    with transform_lock(settings.env(env).database_url, name, env, timeout=settings.postgres.connect_timeout):
        t0 = time.monotonic()
        rev = prepare_revert(settings, env, name, opts)
        session = _run_ranges(settings, env, name, rev, opts)
        rev = finish_revert(settings, env, name, rev.id)
        session.seconds = time.monotonic() - t0
    return summarize(rev, env, session)


def status(settings: Settings, env: str, name: str, runs: int = 5) -> dict:
    """The newest runs of a transform on an environment, newest first. Reads only."""
    spec = spec_for(settings, name)
    with _connect(settings, env, f"{name}:status") as conn:
        from tasks.transform_state import has_schema

        if not has_schema(conn):
            ids = []
        else:
            ids = [r[0] for r in conn.execute("SELECT id FROM dataops_transforms.runs WHERE transform = %s "
                                              "ORDER BY id DESC LIMIT %s", (name, runs)).fetchall()]
        listed = [summarize(load_run(conn, i), env) for i in ids]
        locked = _is_running(conn, name)
    for s in listed:
        if s["status"] == RUNNING:
            s["status"] = RUNNING if locked else "interrupted"
    return {"transform": name, "environment": env, "description": spec.description, "table": spec.table,
            "kind": spec.kind, "runs": listed}


def _is_running(conn: psycopg.Connection, name: str) -> bool:
    from tasks.transform_state import LOCK_CLASS, lock_key

    return conn.execute("SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND classid = %s::oid "
                        "AND objid = %s::oid AND objsubid = 2 AND granted "
                        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))",
                        (LOCK_CLASS & 0xFFFFFFFF, lock_key(name) & 0xFFFFFFFF)).fetchone()[0]


# -- Prefect tasks ------------------------------------------------------------------------------------

@task(name="plan-transform", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2, retry_condition_fn=retry_if_transient)
def plan_task(settings: Settings, env: str, name: str, opts: Options) -> dict:
    return plan(settings, env, name, opts)


@task(name="prepare-transform", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2,
      retry_condition_fn=retry_if_transient)
def prepare_task(settings: Settings, env: str, name: str, opts: Options, flow_run_id: str | None = None) -> RunState:
    """Snapshot (when asked for) and checkpoint rows, or the interrupted run to resume."""
    return prepare_run(settings, env, name, opts, flow_run_id)


@task(name="transform-range", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_if_transient)
def run_range_task(settings: Settings, env: str, name: str, run_id: int, range_no: int, opts: Options) -> RangeOutcome:
    """A retry resumes from the range's checkpoint, so it never repeats a committed batch."""
    return run_range(settings, env, name, run_id, range_no, opts)


@task(name="check-transform", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2,
      retry_condition_fn=retry_if_transient)
def finish_task(settings: Settings, env: str, name: str, run_id: int) -> tuple[RunState, list[str]]:
    return finish_run(settings, env, name, run_id)


@task(name="prepare-revert", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2,
      retry_condition_fn=retry_if_transient)
def prepare_revert_task(settings: Settings, env: str, name: str, opts: Options,
                        flow_run_id: str | None = None) -> RunState:
    return prepare_revert(settings, env, name, opts, flow_run_id)


@task(name="finish-revert", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2,
      retry_condition_fn=retry_if_transient)
def finish_revert_task(settings: Settings, env: str, name: str, revert_id: int) -> RunState:
    return finish_revert(settings, env, name, revert_id)
