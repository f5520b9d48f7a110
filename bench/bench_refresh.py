"""Benchmark for issue 6: refresh-staging against a plain copy and against two masking tools.

    .venv/bin/python bench/bench_refresh.py [--users 1000000] [--root .dataops/bench-refresh]
                                            [--tools-venv PATH] [--no-tools] [--no-write]

What it does, in one run, on one embedded PostgreSQL 16 (pgserver) holding every database:

1. Seeds `bench_prod` with the sample application (tasks.sample_app, --users users; kept
   under --root and reused by the next run when the user count matches), VACUUM ANALYZE.
2. Micro-measures the masking itself in Python: one Faker call; four columns masked by a
   Faker call per value; the same four columns masked by the product (pools + HMAC, the
   real row loop of tasks.refresh_copy); the same rows streamed without masking.
3. `pg_dump -Fc -Z0 bench_prod | pg_restore` into a new database: the limit for a copy.
4. The product: `tasks.refresh.refresh(settings)` in a child process (plan, copy with the
   masking in the stream, indexes and constraints, validation with the leak scan, switch),
   with the sample app's rules (dataops dev up's) minus the row deletion, so that every tool
   copies the same rows. Peak memory: RSS of the child and of its children (copy workers, pg_dump, pg_restore), sampled
   every 50 ms.
5. pg_anon (dump with a sensitive-field dictionary masking the same columns, then restore)
   and pganonymize (a `pg_dump | pg_restore` copy, then its in-place anonymization of the
   same columns), from a separate virtualenv (--tools-venv) so their dependencies stay out
   of the project's. Neither runs here unchanged; what was adapted is written down.
6. Writes the section "## Refresh staging (issue 6)" of bench/RESULTS.md (others are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "RESULTS.md"
SECTION = "## Refresh staging (issue 6)"
MB = 1_000_000
SALT = "bench-salt-0123456789abcdef"

RULES = {  # dataops dev up's rules for the sample app
    "users": {"email": {"faker": "email", "unique": True}, "full_name": "name", "first_name": "first_name",
              "last_name": "last_name", "phone": {"partial": {"keep_last": 2}}, "date_of_birth": {"shift_days": 30},
              "address": "address", "ip_address": None, "password_hash": {"constant": "x"}},
    "user_emails": {"email": {"faker": "email", "unique": True}},
    "audit_logs": {"ip_address": None, "user_agent": "keep"},
}
PG_ANON_DICT = {"dictionary": [
    {"schema": "public", "table": "users", "fields": {
        "email": "md5(\"email\") || '@example.com'", "full_name": "md5(\"full_name\")",
        "first_name": "md5(\"first_name\")", "last_name": "md5(\"last_name\")",
        "phone": "anon_funcs.partial(\"phone\", 0, '*****', 2)",
        "date_of_birth": "(\"date_of_birth\" + (random() * 60 - 30)::int)", "address": "md5(\"address\")",
        "ip_address": "NULL", "password_hash": "'x'"}},
    {"schema": "public", "table": "user_emails", "fields": {"email": "md5(\"email\") || '@example.com'"}},
    {"schema": "public", "table": "audit_logs", "fields": {"ip_address": "NULL"}},
]}
PGANONYMIZE_SCHEMA = """tables:
 - users:
    primary_key: id
    chunk_size: 10000
    fields:
     - email: {provider: {name: fake.unique.email}}
     - full_name: {provider: {name: fake.name}}
     - first_name: {provider: {name: fake.first_name}}
     - last_name: {provider: {name: fake.last_name}}
     - phone: {provider: {name: fake.phone_number}}
     - date_of_birth: {provider: {name: fake.date_of_birth}}
     - address: {provider: {name: fake.address}}
     - password_hash: {provider: {name: set, value: "x"}}
 - user_emails:
    primary_key: id
    chunk_size: 10000
    fields:
     - email: {provider: {name: fake.email}}
