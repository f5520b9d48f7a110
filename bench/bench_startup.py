"""Benchmark for issue 18: what a command pays before it does anything, and the CI pipeline as a
user's CI runs it, before and after the local Prefect API (dataops.local_api).

    .venv/bin/python bench/bench_startup.py [--repeat 5] [--pipelines 2] [--users 200000] [--no-write]

Every figure is a whole process (`dataops ...` started as a user starts it, interpreter and
imports included), timed from outside: wall by a monotonic clock around the child, CPU seconds
and peak RSS from os.wait4 (the child and the children it waited for). The local API server runs
in a session of its own and is not a child: its CPU is not in the command's figures.

Before = Prefect's temporary API started by each command (`prefect.local_api: false`, which is
what every command did before this change); after = the local API, started by the first flow
command and reused. A, B and the yardstick `pg_dump -Fc` run in turn, round by round, so a noisy
machine (2 cores, shared) slows all of them alike; medians are reported with the load average.

1. Start-up table, on an empty database: `backup staging`, `validate staging`, and the read-only
   `migrate staging status`; before, after (warm: from the second command on) and the first
   command after (cold: it starts the server).
2. The CI pipeline of infra/ci/github-actions.yml's merge job (status, validate, backup, up,
   verify), its `run:` steps executed with bash as the runner does, each run on a fresh copy of
   staging (seeded, at revision 0002) and, for "after", a fresh state folder: a new CI runner
   starts the local API itself, once per job.
3. `dataops backup` of the sample app at --users users against `pg_dump -Fc`, before and after.

Writes the section "## Start-up and the CI pipeline (issue 18)" of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from results import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"
SECTION = "## Start-up and the CI pipeline (issue 18)"
DATAOPS = str(Path(sys.executable).parent / "dataops")


def timed(args: list[str], env: dict, cwd: Path | None = None, check: bool = True) -> dict:
    t0 = time.monotonic()
    proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = b"", b""
    # read the pipes to the end, then reap with wait4 for the child's own accounting
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if check and proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return {"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "rss_mib": ru.ru_maxrss / 1024, "rc": proc.returncode,
            "out": out.decode()}


def med(xs):
    return statistics.median(xs) if xs else float("nan")


class World:
    """One embedded PostgreSQL; databases, configs and state folders made on demand."""

    def __init__(self, tmp: Path):
        import pgserver
        from pgserver._commands import POSTGRES_BIN_PATH

        sys.path.insert(0, str(ROOT))
        self.tmp = tmp
        self.bin = Path(POSTGRES_BIN_PATH)
        self.srv = pgserver.get_server(Path(tempfile.mkdtemp(prefix="dobench-")), cleanup_mode="delete")
        from dataops.dsn import Dsn

        self.server = Dsn(self.srv.get_uri("postgres"))
        self.n = 0
        self.base_env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DATAOPS_"))}
        self.base_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        # Prefect's own 20 s bound on its temporary API's start is not met on a busy 2-core machine
        self.base_env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"

    def database(self, prefix: str, users: int = 0, at: str | None = None):
        from dataops.dev.sample_app import create_schema, seed
        from dataops.tasks import pg

        self.n += 1
        name = f"{prefix}_{self.n}"
        pg.create_database(self.server, name)
        dsn = self.server.with_database(name)
        create_schema(dsn)
        if users:
            seed(dsn, users=users, seed=7)
        if at:
            from dataops.tasks.migration.migrate import MigrationTarget, stamp

            stamp(MigrationTarget(dsn, ROOT / "migrations"), at)
        return dsn

    def checkout(self, dsn, local_api: bool, name: str) -> Path:
        """A repository checkout as the CI runner sees it: dataops.yaml and migrations/ at its root."""
        import yaml

        d = self.tmp / name
        shutil.copytree(ROOT / "migrations", d / "migrations", ignore=shutil.ignore_patterns("__pycache__"))
        body = {"environments": {"staging": {"role": "staging", "database_url": dsn.secret()}},
                "storage": {"url": f"file://{d}/store"},
                "migrations": {"path": "migrations"}}
        if not local_api:
            body["prefect"] = {"local_api": False}
        (d / "dataops.yaml").write_text(yaml.safe_dump(body, sort_keys=False))
        return d

    def env(self, state: Path | None) -> dict:
        env = {**self.base_env, "DATAOPS_CONFIG": "dataops.yaml"}
        if state is not None:
            env["DATAOPS_STATE_DIR"] = str(state)
        return env

    def stop_api(self, state: Path) -> None:
        subprocess.run([DATAOPS, "local-api", "stop"], env=self.env(state), capture_output=True, timeout=120)

    def close(self):
        self.srv.cleanup()


def pipeline_steps() -> list[tuple[str, str]]:
    import yaml

    jobs = yaml.safe_load((ROOT / "infra" / "ci" / "github-actions.yml").read_text())["jobs"]
    return [(s.get("name", s["run"]), s["run"]) for s in jobs["staging"]["steps"]
            if "run" in s and s.get("name") != "install dataops"]


def run_pipeline(world: World, local_api: bool, i: int) -> dict:
    dsn = world.database("ci", users=120, at="0002")
    d = world.checkout(dsn, local_api, f"ci-{'after' if local_api else 'before'}-{i}")
    state = world.tmp / f"state-ci-{i}-{local_api}"
    env = world.env(state)
    steps, t0, cpu = {}, time.monotonic(), 0.0
    for name, script in pipeline_steps():
        r = timed(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script], env, cwd=d)
        steps[name], cpu = r["wall"], cpu + r["cpu"]
    total = time.monotonic() - t0
    if local_api:
        world.stop_api(state)
    return {"wall": total, "cpu": cpu, "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5, help="rounds of the start-up table")
    ap.add_argument("--pipelines", type=int, default=2, help="pipeline runs, before and after each")
    ap.add_argument("--users", type=int, default=200_000, help="sample app size for the backup comparison (0: skip)")
    ap.add_argument("--backup-repeat", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="dataops-bench-startup-"))
    world = World(tmp)
    loads = [os.getloadavg()]
    out = [SECTION, "",
           f"`bench/bench_startup.py` run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, "
           "every figure a whole process (interpreter and imports included), timed from outside by the script's own "
           "clock (wall) and os.wait4 (CPU-s = user + system of the command and the children it waited for; peak = its "
           "largest process). Before: Prefect's temporary API started by each command (`prefect.local_api: false`, "
           "what every command did before); after: the local API (docs/local-api.md). Commands, yardstick and "
           "variants run in turn, round by round; medians. The machine was shared with other jobs: load averages are "
           "given with each table, ratios taken in the same rounds are the fair figures.", ""]
    try:
        # 1. start-up on an empty database
        stg = world.database("startup")
        before = world.checkout(stg, False, "startup-before")
        after = world.checkout(stg, True, "startup-after")
        state = tmp / "state-startup"
        commands = {"backup staging": ["backup", "staging"], "validate staging": ["validate", "staging"],
                    "migrate staging status (read-only)": ["migrate", "staging", "status"]}
        cold = timed([DATAOPS, "backup", "staging"], world.env(state), cwd=after)
        conninfo, secret_env = stg.libpq_args()
        pg_dump = [str(world.bin / "pg_dump"), "-Fc", "-f", str(tmp / "empty.dump"), f"--dbname={conninfo}"]
        rows = {k: {"before": [], "after": []} for k in commands}
        dumps = []
        for _ in range(args.repeat):
            for label, argv in commands.items():
                rows[label]["before"].append(timed([DATAOPS, *argv], world.env(state), cwd=before))
                rows[label]["after"].append(timed([DATAOPS, *argv], world.env(state), cwd=after))
            dumps.append(timed(pg_dump, {**world.base_env, **secret_env}))
        loads.append(os.getloadavg())
        out += ["### Start-up: one command on an empty database", "",
                f"{args.repeat} rounds; load average {loads[0][0]:.1f} at the start, {loads[-1][0]:.1f} after.", "",
                "| command | before: wall s | before: CPU-s | before: peak MiB | after: wall s | after: CPU-s | "
                "after: peak MiB | before/after (wall, same rounds) |", "|---|---|---|---|---|---|---|---|"]
        for label, r in rows.items():
            b, a = r["before"], r["after"]
            ratio = med([x["wall"] / y["wall"] for x, y in zip(b, a)])
            out.append(f"| `dataops {label}` | {med([x['wall'] for x in b]):.2f} | {med([x['cpu'] for x in b]):.2f} | "
                       f"{max(x['rss_mib'] for x in b):.0f} | {med([x['wall'] for x in a]):.2f} | "
                       f"{med([x['cpu'] for x in a]):.2f} | {max(x['rss_mib'] for x in a):.0f} | {ratio:.1f}x |")
        out += [f"| `pg_dump -Fc` (yardstick) | | | | {med([x['wall'] for x in dumps]):.2f} | "
                f"{med([x['cpu'] for x in dumps]):.2f} | {max(x['rss_mib'] for x in dumps):.0f} | |", "",
                f"The first flow command after (it starts the local API, a new SQLite database): "
                f"{cold['wall']:.1f} s wall, {cold['cpu']:.2f} CPU-s in the command (the server's own start is in "
                "its session, not counted).", ""]
        world.stop_api(state)

        # 2. the CI pipeline
        runs = {"before": [], "after": []}
        for i in range(args.pipelines):
            runs["before"].append(run_pipeline(world, False, i))
            runs["after"].append(run_pipeline(world, True, i))
        loads.append(os.getloadavg())
        names = [n for n, _ in pipeline_steps()]
        out += ["### The CI pipeline (infra/ci/github-actions.yml, merge job)", "",
                f"Its `run:` steps in bash as the runner runs them, on a fresh staging each run (120 users, at 0002, "
                f"up to 0008); after: a fresh state folder per run, so the job's first flow command starts the local "
                f"API as on a new CI runner. {args.pipelines} runs each, in turn; load average {loads[-1][0]:.1f}.", "",
                "| pipeline | " + " | ".join(names) + " | total wall s | total CPU-s |",
                "|---|" + "---|" * (len(names) + 2)]
        for label, rs in runs.items():
            out.append(f"| {label} | " + " | ".join(f"{med([r['steps'][n] for r in rs]):.1f}" for n in names)
                       + f" | {med([r['wall'] for r in rs]):.1f} | {med([r['cpu'] for r in rs]):.1f} |")
        ratio = med([b["wall"] / a["wall"] for b, a in zip(runs["before"], runs["after"])])
        out += ["", f"After is {ratio:.1f}x faster (median of the paired runs).", ""]

        # 3. backup at N users against pg_dump -Fc
        if args.users:
            big = world.database("big", users=args.users)
            from dataops.tasks import pg

            with pg.connect(big) as conn:
                conn.autocommit = True
                conn.execute("VACUUM ANALYZE")
            b_dir = world.checkout(big, False, "big-before")
            a_dir = world.checkout(big, True, "big-after")
            state = tmp / "state-big"
            timed([DATAOPS, "backup", "staging"], world.env(state), cwd=a_dir)  # starts the server: not counted
            conninfo, secret_env = big.libpq_args()
            dump = [str(world.bin / "pg_dump"), "-Fc", "-f", str(tmp / "big.dump"), f"--dbname={conninfo}"]
            res = {"before": [], "after": [], "pg_dump": []}
            for _ in range(args.backup_repeat):
                res["before"].append(timed([DATAOPS, "backup", "staging"], world.env(state), cwd=b_dir))
                res["after"].append(timed([DATAOPS, "backup", "staging"], world.env(state), cwd=a_dir))
                res["pg_dump"].append(timed(dump, {**world.base_env, **secret_env}))
            world.stop_api(state)
            loads.append(os.getloadavg())
            size = (tmp / "big.dump").stat().st_size / 1048576
            out += [f"### `dataops backup` at {args.users:,} users against `pg_dump -Fc`", "",
                    f"Into a file:// store; `pg_dump -Fc` into a file ({size:.1f} MiB). {args.backup_repeat} rounds; "
                    f"load average {loads[-1][0]:.1f}.", "",
                    "| command | wall s | CPU-s | peak MiB | / pg_dump -Fc (wall, same rounds) |", "|---|---|---|---|---|"]
            for label in ("before", "after", "pg_dump"):
                rs = res[label]
                ratio = med([x["wall"] / y["wall"] for x, y in zip(rs, res["pg_dump"])])
                name = "`pg_dump -Fc`" if label == "pg_dump" else f"`dataops backup` {label}"
                out.append(f"| {name} | {med([x['wall'] for x in rs]):.2f} | {med([x['cpu'] for x in rs]):.2f} | "
                           f"{max(x['rss_mib'] for x in rs):.0f} | {ratio:.2f} |")
            out.append("")
    except BaseException as exc:
        out += ["", f"(the run stopped here: {type(exc).__name__}: {str(exc)[:300]})"]
        raise
    finally:
        for st in tmp.glob("state-*"):
            world.stop_api(st)
        world.close()
        text = "\n".join(out)
        print(text)
        if not args.no_write:
            write_section(text, SECTION)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
