"""The lint corpus (tests/lint_corpus): every dangerous revision is flagged with the rules it names,
no safe pattern is flagged, and dataops flags every revision squawk 2.66 flags (squawk's answers
recorded by bench/bench_lint.py in tests/lint_corpus/squawk-2.66.json, so no npm is needed here).
Runs the real command, `dataops migrate ENV lint --json`, against a PostgreSQL holding base.sql."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

from dataops.tasks import pg
from dataops.tasks.migration.migrate import MigrationTarget, stamp

CORPUS = Path(__file__).resolve().parent / "lint_corpus"
RECORD = json.loads((CORPUS / "squawk-2.66.json").read_text())


def entries() -> dict[str, dict]:
    out = {}
    for path in sorted((CORPUS / "versions").glob("c*.py")):
        text = path.read_text()
        label = re.search(r'^EXPECT = "(\w+)"', text, re.M)
        if label:
            rev = re.search(r'^revision = "(\w+)"', text, re.M).group(1)
            rules = re.search(r"^EXPECT_RULES = \((.*)\)$", text, re.M).group(1)
            out[rev] = {"file": path.name, "label": label.group(1),
                        "rules": sorted(re.findall(r"'([a-z0-9-]+)'", rules))}
    return out


ENTRIES = entries()


@pytest.fixture(scope="module")
def corpus_findings(pg_server_dsn, tmp_path_factory):
    """`dataops migrate corpus lint --json` once for the module: (returncode, findings, stderr)."""
    name = "lint_corpus_t"
    pg.drop_database(pg_server_dsn, name)
    pg.create_database(pg_server_dsn, name)
    dsn = pg_server_dsn.with_database(name)
    try:
        with pg.connect(dsn, autocommit=True) as conn:
            conn.execute((CORPUS / "base.sql").read_text())
            conn.execute("ANALYZE")
        stamp(MigrationTarget(dsn, CORPUS), "c000")
        tmp = tmp_path_factory.mktemp("corpus")
        cfg = tmp / "dataops.yaml"
        cfg.write_text(yaml.safe_dump({"environments": {"corpus": {"role": "staging", "database_url": dsn.secret()}},
                                       "storage": {"url": f"file://{tmp / 'unused'}"},
                                       "migrations": {"path": str(CORPUS)}}))
        r = run_cli("--config", str(cfg), "migrate", "corpus", "lint", "--json")
        yield r.returncode, json.loads(r.stdout), r.stderr
    finally:
        pg.drop_database(pg_server_dsn, name)


def _flagged(findings) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in findings:
        if not f["allowed"]:
            out.setdefault(f["revision"], []).append(f["rule"])
    return {k: sorted(set(v)) for k, v in out.items()}


def test_corpus_is_big_enough_and_labelled():
    labels = [e["label"] for e in ENTRIES.values()]
    assert len(labels) >= 60 and set(labels) == {"dangerous", "safe"}
    assert all(e["file"].split("_")[1] == e["label"] for e in ENTRIES.values())
    assert all(e["rules"] for e in ENTRIES.values() if e["label"] == "dangerous")
    assert set(RECORD["revisions"]) == set(ENTRIES), "re-run bench/bench_lint.py: the corpus changed"


def test_every_dangerous_revision_is_flagged_with_its_rules_and_no_safe_one(corpus_findings):
    returncode, findings, stderr = corpus_findings
    assert returncode == 1 and "lint found" in stderr
    flagged = _flagged(findings)
    wrong = {rev: (e["rules"], flagged.get(rev, [])) for rev, e in ENTRIES.items()
             if flagged.get(rev, []) != e["rules"]}
    assert wrong == {}, "revision: (expected, flagged)"
    assert not [rev for rev, e in ENTRIES.items() if e["label"] == "safe" and rev in flagged]


def test_dataops_flags_everything_squawk_flags(corpus_findings):
    noise = set(RECORD["not_counted"])
    assert noise == {"require-lock-timeout", "require-statement-timeout", "require-timeout-settings",
                     "prefer-robust-stmts"}
    flagged = _flagged(corpus_findings[1])
    squawk = {rev: sorted(set(rules) - noise) for rev, rules in RECORD["revisions"].items()}
    only_squawk = {rev: rules for rev, rules in squawk.items() if rules and rev not in flagged}
    assert only_squawk == {}
    assert sum(bool(r) for r in squawk.values()) >= 40  # the record really holds squawk's findings


def test_findings_on_existing_tables_say_rows_and_size(corpus_findings):
    by_rev = {}
    for f in corpus_findings[1]:
        by_rev.setdefault(f["revision"], []).append(f)
    drop_index = by_rev["c015"][0]  # DROP INDEX public.users_phone_idx: the size is its table's
    assert (drop_index["table"], drop_index["rows"]) == ("public.users", 2000)
    assert "[public.users: about 2,000 rows, " in drop_index["reason"]
    detach = by_rev["c022"][0]  # a partitioned table: the sum of its partitions
    assert (detach["table"], detach["rows"]) == ("public.events", 12000)
    unique = next(f for f in by_rev["c010"] if f["rule"] == "unique-index-existing-data")
    assert "SELECT phone, count(*) FROM public.users GROUP BY phone HAVING count(*) > 1" in unique["reason"]
    new_table = by_rev["c052"][0]  # created in the plan: no size
    assert new_table["rows"] is None and new_table["size"] is None