"""
# pganonymize writes through pgcopy, which has no inet type: the two inet columns are nulled by SQL.
PGANONYMIZE_INET_SQL = "UPDATE users SET ip_address = NULL; UPDATE audit_logs SET ip_address = NULL;"


def _prepare_environ() -> None:
    runtime = Path(tempfile.gettempdir()) / f"dataops-runtime-{os.getuid()}"
    runtime.mkdir(mode=0o700, exist_ok=True)
    os.environ.setdefault("XDG_RUNTIME_DIR", str(runtime))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")


# -- measuring -----------------------------------------------------------------------------------

class TreeRss:
    """Peak RSS of a process and of the whole tree under it, sampled every 50 ms."""

    def __init__(self, pid: int):
        import psutil

        self.proc = psutil.Process(pid)
        self.peak_main = self.peak_tree = self.peak_child = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                main = self.proc.memory_info().rss
                kids = [c.memory_info().rss for c in self.proc.children(recursive=True)]
            except psutil.Error:
                break
            self.peak_main = max(self.peak_main, main)
            self.peak_child = max([self.peak_child, *kids])
            self.peak_tree = max(self.peak_tree, main + sum(kids))
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_timed(args: list[str], env: dict | None = None, shell: bool = False) -> tuple[float, TreeRss, str]:
    t0 = time.monotonic()
    proc = subprocess.Popen(args, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, shell=shell, text=True)
    rss = TreeRss(proc.pid)
    out, _ = proc.communicate()
    rss.stop()
    took = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{args if not shell else args[0][:200]} failed ({proc.returncode}): {out[-2000:]}")
    return took, rss, out


# -- the database ----------------------------------------------------------------------------------

def start_server(pgdata: Path):
    import pgserver

    srv = pgserver.get_server(pgdata, cleanup_mode="stop")
    return srv


def ensure_seeded(base, users: int) -> dict[str, int]:
    from tasks import pg
    from tasks.sample_app import create_schema, seed

    prod = base.with_database("bench_prod")
    if pg.database_exists(base, "bench_prod"):
        with pg.connect(prod) as conn:
            have = conn.execute("SELECT count(*) FROM users").fetchone()[0] \
                if conn.execute("SELECT to_regclass('public.users')").fetchone()[0] else -1
        if have == users:
            print(f"reusing bench_prod with {users:,} users", flush=True)
        else:
            pg.drop_database(base, "bench_prod")
    if not pg.database_exists(base, "bench_prod"):
        print(f"seeding bench_prod with {users:,} users (about {users / 3000:.0f} s)...", flush=True)
        pg.create_database(base, "bench_prod")
        create_schema(prod)
        seed(prod, users=users)
    with pg.connect(prod, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS anon_funcs CASCADE")  # left by a pg_anon run
        conn.execute("VACUUM ANALYZE")
        counts = pg.row_counts(conn)
        size = conn.execute("SELECT pg_database_size('bench_prod')").fetchone()[0]
    return {**counts, "_bytes": size}


def fresh_db(base, name: str) -> None:
    from tasks import pg

    pg.drop_database(base, name)
    pg.create_database(base, name)


# -- 2. micro --------------------------------------------------------------------------------------

MICRO_RULES = {"email": {"faker": "email", "unique": True}, "full_name": "name", "phone": {"partial": {"keep_last": 2}},
               "address": "address"}


def micro(base) -> dict:
    """Four columns of users: a Faker call per value (Python only, on real rows), then the
    product's stream of the whole users table into a new database, with and without the
    four columns masked (pools + HMAC-SHA256, leak digests collected)."""
    import psycopg
    from faker import Faker

    from dataops.settings import ColumnRule
    from tasks import pg
    from tasks.anonymize_rules import read_tables
    from tasks.leak_scan import Workspace
    from tasks.masking import Keyed, compile_rule
    from tasks.refresh_copy import CopyJob, run_copy_job
    from tasks.sample_app import create_schema

    fake = Faker("en_US")
    fake.seed_instance(1)
    calls = 20_000
    t0 = time.perf_counter()
    for _ in range(calls // 4):
        fake.email(), fake.name(), fake.phone_number(), fake.address()
    faker_call_us = (time.perf_counter() - t0) / calls * 1e6

    prod = base.with_database("bench_prod")
    fresh_db(base, "bench_stream")
    target = base.with_database("bench_stream")
    create_schema(target)
    with pg.connect(target, autocommit=True) as conn:  # load into bare tables, as the refresh does
        conn.execute("ALTER TABLE users DROP CONSTRAINT users_pkey CASCADE")
        conn.execute("ALTER TABLE users DROP CONSTRAINT users_email_key")
    with pg.connect(prod) as conn:
        table = read_tables(conn)["users"]
        sample = conn.execute("SELECT id, email, full_name, phone, address FROM users LIMIT 2000").fetchall()
    t0 = time.perf_counter()
    for row in sample:
        (row[0], fake.email(), fake.name(), fake.phone_number(), fake.address())
    faker_rows_s = len(sample) / (time.perf_counter() - t0)

    keyed = Keyed(SALT)
    index = {c.name: i for i, c in enumerate(table.columns)}
    maskers = [(index[col], k, compile_rule(ColumnRule.model_validate(rule), table.column(col), keyed=keyed,
                                            locale="en_US", pool_size=5000, columns=index, masked=set(MICRO_RULES),
                                            where=col))
               for k, (col, rule) in enumerate(MICRO_RULES.items())]
    cols = ", ".join(f'"{c.name}"' for c in table.columns)
    rates = {}
    with psycopg.connect(prod.conninfo(), autocommit=True) as snap_conn, Workspace(table.est_rows * 4) as ws:
        snap_conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        snap = snap_conn.execute("SELECT pg_export_snapshot()").fetchone()[0]
        for name, ms in (("raw", []), ("masked", maskers)):
            with pg.connect(target, autocommit=True) as conn:
                conn.execute("TRUNCATE users CASCADE")
            job = CopyJob(id=name, label="users", source=prod.conninfo(), target=target.conninfo(), snapshot=snap,
                          copy_out=f"COPY public.users ({cols}) TO STDOUT", copy_in=f"COPY public.users ({cols}) FROM STDIN",
                          maskers=ms, leak_dir=ws.path, leak_bits=ws.bits)
            t0 = time.perf_counter()
            r = run_copy_job(job)
            rates[name] = r.rows / (time.perf_counter() - t0)
    pg.drop_database(base, "bench_stream")
    return {"faker_call_us": faker_call_us, "faker_rows_s": faker_rows_s, "masked_rows_s": rates["masked"],
            "raw_rows_s": rates["raw"], "rows": table.est_rows}


# -- 3. the copy ------------------------------------------------------------------------------------

def copy_baseline(base, bin_dir: str) -> dict:
    return {"seconds": copy_baseline_into(base, bin_dir, "bench_copy")}


# -- 4. the refresh ---------------------------------------------------------------------------------

def write_config(path: Path, base) -> None:
    import yaml

    body = {"environments": {
        "production": {"role": "production", "database_url": base.with_database("bench_prod").secret()},
        "staging": {"role": "staging", "database_url": base.with_database("bench_stg").secret()}},
        "storage": {"url": f"file://{path.parent / 'backups'}"},
        "anonymize": {"salt": SALT, "rules": RULES}}
    path.write_text(yaml.safe_dump(body, sort_keys=False))


def child(config: str, out: str) -> None:
    """Runs in the child process: the refresh, timed around the call (imports excluded)."""
    from dataops.settings import load_settings
    from tasks.refresh import refresh

    t0 = time.monotonic()
    r = refresh(load_settings(config))
    took = time.monotonic() - t0
    Path(out).write_text(json.dumps({
        "seconds": took, "phases": r.phases, "rows": r.rows, "tables": {t.table: [t.rows, t.seconds] for t in r.tables},
        "checks": r.checks, "leaks": r.leaks.summary(), "leaked": r.leaks.leaked,
        "masked": [f"{t}.{c}: {rule}" for t, c, rule in r.masked]}))


def run_refresh(base, workdir: Path) -> dict:
    from tasks import pg

    if not pg.database_exists(base, "bench_stg"):
        pg.create_database(base, "bench_stg")
    cfg, out = workdir / "dataops.yaml", workdir / "refresh.json"
    write_config(cfg, base)
    took, rss, log = run_timed([sys.executable, str(Path(__file__).resolve()), "--child", str(cfg), str(out)])
    result = json.loads(out.read_text())
    return {**result, "process_seconds": took, "rss_main": rss.peak_main, "rss_worker": rss.peak_child,
            "rss_tree": rss.peak_tree}


# -- 5. the other tools ------------------------------------------------------------------------------

def tool_python(venv: Path | None) -> str | None:
    if venv is None:
        return None
    py = venv / "bin" / "python"
    return str(py) if py.exists() else None


def run_pg_anon(base, bin_dir: str, py: str, workdir: Path) -> dict:
    """pg_anon 1.x: `init` creates pgcrypto (absent from pgserver's build), so its init.sql is
    loaded without that line, with a digest() built on core sha256()/md5(), and without its
    self-test block (which calls pgcrypto's encrypt); the rules use core SQL (md5, random)."""
    pkg = subprocess.run([py, "-c", "import pg_anon, os; print(os.path.dirname(pg_anon.__file__))"],
                         capture_output=True, text=True, check=True).stdout.strip()
    init = Path(pkg, "init.sql").read_text()
    init = init.replace("CREATE EXTENSION IF NOT EXISTS pgcrypto;", """
CREATE OR REPLACE FUNCTION public.digest(data text, algo text) RETURNS bytea LANGUAGE sql IMMUTABLE AS $shim$
  SELECT CASE lower(algo) WHEN 'md5' THEN decode(md5(data), 'hex') WHEN 'sha224' THEN sha224(convert_to(data, 'UTF8'))
    WHEN 'sha256' THEN sha256(convert_to(data, 'UTF8')) WHEN 'sha384' THEN sha384(convert_to(data, 'UTF8'))
    WHEN 'sha512' THEN sha512(convert_to(data, 'UTF8')) END $shim$;""")
    init = init[:init.index("\ndo $$")]
    (workdir / "pg_anon_init.sql").write_text(init)
    (workdir / "pg_anon_dict.py").write_text(json.dumps(PG_ANON_DICT, indent=1))
    subprocess.run([f"{bin_dir}/psql", "-h", base.host, "-U", "postgres", "-d", "bench_prod", "-q", "-v",
                    "ON_ERROR_STOP=1", "-f", str(workdir / "pg_anon_init.sql")], check=True, capture_output=True)
    fresh_db(base, "bench_pg_anon")
    out_dir = workdir / "pg_anon_out"
    common = ["--db-host", base.host, "--db-user", "postgres"]
    dump, rss_d, _ = run_timed([py, "-m", "pg_anon", "dump", *common, "--db-name", "bench_prod",
                                "--prepared-sens-dict-file", str(workdir / "pg_anon_dict.py"),
                                "--output-dir", str(out_dir), "--clear-output-dir", "--pg-dump", f"{bin_dir}/pg_dump"])
    restore, rss_r, _ = run_timed([py, "-m", "pg_anon", "restore", *common, "--db-name", "bench_pg_anon",
                                   "--input-dir", str(out_dir), "--pg-restore", f"{bin_dir}/pg_restore"])
    shutil.rmtree(out_dir, ignore_errors=True)
    subprocess.run([f"{bin_dir}/psql", "-h", base.host, "-U", "postgres", "-d", "bench_prod", "-qc",
                    "DROP SCHEMA anon_funcs CASCADE; DROP FUNCTION public.digest(text, text)"], capture_output=True)
    return {"seconds": dump + restore, "dump": dump, "restore": restore, "rss_tree": max(rss_d.peak_tree, rss_r.peak_tree)}


def run_pganonymize(base, bin_dir: str, py: str, workdir: Path) -> dict:
    """pganonymize 0.13: in place, so on a `pg_dump | pg_restore` copy. fake.email repeats
    values and breaks users_email_key, so that column uses fake.unique.email; pgcopy has no
    inet, so the inet columns are nulled by SQL; its partial_mask fails on NULL, so phone
    gets fake.phone_number; it has no date shift, so date_of_birth gets fake.date_of_birth."""
    copy = copy_baseline_into(base, bin_dir, "bench_pganonymize")
    (workdir / "pganonymize.yml").write_text(PGANONYMIZE_SCHEMA)
    exe = str(Path(py).parent / "pganonymize")
    anon, rss, _ = run_timed([exe, "--schema", str(workdir / "pganonymize.yml"), "--dbname", "bench_pganonymize",
                              "--user", "postgres", "--host", base.host])
    inet, _, _ = run_timed([f"{bin_dir}/psql", "-h", base.host, "-U", "postgres", "-d", "bench_pganonymize", "-qc",
                            PGANONYMIZE_INET_SQL])
    return {"seconds": copy + anon + inet, "copy": copy, "anonymize": anon + inet, "rss_tree": rss.peak_tree}


def copy_baseline_into(base, bin_dir: str, name: str) -> float:
    fresh_db(base, name)
    _, env = base.libpq_args()
    cmd = (f"'{bin_dir}/pg_dump' -h '{base.host}' -U postgres -Fc -Z0 bench_prod | "
           f"'{bin_dir}/pg_restore' -h '{base.host}' -U postgres --no-owner -d {name}")
    took, _, _ = run_timed([cmd], env=env, shell=True)
    return took


# -- 6. the report ----------------------------------------------------------------------------------

def write_section(text: str) -> None:
    """Replace this benchmark's H2 section of RESULTS.md (re-read right before), keeping the others."""
    body = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    lines = body.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.strip() == SECTION), None)
    if start is None:
        new = body.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "\n".join(lines[:start] + text.rstrip("\n").splitlines() + ([""] + lines[end:] if end < len(lines) else [])) + "\n"
    RESULTS.write_text(new)


