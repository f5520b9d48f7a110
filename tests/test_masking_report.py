"""`dataops anonymize ENV --report [PATH]`: per masked column the rule, distinct values before
and after and uniqueness kept, counted in anonymize's one transaction, printed, published as
a Prefect artifact and written as JSON or Markdown; never a value of the database, never a
DSN secret. Bad paths are refused before anything runs."""

from __future__ import annotations

import json
import os
import re
import secrets

import pytest
from conftest import run_cli
from test_refresh_staging import ANON, checksums, rows

from dataops.dev.sample_app import create_schema, seed
from dataops.errors import BadInput
from dataops.settings import load_settings
from dataops.tasks.anonymize.in_place import anonymize
from dataops.tasks.anonymize.report import ColumnCounts, MaskingReport, check_report_path

PASSWORD = os.environ.get("DATAOPS_TEST_SECRET") or "pw-" + secrets.token_hex(8)  # made per run, never committed
DELETED = "event_type IN ('login', 'password_change')"
MASKED = {  # table -> masked columns of ANON, and the rows that are left when they are counted
    "users": ("email", "full_name", "first_name", "last_name", "phone", "date_of_birth", "address", "ip_address",
              "password_hash"),
    "user_emails": ("email",),
    "audit_logs": ("ip_address",),
}


@pytest.fixture
def staging(make_db, write_config):
    """A staging database holding a (seeded) copy, and a config whose DSN carries a password
    (the embedded server trusts local sockets, so it connects all the same)."""
    dsn = make_db("stg")
    create_schema(dsn)
    seed(dsn, users=150)
    url = f"{dsn.secret()} password={PASSWORD}"
    cfg = write_config({"staging": ("staging", url)}, bucket="unused", extra={"anonymize": ANON})
    return dsn, cfg


def counts_now(dsn, where: dict[str, str] | None = None) -> dict[tuple[str, str], tuple[int, int]]:
    """(non-null, distinct) per masked column, by this file's own SQL."""
    out = {}
    for table, cols in MASKED.items():
        cond = (where or {}).get(table, "true")
        for col in cols:
            out[(table, col)] = rows(dsn, f"SELECT count({col}), count(DISTINCT {col}) FROM {table} WHERE {cond}")[0]
    return out


def real_values(dsn) -> set[str]:
    """Every value of the masked columns before masking, as text, long enough not to occur in a
    report by chance (counts, words of rule labels)."""
    found = set()
    for table, cols in MASKED.items():
        for col in cols:
            found |= {v for (v,) in rows(dsn, f"SELECT DISTINCT {col}::text FROM {table} WHERE {col} IS NOT NULL")
                      if len(v) >= 6}
    assert len(found) > 500
    return found


def assert_no_secret(text: str, values: set[str], dsn) -> None:
    leaked = [v for v in values if v in text]
    assert not leaked, f"real values in the report: {leaked[:5]}"
    assert PASSWORD not in text and dsn.database not in text and dsn.host not in text and "postgresql:" not in text


def test_counts_are_the_rows_masked_and_hold_no_value(staging):
    dsn, cfg = staging
    values = real_values(dsn)
    before = counts_now(dsn, {"audit_logs": f"NOT ({DELETED})"})  # counted after anonymize.delete
    settings = load_settings(str(cfg))
    result = anonymize(settings, settings.env("staging"), count=True)
    after = counts_now(dsn)
    report = result.masking
    got = {(c.table, c.column): c for c in report.columns}
    assert set(got) == set(before)
    for key, c in got.items():
        assert (c.rows_before, c.distinct_before) == before[key], key
        assert (c.rows_after, c.distinct_after) == after[key], key
    email = got[("users", "email")]
    assert email.must_stay_unique and email.uniqueness == "kept" and email.rule.startswith("faker email unique")
    assert email.distinct_after == email.distinct_before == 150 and email.leaked == 0
    assert got[("users", "ip_address")].distinct_after == 0 and got[("users", "ip_address")].uniqueness == "not required"
    assert got[("users", "phone")].unchanged is not None and got[("users", "phone")].leaked == 0
    assert report.deleted == {"audit_logs": result.deleted["audit_logs"]} and result.deleted["audit_logs"] > 0
    assert report.ok and "uniqueness kept" in report.summary() and "0 leaked values" in report.summary(), [
        str(c.as_row()) for c in report.columns]
    # JSON and Markdown, and the round trip the CLI makes through the flow's result
    data = json.loads(report.to_json())
    assert data["ok"] is True and data["environment"] == "staging" and len(data["columns"]) == len(before)
    assert MaskingReport.from_dict(data).to_markdown() == report.to_markdown()
    for text in (report.to_json(), report.to_markdown()):
        assert_no_secret(text, values, dsn)


