"""Benchmark for issue 4 (schema migrations): what the application feels while a migration runs.

    .venv/bin/python bench/bench_migrations.py [--users 50000] [--writers 2] [--no-write]

What it does, in one run:

1. Starts an embedded PostgreSQL (pgserver) in a temporary folder, builds the sample
   application's database (dataops.dev.sample_app, --users users) at revision 0002, VACUUM ANALYZE.
2. "Application" writers: --writers threads, each on its own connection in autocommit,
   looping over three statements (UPDATE an order, UPDATE a user, INSERT a user) on random
   rows and recording every statement's latency.
3. Scenarios, each on a fresh copy of the database (CREATE DATABASE ... TEMPLATE), the
   writers running from 1 s before to 1 s after the migration:
   - safe: the example revisions 0003..0008 through dataops.tasks.migration.migrate.upgrade (advisory lock,
     one transaction per revision, SET LOCAL timeouts, CREATE INDEX CONCURRENTLY, batched
     backfill, NOT VALID + VALIDATE, SET NOT NULL using the validated check);
   - naive: the same end schema in one transaction the way it is often written (plain
     CREATE INDEX, one UPDATE of every order, SET NOT NULL scanning the table);
   - lock queue: a reader transaction holds ACCESS SHARE on users for 3 s (a long report)
     while revision 0003 (ALTER TABLE users) runs, once with lock_timeout 200ms + retries
     and once with lock_timeout 0 (wait forever): without the timeout the ALTER waits in
     the lock queue and every writer of users queues behind it.
4. Also times preflight() (status, plan, lint, fingerprint, checksums of every table) on
   the seeded database, plan + lint alone, and the round trip on an empty scratch database.
5. Writes the section "## Migrations (issue 4)" of bench/RESULTS.md (other sections kept).

Latencies depend on the machine's load: other engineers' tests may share it; the load
average is recorded at the start and the end.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from results import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "RESULTS.md"
SECTION = "## Migrations (issue 4)"
MIGRATIONS = ROOT / "migrations"

NAIVE = """
BEGIN;
ALTER TABLE public.users ADD COLUMN email_verified boolean NOT NULL DEFAULT false,
                         ADD COLUMN email_verified_at timestamptz;