def render(setup: dict, micro_r: dict, copy_r: dict, refresh_r: dict, tools: dict) -> str:
    base = copy_r["seconds"]
    out = [SECTION, "",
           "`bench/bench_refresh.py`: `tasks.refresh.refresh()` (what `dataops refresh-staging` and the "
           "refresh-staging flow run) against `pg_dump -Fc -Z0 | pg_restore` of the same database and against "
           "pg_anon and pganonymize masking the same columns. One run each, one after the other, on one "
           "embedded PostgreSQL holding every database.", "", "### Setup", "", "| | |", "| --- | --- |",
           f"| date | {setup['date']} |",
           f"| machine | {setup['machine']}; load average {setup['load_start']} at the start, {setup['load_end']} at "
           "the end. **The machine was shared with other engineers' test runs: single runs, noisy; compare "
           "ratios taken minutes apart with care.** |",
           f"| PostgreSQL | {setup['pg']} (pgserver), unix socket; pg_dump/pg_restore from the same build |",
           f"| data | sample app, `seed(users={setup['users']:,})`: " + ", ".join(
               f"{t} {n:,}" for t, n in setup["counts"].items()) + f"; {setup['total_rows']:,} rows, "
           f"{setup['bytes'] / 2**20:,.0f} MiB on disk |",
           "| rules | dataops dev up's: users.email faker unique, full_name/first_name/last_name/address faker, "
           "phone partial (keep 2), date_of_birth shift 30 days, ip_address null, password_hash constant; "
           "user_emails.email faker unique; audit_logs.ip_address null (11 columns). The row deletion "
           "(audit login events) is left out so that every tool copies the same rows. |",
           "", "### Results", "",
           "| run | wall time | / copy | peak memory | notes |", "| --- | --- | --- | --- | --- |",
           f"| `pg_dump -Fc -Z0 \\| pg_restore` | {base:.1f} s | 1.00 | - | the limit for a copy |",
           f"| **refresh (dataops)** | {refresh_r['seconds']:.1f} s | {refresh_r['seconds'] / base:.2f} | "
           f"{refresh_r['rss_main'] / MB:.0f} MB main, {refresh_r['rss_worker'] / MB:.0f} MB largest child, "
           f"{refresh_r['rss_tree'] / MB:.0f} MB all | " + ", ".join(
               f"{k} {v:.1f} s" for k, v in refresh_r["phases"].items()) + " |"]
    for name, r in tools.items():
        if "error" in r:
            out.append(f"| {name} | - | - | - | did not run: {r['error']} |")
        else:
            detail = ", ".join(f"{k} {r[k]:.1f} s" for k in ("copy", "anonymize", "dump", "restore") if k in r)
            out.append(f"| {name} | {r['seconds']:.1f} s | {r['seconds'] / base:.2f} | {r['rss_tree'] / MB:.0f} MB | "
                       f"{detail}; {r['note']} |")
    out += ["", f"- refresh: {refresh_r['leaks']}", *[f"- refresh: {c}" for c in refresh_r["checks"]],
            "- refresh per table (wall time of its copy jobs): " + ", ".join(
                f"{t} {v[0]:,} rows {v[1]:.1f} s" for t, v in refresh_r["tables"].items() if v[0]),
            f"- refresh child process, interpreter start and imports included: {refresh_r['process_seconds']:.1f} s.",
            "- peak memory: RSS sampled every 50 ms; \"all\" is the refresh process plus its children at the same "
            "moment (copy workers, spawned when many rows pass through Python; pg_dump/pg_restore for the schema). "
            "PostgreSQL's own memory is not counted for any tool.",
            "", "### Masking in Python (the issue's figures, measured here)", "",
            "| | |", "| --- | --- |",
            f"| one Faker call (email, name, phone_number, address, averaged) | {micro_r['faker_call_us']:.0f} us |",
            f"| users' email, full_name, phone, address masked by a Faker call per value (Python only) | "
            f"{micro_r['faker_rows_s']:,.0f} rows/s |",
            f"| users streamed into a bare table, the same 4 columns masked by the product (pools + HMAC-SHA256, "
            f"leak digests collected; one job, no other load of ours) | {micro_r['masked_rows_s']:,.0f} rows/s |",
            f"| users streamed the same way without masking (the product's raw path) | {micro_r['raw_rows_s']:,.0f} rows/s |",
            "", "### Targets", "", "| target | limit | measured | |", "| --- | --- | --- | --- |",
            _target("refresh wall time / copy", "<= 1.5", refresh_r["seconds"] / base, refresh_r["seconds"] / base <= 1.5)]
    for name, r in tools.items():
        if "error" not in r:
            out.append(_target(f"refresh faster than {name}", f"< {r['seconds']:.1f} s", refresh_r["seconds"],
                               refresh_r["seconds"] < r["seconds"], unit=" s"))
    out.append(_target("peak memory of the refresh (all its processes)", "< 300 MB", refresh_r["rss_tree"] / MB,
                       refresh_r["rss_tree"] < 300 * MB, unit=" MB"))
    out.append(_target("peak memory of any one refresh process", "< 300 MB",
                       max(refresh_r["rss_main"], refresh_r["rss_worker"]) / MB,
                       max(refresh_r["rss_main"], refresh_r["rss_worker"]) < 300 * MB, unit=" MB"))
    return "\n".join(out) + "\n"


