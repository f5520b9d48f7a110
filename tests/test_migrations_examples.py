"""The example revisions in migrations/, the round trip, plan and lint, on a real PostgreSQL."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest

from dataops.dev.sample_app import SCHEMA_REVISION, create_schema, seed
from dataops.errors import BadInput, OperationFailed
from dataops.tasks import pg
from dataops.tasks.migration.lint import lint
from dataops.tasks.migration.migrate import (
    MigrationTarget,
    downgrade,
    new_revision,
    plan,
    plan_text,
    read_current,
    revisions,
    round_trip,
    stamp,
    status,
    upgrade,
)
from dataops.tasks.schema import catalog_snapshot, diff_snapshots, fingerprint

REPO_MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def migrations_copy(tmp_path: Path, **extra: str) -> Path:
    """The repository's migrations plus extra revision files {file name: source}."""
    dest = tmp_path / "migrations"
    shutil.copytree(REPO_MIGRATIONS, dest, ignore=shutil.ignore_patterns("__pycache__"))
    for name, source in extra.items():
        (dest / "versions" / f"{name}.py").write_text(textwrap.dedent(source))
    return dest


def snapshot(dsn):
    with pg.connect(dsn) as conn:
        return catalog_snapshot(conn)


def test_create_schema_is_exactly_revision_0002(make_db):
    built, migrated = make_db("built"), make_db("migr")
    create_schema(built)
    upgrade(MigrationTarget(migrated, REPO_MIGRATIONS), SCHEMA_REVISION)
    a, b = snapshot(built), snapshot(migrated)
    assert fingerprint(a) == fingerprint(b), (
        "tasks/sample_app.py's schema no longer equals migrations at 0002; change the sample schema through a new "
        f"revision instead: {[str(d) for d in diff_snapshots(a, b, 'create_schema', 'migrated')][:5]}")


def test_every_example_revision_round_trips(db):
    steps = round_trip(MigrationTarget(db, REPO_MIGRATIONS))
    assert [s.revision for s in steps] == [r.revision for r in revisions(REPO_MIGRATIONS)]
    assert all(s.ok for s in steps), [s.problems for s in steps if not s.ok]
    assert read_current(db) == revisions(REPO_MIGRATIONS)[-1].revision


def test_round_trip_catches_a_downgrade_that_leaves_something_behind(db, tmp_path):
    path = migrations_copy(tmp_path, **{"0009_sloppy": '''
        """adds a column and an index, forgets the index on the way down"""
        from alembic import op
        revision = "0009"
        down_revision = "0008"
        transactional = True
        def upgrade():
            op.execute("ALTER TABLE public.products ADD COLUMN weight numeric")
            op.execute("CREATE TABLE public.shipments (id int PRIMARY KEY, note text)")
        def downgrade():
            op.execute("ALTER TABLE public.products DROP COLUMN weight")
    '''})
    steps = round_trip(MigrationTarget(db, path))
    assert [s.ok for s in steps] == [True] * 8 + [False]
    assert "table public.shipments missing in before upgrade" in steps[-1].problems[0]


def test_examples_on_seeded_data_keep_every_row(make_db):
    """0003..0008 on a seeded database: backfill fills every order, NOT NULL holds, down restores the rows."""
    dsn = make_db("data")
    create_schema(dsn)
    seed(dsn, users=150, seed=3)
    mt = MigrationTarget(dsn, REPO_MIGRATIONS)
    stamp(mt, SCHEMA_REVISION)
    from dataops.tasks.migration.checks import inspect_database

    before = inspect_database(dsn)
    result = upgrade(mt)
    assert result.from_revision == "0002" and result.revisions == ["0003", "0004", "0005", "0006", "0007", "0008"]
    with pg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM orders WHERE tax_amount IS NULL").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM orders WHERE tax_amount = round(amount * 0.08, 2)").fetchone()[0] \
            == conn.execute("SELECT count(*) FROM orders").fetchone()[0]
        assert conn.execute("""SELECT attnotnull FROM pg_attribute
                               WHERE attrelid = 'orders'::regclass AND attname = 'tax_amount'""").fetchone()[0]
        assert conn.execute("SELECT count(*) FROM pg_constraint WHERE conname = 'orders_tax_amount_not_null'"
                            ).fetchone()[0] == 0
        assert conn.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = 'users_email_verified_at_idx'::regclass"
                            ).fetchone()[0]
    downgrade(mt, SCHEMA_REVISION)
    after = inspect_database(dsn)
    assert (after.fingerprint, after.checksums) == (before.fingerprint, before.checksums)


