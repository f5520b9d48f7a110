"""Streaming one table (or one block range of it) from the source into the new copy.

`COPY (SELECT ...) TO STDOUT` on the source, inside the refresh's exported snapshot, feeds
`COPY ... FROM STDIN` on the target row by row: memory holds a few hundred rows, whatever
the table size. Rules that need no secret (null, constant) are applied in the SELECT, so
a table with nothing else to mask streams through unparsed. Otherwise each row is split
on tabs (COPY's text format escapes tabs, newlines and backslashes inside values, so a
split is exact), only the masked fields are decoded, rewritten and re-encoded.

Tables load with no index, constraint or trigger in place (those come after the load,
as pg_restore does), so they can load in parallel in any order. Rules PostgreSQL
evaluates (noise, choice, generalize, json paths, cases; dataops.tasks.anonymize.sql_rules) are in the
SELECT too; a table whose rules leave the leak scan nothing to take from each row streams through
two psql processes like an unmasked one (Masker.row_free). Jobs whose rows pass
through Python run in worker processes when there are many rows: masking is CPU work,
and threads would share one core under the GIL.
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import logging
import multiprocessing
import re
import signal
import time
from dataclasses import dataclass, field

import psycopg
import psycopg.conninfo
from psycopg import sql

from dataops.tasks.anonymize.masking import NULL, Masker, escape, unescape
from dataops.tasks.schema import STABLE_OUTPUT

log = logging.getLogger("dataops.refresh")

BATCH_ROWS = 500
PROCESS_THRESHOLD_ROWS = 300_000  # below this, worker processes cost more to start than they save


@dataclass
class CopyJob:
    id: str  # "users" or "users#2"
    label: str
    source: str  # conninfo with the password: only ever pickled to our own worker processes
    target: str
    snapshot: str
    copy_out: str
    copy_in: str
    maskers: list[tuple[int, int, Masker]] = field(default_factory=list)  # (field index, column id, masker)
    leak_dir: str = ""
    leak_bits: int = 0
    est_rows: int = 0
    # Jobs with nothing to mask in Python go through two psql processes instead: C all the
    # way (~0.7 us a row less CPU than a Python loop). (psql path, source libpq args, target libpq args)
    psql: tuple[str, tuple[str, dict], tuple[str, dict]] | None = None
    # Rules PostgreSQL evaluates (sql_rules) come masked in their field; the source value follows
    # at the end of the row for the leak scan: field index -> index of the source value's field.
    extras: dict[int, int] = field(default_factory=dict)


@dataclass
class CopyResult:
    id: str
    label: str
    rows: int
    started: float  # time.time(), so parts of one table give its wall time
    finished: float
    unchanged: dict[int, int] = field(default_factory=dict)  # column id -> values the rule left as they were
    values: dict[int, int] = field(default_factory=dict)  # column id -> non-NULL values masked in Python


def _session_settings(conn: psycopg.Connection) -> None:
    for name, value in STABLE_OUTPUT.items():
        conn.execute("SELECT set_config(%s, %s, false)", (name, value))


def run_copy_job(job: CopyJob) -> CopyResult:
    """Copy one job; the target side commits only at the end (the new copy is scratch anyway)."""
    started = time.time()
    if job.psql and not job.maskers:
        return CopyResult(job.id, job.label, _psql_pipe(job), started, time.time())
    with psycopg.connect(job.source, autocommit=True, application_name="dataops-refresh-copy") as src, \
            psycopg.connect(job.target, autocommit=True, application_name="dataops-refresh-load") as dst:
        _session_settings(src)
        src.execute("SET idle_in_transaction_session_timeout = 0")
        src.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        src.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(job.snapshot)))
        _session_settings(dst)
        dst.execute("SET synchronous_commit = off")  # a crash loses the scratch copy, never staging
        dst.execute("BEGIN")
        with src.cursor().copy(job.copy_out) as cin, dst.cursor().copy(job.copy_in) as cout:
            if job.maskers:
                from dataops.tasks.anonymize.leak_scan import Collector

                collector = Collector(job.leak_dir, job.id.replace("#", "_"), job.leak_bits)
                rows, unchanged, values = _masked_stream(cin, cout, job.maskers, collector, job.extras)
                collector.flush(final=True)
            else:
                rows, unchanged, values = _raw_stream(cin, cout), {}, {}
        dst.execute("COMMIT")
        src.execute("COMMIT")
    return CopyResult(job.id, job.label, rows, started, time.time(), unchanged, values)


def _psql_pipe(job: CopyJob) -> int:
    """`psql -c COPY ... TO STDOUT | psql -c COPY ... FROM STDIN`, the source side in the
    snapshot. A source that fails halfway would leave the target with fewer rows: its exit
    status is checked, and the row counts are validated anyway."""
    import hashlib
    import os
    import subprocess

    binary, (src_info, src_env), (dst_info, dst_env) = job.psql
    # In the conninfo's `options`, after what is there already (row_security=off among them):
    # libpq ignores PGOPTIONS when the conninfo has options of its own.
    options = " ".join(f"-c {name}={value.replace(' ', '')}" for name, value in STABLE_OUTPUT.items())
    src_info, dst_info = _with_options(src_info, options), _with_options(dst_info, options)
    base = [binary, "-X", "-v", "ON_ERROR_STOP=1"]
    # The SELECT goes in a file of the run's private folder, not on the command line: a masking
    # expression holds the salt's HMAC pads, and any local user can read a process's arguments
    # (it can also exceed the kernel's 128 kB limit on one argument, with a Faker pool inside).
    query = os.path.join(job.leak_dir, f"copy-{hashlib.sha256(job.id.encode()).hexdigest()[:16]}.sql")  # any name
    fd = os.open(query, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(job.copy_out + ";\n")
    out_cmd = [*base, "-q", f"--dbname={src_info}", "-c", "SET idle_in_transaction_session_timeout = 0",
               "-c", "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY",
               "-c", f"SET TRANSACTION SNAPSHOT '{job.snapshot}'", "-f", query, "-c", "COMMIT"]
    in_cmd = [*base, f"--dbname={dst_info}", "-c", "SET synchronous_commit = off", "-c", job.copy_in]
    env = {**os.environ, "PGAPPNAME": "dataops-refresh-copy"}
    source = subprocess.Popen(out_cmd, env={**env, **src_env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              preexec_fn=_die_with_parent)
    try:
        target = subprocess.run(in_cmd, env={**env, **dst_env, "PGAPPNAME": "dataops-refresh-load"},
                                stdin=source.stdout, capture_output=True, text=True, preexec_fn=_die_with_parent)
    finally:
        source.stdout.close()
        src_err = source.stderr.read().decode(errors="replace")
        source.wait()
    if source.returncode != 0 or target.returncode != 0:
        # The side that failed says why. A source that stopped halfway can leave the target a cut row
        # (its COPY then fails as a consequence); a target that stopped leaves the source writing into a
        # closed pipe, killed by SIGPIPE without a word (a negative return code).
        source_failed = source.returncode > 0 or target.returncode == 0
        why = (src_err if source_failed else target.stderr).strip().splitlines()
        raise psycopg.OperationalError(f"copying {job.id} failed: {why[-1] if why else 'psql exited early'}")
    return int(target.stdout.strip().split()[-1])  # "COPY <rows>"


def _with_options(conninfo: str, options: str) -> str:
    params = psycopg.conninfo.conninfo_to_dict(conninfo)
    params["options"] = f"{params.get('options') or ''} {options}".strip()
    return psycopg.conninfo.make_conninfo("", **params)


def _raw_stream(cin, cout) -> int:
    rows = 0
    buf: list = []
    for data in cin:
        buf.append(data)
        if len(buf) >= BATCH_ROWS:
            cout.write(b"".join(buf))
            rows += len(buf)
            buf.clear()
    if buf:
        cout.write(b"".join(buf))
        rows += len(buf)
    return rows


_NEEDS_ESCAPE = re.compile(rb"[\\\t\n\r]").search
MEMO_LIMIT = 20_000  # distinct values remembered per column (a few MB)
MEMO_PROBE = 20_000  # after this many values, stop remembering if fewer than 1 in 5 repeat


def _masked_stream(cin, cout, maskers: list[tuple[int, int, Masker]], collector,
                   extras: dict[int, int] | None = None) -> tuple[int, dict, dict]:
    """Rewrite the masked fields of each row. A masked value depends on the value alone
    (templates aside), so columns with repeating values (names, birth dates) remember
    their last outputs: a repeat costs a dict lookup instead of two SHA-256 rounds."""
    keyed = maskers[0][2].keyed
    inner, outer = keyed._inner, keyed._outer
    specs = []
    _by_postgres: list[tuple] = []
    width = min(extras.values()) if extras else None
    seen = [0] * len(maskers)
    for k, (idx, col_id, m) in enumerate(maskers):
        track_source, track_output = m.track_source, m.track_output
        memo = None if (m.kind == "template" or m.column.unique) else {}
        if extras and idx in extras:
            _by_postgres.append((idx, extras[idx], track_source, track_output, col_id.to_bytes(2, "little"), k))
            continue
        # idx, function, tracked source/output, id bytes, k, memo, memo probes, values seen
        specs.append([idx, m.py, track_source, track_output, col_id.to_bytes(2, "little"), k, memo, 0, 0])
    unchanged = [0] * len(maskers)
    add_source, add_output = collector.add_source, collector.add_output
    needs_escape = _NEEDS_ESCAPE
    rows = 0
    buf: list[bytes] = []
    for data in cin:
        fields = bytes(data).split(b"\t")
        fields[-1] = fields[-1][:-1]  # the row's newline
        for spec in specs:
            idx = spec[0]
            f = fields[idx]
            if f == NULL:
                continue
            spec[8] += 1
            memo = spec[6]
            if memo is not None:
                hit = memo.get(f)
                if hit is not None:
                    fields[idx] = hit[0]
                    if hit[1]:
                        unchanged[spec[5]] += 1
                    continue
            v = unescape(f) if b"\\" in f else f
            h = inner()
            h.update(v)
            d = outer()
            d.update(h.digest())
            d = d.digest()
            o = spec[1](v, d, fields).encode()
            if spec[2]:
                add_source(d[24:32])
            same = o == v
            if same:
                unchanged[spec[5]] += 1
            elif spec[3]:
                h = inner()
                h.update(o)
                od = outer()
                od.update(h.digest())
                add_output(od.digest()[24:32], spec[4])
            if needs_escape(o):
                o = escape(o)
            fields[idx] = o
            if memo is not None:
                spec[7] += 1
                if spec[7] > MEMO_PROBE and len(memo) * 5 > spec[7] * 4:
                    spec[6] = None  # mostly distinct values: remembering them only costs memory
                elif len(memo) < MEMO_LIMIT:
                    memo[f] = (o, same)
        if width is not None:
            for idx, at, t_src, t_out, cid, k in _by_postgres:
                _check_by_postgres(fields[at], fields[idx], t_src, t_out, cid, k, unchanged, seen, keyed,
                                   add_source, add_output)
            del fields[width:]
        buf.append(b"\t".join(fields))
        if len(buf) >= BATCH_ROWS:
            buf.append(b"")
            cout.write(b"\n".join(buf))
            rows += len(buf) - 1
            buf.clear()
            collector.flush()
    if buf:
        buf.append(b"")
        cout.write(b"\n".join(buf))
        rows += len(buf) - 1
    for sp in specs:
        seen[sp[5]] = sp[8]
    return rows, {maskers[k][1]: n for k, n in enumerate(unchanged) if n}, {maskers[k][1]: n for k, n in enumerate(seen)}


def _check_by_postgres(src: bytes, out: bytes, t_src: bool, t_out: bool, cid: bytes, k: int, unchanged: list,
                       seen: list, keyed, add_source, add_output) -> None:
    """The leak scan's share of a value PostgreSQL masked: its source value came along at the row's end."""
    if src == NULL:
        return
    seen[k] += 1
    v = unescape(src) if b"\\" in src else src
    if t_src:
        add_source(keyed.digest(v)[24:32])
    if out == NULL:
        return
    o = unescape(out) if b"\\" in out else out
    if o == v:
        unchanged[k] += 1
    elif t_out:
        add_output(keyed.digest(o)[24:32], cid)


# -- running many jobs -----------------------------------------------------------------------

def _die_with_parent() -> None:
    """psql children must not outlive a killed refresh (they would keep loading a copy the next
    run discards anyway). Their copy thread waits for them, so the thread outlives them."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # pragma: no cover - not Linux
        pass


