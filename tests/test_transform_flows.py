"""run-transform and revert-transform on a real Prefect server, and the `dataops transform` CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import run_cli

from dataops.dev.sample_app import create_schema, seed
from dataops.errors import OperationFailed
from dataops.settings import load_settings
from dataops.tasks import pg
from dataops.tasks.checksums import table_checksum
from dataops.tasks.transform.engine import status, transform

ROOT = Path(__file__).resolve().parent.parent



def config(tmp_path: Path, dsn, transforms: Path = ROOT / "transforms", extra: dict | None = None) -> str:
    path = tmp_path / "dataops.yaml"
    path.write_text(yaml.safe_dump({
        "environments": {"dev": {"role": "development", "database_url": dsn.secret()}},
        "storage": {"url": (tmp_path / "backups").as_uri()},
        "transforms": {"path": str(transforms), "batch_size": 50},
        **(extra or {}),
    }))
    return str(path)


@pytest.fixture
def app(make_db):
    dsn = make_db("xff")
    create_schema(dsn)
    seed(dsn, users=300)
    return dsn


def checksum(dsn, table: str) -> str:
    with pg.connect(dsn) as conn:
        return table_checksum(conn, "public", table).checksum


def latest_artifacts() -> dict:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {a.key: a for a in client.read_latest_artifacts()}


def test_run_transform_flow_completes_with_progress_and_counts(prefect_api, app, tmp_path):
    from dataops.flows.run_transform import run_transform

    cfg = config(tmp_path, app)
    state = run_transform("dev", "users_split_full_name", workers=2, config=cfg, return_state=True)
    assert state.is_completed(), state.message
    s = state.result()
    assert s["status"] == "completed" and s["ranges"] == 2 and s["changed"] + s["invalid"] == 300
    art = latest_artifacts()
    assert art["transform-users-split-full-name-dev-progress"].data == 100.0
    table = art["transform-users-split-full-name-dev"].data
    assert "skipped as invalid" in table and f"e.g. keys {', '.join(s['invalid_examples'])}" in table
    assert f"longest transaction {s['longest_tx_s']:.3f} s (bound 1 s)" in art["transform-users-split-full-name-dev-details"].data

    # what a server-side automation on every failed run would start: it leaves a good run alone
    from dataops.flows.revert_transform import revert_transform

    after = checksum(app, "users")
    assert revert_transform("dev", "users_split_full_name", only_if_checks_failed=True, config=cfg)["status"] == \
        "nothing to revert"
    assert checksum(app, "users") == after


def test_failed_checks_revert_the_run_through_the_failure_hook(prefect_api, app, tmp_path):
    """A transform that breaks a validation check passes every batch, then is undone."""
    from dataops.flows.run_transform import run_transform

    folder = tmp_path / "transforms"
    folder.mkdir()
    (folder / "tax_twice.py").write_text(
        '"""Wrong on purpose: tax above the amount."""\nTABLE = "orders"\nWHERE = "tax_amount IS NULL"\n'
        'SET = {"tax_amount": "amount * 2"}\nSNAPSHOT = ["tax_amount"]\n')
    with pg.connect(app) as conn:
        conn.execute("ALTER TABLE orders ADD COLUMN tax_amount numeric(12,2)")
        conn.commit()
    cfg = config(tmp_path, app, folder, extra={"validation": {"custom": [
        {"name": "tax below amount", "sql": "SELECT id FROM orders WHERE tax_amount > amount", "table": "orders"}]}})
    original = checksum(app, "orders")

    state = run_transform("dev", "tax_twice", config=cfg, return_state=True)

    assert state.is_failed() and "checks after tax_twice on dev failed: validation: FAIL custom" in state.message
    settings = load_settings(cfg)
    runs = status(settings, settings.env("dev"), "tax_twice")["runs"]
    assert [(r["action"], r["status"]) for r in runs] == [("revert", "completed"), ("run", "reverted")]
    assert runs[1]["changed"] > 0 and runs[0]["changed"] == runs[1]["changed"]
    assert checksum(app, "orders") == original


def test_verify_failure_marks_the_run_and_blocks_a_new_one_until_reverted(app, tmp_path):
    folder = tmp_path / "transforms"
    folder.mkdir()
    (folder / "shout.py").write_text('TABLE = "users"\nSET = {"last_name": "upper(full_name)"}\n'
                                     'SNAPSHOT = ["last_name", "updated_at"]\n'
                                     'VERIFY = "SELECT id FROM users WHERE last_name = upper(full_name) AND full_name <> \'\'"\n')
    settings = load_settings(config(tmp_path, app, folder))
    original = checksum(app, "users")
    with pytest.raises(OperationFailed, match=r"VERIFY of shout returned rows, e\.g\. \d+"):
        transform(settings, settings.env("dev"), "shout")
    from dataops.errors import BadInput
    from dataops.tasks.transform.engine import revert

    with pytest.raises(BadInput, match="failed its checks and is not reverted; revert it first"):
        transform(settings, settings.env("dev"), "shout")
    revert(settings, settings.env("dev"), "shout")
    assert checksum(app, "users") == original


def test_cli_list_run_status_revert(prefect_api, app, tmp_path):
    import shutil

    folder = tmp_path / "transforms"
    shutil.copytree(ROOT / "transforms", folder, ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "audit_fix.py").write_text('"""A fix of a table without a key."""\nTABLE = "audit_raw"\n'
                                         'SET = {"note": "upper(note)"}\n')
    with pg.connect(app) as conn:
        conn.execute("CREATE TABLE audit_raw (at timestamptz, note text); INSERT INTO audit_raw VALUES (now(), 'x')")
        conn.commit()
    cfg = config(tmp_path, app, folder)
    env = {"PREFECT_API_URL": prefect_api}
    original = checksum(app, "users")

    listed = run_cli("--config", cfg, "transform", "dev", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    for name in ("users_split_full_name", "user_emails_normalize", "orders_backfill_tax_amount"):
        assert name in listed.stdout
    assert "never" in listed.stdout

    ran = run_cli("--config", cfg, "transform", "dev", "run", "users_split_full_name", "--workers", "2", env=env)
    assert ran.returncode == 0, ran.stderr
    assert "users_split_full_name on dev: completed (run 1)" in ran.stdout
    assert "skipped as invalid (e.g. keys " in ran.stdout and "bound 1 s" in ran.stdout

    st = run_cli("--config", cfg, "transform", "dev", "status", "users_split_full_name", env=env)
    assert st.returncode == 0 and "run 1: completed, 300 of 300 rows" in st.stdout, st.stdout + st.stderr

    back = run_cli("--config", cfg, "transform", "dev", "revert", "users_split_full_name", env=env)
    assert back.returncode == 0, back.stderr
    assert "revert of users_split_full_name on dev: completed (revert 2)" in back.stdout
    assert checksum(app, "users") == original

    too_many = run_cli("--config", cfg, "transform", "dev", "run", "users_split_full_name", "--workers", "65", env=env)
    assert too_many.returncode == 2
    assert too_many.stderr.startswith("error: workers: Input should be less than or equal to 64 (got 65)"), too_many.stderr

    missing = run_cli("--config", cfg, "transform", "dev", "run", "orders_backfill_tax_amount", env=env)
    assert missing.returncode == 2
    assert missing.stderr.startswith('error: column "tax_amount" does not exist in table "public.orders"; '
                                     "run the migration that adds it first"), missing.stderr

    keyless = run_cli("--config", cfg, "transform", "dev", "run", "audit_fix", env=env)
    assert keyless.returncode == 2, keyless.stderr
    assert keyless.stderr.startswith('error: table "public.audit_raw" has no primary key and no unique index on NOT '
                                     "NULL columns, so a transform cannot walk it in batches; add a primary key "
                                     "(ALTER TABLE public.audit_raw ADD PRIMARY KEY (...))"), keyless.stderr
    assert "Traceback" not in keyless.stderr and len(keyless.stderr.strip().splitlines()) == 1, keyless.stderr
    with pg.connect(app) as conn:
        assert conn.execute("SELECT note FROM audit_raw").fetchall() == [("x",)]
        assert conn.execute("SELECT count(*) FROM dataops_transforms.runs WHERE transform = 'audit_fix'"
                            ).fetchone() == (0,)
