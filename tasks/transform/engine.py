"""Running and reverting transforms: the steps, and the one order they run in, with or without Prefect.

A run's life:
1. Under the transform's locks (its name's, its table's, and the schema lock shared with other
   transforms but not with a migration; see state.transform_lock): resume the interrupted run
   if there is one (same module source and key, else refused), or start a new one: split the
   key range into `workers` disjoint ranges, take the snapshot the transform asks for, record
   the table's definition. The run row, its ranges and the snapshot are committed together,
   so a crash leaves either all of them or none.
2. Each range is worked through in batches (dataops.tasks.transform.batches), by as many workers.
3. After the last batch: the checks (dataops.tasks.transform.checks); a failure marks the run
   checks-failed, and the flow's failure hook reverts it.

`transform()` and `revert()` hold that order once. By default their steps are plain calls
with the ranges on threads (tests, benchmarks, scripts); the flows pass `PrefectSteps`, whose
ranges are task runs, so that a Dask task runner can spread them across machines.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed

from prefect import get_run_logger, task

from dataops.errors import BadInput, OperationFailed, is_transient
from dataops.failpoints import failpoint
from dataops.settings import Environment, Settings
from dataops.tasks import pg
from dataops.tasks.retries import RETRY_TRANSIENT
from dataops.tasks.transform.batches import Options, Overrides, RangeOutcome, process_range, session_limits
from dataops.tasks.transform.checks import baseline, post_checks
from dataops.tasks.transform.plan import (
    batcher_for,
    compile_check,
    connect,
    spec_for,
    split_ranges,
)
from dataops.tasks.transform.progress import PROGRESS_EVERY_S, ProgressMonitor, Session, gather_ranges, summarize
from dataops.tasks.transform.report import ProgressArtifact, publish_summary
from dataops.tasks.transform.revert import batcher_for_revert, index_snapshot, snapshot_to_json
from dataops.tasks.transform.snapshot import SCHEMA as SNAPSHOT_SCHEMA
from dataops.tasks.transform.snapshot import take_snapshot
from dataops.tasks.transform.spec import Target, bind
from dataops.tasks.transform.state import (
    CHECKS_FAILED,
    COMPLETED,
    LOCK_CLASS,
    REVERTED,
    RUNNING,
    RunState,
    create_run,
    ensure_schema,
    has_schema,
    latest_run,
    load_run,
    lock_key,
    request_stop,
    set_status,
    transform_lock,
)

log = logging.getLogger("dataops.transform")


# -- a run ----------------------------------------------------------------------------------------

def prepare_run(settings: Settings, env: Environment, name: str, opts: Options,
                flow_run_id: str | None = None) -> RunState:
    """Resume the interrupted run, or start a new one. The caller holds the transform's lock."""
    spec = spec_for(settings, name)
    with connect(settings, env, f"{name}:prepare", autocommit=True) as conn:
        target = bind(conn, spec)  # a table the transform cannot work on: refused before anything is written
        compile_check(conn, spec, target)
        ensure_schema(conn)
        if pg.ensure_statistics(conn, target.schema, target.table):
            log.info("%s had no planner statistics (a fresh restore?): analyzed it first", target.label)
        last = latest_run(conn, name)
        if last is not None and last.status == RUNNING:
            if last.action == "revert":
                raise BadInput(f"a revert of {name} on {env.name} was interrupted; finish it first: "
                               f"dataops transform {env.name} revert {name}")
            if last.definition != spec.definition:
                raise BadInput(f"{spec.path} changed since run {last.id} of {name} started on {env.name}, which was "
                               f"interrupted; put the old version back to finish it, or revert it first "
                               f"(dataops transform {env.name} revert {name})")
            same_key(last, target, env)
            request_stop(conn, last.id, False)
            set_status(conn, last.id, RUNNING, finished=False, flow_run_id=flow_run_id)
            done = last.total("scanned")
            log.info("resuming run %d of %s on %s: %d of %d ranges left, %d rows done", last.id, name, env.name,
                     len(last.pending), len(last.ranges), done)
            return load_run(conn, last.id)
        if last is not None and last.action == "run" and last.status == CHECKS_FAILED:
            raise BadInput(f"run {last.id} of {name} on {env.name} failed its checks and is not reverted; "
                           f"revert it first: dataops transform {env.name} revert {name}")
        ranges = split_ranges(conn, target, opts.workers)
        if isinstance(spec.snapshot, tuple) and target.update_triggers:
            log.info("%s has UPDATE trigger(s) %s: SNAPSHOT must list every column they write (it has %s)",
                     target.label, ", ".join(target.update_triggers), ", ".join(spec.snapshot))
        before = baseline(settings, env, conn, target)
        with conn.transaction():
            snap = None
            if spec.snapshot is not None:
                snap = take_snapshot(conn, (target.schema, target.table),
                                     columns=None if spec.snapshot == "*" else list(spec.snapshot),
                                     where=spec.where, key=list(target.key), label=f"xf_{name}")
                index_snapshot(conn, snap)
                log.info("snapshot %s of %s: %d rows, columns %s", snap.name, target.label, snap.rows,
                         ", ".join(snap.columns))
            run_id = create_run(conn, transform=name, action="run", definition=spec.definition,
                                table_name=target.label, key_column=list(target.key), params=opts.as_dict(),
                                ranges=ranges, snapshot=snapshot_to_json(snap) if snap else None,
                                baseline=before, flow_run_id=flow_run_id)
        log.info("run %d of %s on %s: %s, %d range(s), %d rows", run_id, name, env.name, target.label, len(ranges),
                 sum(r[2] for r in ranges))
        return load_run(conn, run_id)