def _exit_with_parent_process() -> None:
    """The pool's workers: PR_SET_PDEATHSIG fires when the *thread* that started a process ends,
    and the pool starts its workers from whichever copy thread submits first; when that thread
    finished, an idle worker holding the pool's queue lock was killed and the refresh waited on
    it forever. So a worker watches its parent process instead and leaves when it is gone."""
    import os
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="dataops-parent-watch", daemon=True).start()


def run_jobs(jobs: list[CopyJob], workers: int, on_done=None, before_masking=None) -> list[CopyResult]:
    """Run copy jobs, `workers` at a time, largest first.

    Each job runs in a thread; a job that masks in Python hands itself to a worker process
    when the masked rows are many (pure-psql jobs never need one), so at most `workers`
    processes exist and they only hold what masking needs. Any failure cancels what has
    not started and re-raises; the caller discards the copy. `before_masking()` is called
    (and waited for) before each job that masks in Python: the Faker pools being built.
    """
    jobs = sorted(jobs, key=lambda j: j.est_rows, reverse=True)
    masked_rows = sum(j.est_rows for j in jobs if j.maskers)
    procs = None
    if workers > 1 and masked_rows >= PROCESS_THRESHOLD_ROWS:
        procs = cf.ProcessPoolExecutor(max_workers=min(workers, sum(1 for j in jobs if j.maskers)),
                                       initializer=_exit_with_parent_process, mp_context=multiprocessing.get_context("spawn"))

    def run(job: CopyJob) -> CopyResult:
        if job.maskers and before_masking is not None:
            before_masking()
        if procs is not None and job.maskers:
            return procs.submit(run_copy_job, job).result()
        return run_copy_job(job)

    threads = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dataops-copy")
    results: list[CopyResult] = []
    futures = {}
    try:
        for job in jobs:
            futures[threads.submit(run, job)] = job
        for fut in cf.as_completed(futures):
            result = fut.result()
            results.append(result)
            if on_done:
                on_done(result)
    except BaseException:
        for fut in futures:
            fut.cancel()
        raise
    finally:
        if procs is not None:  # before the threads: none of them waits on a worker any more
            procs.shutdown(wait=False, cancel_futures=True)
        threads.shutdown(wait=True, cancel_futures=True)
        if procs is not None:
            procs.shutdown(wait=True)
    return results
