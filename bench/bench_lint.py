"""Lint side by side: dataops's migration lint against squawk 2.66 on the corpus in tests/lint_corpus.

1. Starts an embedded PostgreSQL (pgserver), loads tests/lint_corpus/base.sql (existing tables
   with rows) and stamps the database at the corpus's base revision c000.
2. Runs the real command, `dataops --config ... migrate corpus lint --json`, over the ~90
   pending revisions, each one dangerous statement or one safe pattern (the label is in the
   file name and in the revision's EXPECT).
3. Renders every revision's SQL offline (the same text dataops lints) into one .sql file per
   revision and runs `squawk --reporter json` over them (squawk-cli 2.66.0 from npm; --squawk
   names the binary, default .cache/squawk/node_modules/.bin/squawk). The result is recorded in
   tests/lint_corpus/squawk-2.66.json, which tests/test_lint_corpus.py compares against, so CI
   needs no npm.
4. Times both commands, interleaved (A, B, A, B, ...), medians; records the load average.
5. Writes the section "## Lint vs squawk (issue 17)" of bench/RESULTS.md: per revision, flagged
   by both, only squawk, only dataops, or neither.

squawk's require-lock-timeout, require-statement-timeout, require-timeout-settings and
prefer-robust-stmts fire on nearly every statement here: dataops sets lock_timeout and
statement_timeout itself for every revision it runs and runs each transactional revision in
one transaction, so they are shown in the table but not counted (docs/lint-rules.md says why).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"
SECTION = "## Lint vs squawk (issue 17)"
CORPUS = ROOT / "tests" / "lint_corpus"
RECORD = CORPUS / "squawk-2.66.json"
SQUAWK_VERSION = "2.66.0"
NOISE = ("require-lock-timeout", "require-statement-timeout", "require-timeout-settings", "prefer-robust-stmts")


def corpus_entries() -> list[dict]:
    """Every corpus revision but the base: revision, file, label, expected rules, the statement."""
    out = []
    for path in sorted((CORPUS / "versions").glob("c*.py")):
        text = path.read_text()
        rev = re.search(r'^revision = "(\w+)"', text, re.M).group(1)
        label = re.search(r'^EXPECT = "(\w+)"', text, re.M)
        if label is None:
            continue
        rules = re.search(r"^EXPECT_RULES = (\(.*\))$", text, re.M).group(1)
        sql = re.search(r'^SQL = """\n(.*?)\n"""', text, re.M | re.S).group(1)
        out.append({"revision": rev, "file": path.name, "label": label.group(1),
                    "expect": list(eval(rules)), "sql": sql})  # noqa: S307 - our own literal tuple
    return out


def config(tmp: Path, dsn) -> Path:
    import yaml

    cfg = tmp / "dataops.yaml"
    cfg.write_text(yaml.safe_dump({
        "environments": {"corpus": {"role": "staging", "database_url": dsn.secret()}},
        "storage": {"url": f"file://{tmp / 'unused'}"},
        "migrations": {"path": str(CORPUS)}}))
    return cfg


def run_dataops(cfg: Path) -> tuple[float, list[dict]]:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "dataops.cli", "--config", str(cfg), "migrate", "corpus", "lint",
                        "--json"], capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - t0
    if r.returncode not in (0, 1) or not r.stdout.strip().startswith("["):
        raise SystemExit(f"dataops lint failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    return seconds, json.loads(r.stdout)


def render_sql(cfg_dsn, sql_dir: Path) -> dict[str, Path]:
    """One file per revision with the SQL dataops lints (Alembic offline rendering)."""
    from dataops.tasks.migration.migrate import MigrationTarget, plan

    files = {}
    for p in plan(MigrationTarget(cfg_dsn, CORPUS), current="c000"):
        f = sql_dir / f"{p.revision}.sql"
        f.write_text(p.sql)
        files[p.revision] = f
    return files


def run_squawk(squawk: str, files: list[Path]) -> tuple[float, list[dict]]:
    t0 = time.monotonic()
    r = subprocess.run([squawk, "--reporter", "json", *map(str, files)], capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - t0
    if not r.stdout.strip().startswith("["):
        raise SystemExit(f"squawk failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    return seconds, json.loads(r.stdout)


def in_process(dsn) -> tuple[float, float]:
    """(plan, lint against the database) seconds, without the CLI's start and imports."""
    from dataops.tasks.migration.lint import lint_against
    from dataops.tasks.migration.migrate import MigrationTarget, plan

    mt = MigrationTarget(dsn, CORPUS)
    t0 = time.monotonic()
    plans = plan(mt)
    t1 = time.monotonic()
    lint_against(mt, plans)
    return t1 - t0, time.monotonic() - t1