def same_key(run: RunState, target: Target, env: Environment) -> None:
    """The checkpoints of `run` are values of the key it started with: resumed over another key
    (a migration changed the primary key meanwhile), they would skip or repeat rows."""
    if list(run.key_column) != list(target.key):
        raise BadInput(f"the key of {target.label} is ({target.key_label}) now, but {run.action} {run.id} of "
                       f"{run.transform} on {env.name} started over ({', '.join(run.key_column)}); its checkpoints "
                       "do not apply to the new key: put the old key back to finish it, or restore the table")


def run_range(settings: Settings, env: Environment, name: str, run_id: int, range_no: int,
              opts: Options) -> RangeOutcome:
    """One worker: its own connection, its range from the checkpoint to the end."""
    spec = spec_for(settings, name)
    with connect(settings, env, f"{name}:r{range_no}", autocommit=True) as conn:
        session_limits(conn, opts)
        run = load_run(conn, run_id)
        if run is None:
            raise OperationFailed(f"run {run_id} of {name} is not in {env.name}'s dataops_transforms.runs")
        r = next(x for x in run.ranges if x.range_no == range_no)
        target = bind(conn, spec)
        same_key(run, target, env)
        if run.action == "run":
            batcher = batcher_for(spec, target, run.id)
        else:
            batcher = batcher_for_revert(run.params["method"], spec, target, run.snapshot, run.reverts)
        try:
            return process_range(conn, batcher, r, opts, label=f"{run.action} {name} on {env.name}",
                                 revert=run.action == "revert")
        except Exception as exc:
            if not is_transient(exc) and not conn.closed and not conn.broken:
                request_stop(conn, run_id)  # no retry will help: the other ranges stop after their current batch
            raise


def finish_run(settings: Settings, env: Environment, name: str, run_id: int) -> tuple[RunState, list[str]]:
    """Checks after the last batch; records completed or checks-failed. Returns (run, problems)."""
    spec = spec_for(settings, name)
    with connect(settings, env, f"{name}:checks", autocommit=True) as conn:
        run = load_run(conn, run_id)
        if run.pending:
            raise OperationFailed(f"run {run_id} of {name} has {len(run.pending)} unfinished range(s); "
                                  f"run it again to resume: dataops transform {env.name} run {name}")
        target = bind(conn, spec)
        failpoint("transform.before_checks")  # every batch committed, the run not yet marked: `run` checks it
        problems = post_checks(settings, env, conn, spec, target, run.baseline)
        set_status(conn, run_id, CHECKS_FAILED if problems else COMPLETED, "; ".join(problems) or None)
        return load_run(conn, run_id), problems


