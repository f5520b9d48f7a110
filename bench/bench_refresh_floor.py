"""The refresh's floor on this machine (issues 17 and 18): the CPU a masked refresh cannot do
without, measured part by part in one run, against the copy it is compared with.

    .venv/bin/python bench/bench_refresh_floor.py [--users 1000000] [--no-write]

Why: the refresh targets (issue 18: at most 1.3x `pg_dump -Z0 | pg_restore` at 1M users and less
CPU than pg_anon; issue 17: within 1.5x with a jsonb and noise rules) are wall-time ratios on 2
cores. No schedule finishes before (CPU it must spend) / (cores), so if that bound alone is above
the target, no engineering of the pipeline meets it. This script measures the bound's parts on
the refresh benchmark's database (bench_refresh.py's bench_prod, seeded if needed):

1. the copy, `pg_dump -Fc -Z0 | pg_restore`, 3 runs (median): the work of reading every row,
   writing it into a new database and building its indexes, which the refresh does as well;
2. per masked table, the CPU its masking adds, the cheaper of two ways:
   - in SQL: `COPY (SELECT <every rule as an SQL expression>) TO STDOUT` against the same
     COPY without the rules (server CPU; Faker from a jsonb pool inlined, as sql_rules does);
   - in Python (tables the product masks in Python): the product's stream (run_copy_job) of
     the table into a bare table with its rules against the same stream without them
     (process and server CPU);
3. the proof: the checksum of the unmasked columns (the product's query) on the source and on
   the copy, which the refresh runs on both sides.

Floor = copy CPU + masking CPU + proof CPU, over the cores; compared with each target times the
copy's median wall time. The leak scan's digests, the Faker pools, imports and the plan are left
out (they would only raise the floor). Writes "## Refresh: the floor on 2 cores (issues 17 and 18)"
in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import bench_refresh as B  # noqa: E402
from results import write_section  # noqa: E402

SECTION = "## Refresh: the floor on 2 cores (issues 17 and 18)"
TARGETS = (("issue 18: usual rules at most 1.3x the copy", "usual", 1.3),
           ("issue 6/17: usual rules within 1.5x the copy", "usual", 1.5),
           ("issue 17: with the jsonb and noise rules within 1.5x the copy", "issue17", 1.5))


def server_cpu() -> float:
    """CPU of every PostgreSQL process: the reaped ones (the postmaster's children times) and the
    live ones (the refresh's snapshot connection stays open, so CpuMeter's wait for exited
    backends does not apply). Read after a short pause, so that backends of a finished step have exited."""
    import psutil

    time.sleep(0.3)
    pm = B.CpuMeter.postmaster
    t = pm.cpu_times()
    total = t.children_user + t.children_system
    for c in pm.children():
        try:
            ct = c.cpu_times()
            total += ct.user + ct.system
        except psutil.Error:
            continue
    return total


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def measure(fn) -> dict:
    s0, c0, t0 = server_cpu(), self_cpu(), time.monotonic()
    fn()
    wall = time.monotonic() - t0
    return {"wall": wall, "server": server_cpu() - s0, "client": self_cpu() - c0}


def cpu(m: dict) -> float:
    return m["server"] + m["client"]


def psql_to_null(bin_dir: str, dsn, query: str, workdir: Path) -> None:
    f = workdir / "q.sql"
    f.write_text(f"COPY ({query}) TO STDOUT;\n")
    info, env = dsn.libpq_args()
    p = subprocess.run([f"{bin_dir}/psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", f"--dbname={info}", "-f", str(f)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
    if p.returncode:
        raise RuntimeError(p.stderr[-500:])


def sql_expression(m, col, refs):
    """A rule as one SQL expression of its column (NULL stays NULL)."""
    from psycopg import sql

    from dataops.tasks.anonymize.sql_rules import standalone

    if m.in_sql or m.by_postgres or m.kind in ("hash", "partial", "shift_days", "template"):
        return m.sql(col, refs=refs)
    return sql.SQL("CASE WHEN {} IS NULL THEN NULL ELSE ({}) END").format(col, standalone(m, col, refs))


def bare_target(base, name: str, table) -> None:
    """A database holding `table`'s columns with no index, constraint or trigger: what the
    refresh loads into."""
    from psycopg import sql

    from dataops.tasks import pg

    B.fresh_db(base, name)
    cols = sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(c.type)) for c in table.columns)
    with pg.connect(base.with_database(name), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE TABLE public.{} ({})").format(sql.Identifier(table.name), cols))


def python_masking(base, plan, label: str, snap_id: str, workdir: Path) -> dict:
    """(raw, masked) runs of the product's Python stream of one table into a bare table."""
    from psycopg import sql

    from dataops.tasks import pg
    from dataops.tasks.anonymize.leak_scan import Workspace
    from dataops.tasks.refresh.table_copy import CopyJob, run_copy_job

    tp = plan.tables[label]
    t = tp.table
    tm = plan.masking.tables[label]
    index = {c.name: i for i, c in enumerate(t.columns)}
    maskers = [(index[c], k, m) for k, (c, m) in enumerate(tm.maskers.items()) if not m.in_sql]
    assert not any(m.by_postgres for _, _, m in maskers), "rules PostgreSQL evaluates ride with extras: not measured here"
    in_sql = {c: m for c, m in tm.maskers.items() if m.in_sql}
    prod = base.with_database("bench_prod")
    select = []
    for c in t.columns:
        ident = sql.SQL("t0.{}").format(sql.Identifier(c.name))
        select.append(sql.SQL("{} AS {}").format(in_sql[c.name].sql(ident), sql.Identifier(c.name))
                      if c.name in in_sql else ident)
    cols = sql.SQL(", ").join(sql.Identifier(c.name) for c in t.columns)
    out = {}
    bare_target(base, "bench_floor", t)
    target = base.with_database("bench_floor")
    with pg.connect(prod) as conn:
        copy_out = sql.SQL("COPY (SELECT {} FROM {} AS t0) TO STDOUT").format(sql.SQL(", ").join(select),
                                                                             tp.rel.scan).as_string(conn)
        copy_in = sql.SQL("COPY public.{} ({}) FROM STDIN").format(sql.Identifier(t.name), cols).as_string(conn)
    with Workspace(t.est_rows * len(maskers)) as ws:
        for name, ms in (("raw", []), ("masked", maskers)):
            with pg.connect(target, autocommit=True) as conn:
                conn.execute(sql.SQL("TRUNCATE public.{}").format(sql.Identifier(t.name)))
            job = CopyJob(id=f"{label}-{name}", label=label, source=prod.conninfo(), target=target.conninfo(),
                          snapshot=snap_id, copy_out=copy_out, copy_in=copy_in, maskers=ms, leak_dir=ws.path,
                          leak_bits=ws.bits)
            out[name] = measure(lambda job=job: run_copy_job(job))
    pg.drop_database(base, "bench_floor")
    return out


def write_config(path: Path, base, rules: dict) -> None:
    import yaml

    path.write_text(yaml.safe_dump({"environments": {
        "production": {"role": "production", "database_url": base.with_database("bench_prod").secret()},
        "staging": {"role": "staging", "database_url": base.with_database("bench_stg").secret()}},
        "storage": {"url": f"file://{path.parent / 'backups'}"},
        "anonymize": {"salt": B.SALT, "rules": rules}}))


def masking_costs(base, bin_dir: str, rules: dict, workdir: Path, python_done: dict) -> dict:
    """Per masked table: SQL extra CPU, Python extra CPU (when masked in Python), rows."""
    from psycopg import sql

    from dataops.settings import load_settings
    from dataops.tasks import pg
    from dataops.tasks.anonymize.masking import fill_pools
    from dataops.tasks.refresh import steps
    from dataops.tasks.refresh.plan import resolve_environments

    cfg = workdir / "dataops.yaml"
    write_config(cfg, base, rules)
    settings = load_settings(str(cfg))
    source, target = resolve_environments(settings, None, None)
    prod = base.with_database("bench_prod")
    out = {}
    with steps.source_snapshot(settings, source) as snap:
        plan = steps.plan_and_guard(settings, snap, source, target)
        fill_pools([m for tm in plan.masking.tables.values() for m in tm.maskers.values()])
        for label, tm in sorted(plan.masking.tables.items()):
            tp = plan.tables[label]
            t = tp.table
            refs = {c.name: sql.SQL("t0.{}").format(sql.Identifier(c.name)) for c in t.columns}
            plain = sql.SQL("SELECT {} FROM {} AS t0").format(sql.SQL(", ").join(refs.values()), tp.rel.scan)
            masked = sql.SQL("SELECT {} FROM {} AS t0").format(sql.SQL(", ").join(
                sql_expression(tm.maskers[c.name], refs[c.name], refs) if c.name in tm.maskers else refs[c.name]
                for c in t.columns), tp.rel.scan)
            with pg.connect(prod) as conn:
                plain_q, masked_q = plain.as_string(conn), masked.as_string(conn)
            a = measure(lambda: psql_to_null(bin_dir, prod, plain_q, workdir))
            b = measure(lambda: psql_to_null(bin_dir, prod, masked_q, workdir))
            row = {"rows": t.est_rows, "rules": ", ".join(f"{c} {m.kind}" for c, m in tm.maskers.items()),
                   "sql": max(0.0, cpu(b) - cpu(a)), "python": None}
            in_python = [m for m in tm.maskers.values() if not m.row_free]
            if in_python:
                key = (label, tuple(sorted((c, m.kind) for c, m in tm.maskers.items())))
                if key not in python_done:
                    runs = python_masking(base, plan, label, snap.id, workdir)
                    python_done[key] = max(0.0, cpu(runs["masked"]) - cpu(runs["raw"]))
                row["python"] = python_done[key]
            print(f"  {label}: {row}", flush=True)
            out[label] = row
        checks = {}
        for side, db in (("source", prod), ("copy", base.with_database("bench_copy"))):
            def run(db=db):
                with pg.connect(db, autocommit=True) as conn:
                    for tp in plan.copied:
                        steps._checksum(conn, tp, steps._unmasked(plan, tp.label))
            checks[side] = measure(run)
        out["_checks"] = {k: cpu(v) for k, v in checks.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--root", type=Path, default=ROOT / ".dataops" / "bench-refresh")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--tools-venv", type=Path, default=Path(os.environ.get("DATAOPS_BENCH_TOOLS_VENV",
                                                                          ROOT / ".venv-bench-tools")))
    args = ap.parse_args()
    B._prepare_environ()
    import psutil
    from pgserver._commands import POSTGRES_BIN_PATH

    from dataops.dsn import Dsn

    started, load_start = time.monotonic(), B._load()
    srv = B.start_server(args.root / "pg")
    base = Dsn(srv.get_uri("postgres").replace("postgres:@", "postgres@"))
    bin_dir = str(POSTGRES_BIN_PATH)
    counts = B.ensure_seeded(base, args.users)
    size = counts.pop("_bytes")
    B.CpuMeter.postmaster = psutil.Process(int((args.root / "pg" / "postmaster.pid").read_text().split()[0]))
    workdir = Path(tempfile.mkdtemp(prefix="bench-floor-"))
    copies = []
    for i in range(3):
        r = B.copy_baseline(base, bin_dir)
        copies.append(r)
        print(f"copy {i + 1}: {r['seconds']:.1f} s, {r['cpu']['client'] + r['cpu']['server']:.1f} CPU-s", flush=True)
    anon = None
    py = B.tool_python(args.tools_venv)
    if py:  # pg_anon on the usual rules (bench_refresh.py's run), for the CPU target
        anon = B.run_pg_anon(base, bin_dir, py, workdir)
        print(f"pg_anon: {anon['seconds']:.1f} s, {anon['cpu']['client'] + anon['cpu']['server']:.1f} CPU-s", flush=True)
    usual = {t: dict(c) for t, c in B.RULES.items()}
    with17 = {t: {**usual.get(t, {}), **B.RULES_17_EXTRA.get(t, {})} for t in {*usual, *B.RULES_17_EXTRA}}
    python_done: dict = {}
    print("usual rules...", flush=True)
    costs = {"usual": masking_costs(base, bin_dir, usual, workdir, python_done)}
    print("issue 17 rules...", flush=True)
    costs["issue17"] = masking_costs(base, bin_dir, with17, workdir, python_done)
    from dataops.tasks import pg

    pg.drop_database(base, "bench_copy")
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    text = render(args, copies, costs, counts, size, commit, load_start, time.monotonic() - started, anon)
    print(text)
    if not args.no_write:
        write_section(text, SECTION)
        print("wrote bench/RESULTS.md")


def render(args, copies, costs, counts, size, commit, load_start, took, anon) -> str:
    walls = sorted(c["seconds"] for c in copies)
    copy_wall = walls[1]
    copy_cpu = sorted(c["cpu"]["client"] + c["cpu"]["server"] for c in copies)[1]
    out = [SECTION, "",
           f"`bench/bench_refresh_floor.py --users {args.users}`: the CPU a masked refresh cannot do without, measured "
           "part by part in one run on the refresh benchmark's database, and what it implies on "
           f"{args.cores} cores: no schedule finishes before (CPU it must spend) / (cores).", "",
           "| | |", "| --- | --- |",
           f"| date | {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, git commit {commit}; whole bench "
           f"{took:.0f} s |",
           f"| machine | {os.cpu_count()} CPUs, {platform.system()} {platform.release()}; load average at start "
           f"{load_start}, at end {B._load()} |",
           f"| data | {args.users:,} users, {sum(counts.values()):,} rows, {size / 1e6:,.0f} MB |",
           f"| copy (`pg_dump -Fc -Z0 \\| pg_restore`), 3 runs | {', '.join(f'{w:.1f} s' for w in walls)}; median "
           f"{copy_wall:.1f} s and {copy_cpu:.1f} CPU-s (server and client) |", "",
           "Masking CPU per table (extra over the same COPY without rules; the floor takes the cheaper way):", "",
           "| rules | table | rows | rules on it | in SQL (CPU-s) | in Python, the product's stream (CPU-s) | "
           "per value, cheaper way |", "| --- | --- | --- | --- | --- | --- | --- |"]
    floors = {}
    for which, rows in costs.items():
        total = 0.0
        for label, r in rows.items():
            if label.startswith("_"):
                continue
            best = min(x for x in (r["sql"], r["python"]) if x is not None)
            total += best
            n_rules = max(1, len(r["rules"].split(", ")))
            out.append(f"| {which} | {label} | {r['rows']:,} | {r['rules']} | {r['sql']:.1f} | "
                       + (f"{r['python']:.1f}" if r["python"] is not None else "-")
                       + f" | {best / max(1, r['rows'] * n_rules) * 1e6:.2f} us |")
        checks = rows["_checks"]["source"] + rows["_checks"]["copy"]
        floors[which] = (total, checks)
    out += ["", "| rules | copy CPU-s | + masking CPU-s | + proof (checksums, both sides) CPU-s | floor CPU-s | "
            f"floor wall on {args.cores} cores | floor / copy wall |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for which, (mask, checks) in floors.items():
        f = copy_cpu + mask + checks
        out.append(f"| {which} | {copy_cpu:.1f} | {mask:.1f} | {checks:.1f} | {f:.1f} | {f / args.cores:.1f} s | "
                   f"{f / args.cores / copy_wall:.2f}x |")
    out += ["", "| target | limit | floor | reachable on this machine |", "| --- | --- | --- | --- |"]
    for name, which, limit in TARGETS:
        mask, checks = floors[which]
        ratio = (copy_cpu + mask + checks) / args.cores / copy_wall
        out.append(f"| {name} | {limit}x | {ratio:.2f}x | {'yes, in principle' if ratio <= limit else '**no**'} |")
    if anon is not None:
        anon_cpu = anon["cpu"]["client"] + anon["cpu"]["server"]
        mask, checks = floors["usual"]
        f = copy_cpu + mask + checks
        out.append(f"| issue 18: usual rules, less CPU than pg_anon on them (pg_anon here: {anon['seconds']:.1f} s, "
                   f"{anon_cpu:.1f} CPU-s) | {anon_cpu:.1f} CPU-s | {f:.1f} CPU-s | "
                   f"{'yes, in principle' if f < anon_cpu else '**no**'} |")
    out += ["", "- The floor leaves out what the refresh also spends: the leak scan's digests, the Faker pools, "
            "imports, the plan, the schema dump, and any moment a core waits. A measured refresh sits above it.",
            "- The copy's CPU stands for the reading, loading and index building every copy does; the refresh's psql "
            "pipes replace pg_dump and pg_restore's client CPU with their own.",
            "- pg_anon masks with md5() and random() in its dump's SELECT: no key, no pools, no uniqueness, no leak scan "
            "and no checksums; its CPU is its dump and restore plus those expressions."]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
