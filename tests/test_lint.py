"""Migration lint beyond the corpus: the rule table in docs/, squawk's rule list, SQL run outside
dataops, the revision graph, allow comments, and table sizes on a real PostgreSQL."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

from dataops.settings import MigrationSettings
from dataops.tasks import pg
from dataops.tasks.migration import migrate
from dataops.tasks.migration.lint import LiveDatabase, heads_finding, lint, lint_sql
from dataops.tasks.migration.lint_rules import PEERS, RULES, SQUAWK_NOT_ADOPTED, rules_markdown, squawk_rules_covered
from dataops.tasks.migration.migrate import MigrationTarget, plan

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "lint-rules.md"

# Every rule squawk 2.66.0 knows: each name is accepted by `squawk --include=<name>` (unused-ignore
# is reported but cannot be included).
SQUAWK_266 = """
adding-field-with-default adding-foreign-key-constraint adding-not-nullable-field adding-required-field
adding-serial-primary-key-field ban-alter-domain-with-add-constraint ban-char-field
ban-concurrent-index-creation-in-transaction ban-create-domain-with-constraint ban-drop-column ban-drop-database
ban-drop-not-null ban-drop-table ban-duplicate-column-assignments ban-truncate-cascade ban-uncommitted-transaction
changing-column-type constraint-missing-not-valid disallowed-unique-constraint identifier-too-long
prefer-bigint-over-int prefer-bigint-over-smallint prefer-identity prefer-repack prefer-robust-stmts
prefer-text-field prefer-timestamp-tz renaming-column renaming-table require-concurrent-index-creation
require-concurrent-index-deletion require-concurrent-partition-detach require-concurrent-reindex
require-enum-value-ordering require-lock-timeout require-statement-timeout require-table-schema
require-timeout-settings transaction-nesting unused-ignore
""".split()


def test_docs_table_is_the_code_s_table():
    text = DOC.read_text()
    block = text[text.index("<!-- BEGIN RULES"):].split("\n", 1)[1].split("<!-- END RULES -->")[0]
    assert block.strip() == rules_markdown().strip(), \
        "docs/lint-rules.md is out of date: paste `python -m dataops.tasks.migration.lint_rules` between the markers"
    documented = {line.split("`")[1] for line in block.splitlines() if line.startswith("| `")}
    assert set(RULES) <= documented and set(PEERS) == set(RULES)
    assert documented - set(RULES) == set(SQUAWK_NOT_ADOPTED)  # the second table: squawk names


def test_every_squawk_rule_has_a_rule_or_a_reason():
    covered = squawk_rules_covered()
    assert sorted(set(SQUAWK_266) - set(covered)) == []
    assert sorted(set(covered) - set(SQUAWK_266)) == []  # no misspelt squawk names in PEERS


def _rules(findings) -> list[str]:
    return [f.rule for f in findings if not f.allowed]


def test_sql_run_outside_dataops_needs_lock_timeout_and_a_commit():
    bare = "ALTER TABLE public.users ADD COLUMN nick text;\nCREATE INDEX i ON public.users (nick);"
    assert _rules(lint_sql(bare)) == ["lock-timeout", "index-not-concurrent"]
    assert _rules(lint_sql("SET lock_timeout = '3s';\n" + bare)) == ["index-not-concurrent"]
    assert _rules(lint_sql("SET lock_timeout = '3s'; BEGIN; ALTER TABLE public.users ADD COLUMN nick text;")) == \
        ["transaction-control"]
    assert _rules(lint_sql("SELECT 1; INSERT INTO public.t VALUES (1);")) == []  # no strong lock taken


def test_identifier_length_is_counted_in_bytes():
    name = "ü" * 32  # 32 characters, 64 bytes: PostgreSQL cuts it
    assert _rules(lint_sql(f'SET lock_timeout = 1000; CREATE TABLE public."{name}" (id bigint)')) == \
        ["identifier-too-long"]
    assert _rules(lint_sql(f'SET lock_timeout = 1000; CREATE TABLE public."{"ü" * 31}" (id bigint)')) == []
    # statements after non-ASCII text are cut where they are (pglast counts characters)
    found = lint_sql("SET lock_timeout = 1000; COMMENT ON TABLE public.t IS 'déjà vu'; DROP TABLE public.t;")
    assert [(f.rule, f.statement) for f in found] == [("drop-table", "DROP TABLE public.t")]


def _migrations(tmp_path: Path, **revisions: str) -> Path:
    dest = tmp_path / "migrations"
    shutil.copytree(ROOT / "migrations", dest, ignore=shutil.ignore_patterns("__pycache__"))
    for name, source in revisions.items():
        (dest / "versions" / f"{name}.py").write_text(textwrap.dedent(source))
    return dest


def _revision(rev: str, down: str, sql: str, allow: str = "") -> str:
    return f'''
        """{rev}"""
        from alembic import op
        revision = "{rev}"
        down_revision = "{down}"
        transactional = True
        {allow}
        def upgrade():
            op.execute({sql!r})
        def downgrade():
            op.execute("SELECT 1")
    '''


def test_two_heads_are_a_finding(tmp_path):
    path = _migrations(tmp_path, **{"0009_a": _revision("0009", "0008", "SELECT 1"),
                                    "0010_b": _revision("0010", "0008", "SELECT 1")})
    f = heads_finding(path)
    assert (f.rule, f.blocks) == ("multiple-heads", True) and "0009, 0010" in f.reason
    assert heads_finding(ROOT / "migrations") is None


def test_an_allow_that_names_nothing_that_fired_is_a_warning(tmp_path):
    path = _migrations(tmp_path, **{"0009_x": _revision("0009", "0008", "ALTER TABLE public.users ADD COLUMN n text",
                                                        "# dataops: allow=drop-column,no-such-rule")})
    findings = lint(plan(MigrationTarget(None, path), current="0008"))
    assert [(f.rule, f.severity, f.statement) for f in findings] == [
        ("unused-allow", "warning", "# dataops: allow=drop-column"),
        ("unused-allow", "warning", "# dataops: allow=no-such-rule")]


def test_plan_in_one_alembic_run_is_the_plan_revision_by_revision():
    mt = MigrationTarget(None, ROOT / "migrations")
    revs = migrate.upgrade_path(mt, None)
    at_once = migrate._plan_at_once(mt, revs)
    one_by_one = [migrate._plan_at_once(mt, [r]) or migrate.plan(mt, r.revision, current=r.down_revision)[0]
                  for r in revs]
    assert at_once is not None and len(at_once) == len(revs) == 8
    assert [(p.revision, p.sql) for p in at_once] == [(p.revision, p.sql) for p in one_by_one]


@pytest.fixture
def sized_db(db):
    with pg.connect(db, autocommit=True) as conn:
        conn.execute("""CREATE TABLE public.tiny (id bigint PRIMARY KEY, note text);
                        INSERT INTO public.tiny SELECT g, 'n' FROM generate_series(1, 10) g;
                        CREATE TABLE public.big (id bigint, note text);
                        INSERT INTO public.big SELECT g, repeat('x', 100) FROM generate_series(1, 5000) g;
                        CREATE SCHEMA "Odd Schema";
                        CREATE TABLE "Odd Schema"."Mixed Case" (id bigint);
                        INSERT INTO "Odd Schema"."Mixed Case" VALUES (1), (2), (3);""")
        conn.execute("ANALYZE public.tiny")  # big is never analyzed: its rows are counted
    return db


def test_findings_carry_table_size_and_small_tables_can_be_warnings(sized_db, tmp_path):
    sql = ("CREATE INDEX tiny_note ON public.tiny (note); CREATE INDEX big_note ON public.big (note); "
           "ALTER TABLE public.tiny DROP COLUMN note")
    path = _migrations(tmp_path, **{"0009_x": _revision("0009", "0008", sql)})
    plans = plan(MigrationTarget(sized_db, path), current="0008")
    with pg.connect(sized_db, autocommit=True) as conn:
        plain = lint(plans, live=LiveDatabase(conn))
        relaxed = lint(plans, live=LiveDatabase(conn), small_table_rows=100)
    assert [(f.rule, f.table, f.rows, f.severity) for f in plain] == [
        ("index-not-concurrent", "public.tiny", 10, "error"),
        ("index-not-concurrent", "public.big", 5000, "error"),
        ("drop-column", "public.tiny", 10, "error")]
    assert "[public.big: about 5,000 rows, " in plain[1].reason and plain[1].size.endswith("kB")
    # under 100 rows the index build is a warning; dropping a column breaks running code at any size
    assert [(f.rule, f.severity, f.blocks) for f in relaxed] == [
        ("index-not-concurrent", "warning", False), ("index-not-concurrent", "error", True),
        ("drop-column", "error", True)]
    assert "under migrations.lint_small_table_rows = 100" in relaxed[0].reason
    with pg.connect(sized_db, autocommit=True) as conn:  # quoted names of an odd schema and table
        odd = lint_sql('SET lock_timeout = 1000; CREATE INDEX ON "Odd Schema"."Mixed Case" (id);',
                       live=LiveDatabase(conn))
    assert [(f.rule, f.table, f.rows) for f in odd] == [("index-not-concurrent", '"Odd Schema"."Mixed Case"', 3)]


def test_setting_is_off_by_default_and_checked():
    assert MigrationSettings().lint_small_table_rows is None
    assert MigrationSettings(lint_small_table_rows=1000).lint_small_table_rows == 1000
    with pytest.raises(ValueError):
        MigrationSettings(lint_small_table_rows=0)


def _config(tmp_path: Path, dsn) -> Path:
    cfg = tmp_path / "dataops.yaml"
    cfg.write_text(yaml.safe_dump({"environments": {"app": {"role": "staging", "database_url": dsn.secret()}},
                                   "storage": {"url": f"file://{tmp_path / 'unused'}"},
                                   "migrations": {"path": str(ROOT / "migrations")}}))
    return cfg


def test_cli_lints_a_sql_file_with_sizes(sized_db, tmp_path):
    cfg = _config(tmp_path, sized_db)
    sql = tmp_path / "hotfix.sql"
    sql.write_text("ALTER TABLE public.big ALTER COLUMN note TYPE varchar(200);\n")
    r = run_cli("--config", str(cfg), "migrate", "app", "lint", "--sql", str(sql), "--json")
    assert r.returncode == 1, r.stderr
    found = json.loads(r.stdout)
    assert [(f["rule"], f["table"], f["rows"]) for f in found] == [("lock-timeout", None, None),
                                                                   ("column-type-change", "public.big", 5000)]
    assert "lint found 2 error(s)" in r.stderr


@pytest.mark.extended
def test_cli_refuses_a_missing_sql_file(db, tmp_path):
    cfg = _config(tmp_path, db)
    before = sorted(p.name for p in tmp_path.iterdir())
    r = run_cli("--config", str(cfg), "migrate", "app", "lint", "--sql", str(tmp_path / "nope.sql"))
    assert r.returncode == 2 and "cannot read" in r.stderr and "give --sql an SQL file" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


REAL = Path(__file__).resolve().parent / "real"


@pytest.mark.parametrize("script, expected", [
    ("pagila/pagila-schema.sql.xz", {"char-field"}),
    ("pagila/pagila-data.sql.xz", set()),
    ("chinook/Chinook_PostgreSql.sql.xz", {"drop-database", "psql-meta-command", "prefer-bigint-key"}),
    ("employees/employee.sql.xz", {"psql-meta-command", "drop-table", "prefer-bigint-key"}),
    ("northwind/northwind.sql.xz", {"drop-table"}),
])
def test_the_public_sample_databases_scripts_are_linted_whole(script, expected):
    """psql scripts as their authors publish them: meta-commands (\\c, \\i, \\echo) and COPY ... FROM
    stdin data made each file one unparsable statement, so nothing in it was checked. An index on a
    materialized view and the ownership of a sequence the same script created are not locks on
    anything another session holds."""
    import lzma

    from dataops.tasks.migration.lint import lint_sql

    findings = lint_sql(lzma.decompress((REAL / script).read_bytes()).decode(), name=script)
    rules = {f.rule for f in findings}
    assert "unparsable-sql" not in rules and expected <= rules, rules
    assert not [f for f in findings if f.rule == "index-not-concurrent"]  # pagila's rental_by_category: new
    assert all("_seq" not in f.statement for f in findings if f.rule == "lock-timeout"), findings
    if script.startswith("employees"):
        assert sorted(f.statement for f in findings if f.rule == "psql-meta-command")[0].startswith("\\i load_")


def test_psql_lines_are_set_aside_only_outside_dollar_quotes():
    from dataops.tasks.migration.lint import strip_psql

    text = ("\\set ON_ERROR_STOP on\nCREATE FUNCTION f() RETURNS text AS $body$\n\\not a command\n$body$ LANGUAGE sql;\n"
            "COPY t (a) FROM stdin;\n1\tx\n\\.\nCREATE INDEX i ON t (a);\n\\i more.sql\n")
    sql, skipped = strip_psql(text)
    lines = sql.split("\n")
    assert lines[0] == "" and lines[2] == "\\not a command" and lines[5] == lines[6] == ""
    assert lines[7] == "CREATE INDEX i ON t (a);" and skipped == ["\\i more.sql"]
    assert len(lines) == len(text.split("\n"))