# -- a revert -------------------------------------------------------------------------------------

def prepare_revert(settings: Settings, env: Environment, name: str, opts: Options,
                   flow_run_id: str | None = None) -> RunState:
    """Resume an interrupted revert, or start reverting the newest run not yet reverted.
    The caller holds the transform's lock."""
    spec = spec_for(settings, name)
    with connect(settings, env, f"{name}:prepare-revert", autocommit=True) as conn:
        target = bind(conn, spec)
        ensure_schema(conn)
        last = latest_run(conn, name)
        if last is not None and last.action == "revert" and last.status == RUNNING:
            same_key(last, target, env)
            request_stop(conn, last.id, False)
            set_status(conn, last.id, RUNNING, finished=False, flow_run_id=flow_run_id)
            log.info("resuming revert %d of run %d of %s on %s", last.id, last.reverts, name, env.name)
            return load_run(conn, last.id)
        row = conn.execute("SELECT id FROM dataops_transforms.runs WHERE transform = %s AND action = 'run' "
                           "AND status <> %s ORDER BY id DESC LIMIT 1", (name, REVERTED)).fetchone()
        if row is None:
            raise BadInput(f"nothing to revert: {name} has no run on {env.name} that is not already reverted")
        victim = load_run(conn, row[0])
        if victim.snapshot and not spec.revert:
            same_key(victim, target, env)  # the snapshot is keyed by the run's key
        if spec.revert:
            method, keys_table, snapshot = "own", None, None
            compile_check(conn, spec, target)
        elif victim.snapshot:
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
                                table_name=target.label, key_column=list(target.key),
                                params={**opts.as_dict(), "method": method}, ranges=ranges, snapshot=snapshot,
                                flow_run_id=flow_run_id)
        log.info("revert %d of run %d of %s on %s, from %s: %d range(s)", rev_id, victim.id, name, env.name,
                 "its REVERT" if method == "own" else f"snapshot {snapshot['name']}", len(ranges))
        return load_run(conn, rev_id)


def finish_revert(settings: Settings, env: Environment, name: str, revert_id: int) -> RunState:
    with connect(settings, env, f"{name}:finish-revert", autocommit=True) as conn:
        rev = load_run(conn, revert_id)
        if rev.pending:
            raise OperationFailed(f"revert {revert_id} of {name} has {len(rev.pending)} unfinished range(s); "
                                  f"run it again to resume: dataops transform {env.name} revert {name}")
        with conn.transaction():
            set_status(conn, revert_id, COMPLETED)
            set_status(conn, rev.reverts, REVERTED, f"reverted by run {revert_id}")
        return load_run(conn, revert_id)


# -- the order of a run and of a revert ----------------------------------------------------------------

Reporter = Callable[[float, str], None]  # (percent done, progress line)


class PlainSteps:
    """The steps as plain calls, the ranges on threads of this process. The flows pass
    PrefectSteps (at the bottom) instead, so the order lives in one place: transform() and
    revert() below."""

    prepare_run = staticmethod(prepare_run)
    finish_run = staticmethod(finish_run)
    prepare_revert = staticmethod(prepare_revert)
    finish_revert = staticmethod(finish_revert)
    # told when a run's checks fail (in a flow, its failure hook starts the revert itself)
    after_failed_checks = "undo it with dataops transform {env} revert {name}"

    @staticmethod
    def logger():
        return log

    @staticmethod
    def reporter(env: Environment, run: RunState) -> Reporter:
        return lambda _percent, line: log.info("%s", line)

    @staticmethod
    def run_ranges(settings: Settings, env: Environment, name: str, run: RunState,
                   opts: Options) -> tuple[float, BaseException | None]:
        """(longest transaction, first error): every range ends before the error is raised
        (the failed worker already asked the others to stop after their current batch)."""
        longest, error = 0.0, None
        if not run.pending:
            return longest, error
        with ThreadPoolExecutor(max_workers=len(run.pending), thread_name_prefix=f"xf-{name}") as pool:
            futures = [pool.submit(run_range, settings, env, name, run.id, r.range_no, opts) for r in run.pending]
            for f in as_completed(futures):
                try:
                    longest = max(longest, f.result().longest_tx_s)
                except Exception as exc:  # noqa: BLE001 - raised by the caller once every worker has stopped
                    error = error or exc
        return longest, error

    @staticmethod
    def publish(summary: dict) -> None:
        pass