CREATE INDEX users_email_verified_at_idx ON public.users (email_verified_at);
ALTER TABLE public.orders ADD COLUMN tax_amount numeric(12,2);
UPDATE public.orders SET tax_amount = round(amount * 0.08, 2);
ALTER TABLE public.orders ALTER COLUMN tax_amount SET NOT NULL;
COMMIT;
"""


def _prepare_environ() -> None:
    runtime = Path(tempfile.gettempdir()) / f"dataops-runtime-{os.getuid()}"
    runtime.mkdir(mode=0o700, exist_ok=True)
    os.environ.setdefault("XDG_RUNTIME_DIR", str(runtime))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


# -- the application's writers ---------------------------------------------------------------

class Writers:
    def __init__(self, dsn, n: int, users: int, orders: int):
        self.dsn, self.n, self.users, self.orders = dsn, n, users, orders
        self.samples: list[tuple[float, float, str]] = []  # (start, latency s, statement kind)
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _run(self, k: int) -> None:
        import psycopg

        rng = random.Random(k)
        with psycopg.connect(self.dsn.conninfo(application_name=f"app-writer-{k}"), autocommit=True) as conn:
            i = 0
            while not self._stop.is_set():
                kind = ("order", "user", "signup")[i % 3]
                t0 = time.monotonic()
                try:
                    if kind == "order":
                        conn.execute("UPDATE public.orders SET status = status WHERE id = %s",
                                     (rng.randint(1, self.orders),))
                    elif kind == "user":
                        conn.execute("UPDATE public.users SET phone = phone WHERE id = %s", (rng.randint(1, self.users),))
                    else:
                        conn.execute("INSERT INTO public.users (email) VALUES (%s)", (f"w{k}-{i}-{time.time_ns()}@x.test",))
                except psycopg.Error as exc:
                    self.errors.append(f"{kind}: {str(exc).splitlines()[0]}")
                self.samples.append((t0, time.monotonic() - t0, kind))
                i += 1

    def __enter__(self):
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(self.n)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def window(self, start: float, end: float) -> dict:
        lat = sorted(s[1] for s in self.samples if start <= s[0] <= end)
        if not lat:
            return {"ops": 0, "p50": 0, "p99": 0, "max": 0, "slow": 0}
        return {"ops": len(lat), "rate": len(lat) / max(end - start, 1e-9), "p50": statistics.median(lat),
                "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))], "max": lat[-1],
                "slow": sum(x > 0.1 for x in lat)}


# -- scenarios ----------------------------------------------------------------------------------

def copy_db(server, src: str, name: str):
    from psycopg import sql

    from dataops.tasks import pg

    pg.drop_database(server, name)
    with pg.connect(server, autocommit=True, dbname="postgres") as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(src)))
    return server.with_database(name)


def with_writers(dsn, args, counts, fn) -> dict:
    with Writers(dsn, args.writers, counts["users"], counts["orders"]) as w:
        time.sleep(1.0)
        t0 = time.monotonic()
        detail = fn()
        t1 = time.monotonic()
        time.sleep(1.0)
    base = w.window(t0 - 1.0, t0)
    during = w.window(t0, t1)
    return {"seconds": t1 - t0, "during": during, "before": base, "errors": w.errors[:3], "n_errors": len(w.errors),
            "detail": detail}


def scenario_safe(server, args, counts) -> dict:
    from dataops.tasks import pg
    from dataops.tasks.migration.migrate import MigrationTarget, upgrade
    from dataops.tasks.schema import schema_fingerprint

    dsn = copy_db(server, "bench_src", "bench_safe")
    result = with_writers(dsn, args, counts, lambda: upgrade(MigrationTarget(dsn, MIGRATIONS), "0008"))
    with pg.connect(dsn) as conn:
        result["fingerprint"] = schema_fingerprint(conn)
    return result


def scenario_naive(server, args, counts) -> dict:
    from dataops.tasks import pg
    from dataops.tasks.schema import schema_fingerprint

    dsn = copy_db(server, "bench_src", "bench_naive")

    def run():
        with pg.connect(dsn, autocommit=True) as conn:
            conn.execute(NAIVE)

    result = with_writers(dsn, args, counts, run)
    with pg.connect(dsn) as conn:
        result["fingerprint"] = schema_fingerprint(conn)
    return result


def scenario_lock_queue(server, args, counts, lock_timeout: str) -> dict:
    """A 3 s reader on users while 0003 alters users."""
    import psycopg

    from dataops.settings import MigrationSettings
    from dataops.tasks.migration.migrate import MigrationTarget, upgrade

    dsn = copy_db(server, "bench_src", f"bench_queue_{lock_timeout.replace(' ', '')}")
    opts = MigrationSettings(lock_timeout=lock_timeout, lock_retries=10, lock_retry_delay_s=0.5)

    def run():
        reader = psycopg.connect(dsn.conninfo(application_name="long-report"))
        reader.execute("SELECT count(*) FROM public.users")  # ACCESS SHARE until the transaction ends
        threading.Timer(3.0, reader.commit).start()
        try:
            r = upgrade(MigrationTarget(dsn, MIGRATIONS, opts), "0003")
            return f"revision 0003 applied at attempt {r.steps[0].attempts}"
        finally:
            reader.close()

    return with_writers(dsn, args, counts, run)


def time_preflight(server, counts) -> dict:
    from dataops.settings import parse_settings
    from dataops.tasks import pg
    from dataops.tasks.migration.lint import lint
    from dataops.tasks.migration.migrate import MigrationTarget, plan, round_trip
    from dataops.tasks.migration.preflight import preflight
    from dataops.tasks.scratch import scratch_name

    dsn = server.with_database("bench_src")
    settings = parse_settings({"environments": {"bench": {"role": "staging", "database_url": dsn.secret()}},
                               "storage": {"url": "file:///tmp/dataops-bench-unused"},
                               "migrations": {"path": str(MIGRATIONS)}}, env={})
    t0 = time.monotonic()
    pre = preflight(settings, settings.env("bench"))
    t_pre = time.monotonic() - t0
    t0 = time.monotonic()
    plans = plan(MigrationTarget(dsn, MIGRATIONS))
    findings = lint(plans)
    t_lint = time.monotonic() - t0
    name = scratch_name("bench", "mtest")
    pg.create_database(server, name)
    try:
        t0 = time.monotonic()
        steps = round_trip(MigrationTarget(server.with_database(name), MIGRATIONS))
        t_rt = time.monotonic() - t0
    finally:
        pg.drop_database(server, name)
    assert pre.ok and not findings and all(s.ok for s in steps), (pre.problems, findings, steps)
    return {"preflight": t_pre, "plan_lint": t_lint, "round_trip": t_rt, "revisions": len(steps), "pending": len(plans),
            "tables": len(pre.state.checksums)}


# -- report -------------------------------------------------------------------------------------

def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    ram = int(next(ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines()
                   if ln.startswith("MemTotal"))) * 1024
    return (f"{os.cpu_count()} CPUs ({cpu}), {ram / 1024 ** 3:.1f} GiB RAM, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def ms(x: float) -> str:
    return f"{x * 1000:,.0f} ms" if x >= 0.01 else f"{x * 1000:.1f} ms"


def render(args, counts, load0, load1, seed_s, results, pre) -> str:
    rows = []
    for label, r in results:
        d = r["during"]
        rows.append(f"| {label} | {r['seconds']:.2f} s | {d['ops']:,} | {ms(d['p50'])} | {ms(d['p99'])} | "
                    f"{ms(d['max'])} | {d['slow']:,} | {r['n_errors']} |")
    base = results[0][1]["before"]
    same = results[0][1].get("fingerprint") == results[1][1].get("fingerprint")
    lines = [
        SECTION, "",
        "`bench/bench_migrations.py`: what the application's writers feel while a migration runs, the safe way "
        "(`dataops.tasks.migration.migrate.upgrade`, the example revisions) against the same change written naively, and the lock "
        "queue that `lock_timeout` prevents. One run of each scenario (latencies of every writer statement).", "",
        "### Setup", "", "| | |", "| --- | --- |",
        f"| date | {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC |",
        f"| machine | {machine()}; load average {load0} at the start, {load1} at the end (other engineers' tests may "
        "share the machine) |",
        "| PostgreSQL | 16.2, embedded (pgserver), unix socket, default settings |",
        f"| data | `create_schema` + `seed(users={args.users:,})` in {seed_s:.0f} s: users {counts['users']:,}, "
        f"orders {counts['orders']:,}, audit_logs {counts['audit_logs']:,}; stamped at 0002; each scenario on a "
        "`CREATE DATABASE ... TEMPLATE` copy |",
        f"| writers | {args.writers} threads, autocommit, round robin: UPDATE a random order, UPDATE a random user, "
        f"INSERT a user; in the second before the migration: {base['ops']:,} statements, p50 {ms(base['p50'])}, "
        f"max {ms(base['max'])} |", "",
        "### Writers while the migration runs", "",
        "| scenario | migration time | writer statements | p50 | p99 | max | > 100 ms | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |", *rows, "",
        f"- safe and naive end with {'the same' if same else 'DIFFERENT'} schema fingerprint.",
        f"- lock queue with lock_timeout 200ms: {results[2][1]['detail']}; with lock_timeout 0: "
        f"{results[3][1]['detail']}.",
        f"- preflight (status, plan, lint, fingerprint, checksums of {pre['tables']} tables) on the seeded database: "
        f"{pre['preflight']:.2f} s; plan + lint of the {pre['pending']} pending revisions alone: {pre['plan_lint']:.2f} s; "
        f"round trip of all {pre['revisions']} revisions on an empty scratch database: {pre['round_trip']:.2f} s.",
    ]
    errors = [e for _, r in results for e in r["errors"]]
    if errors:
        lines.append(f"- writer errors (first): {'; '.join(errors[:3])}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=50_000)
    ap.add_argument("--writers", type=int, default=2)
    ap.add_argument("--no-write", action="store_true", help="print the section, do not touch RESULTS.md")
    args = ap.parse_args()
    _prepare_environ()
    import pgserver

    from dataops.dev.sample_app import create_schema, seed
    from dataops.dsn import Dsn
    from dataops.tasks import pg
    from dataops.tasks.migration.migrate import MigrationTarget, stamp

    load0 = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    pgdata = Path(tempfile.mkdtemp(prefix="dobm-"))
    srv = pgserver.get_server(pgdata, cleanup_mode="delete")
    try:
        server = Dsn(srv.get_uri("postgres"))
        pg.create_database(server, "bench_src")
        src = server.with_database("bench_src")
        t0 = time.monotonic()
        create_schema(src)
        counts = seed(src, users=args.users)
        seed_s = time.monotonic() - t0
        stamp(MigrationTarget(src, MIGRATIONS), "0002")
        with pg.connect(src, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")
        print(f"seeded {counts} in {seed_s:.1f} s", flush=True)
        results = []
        for label, fn in (("safe: `dataops.tasks.migration.migrate.upgrade` 0002 -> 0008", lambda: scenario_safe(server, args, counts)),
                          ("naive: one transaction, plain index, one UPDATE", lambda: scenario_naive(server, args, counts)),
                          ("lock queue, revision 0003, lock_timeout 200ms (retried)",
                           lambda: scenario_lock_queue(server, args, counts, "200ms")),
                          ("lock queue, revision 0003, lock_timeout 0 (waits)",
                           lambda: scenario_lock_queue(server, args, counts, "0"))):
            r = fn()
            results.append((label, r))
            print(f"{label}: {r['seconds']:.2f} s, writers max {ms(r['during']['max'])}", flush=True)
        pre = time_preflight(server, counts)
        print(pre, flush=True)
    finally:
        srv.cleanup()
    load1 = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    text = render(args, counts, load0, load1, seed_s, results, pre)
    print(text)
    if not args.no_write:
        write_section(text, SECTION)
        print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
