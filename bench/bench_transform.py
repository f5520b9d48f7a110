"""Benchmark for issue 5: batched transforms against one big UPDATE and a row-by-row loop.

    .venv/bin/python bench/bench_transform.py [--users 1000000] [--rounds 2] [--no-flow] [--no-memory]

What it does, in one run:

1. Starts an embedded PostgreSQL (pgserver) in a temporary folder and builds a template
   database: the sample application's schema with --users users (the seeder's own rows,
   through tasks.sample_app's user generator; the other tables stay empty because the
   full_name split reads only users), then VACUUM (FREEZE, ANALYZE) and a CHECKPOINT.
2. Every measurement runs on a fresh copy (CREATE DATABASE ... TEMPLATE), after a CHECKPOINT:
   - one set-based UPDATE of the whole table (the full_name split in SQL);
   - keyset batches of 10,000 rows, one set-based UPDATE each, autocommit: the hand-written
     loop a careful engineer would write;
   - the seed-style loop: one UPDATE per row, committed every 100 rows (on the first
     50,000 rows only: the whole table would take minutes);
   - the product, `tasks.transform_engine` in-process: the SQL variant of the split (SET),
     the pandas variant (change(df)), both without a snapshot so that they do the same work
     as the baselines, and the shipped module (pandas, with its snapshot). Phases are
     timed apart: prepare (lock, ranges, validation baseline, snapshot), batches, checks.
   - the same SQL transform through the run-transform flow on a Prefect server of its own
     (startup not timed), alternating with in-process runs, --rounds times each;
   - peak memory: the pandas transform in a child process on a table of --small-users and
     of --users users (VmHWM minus the RSS after imports).
3. Writes the section "## Transforms (issue 5)" of bench/RESULTS.md (other sections are kept).

Rates are rows of the table per second of wall-clock time. Other engineers' tests may share
the machine: the load average is recorded at the start and the end.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "RESULTS.md"
SECTION = "## Transforms (issue 5)"
ENV = "bench"

SPLIT_SET = {"first_name": "split_part(btrim(full_name), ' ', 1)",
             "last_name": "btrim(substr(btrim(full_name), strpos(btrim(full_name), ' ') + 1))"}
WHERE = "first_name IS NULL AND last_name IS NULL"
VALID = "btrim(full_name) LIKE '% %'"
SQL_VARIANT = f'''
"""The full_name split as SQL (benchmark variant, no snapshot)."""
TABLE = "users"
WHERE = {WHERE!r}
VALID = {VALID!r}
SET = {SPLIT_SET!r}
'''


def _prepare_environ(home: Path) -> None:
    runtime = Path(tempfile.gettempdir()) / f"dataops-runtime-{os.getuid()}"
    runtime.mkdir(mode=0o700, exist_ok=True)
    os.environ.setdefault("XDG_RUNTIME_DIR", str(runtime))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ["PREFECT_HOME"] = str(home / "prefect-home")


def _vm(field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1)) * 1024 if m else 0


# -- the database ---------------------------------------------------------------------------------

def build_template(base, name: str, users: int) -> None:
    from tasks import pg
    from tasks.sample_app import _copy_users, _Pools, create_schema

    pg.create_database(base, name)
    dsn = base.with_database(name)
    create_schema(dsn)
    with pg.connect(dsn) as conn:
        with conn.cursor() as cur:
            _copy_users(cur, random.Random(42), _Pools.build(42), users)
        conn.commit()
    with pg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM (FREEZE, ANALYZE) users")
        conn.execute("CHECKPOINT")


class Copies:
    def __init__(self, base, template: str):
        self.base, self.template, self.n = base, template, 0

    def fresh(self):
        from psycopg import sql

        from tasks import pg

        self.n += 1
        name = f"{self.template}_c{self.n}"
        pg.drop_database(self.base, name)
        with pg.connect(self.base, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name),
                                                                         sql.Identifier(self.template)))
            conn.execute("CHECKPOINT")
        return self.base.with_database(name)

    def drop(self, dsn) -> None:
        from tasks import pg

        pg.drop_database(self.base, dsn.database)


def table_rows(dsn) -> int:
    from tasks import pg

    with pg.connect(dsn) as conn:
        return conn.execute("SELECT count(*) FROM users").fetchone()[0]


def split_is_right(dsn) -> int:
    """Rows split wrongly (must be 0): checks every variant did the same work."""
    from tasks import pg

    with pg.connect(dsn) as conn:
        return conn.execute(f"SELECT count(*) FROM users WHERE ({VALID}) AND (first_name IS NULL OR "
                            "first_name || ' ' || last_name <> btrim(full_name))".replace("%", "%%"), {}).fetchone()[0]


# -- baselines --------------------------------------------------------------------------------------

def _set_sql() -> str:
    return ", ".join(f"{c} = {e}" for c, e in SPLIT_SET.items())


def single_update(dsn) -> dict:
    from tasks import pg

    with pg.connect(dsn) as conn:
        t0 = time.monotonic()
        n = conn.execute(f"UPDATE users SET {_set_sql()} WHERE {WHERE} AND {VALID}".replace("%", "%%"), {}).rowcount
        conn.commit()
        took = time.monotonic() - t0
    return {"seconds": took, "changed": n, "longest_tx_s": took}


def keyset_loop(dsn, batch: int = 10_000) -> dict:
    from tasks import pg

    update = f"UPDATE users SET {_set_sql()} WHERE id > %s AND id <= %s AND {WHERE} AND {VALID.replace('%', '%%')}"
    with pg.connect(dsn, autocommit=True) as conn:
        t0, last, longest, changed = time.monotonic(), 0, 0.0, 0
        while True:
            hi = conn.execute("SELECT max(id) FROM (SELECT id FROM users WHERE id > %s ORDER BY id LIMIT %s) s",
                              (last, batch)).fetchone()[0]
            if hi is None:
                break
            b0 = time.monotonic()
            with conn.transaction():
                changed += conn.execute(update, (last, hi)).rowcount
            longest = max(longest, time.monotonic() - b0)
            last = hi
        took = time.monotonic() - t0
    return {"seconds": took, "changed": changed, "longest_tx_s": longest}


def seed_style_loop(dsn, rows: int, per_commit: int = 100) -> dict:
    from tasks import pg

    with pg.connect(dsn) as conn:
        t0, last, done, longest = time.monotonic(), 0, 0, 0.0
        while done < rows:
            b0 = time.monotonic()
            batch = conn.execute(f"SELECT id, full_name FROM users WHERE id > %s AND {WHERE} ORDER BY id LIMIT %s",
                                 (last, per_commit)).fetchall()
            if not batch:
                break
            with conn.cursor() as cur:
                for uid, full in batch:
                    parts = full.strip().split(" ", 1)
                    if len(parts) == 2:
                        cur.execute("UPDATE users SET first_name = %s, last_name = %s WHERE id = %s",
                                    (parts[0], parts[1].strip(), uid))
            conn.commit()
            longest = max(longest, time.monotonic() - b0)
            last, done = batch[-1][0], done + len(batch)
        took = time.monotonic() - t0
    return {"seconds": took, "rows": done, "longest_tx_s": longest}


# -- the product ------------------------------------------------------------------------------------

def settings_for(tmp: Path, dsn, folder: Path, **transforms):
    import yaml

    from dataops.settings import load_settings

    path = tmp / f"dataops-{dsn.database}.yaml"
    path.write_text(yaml.safe_dump({
        "environments": {ENV: {"role": "development", "database_url": dsn.secret()}},
        "storage": {"url": (tmp / "backups").as_uri()},
        "transforms": {"path": str(folder), "batch_size": 10_000, **transforms},
    }))
    return load_settings(path)


def engine_run(settings, name: str) -> dict:
    """transform(), phase by phase."""
    from tasks.transform_batches import Options
    from tasks.transform_engine import _run_ranges, finish_run, prepare_run, summarize
    from tasks.transform_state import transform_lock

    opts = Options.from_settings(settings.transforms)
    t0 = time.monotonic()
    with transform_lock(settings.env(ENV).database_url, name, ENV):
        run = prepare_run(settings, ENV, name, opts)
        t1 = time.monotonic()
        session = _run_ranges(settings, ENV, name, run, opts)
        t2 = time.monotonic()
        run, problems = finish_run(settings, ENV, name, run.id)
    t3 = time.monotonic()
    s = summarize(run, ENV, session, problems)
    assert not problems and s["status"] == "completed", s
    return {"seconds": t3 - t0, "prepare_s": t1 - t0, "batches_s": t2 - t1, "checks_s": t3 - t2,
            "longest_tx_s": s["longest_tx_s"], "batches": s["batches"], "changed": s["changed"],
            "invalid": s["invalid"], "busy_s": s["busy_s"]}


def flow_run(settings, name: str) -> dict:
    from flows.run_transform import run_transform

    t0 = time.monotonic()
    s = run_transform(ENV, name, config=settings.source)
    took = time.monotonic() - t0
    assert s["status"] == "completed", s
    return {"seconds": took, "inner_s": s["seconds"], "longest_tx_s": s["longest_tx_s"], "batches": s["batches"]}


CHILD = """
import json, re, sys, time
from pathlib import Path
def vm(f):
    return int(re.search(rf"^{f}:\\s+(\\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024
from dataops.settings import load_settings
from tasks.transform_engine import transform
import pandas, psycopg
rss0 = vm("VmRSS")
t0 = time.monotonic()
s = transform(load_settings(sys.argv[1]), sys.argv[2], sys.argv[3])
print(json.dumps({"rss_after_imports": rss0, "peak": vm("VmHWM"), "seconds": time.monotonic() - t0,
                  "changed": s["changed"]}))
"""


def memory_run(settings, name: str) -> dict:
    import json

    out = subprocess.run([sys.executable, "-c", CHILD, settings.source, ENV, name], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- report -------------------------------------------------------------------------------------------

def write_section(text: str) -> None:
    """Replace this benchmark's H2 section of RESULTS.md (re-read just now), keeping every other section."""
    body = RESULTS.read_text() if RESULTS.exists() else (
        "# Benchmark results\n\nOne H2 section per script in `bench/`; each script rewrites only its own section.\n")
    lines = body.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip() == SECTION), None)
    if start is None:
        new = body.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "".join(lines[:start]) + text.rstrip("\n") + "\n" + ("\n" + "".join(lines[end:]) if end < len(lines) else "")
    RESULTS.write_text(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--small-users", type=int, default=100_000, help="smaller table for the memory comparison")
    ap.add_argument("--seed-loop-rows", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=2, help="in-process vs flow rounds of the SQL transform")
    ap.add_argument("--no-flow", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-write", action="store_true", help="print the section instead of writing RESULTS.md")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="dobx-"))
    _prepare_environ(tmp)
    import pgserver

    from dataops.dsn import Dsn

    load0 = os.getloadavg()
    started = datetime.now(timezone.utc)
    srv = pgserver.get_server(tmp / "pg", cleanup_mode="delete")
    base = Dsn(srv.get_uri("postgres"))
    folder = tmp / "transforms"
    folder.mkdir()
    (folder / "split_sql.py").write_text(textwrap.dedent(SQL_VARIANT))
    shipped = (ROOT / "transforms" / "users_split_full_name.py").read_text()
    (folder / "users_split_full_name.py").write_text(shipped)
    (folder / "split_pandas.py").write_text(re.sub(r"^SNAPSHOT = .*$", "", shipped, flags=re.M))
    results: dict = {}
    try:
        t = time.monotonic()
        build_template(base, "tpl", args.users)
        results["build_s"] = time.monotonic() - t
        copies = Copies(base, "tpl")
        rows = None

        def measure(label: str, fn, check: bool = True):
            dsn = copies.fresh()
            try:
                r = fn(dsn)
                if check:
                    wrong = split_is_right(dsn)
                    assert wrong == 0, f"{label}: {wrong} rows split wrongly"
                nonlocal rows
                rows = rows or table_rows(dsn)
            finally:
                copies.drop(dsn)
            print(f"{label}: {r}", flush=True)
            results.setdefault(label, []).append(r)
            return r

        measure("single UPDATE", single_update)
        measure("keyset batches of 10,000 (hand-written)", keyset_loop)
        measure("seed-style loop (UPDATE per row, commit per 100)",
                lambda d: seed_style_loop(d, args.seed_loop_rows), check=False)
        measure("transform, SQL (no snapshot)", lambda d: engine_run(settings_for(tmp, d, folder), "split_sql"))
        measure("transform, pandas (no snapshot)", lambda d: engine_run(settings_for(tmp, d, folder), "split_pandas"))
        measure("transform, shipped module (pandas + snapshot)",
                lambda d: engine_run(settings_for(tmp, d, folder), "users_split_full_name"))
        measure("single UPDATE", single_update)
        if not args.no_flow:
            from prefect.testing.utilities import prefect_test_harness

            with prefect_test_harness(server_startup_timeout=180):
                for _ in range(args.rounds):
                    measure("transform, SQL, in-process", lambda d: engine_run(settings_for(tmp, d, folder), "split_sql"))
                    measure("transform, SQL, run-transform flow", lambda d: flow_run(settings_for(tmp, d, folder), "split_sql"))
        if not args.no_memory:
            for n, label in ((args.small_users, "small"), (args.users, "large")):
                if label == "small":
                    build_template(base, "tpl_small", n)
                    small = Copies(base, "tpl_small")
                    dsn = small.fresh()
                else:
                    dsn = copies.fresh()
                try:
                    r = memory_run(settings_for(tmp, dsn, folder), "split_pandas")
                finally:
                    pg_drop = small.drop if label == "small" else copies.drop
                    pg_drop(dsn)
                r["users"] = n
                print(f"memory {label}: {r}", flush=True)
                results[f"memory {label}"] = r
    finally:
        srv.cleanup()
    results["rows"] = rows
    text = render(results, args, started, load0, os.getloadavg())
    if args.no_write:
        print(text)
    else:
        write_section(text)
        print(f"wrote {SECTION} to {RESULTS}")


def _secs(runs: list[dict]) -> str:
    return ", ".join(f"{r['seconds']:.2f}" for r in runs)


def _med(runs: list[dict], key: str = "seconds") -> float:
    return statistics.median(r[key] for r in runs)


def render(res: dict, args, started: datetime, load0, load1) -> str:
    rows = res["rows"]
    single = _med(res["single UPDATE"])
    rate = lambda s, n=rows: n / s  # noqa: E731
    base = rate(single)
    seed_r = res["seed-style loop (UPDATE per row, commit per 100)"][0]
    seed_rate = seed_r["rows"] / seed_r["seconds"]

    def line(label: str, runs: list[dict], note: str = "") -> str:
        s = _med(runs)
        longest = max(r["longest_tx_s"] for r in runs)
        return (f"| {label} | {s:.2f} | {rate(s):,.0f} | {100 * rate(s) / base:.0f}% | {rate(s) / seed_rate:.0f}x | "
                f"{longest:.2f} | {note} |")

    out = [SECTION, "",
           f"`bench/bench_transform.py --users {args.users}`: the full_name split on {rows:,} users "
           f"(sample application's users table; {started:%Y-%m-%d %H:%M} UTC; {platform.machine()}, "
           f"{os.cpu_count()} cores, PostgreSQL 16 from pgserver, default settings). Load average "
           f"{load0[0]:.1f} at the start, {load1[0]:.1f} at the end: other engineers' tests were sharing the machine, "
           "so single figures carry a few percent of noise.",
           "",
           "| variant | seconds | rows/s | vs single UPDATE | vs seed-style loop | longest transaction (s) | notes |",
           "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
           line("one set-based UPDATE of the whole table", res["single UPDATE"],
                f"median of {len(res['single UPDATE'])} (first and last measurement)"),
           line("keyset batches of 10,000, one UPDATE each (hand-written)",
                res["keyset batches of 10,000 (hand-written)"]),
           f"| seed-style loop: UPDATE per row, commit per 100 | {seed_r['seconds']:.2f} "
           f"(first {seed_r['rows']:,} rows) | {seed_rate:,.0f} | {100 * seed_rate / base:.1f}% | 1x | "
           f"{seed_r['longest_tx_s']:.3f} | |"]
    for label in ("transform, SQL (no snapshot)", "transform, pandas (no snapshot)",
                  "transform, shipped module (pandas + snapshot)"):
        r = res[label][0]
        out.append(line(label.replace("transform", "`transform()`"), res[label],
                        f"prepare {r['prepare_s']:.2f} s, batches {r['batches_s']:.2f} s ({r['batches']} batches, "
                        f"{rate(r['batches_s']):,.0f} rows/s), checks {r['checks_s']:.2f} s"))
    sql_r, pd_r = res["transform, SQL (no snapshot)"][0], res["transform, pandas (no snapshot)"][0]
    out += ["",
            "Targets (issue 5): SQL transform >= 85% of the single UPDATE: "
            f"**{100 * single / sql_r['seconds']:.0f}%** whole run, {100 * single / sql_r['batches_s']:.0f}% for the "
            f"batches alone; pandas >= 40%: **{100 * single / pd_r['seconds']:.0f}%** "
            f"({100 * single / pd_r['batches_s']:.0f}% batches alone); both >= 25x the seed-style loop: "
            f"**{rate(sql_r['seconds']) / seed_rate:.0f}x** and **{rate(pd_r['seconds']) / seed_rate:.0f}x**; "
            f"longest transaction under max_batch_seconds (1 s): **{max(sql_r['longest_tx_s'], pd_r['longest_tx_s']):.2f} s**."]
    if "transform, SQL, run-transform flow" in res:
        plain, flw = res["transform, SQL, in-process"], res["transform, SQL, run-transform flow"]
        p, f = _med(plain), _med(flw)
        inner = _med(flw, "inner_s")
        out += ["",
                f"Flow and task overhead: the same SQL transform in-process and through the run-transform flow "
                f"(Prefect test server, startup not timed), alternating, {len(plain)} rounds each: median "
                f"{p:.2f} s in-process, {f:.2f} s as a flow ({inner:.2f} s between the flow's first and last step), "
                f"so **{100 * (f - p) / f:.1f}%** of the flow run is Prefect (flow and task runs, states, logs, "
                f"artifacts). Single runs: in-process {_secs(plain)} s; flow {_secs(flw)} s."]
    if "memory large" in res:
        s, lg = res["memory small"], res["memory large"]
        mib = 1024 * 1024
        out += ["",
                f"Peak memory of the pandas transform in a child process (VmHWM minus RSS after imports): "
                f"**{(s['peak'] - s['rss_after_imports']) / mib:.0f} MiB** on {s['users']:,} users, "
                f"**{(lg['peak'] - lg['rss_after_imports']) / mib:.0f} MiB** on {lg['users']:,} users "
                f"(RSS after imports {lg['rss_after_imports'] / mib:.0f} MiB): batches bound it, not the table."]
    out += ["", f"Template built in {res['build_s']:.0f} s (not part of any figure); each variant ran on its own "
                "copy of it (CREATE DATABASE ... TEMPLATE, then CHECKPOINT)."]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