def _target(what: str, limit: str, value: float, ok: bool, unit: str = "") -> str:
    return f"| {what} | {limit} | {value:.2f}{unit} | {'**PASS**' if ok else '**FAIL**'} |"


def _load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--root", type=Path, default=ROOT / ".dataops" / "bench-refresh")
    ap.add_argument("--tools-venv", type=Path, default=Path(os.environ.get("DATAOPS_BENCH_TOOLS_VENV",
                                                                            ROOT / ".venv-bench-tools")))
    ap.add_argument("--no-tools", action="store_true", help="skip pg_anon and pganonymize")
    ap.add_argument("--tools", default="pg_anon,pganonymize",
                    help="tools to run now (the others' figures come from the last run, if kept in ROOT/tools.json)")
    ap.add_argument("--reuse-tools", action="store_true", help="run no tool; report the figures kept in ROOT/tools.json")
    ap.add_argument("--no-write", action="store_true", help="print the section, do not touch RESULTS.md")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    _prepare_environ()
    if args.child:
        child(*args.child)
        return

    from dataops.dsn import Dsn
    from pgserver._commands import POSTGRES_BIN_PATH

    load_start = _load()
    args.root.mkdir(parents=True, exist_ok=True)
    srv = start_server(args.root / "pg")
    base = Dsn(srv.get_uri("postgres").replace("postgres:@", "postgres@"))
    bin_dir = str(POSTGRES_BIN_PATH)
    counts = ensure_seeded(base, args.users)
    size = counts.pop("_bytes")
    work = Path(tempfile.mkdtemp(prefix="bench-refresh-"))
    import psutil

    setup = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "users": args.users,
             "machine": f"{os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.1f} GiB RAM, "
                        f"{platform.system()} {platform.release()}, Python {platform.python_version()}",
             "counts": counts, "total_rows": sum(counts.values()), "bytes": size,
             "pg": subprocess.run([f"{bin_dir}/postgres", "--version"], capture_output=True, text=True).stdout.split()[-1],
             "load_start": load_start}
    print("micro...", flush=True)
    micro_r = micro(base)
    print(f"  {micro_r}", flush=True)
    print("pg_dump | pg_restore...", flush=True)
    copy_r = copy_baseline(base, bin_dir)
    print(f"  {copy_r['seconds']:.1f} s", flush=True)
    print("refresh...", flush=True)
    refresh_r = run_refresh(base, work)
    print(f"  {refresh_r['seconds']:.1f} s, {refresh_r['rss_tree'] / MB:.0f} MB; {refresh_r['leaks']}", flush=True)
    tools: dict[str, dict] = {}
    saved = args.root / "tools.json"
    wanted = [] if args.no_tools or args.reuse_tools else [t.strip() for t in args.tools.split(",") if t.strip()]
    kept = json.loads(saved.read_text()) if saved.exists() else {}
    if kept.get("users") == args.users and not args.no_tools:
        tools = {name: {**r, "note": r["note"] + (f" (measured {r['date']})" if "date" in r else "")}
                 for name, r in kept["tools"].items() if name not in wanted}
    py = tool_python(args.tools_venv) if wanted else None
    if wanted and py is None:
        missing = (f"not installed: python3 -m venv {args.tools_venv} && {args.tools_venv}/bin/pip install "
                   "psycopg2-binary pganonymize pg-anon")
        tools = {"pg_anon": {"error": missing}, "pganonymize": {"error": missing}}
    elif py:
        for name, fn, note in (("pg_anon", run_pg_anon, "masking in SQL during its dump (md5, random), no Faker, "
                                                        "not deterministic; init.sql without pgcrypto (see the script)"),
                               ("pganonymize", run_pganonymize, "Faker per value, in place after the copy; "
                                                                "fake.unique.email, inet nulled by SQL (see the script)")):
            if name not in wanted:
                continue
            print(f"{name}...", flush=True)
            try:
                tools[name] = {**fn(base, bin_dir, py, work), "note": note}
                print(f"  {tools[name]['seconds']:.1f} s", flush=True)
            except Exception as exc:  # noqa: BLE001 - a tool that fails is reported, not fatal
                tools[name] = {"error": " ".join(str(exc).split())[:300]}
                print(f"  failed: {tools[name]['error']}", flush=True)
    if py:
        fresh = {n: {**r, "date": setup["date"]} for n, r in tools.items() if n in wanted and "error" not in r}
        old = kept.get("tools", {}) if kept.get("users") == args.users else {}
        saved.write_text(json.dumps({"users": args.users, "tools": {**old, **fresh}}))
    setup["load_end"] = _load()
    from tasks import pg

    for name in ("bench_copy", "bench_pg_anon", "bench_pganonymize", "bench_stream"):
        pg.drop_database(base, name)
    shutil.rmtree(work, ignore_errors=True)
    text = render(setup, micro_r, copy_r, refresh_r, tools)
    if args.no_write:
        print(text)
    else:
        write_section(text)
        print(text)
        print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