def verdict(ours: bool, theirs: bool) -> str:
    return {(True, True): "both", (False, True): "only squawk", (True, False): "only dataops",
            (False, False): "neither"}[(ours, theirs)]


def compare(entries, findings, squawk_by_rev) -> list[dict]:
    ours: dict[str, list[str]] = {}
    for f in findings:
        if not f["allowed"]:
            ours.setdefault(f["revision"], []).append(f["rule"])
    rows = []
    for e in entries:
        mine = sorted(set(ours.get(e["revision"], [])))
        theirs = sorted(set(squawk_by_rev.get(e["revision"], [])))
        counted = [r for r in theirs if r not in NOISE]
        rows.append({**e, "dataops": mine, "squawk": theirs, "squawk_counted": counted,
                     "verdict": verdict(bool(mine), bool(counted))})
    return rows


def render(rows, t_ours, t_theirs, t_inproc, load0, load1, n_runs) -> str:
    def count(label, v):
        return sum(r["label"] == label and r["verdict"] == v for r in rows)

    dangerous = [r for r in rows if r["label"] == "dangerous"]
    safe = [r for r in rows if r["label"] == "safe"]
    lines = [SECTION, "",
             f"`python bench/bench_lint.py` (`make lint-compare`): {len(rows)} revisions in tests/lint_corpus "
             f"({len(dangerous)} dangerous, {len(safe)} safe patterns), linted by `dataops migrate corpus lint "
             f"--json` (the real CLI, against a PostgreSQL holding tests/lint_corpus/base.sql) and by squawk "
             f"{SQUAWK_VERSION} (npm `squawk-cli`, `--reporter json`) on the same rendered SQL, one file per "
             "revision. squawk's result is kept in tests/lint_corpus/squawk-2.66.json for the test.", "",
             "| | both | only squawk | only dataops | neither |", "|---|---|---|---|---|"]
    for label in ("dangerous", "safe"):
        lines.append(f"| {label} | " + " | ".join(str(count(label, v)) for v in
                                                  ("both", "only squawk", "only dataops", "neither")) + " |")
    missed = [r["revision"] for r in dangerous if not r["dataops"]]
    flagged_safe = [r["revision"] for r in safe if r["dataops"]]
    squawk_only = [r["revision"] for r in rows if r["verdict"] == "only squawk"]
    lines += ["",
              f"- dataops flags {len(dangerous) - len(missed)} of {len(dangerous)} dangerous revisions"
              + (f" (missed: {', '.join(missed)})" if missed else "") + f"; safe patterns flagged by dataops: "
              f"{len(flagged_safe)}" + (f" ({', '.join(flagged_safe)})" if flagged_safe else "") + ".",
              f"- flagged by squawk but not by dataops: {len(squawk_only)}"
              + (f" ({', '.join(squawk_only)}: see the table)" if squawk_only else "") + ".",
              f"- not counted for squawk (shown in brackets): {', '.join(NOISE)}. dataops sets lock_timeout and "
              "statement_timeout for every revision it runs and runs a transactional revision in one "
              "transaction; `dataops migrate ENV lint --sql FILE` (SQL run elsewhere) does ask for lock_timeout "
              "(rule lock-timeout).",
              f"- time for the whole corpus, median of {n_runs} interleaved runs: dataops "
              f"{statistics.median(t_ours):.2f} s (one process: Python start, imports, offline rendering of "
              f"{len(rows) + 1} revisions, lint, table sizes from the database), squawk "
              f"{statistics.median(t_theirs):.2f} s (native binary, SQL files already rendered). Inside dataops's "
              f"time, rendering the plan took {statistics.median(p for p, _ in t_inproc):.2f} s and linting it "
              f"against the database {statistics.median(q for _, q in t_inproc):.2f} s (in process, median); the "
              "rest is Python starting and importing the CLI (Prefect, Alembic, SQLAlchemy). Load average "
              f"(1/5/15 min) {load0} at the start, {load1} at the end; 2 cores shared with other work.",
              "", "| revision | expected | statement | dataops | squawk | verdict |", "|---|---|---|---|---|---|"]
    for r in rows:
        stmt = " ".join(r["sql"].split())
        stmt = stmt if len(stmt) <= 90 else stmt[:87] + "..."
        sq = ", ".join(x if x in r["squawk_counted"] else f"[{x}]" for x in r["squawk"]) or "-"
        lines.append(f"| {r['revision']} | {r['label']} | `{stmt.replace('|', '/')}` | "
                     f"{', '.join(r['dataops']) or '-'} | {sq} | {r['verdict']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--squawk", default=str(ROOT / ".cache" / "squawk" / "node_modules" / ".bin" / "squawk"))
    ap.add_argument("--runs", type=int, default=3, help="timed runs of each tool (interleaved)")
    ap.add_argument("--no-write", action="store_true", help="print the section, touch neither file")
    args = ap.parse_args()
    version = subprocess.run([args.squawk, "--version"], capture_output=True, text=True).stdout.strip()
    if SQUAWK_VERSION not in version:
        raise SystemExit(f"{args.squawk} says {version!r}; install squawk-cli@{SQUAWK_VERSION} (make lint-compare)")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    import pgserver

    from dataops.dsn import Dsn
    from dataops.tasks import pg
    from dataops.tasks.migration.migrate import MigrationTarget, stamp

    load0 = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    entries = corpus_entries()
    tmp = Path(tempfile.mkdtemp(prefix="dobl-"))
    srv = pgserver.get_server(tmp / "pg", cleanup_mode="delete")
    try:
        server = Dsn(srv.get_uri("postgres"))
        pg.create_database(server, "lint_corpus")
        dsn = server.with_database("lint_corpus")
        with pg.connect(dsn, autocommit=True) as conn:
            conn.execute((CORPUS / "base.sql").read_text())
            conn.execute("ANALYZE")
        stamp(MigrationTarget(dsn, CORPUS), "c000")
        cfg = config(tmp, dsn)
        sql_dir = tmp / "sql"
        sql_dir.mkdir()
        files = render_sql(dsn, sql_dir)
        t_ours, t_theirs, t_inproc = [], [], []
        for _ in range(args.runs):
            s, findings = run_dataops(cfg)
            t_ours.append(s)
            s, reports = run_squawk(args.squawk, [files[e["revision"]] for e in entries])
            t_theirs.append(s)
            t_inproc.append(in_process(dsn))
    finally:
        srv.cleanup()
    load1 = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    squawk_by_rev: dict[str, list[str]] = {e["revision"]: [] for e in entries}
    for rep in reports:
        rev = Path(rep["file"]).stem
        squawk_by_rev.setdefault(rev, []).append(rep["rule_name"])
    squawk_by_rev = {k: sorted(set(v)) for k, v in squawk_by_rev.items()}
    rows = compare(entries, findings, squawk_by_rev)
    text = render(rows, t_ours, t_theirs, t_inproc, load0, load1, args.runs)
    print(text)
    if not args.no_write:
        RECORD.write_text(json.dumps({"squawk": version, "command": "squawk --reporter json cNNN.sql ...",
                                      "input": "each revision's SQL as `dataops migrate ENV plan` renders it",
                                      "not_counted": list(NOISE), "revisions": squawk_by_rev}, indent=1) + "\n")
        write_section(text, SECTION)
        print(f"wrote {RESULTS.relative_to(ROOT)} and {RECORD.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