def test_plan_renders_sql_without_touching_the_database(db):
    create_schema(db)
    mt = MigrationTarget(db, REPO_MIGRATIONS)
    stamp(mt, "0002")
    with pg.connect(db) as conn:
        fp = fingerprint(catalog_snapshot(conn))
    plans = plan(mt, "0004")
    assert [p.revision for p in plans] == ["0003", "0004"]
    text = plan_text(plans)
    assert "ADD COLUMN email_verified boolean NOT NULL DEFAULT false" in text
    assert "CREATE INDEX CONCURRENTLY users_email_verified_at_idx" in text
    assert "(not transactional: runs outside a transaction)" in text
    assert read_current(db) == "0002"
    with pg.connect(db) as conn:
        assert fingerprint(catalog_snapshot(conn)) == fp
        assert conn.execute("SELECT to_regclass('public.users') IS NOT NULL AND NOT EXISTS ("
                            "SELECT FROM pg_attribute WHERE attrelid = 'users'::regclass AND attname = 'email_verified')"
                            ).fetchone()[0]


def test_status_and_target_errors(db):
    mt = MigrationTarget(db, REPO_MIGRATIONS)
    st = status(mt)
    assert st.current is None and st.head == "0008" and len(st.pending) == 8
    upgrade(mt, "0003")
    st = status(mt)
    assert (st.current, [r.revision for r in st.applied]) == ("0003", ["0001", "0002", "0003"])
    with pytest.raises(BadInput, match="revision '0042' does not exist"):
        upgrade(mt, "0042")
    with pytest.raises(BadInput, match="past 0002; use `dataops migrate .* down --to 0002`"):
        upgrade(mt, "0002")
    with pytest.raises(BadInput, match="--to REV .* or --steps N"):
        downgrade(mt)
    assert downgrade(mt, steps=2).revisions == ["0003", "0002"]
    assert read_current(db) == "0001"


def test_a_failing_transactional_revision_leaves_nothing_of_itself(db, tmp_path):
    path = migrations_copy(tmp_path, **{"0009_fails_halfway": '''
        """adds a column, fills it, then fails"""
        from alembic import op
        revision = "0009"
        down_revision = "0008"
        transactional = True
        def upgrade():
            op.execute("ALTER TABLE public.users ADD COLUMN nickname text")
            op.execute("UPDATE public.users SET nickname = 'x'")
            op.execute("SELECT 1 / 0")
        def downgrade():
            op.execute("ALTER TABLE public.users DROP COLUMN nickname")
    '''})
    mt = MigrationTarget(db, path)
    upgrade(mt, "0008")
    fp = fingerprint(snapshot(db))
    with pytest.raises(OperationFailed, match="upgrade of revision 0009 .* failed: division by zero; nothing of it was applied"):
        upgrade(mt)
    assert read_current(db) == "0008" and fingerprint(snapshot(db)) == fp


def test_new_revision_has_both_functions_and_lint_flags_it_until_written(db, tmp_path):
    path = migrations_copy(tmp_path)
    created = new_revision(path, "Add orders.discount")
    assert created.name == "0009_add_orders_discount.py"
    source = created.read_text()
    assert 'revision = "0009"' in source.replace("'", '"') and 'down_revision = "0008"' in source.replace("'", '"')
    assert "def upgrade()" in source and "def downgrade()" in source and "transactional = True" in source
    with pytest.raises(BadInput, match="revision 0009 .* cannot be rendered: NotImplementedError"):
        plan(MigrationTarget(db, path), current="0008")
    created.write_text(source.replace('raise NotImplementedError("write upgrade() with op.execute(...)")',
                                      'op.execute("ALTER TABLE public.orders ADD COLUMN discount numeric")'))
    findings = lint(plan(MigrationTarget(db, path), current="0008"))
    assert [(f.revision, f.rule, f.blocks) for f in findings] == [("0009", "missing-downgrade", True)]


def test_example_revisions_pass_lint(db):
    findings = lint(plan(MigrationTarget(db, REPO_MIGRATIONS), current=None))
    assert not [f for f in findings if f.blocks]
    # the baseline's integer identity keys are the only advice (squawk says the same)
    assert [(f.revision, f.rule, f.severity, f.statement.split(" (")[0]) for f in findings] == [
        ("0001", "prefer-bigint-key", "warning", f"CREATE TABLE public.{t}") for t in
        ("categories", "products", "feature_flags")]


BAD = {
    "ALTER TABLE public.users ADD COLUMN nick text NOT NULL": "add-not-null-column-without-default",
    "ALTER TABLE public.users ADD COLUMN token uuid DEFAULT gen_random_uuid()": "add-column-volatile-default",
    "CREATE INDEX users_phone_idx ON public.users (phone)": "index-not-concurrent",
    "CREATE INDEX CONCURRENTLY users_phone_idx ON public.users (phone)": "concurrently-in-transaction",
    "ALTER TABLE public.orders ALTER COLUMN amount TYPE numeric(14,2)": "column-type-change",
    "ALTER TABLE public.users DROP COLUMN address": "drop-column",
    "ALTER TABLE public.users RENAME COLUMN phone TO phone_number": "rename-column",
    "ALTER TABLE public.products RENAME TO items": "rename-table",
    "DROP TABLE public.settings": "drop-table",
    "ALTER TABLE public.orders ADD CONSTRAINT orders_amount_positive CHECK (amount > 0)": "constraint-not-valid",
    "ALTER TABLE public.audit_logs ADD CONSTRAINT audit_fk FOREIGN KEY (user_id) REFERENCES public.users (id)":
        "constraint-not-valid",
    "ALTER TABLE public.feature_flags ALTER COLUMN description SET NOT NULL": "set-not-null-scan",
}
GOOD = [
    "ALTER TABLE public.users ADD COLUMN nick text",
    "ALTER TABLE public.users ADD COLUMN active boolean NOT NULL DEFAULT true",
    "ALTER TABLE public.orders ADD CONSTRAINT orders_amount_positive CHECK (amount > 0) NOT VALID",
    # a table created in the plan is new and empty: its index and foreign key need no care
    "CREATE TABLE public.shipments (id bigint PRIMARY KEY, order_id bigint NOT NULL REFERENCES public.orders (id)); "
    "CREATE INDEX shipments_order_id_idx ON public.shipments (order_id)",
]