def test_uniqueness_lost_is_reported():
    ok = ColumnCounts("t", "c", "faker email unique", 10, 10, 10, 10, must_stay_unique=True)
    lost = ColumnCounts("t", "d", "keyed hash (8)", 10, 10, 10, 9, must_stay_unique=True)
    free = ColumnCounts("t", "e", "faker name", 10, 10, 10, 3)
    report = MaskingReport("dev", [ok, lost, free])
    assert [c.uniqueness for c in report.columns] == ["kept", "LOST", "not required"]
    assert not report.ok and "1 of 2 unique columns still unique (uniqueness LOST in t.d)" in report.summary()


def test_cli_report_is_printed_written_and_published(prefect_api, staging, tmp_path):
    dsn, cfg = staging
    values = real_values(dsn)
    out = tmp_path / "masking.json"
    r = run_cli("--config", str(cfg), "anonymize", "staging", "--report", str(out),
                env={"PREFECT_API_URL": prefect_api})
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["ok"] and {c["column"] for c in data["columns"] if c["table"] == "users"} == set(MASKED["users"])
    assert f"masking report written to {out}" in r.stdout and "distinct before" in r.stdout
    assert "masking report for staging: 11 masked columns, 2 of 2 unique columns still unique" in r.stdout
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        artifact = {a.key: a for a in client.read_latest_artifacts()}["masking-report-staging"]
    assert "# Masking report: staging" in artifact.data and "| users | email | faker email unique" in artifact.data
    for text in (out.read_text(), r.stdout, r.stderr, artifact.data):
        assert_no_secret(text, values, dsn)


def test_report_paths_that_cannot_be_written_are_refused(tmp_path):
    (tmp_path / "locked").mkdir(mode=0o500)
    for path, message in [(tmp_path, "is a folder; name a file in it"),
                          (tmp_path / "r.csv", "name it .json (JSON) or .md (Markdown)"),
                          (tmp_path / "no" / "r.md", f"folder {tmp_path / 'no'} does not exist")] + (
            [] if os.geteuid() == 0 else [(tmp_path / "locked" / "r.json", "is not writable")]):
        with pytest.raises(BadInput, match=re.escape(message)):
            check_report_path(str(path))
    assert check_report_path(str(tmp_path / "r.MD")) == tmp_path / "r.MD"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["locked"]


@pytest.mark.parametrize("args, message", [  # through the command: exit 2, one line, nothing written
    (["staging", "--report", "{tmp}/missing/r.json"], "folder {tmp}/missing does not exist"),
    (["staging", "{tmp}/r.json"], "unexpected argument {tmp}/r.json; to write a masking report there, add --report"),
    (["nope", "--report", "{tmp}/r.json"], "unknown environment 'nope'"),
])
def test_bad_input_writes_nothing(staging, tmp_path, args, message):
    dsn, cfg = staging
    folder = tmp_path / "out"
    folder.mkdir()
    before = checksums(dsn)
    r = run_cli("--config", str(cfg), "anonymize", *[a.format(tmp=folder) for a in args])
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message.format(tmp=folder) in lines[0], lines
    assert list(folder.iterdir()) == [] and checksums(dsn) == before