def _work_through(settings: Settings, env: Environment, name: str, run: RunState, opts: Options, steps,
                  progress_every_s: float) -> float:
    """The pending ranges, with progress reports; the longest transaction."""
    with ProgressMonitor(settings, env, run, steps.reporter(env, run), progress_every_s):
        longest, error = steps.run_ranges(settings, env, name, run, opts)
    if error is not None:
        raise error
    return longest


def transform(settings: Settings, env: Environment, name: str, overrides: Overrides | None = None, *,
              steps=PlainSteps, flow_run_id: str | None = None, progress_every_s: float = PROGRESS_EVERY_S) -> dict:
    """Run (or resume) a transform. Raises OperationFailed when the checks fail (the run is
    then marked checks-failed; `revert()` undoes it)."""
    opts = Options.from_settings(settings.transforms, overrides)
    say = steps.logger()
    t0 = time.monotonic()
    spec = spec_for(settings, name)
    table = (spec.schema_name, spec.table_name)
    with transform_lock(env, name, table, timeout=settings.postgres.connect_timeout):
        run = steps.prepare_run(settings, env, name, opts, flow_run_id)
        longest = _work_through(settings, env, name, run, opts, steps, progress_every_s)
        run, problems = steps.finish_run(settings, env, name, run.id)
    summary = summarize(run, env, Session(time.monotonic() - t0, longest), problems)
    steps.publish(summary)
    say.info("%s on %s: %s; %d changed, %d deleted, %d invalid, %d unchanged in %d batches; longest transaction "
             "%.3f s", name, env.name, summary["status"], summary["changed"], summary["deleted"], summary["invalid"],
             summary["unchanged"], summary["batches"], summary["longest_tx_s"])
    if problems:
        raise OperationFailed(f"checks after {name} on {env.name} failed: {'; '.join(problems)}; "
                              + steps.after_failed_checks.format(env=env.name, name=name))
    return summary


def revert(settings: Settings, env: Environment, name: str, overrides: Overrides | None = None, *,
           steps=PlainSteps, flow_run_id: str | None = None, progress_every_s: float = PROGRESS_EVERY_S,
           only_if_checks_failed: bool = False) -> dict:
    """Undo the newest run not yet reverted (or resume an interrupted revert).
    only_if_checks_failed: leave the newest run alone unless its checks failed; one that was
    merely interrupted is waiting to be resumed, not reverted."""
    opts = Options.from_settings(settings.transforms, overrides)
    say = steps.logger()
    t0 = time.monotonic()
    spec = spec_for(settings, name)
    table = (spec.schema_name, spec.table_name)
    with transform_lock(env, name, table, timeout=settings.postgres.connect_timeout) as conn:
        if only_if_checks_failed:
            last = latest_run(conn, name)
            interrupted_revert = last is not None and last.action == "revert" and last.status == RUNNING
            if not interrupted_revert and (last is None or last.status != CHECKS_FAILED):
                say.info("the newest run of %s on %s did not fail its checks (%s); nothing to revert", name, env.name,
                         f"{last.action} {last.id} {last.status}" if last else "never run")
                return {"transform": name, "environment": env.name, "status": "nothing to revert"}
        rev = steps.prepare_revert(settings, env, name, opts, flow_run_id)
        longest = _work_through(settings, env, name, rev, opts, steps, progress_every_s)
        rev = steps.finish_revert(settings, env, name, rev.id)
    summary = summarize(rev, env, Session(time.monotonic() - t0, longest))
    steps.publish(summary)
    say.info("reverted run %s of %s on %s (%s): %d rows written back, %d re-inserted", rev.reverts, name, env.name,
             rev.params.get("method"), summary["changed"], summary["inserted"])
    return summary