def _one_statement_revision(tmp_path, sql: str, allow: str = "") -> Path:
    return migrations_copy(tmp_path, **{"0009_under_test": f'''
        """one statement"""
        from alembic import op
        revision = "0009"
        down_revision = "0008"
        transactional = True
        {allow}
        def upgrade():
            op.execute({sql!r})
        def downgrade():
            op.execute("SELECT 1")
    '''})


@pytest.mark.parametrize("sql, rule", BAD.items(), ids=list(BAD.values()))
def test_lint_flags_with_reason_and_alternative(tmp_path, sql, rule):
    path = _one_statement_revision(tmp_path, sql)
    findings = [f for f in lint(plan(MigrationTarget(None, path), current="0008")) if f.revision == "0009"]
    assert [f.rule for f in findings] == [rule]
    f = findings[0]
    assert f.statement.startswith(sql.split(" (")[0][:30]) and f.reason and f.alternative


@pytest.mark.parametrize("sql", GOOD)
def test_lint_passes_safe_statements(tmp_path, sql):
    path = _one_statement_revision(tmp_path, sql)
    assert lint(plan(MigrationTarget(None, path), current="0008")) == []


def test_lint_allow_comment_and_usage_of_a_dropped_column(db, tmp_path):
    create_schema(db)
    path = _one_statement_revision(tmp_path, "ALTER TABLE public.users DROP COLUMN email", "# dataops: allow=drop-column")
    from dataops.tasks.migration.lint import usage_lookup

    with pg.connect(db, autocommit=True) as conn:
        findings = lint(plan(MigrationTarget(db, path), current="0008"), dependents=usage_lookup(conn))
    assert [(f.rule, f.allowed, f.blocks) for f in findings] == [("drop-column", True, False)]
    assert "still used by view public.user_order_totals" in findings[0].reason


def test_dev_up_leaves_both_databases_at_0002_and_configures_migrations(tmp_path):
    import tempfile

    from dataops.dev.stack import dev_down, dev_up
    from dataops.settings import load_settings

    root = Path(tempfile.mkdtemp(prefix="domig-"))  # short: the unix socket path must stay under ~100 bytes
    try:
        stack = dev_up(root, users=20, store="file", config_path=root / "dataops.yaml")
        settings = load_settings(stack.config_path)
        assert settings.migrations_dir == REPO_MIGRATIONS and settings.migrations.allow_auto_approve
        assert read_current(stack.pg_dsn_production) == read_current(stack.pg_dsn_staging) == "0002"
        assert [r.revision for r in status(MigrationTarget(stack.pg_dsn_production, REPO_MIGRATIONS)).pending] \
            == ["0003", "0004", "0005", "0006", "0007", "0008"]
    finally:
        dev_down(root)
        shutil.rmtree(root, ignore_errors=True)


def test_migration_and_alert_settings_are_checked_when_read(tmp_path):
    from dataops.errors import ConfigError
    from dataops.settings import parse_settings

    base = {"environments": {"production": {"role": "production", "database_url": "postgresql://u@h/app"}},
            "storage": {"url": "file:///tmp/x"}}
    s = parse_settings(base, source=str(tmp_path / "dataops.yaml"), env={})
    assert (s.migrations.lock_timeout, s.migrations.lock_retries, s.migrations.allow_auto_approve) == ("5s", 3, False)
    assert s.migrations_dir == tmp_path / "migrations"  # relative to the config file
    with pytest.raises(ConfigError, match=r"migrations.lock_timeout: '5 seconds' is not a PostgreSQL duration"):
        parse_settings({**base, "migrations": {"lock_timeout": "5 seconds"}}, env={})
    with pytest.raises(ConfigError, match=r"migrations.lock_timout: unknown key; did you mean 'lock_timeout'\?"):
        parse_settings({**base, "migrations": {"lock_timout": "5s"}}, env={})
    with pytest.raises(ConfigError, match=r"alerts.webhook_url: must be an http\(s\) URL"):
        parse_settings({**base, "alerts": {"webhook_url": "ftp://x"}}, env={})