# -- reading ------------------------------------------------------------------------------------------

def status(settings: Settings, env: Environment, name: str, runs: int = 5) -> dict:
    """The newest runs of a transform on an environment, newest first. Reads only."""
    spec = spec_for(settings, name)
    with connect(settings, env, f"{name}:status") as conn:
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
    return {"transform": name, "environment": env.name, "description": spec.description, "table": spec.table,
            "kind": spec.kind, "runs": listed}


def _is_running(conn, name: str) -> bool:
    return conn.execute("SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND classid = %s::oid "
                        "AND objid = %s::oid AND objsubid = 2 AND granted "
                        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))",
                        (LOCK_CLASS & 0xFFFFFFFF, lock_key(name) & 0xFFFFFFFF)).fetchone()[0]


# -- Prefect tasks ------------------------------------------------------------------------------------


@task(name="prepare-transform", **RETRY_TRANSIENT)
def prepare_task(settings: Settings, env: Environment, name: str, opts: Options,
                 flow_run_id: str | None = None) -> RunState:
    """Snapshot (when asked for) and checkpoint rows, or the interrupted run to resume."""
    return prepare_run(settings, env, name, opts, flow_run_id)


@task(name="transform-range", **RETRY_TRANSIENT)
def run_range_task(settings: Settings, env: Environment, name: str, run_id: int, range_no: int,
                   opts: Options) -> RangeOutcome:
    """A retry resumes from the range's checkpoint, so it never repeats a committed batch."""
    return run_range(settings, env, name, run_id, range_no, opts)


@task(name="check-transform", **RETRY_TRANSIENT)
def finish_task(settings: Settings, env: Environment, name: str, run_id: int) -> tuple[RunState, list[str]]:
    return finish_run(settings, env, name, run_id)


@task(name="prepare-revert", **RETRY_TRANSIENT)
def prepare_revert_task(settings: Settings, env: Environment, name: str, opts: Options,
                        flow_run_id: str | None = None) -> RunState:
    return prepare_revert(settings, env, name, opts, flow_run_id)


@task(name="finish-revert", **RETRY_TRANSIENT)
def finish_revert_task(settings: Settings, env: Environment, name: str, revert_id: int) -> RunState:
    return finish_revert(settings, env, name, revert_id)


class PrefectSteps(PlainSteps):
    """The same steps as Prefect task runs, for the run-transform and revert-transform flows:
    prepare and finish run in the flow, each range is submitted to the flow's task runner."""

    prepare_run = prepare_task
    finish_run = finish_task
    prepare_revert = prepare_revert_task
    finish_revert = finish_revert_task
    after_failed_checks = "reverting it"  # the run-transform flow's on_failure hook starts revert-transform

    @staticmethod
    def logger():
        return get_run_logger()

    @staticmethod
    def reporter(env: Environment, run: RunState) -> Reporter:
        """Progress lines in the flow run's log, and a progress artifact on its page."""
        logger = get_run_logger()
        revert = run.action == "revert"
        bar = ProgressArtifact(f"transform-{run.transform}-{env.name}{'-revert' if revert else ''}-progress",
                               f"{'revert of ' if revert else ''}{run.transform} on {env.name}")

        def report(percent: float, line: str) -> None:
            logger.info("%s", line)
            bar.update(percent)

        return report

    @staticmethod
    def run_ranges(settings: Settings, env: Environment, name: str, run: RunState,
                   opts: Options) -> tuple[float, BaseException | None]:
        what = "revert-" if run.action == "revert" else ""
        futures = [run_range_task.with_options(task_run_name=f"{name}-{what}range-{r.range_no}").submit(
            settings, env, name, run.id, r.range_no, opts) for r in run.pending]
        return gather_ranges(futures)

    publish = staticmethod(publish_summary)
