"""migrate-database and rollback-migration as Prefect flows: real PostgreSQL, S3 and Prefect server."""

from __future__ import annotations

import contextvars
import json
import re
import threading
import time
import uuid

import pytest
from conftest import answer_approval, run_cli
from test_migrations_examples import REPO_MIGRATIONS, migrations_copy

from dataops.dev.alert_receiver import AlertReceiver
from dataops.dev.sample_app import create_schema, seed
from dataops.errors import BadInput, OperationFailed
from dataops.flows.migrate_database import migrate_database
from dataops.flows.rollback_migration import rollback_migration
from dataops.tasks import pg
from dataops.tasks.backup.catalog import list_backups
from dataops.tasks.backup.storage import open_storage
from dataops.tasks.migration.audit import AuditRecord, history, load, save
from dataops.tasks.migration.checks import inspect_database
from dataops.tasks.migration.migrate import MigrationTarget, read_current, stamp, upgrade

EXAMPLES = ["0003", "0004", "0005", "0006", "0007", "0008"]

FAILS_HALFWAY = '''
    """adds a column, fills it, then fails"""
    from alembic import op
    revision = "0009"
    down_revision = "0008"
    transactional = True
    def upgrade():
        op.execute("ALTER TABLE public.users ADD COLUMN nickname text")
        op.execute("UPDATE public.users SET nickname = left(email, 3)")
        op.execute("SELECT 1 / 0")
    def downgrade():
        op.execute("ALTER TABLE public.users DROP COLUMN nickname")
'''


@pytest.fixture
def app_db(make_db):
    """A seeded sample database at revision 0002, as `dev up` leaves it."""
    dsn = make_db("app")
    create_schema(dsn)
    seed(dsn, users=150, seed=5)
    stamp(MigrationTarget(dsn, REPO_MIGRATIONS), "0002")
    return dsn


@pytest.fixture
def configure(app_db, s3_bucket, write_config, tmp_path):
    def make(role: str = "staging", migrations=None, alerts: dict | None = None, **options):
        extra = {"migrations": {"path": str(migrations or REPO_MIGRATIONS), "lock_timeout": "2s",
                                "approval_poll_s": 1, **options}}
        if alerts:
            extra["alerts"] = alerts
        return str(write_config({"app": (role, app_db)}, bucket=s3_bucket, extra=extra))

    return make


def flow_run_state(run_id: str) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(uuid.UUID(run_id)).state.type.value


@pytest.fixture
def receiver():
    with AlertReceiver() as rx:
        yield rx


def test_failed_revision_is_undone_by_the_hook_and_the_rollback_flow(prefect_api, app_db, configure, tmp_path,
                                                                      receiver):
    cfg = configure(migrations=migrations_copy(tmp_path, **{"0009_fails_halfway": FAILS_HALFWAY}),
                    alerts={"webhook_url": receiver.url})
    before = inspect_database(app_db)

    with pytest.raises(OperationFailed, match="upgrade of revision 0009 on app failed: division by zero"):
        migrate_database("app", config=cfg)

    after = inspect_database(app_db)
    assert read_current(app_db) == "0002"
    assert after.fingerprint == before.fingerprint and after.checksums == before.checksums
    rows = history(app_db)
    migration = next(r for r in rows if r.action == "migrate")
    rollback = next(r for r in rows if r.action == "rollback")
    assert (migration.outcome, migration.phase, migration.applied) == ("rolled-back", "applying", EXAMPLES)
    assert migration.backup_id and migration.from_revision == "0002" and "division by zero" in migration.detail
    assert (rollback.parent_run_id, rollback.outcome, rollback.to_revision) == (migration.run_id, "rolled-back", "0002")
    assert rollback.fingerprint_after == before.fingerprint
    assert flow_run_state(migration.run_id) == "FAILED" and flow_run_state(rollback.run_id) == "COMPLETED"
    # a rollback that worked still tells people, as a warning: the migration needs fixing
    assert len(receiver.received) == 1
    alert = receiver.received[0]
    assert (alert["severity"], alert["subject"]) == ("warning", "migration of app failed and was rolled back")
    assert (alert["run_id"], alert["rollback_run_id"], alert["failed"]) == (migration.run_id, rollback.run_id,
                                                                            "at revision 0009")
    assert alert["run_url"].endswith(f"/runs/flow-run/{migration.run_id}")
    assert "failed at revision 0009: upgrade of revision 0009 on app failed: division by zero" in alert["body"]
    assert "downgraded app from 0008 to 0002: undid 0008, 0007, 0006, 0005, 0004, 0003" in alert["body"]
    assert "app is at revision 0002 again" in alert["body"]


def test_rollback_of_a_run_that_never_held_the_lock_touches_nothing_and_sends_nothing(prefect_api, app_db, configure,
                                                                                      receiver):
    cfg = configure(alerts={"webhook_url": receiver.url})
    failed = AuditRecord(run_id=str(uuid.uuid4()), action="migrate", environment="app", who="test", phase="approval",
                         from_revision="0002", backup_id="20990101T000000Z-000000")
    failed.finish("failed", "the approval form could not be read")
    save(app_db, failed)

    r = rollback_migration("app", failed.run_id, config=cfg)

    assert r["outcome"] == "nothing-to-undo" and r["alert_sent"] is None
    assert load(app_db, failed.run_id).outcome == "failed" and read_current(app_db) == "0002"
    assert receiver.wait_for(timeout=0.5) is None


def test_failed_downgrade_falls_back_to_restoring_the_backup(prefect_api, app_db, configure, tmp_path, receiver):
    path = migrations_copy(tmp_path, **{
        "0009_no_way_back": '''
            """applies, but its downgrade fails"""
            from alembic import op
            revision = "0009"
            down_revision = "0008"
            transactional = True
            def upgrade():
                op.execute("CREATE TABLE public.coupons (code text PRIMARY KEY)")
            def downgrade():
                op.execute("DROP TABLE public.no_such_table")
        ''',
        "0010_fails": FAILS_HALFWAY.replace('"0009"', '"0010"').replace('"0008"', '"0009"'),
    })
    cfg = configure(migrations=path, alerts={"webhook_url": receiver.url})
    before = inspect_database(app_db)

    with pytest.raises(OperationFailed, match="revision 0010 .* division by zero"):
        migrate_database("app", config=cfg)

    after = inspect_database(app_db)
    assert read_current(app_db) == "0002"
    assert after.fingerprint == before.fingerprint and after.checksums == before.checksums
    rows = history(app_db)  # written again after the restore brought back the backup's audit table
    migration = next(r for r in rows if r.action == "migrate")
    rollback = next(r for r in rows if r.action == "rollback")
    assert migration.outcome == "restored" and rollback.outcome == "restored"
    assert rollback.backup_id == migration.backup_id and migration.backup_id in rollback.detail
    alert = receiver.wait_for(timeout=0)
    assert alert["severity"] == "warning" and alert["failed"] == "at revision 0010"
    assert alert["subject"] == f"migration of app failed and was rolled back (backup {migration.backup_id} restored)"


def test_rollback_that_cannot_restore_sends_a_critical_alert(prefect_api, app_db, configure, tmp_path,
                                                             webhook_receiver):
    path = migrations_copy(tmp_path, **{"0009_no_way_back": '''
        """its downgrade fails"""
        from alembic import op
        revision = "0009"
        down_revision = "0008"
        transactional = True
        def upgrade():
            op.execute("CREATE TABLE public.coupons (code text PRIMARY KEY)")
        def downgrade():
            op.execute("DROP TABLE public.no_such_table")
    '''})
    cfg = configure(migrations=path, alerts={"webhook_url": webhook_receiver["url"]})
    fp = inspect_database(app_db, checksums=False).fingerprint
    upgrade(MigrationTarget(app_db, path))
    # a migration run that died while applying, whose backup has since gone missing
    failed = AuditRecord(run_id=str(uuid.uuid4()), action="migrate", environment="app", who="test", phase="applying",
                         from_revision="0002", backup_id="20990101T000000Z-000000", fingerprint_before=fp)
    failed.finish("failed", "died")
    save(app_db, failed)

    with pytest.raises(OperationFailed, match="rollback of app failed: restore of backup 20990101T000000Z-000000 "
                                              "failed: .*a critical alert was sent"):
        rollback_migration("app", failed.run_id, config=cfg)

    assert len(webhook_receiver["received"]) == 1
    alert = webhook_receiver["received"][0]
    assert alert["severity"] == "critical" and alert["environment"] == "app" and alert["run_id"] == failed.run_id
    assert "could not be rolled back" in alert["body"] and "downgrade" not in alert["subject"]
    assert load(app_db, failed.run_id).outcome == "rollback-failed"
    assert read_current(app_db) == "0009"  # nothing was half-done by the rollback


def _resume_when_paused(config: str, run_input: dict) -> threading.Thread:
    """Answer the approval form of the paused run of `config`, as a person in the UI would."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    def work():
        deadline = time.monotonic() + 120
        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline:
                paused = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))))
                mine = [r for r in paused if r.parameters.get("config") == config]
                if mine:
                    answer_approval(client, mine[0].id, run_input)
                    return
                time.sleep(0.3)

    thread = threading.Thread(target=contextvars.copy_context().run, args=(work,), daemon=True)
    thread.start()
    return thread


def test_production_waits_for_approval_and_applies_once_approved(prefect_api, app_db, configure):
    cfg = configure(role="production")
    approver = _resume_when_paused(cfg, {"approved": True, "approver": "alice", "comment": "reviewed the plan"})

    r = migrate_database("app", config=cfg)

    approver.join(5)
    assert (r["outcome"], r["applied"], r["to_revision"]) == ("succeeded", EXAMPLES, "0008")
    assert read_current(app_db) == "0008"
    record = load(app_db, r["run_id"])
    assert (record.approver, record.comment, record.outcome, record.phase) == ("alice", "reviewed the plan",
                                                                              "succeeded", "done")
    assert record.backup_id == r["backup_id"] and record.fingerprint_after != record.fingerprint_before
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        artifacts = {a.key: a for a in client.read_latest_artifacts()}
    plan = artifacts["migration-plan-app"].data
    assert "ADD COLUMN email_verified" in plan and "## Lint" in plan
    assert "alice" in artifacts["migration-app"].data


def test_rejected_approval_changes_nothing(prefect_api, app_db, configure):
    cfg = configure(role="production", approval_timeout_s=120)
    before = inspect_database(app_db)
    rejecter = _resume_when_paused(cfg, {"approved": False, "approver": "bob", "comment": "not during the sale"})

    final = migrate_database("app", config=cfg, return_state=True)

    rejecter.join(5)
    assert final.is_cancelled() and "rejected by bob: not during the sale" in final.message
    record = load(app_db, str(final.state_details.flow_run_id))
    assert (record.outcome, record.approver, record.comment) == ("rejected", "bob", "not during the sale")
    assert "nothing was changed" in record.detail and record.phase == "approval"
    assert read_current(app_db) == "0002"
    after = inspect_database(app_db)
    assert (after.fingerprint, after.checksums) == (before.fingerprint, before.checksums)
    # the backup came first, as always; the rejection did not start a rollback
    assert [m.id for m in list_backups(open_storage(_settings(cfg).storage), "app")] == [record.backup_id]
    assert [r.action for r in history(app_db)] == ["migrate"]


def test_unanswered_approval_times_out_and_auto_approve_needs_the_setting(prefect_api, app_db, configure):
    cfg = configure(role="production", approval_timeout_s=2)

    final = migrate_database("app", config=cfg, return_state=True)

    # the server turns an expired pause into Failed ("never resumed"), whatever the run returns
    assert final.is_failed() or final.is_cancelled()
    record = load(app_db, str(final.state_details.flow_run_id))
    assert record.outcome == "timed-out" and record.detail.startswith("no answer within 2 s")
    assert read_current(app_db) == "0002"
    assert [r.action for r in history(app_db)] == ["migrate"]  # stopped unchanged: no rollback started
    with pytest.raises(BadInput, match="auto_approve is honored only with migrations.allow_auto_approve: true"):
        migrate_database("app", auto_approve=True, config=cfg)


def _settings(cfg):
    from dataops.settings import load_settings

    return load_settings(cfg)


def test_two_concurrent_runs_apply_each_revision_once(prefect_api, app_db, configure, tmp_path):
    """Run a (a flow in this process) holds the migration lock, stuck in revision 0009 until the
    test lets it go; run b (the CLI, another process) arrives meanwhile and must fail at once."""
    import psycopg

    cfg = configure(lock_timeout="60s", migrations=migrations_copy(tmp_path, **{"0009_waits": '''
        """waits for the test's go-ahead (advisory lock 4242), so that the second run arrives meanwhile"""
        from alembic import op
        revision = "0009"
        down_revision = "0008"
        transactional = True
        def upgrade():
            op.execute("CREATE TABLE public.applied_once (id int PRIMARY KEY)")
            op.execute("INSERT INTO public.applied_once VALUES (1)")
            op.execute("SELECT pg_advisory_xact_lock(4242)")
        def downgrade():
            op.execute("DROP TABLE public.applied_once")
    '''}))
    gate = psycopg.connect(app_db.conninfo(), autocommit=True)
    gate.execute("SELECT pg_advisory_lock(4242)")
    first: dict = {}
    thread = threading.Thread(target=contextvars.copy_context().run,
                              args=(lambda: first.update(migrate_database("app", config=cfg)),))
    thread.start()
    try:
        deadline = time.monotonic() + 90
        while not gate.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242 "
                               "AND NOT granted").fetchone()[0]:
            assert time.monotonic() < deadline and thread.is_alive(), first
            time.sleep(0.1)

        second = run_cli("--config", cfg, "migrate", "app", "up", env={"PREFECT_API_URL": prefect_api})
    finally:
        gate.close()  # lets run a finish
        thread.join(90)

    assert second.returncode == 1, second.stdout + second.stderr
    assert re.search(r"another migration holds the lock on app \(pid \d+, application_name dataops-migrate",
                     second.stderr), second.stderr
    assert first["outcome"] == "succeeded" and first["applied"] == [*EXAMPLES, "0009"]
    assert read_current(app_db) == "0009"
    runs = [r for r in history(app_db) if r.action == "migrate"]
    assert sorted(r.outcome for r in runs) == ["failed", "succeeded"]
    applied = [rev for r in runs for rev in r.applied]
    assert sorted(applied) == sorted(set(applied)) == [*EXAMPLES, "0009"]  # each revision once, by one run
    loser = next(r for r in runs if r.outcome == "failed")
    assert loser.phase == "preflight" and loser.backup_id is None  # stopped before its backup
    with pg.connect(app_db) as conn:
        assert conn.execute("SELECT count(*) FROM applied_once").fetchone()[0] == 1


def test_cli_status_plan_lint_and_dry_run(prefect_api, app_db, configure, tmp_path):
    path = migrations_copy(tmp_path, **{"0009_drop": '''
        """drops a column"""
        from alembic import op
        revision = "0009"
        down_revision = "0008"
        transactional = True
        def upgrade():
            op.execute("ALTER TABLE public.users DROP COLUMN phone")
        def downgrade():
            op.execute("ALTER TABLE public.users ADD COLUMN phone text")
    '''})
    cfg = configure(migrations=path)
    env = {"PREFECT_API_URL": prefect_api}

    r = run_cli("--config", cfg, "migrate", "app", "status", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) | {} == {"environment": "app", "current": "0002", "head": "0009", "heads": ["0009"],
                                         "applied": ["0001", "0002"], "pending": [*EXAMPLES, "0009"]}

    r = run_cli("--config", cfg, "migrate", "app", "lint", env=env)
    assert r.returncode == 1
    assert "0009 error drop-column: ALTER TABLE public.users DROP COLUMN phone" in r.stdout
    assert "expand/contract" in r.stdout
    assert r.stderr.strip().splitlines()[-1].startswith("error: lint found 1 error(s) in revision(s) 0009")

    r = run_cli("--config", cfg, "migrate", "app", "up", "--dry-run", env=env)
    assert r.returncode == 1 and "preflight of app failed, nothing was changed: lint: 1 error(s)" in r.stderr
    assert read_current(app_db) == "0002"

    r = run_cli("--config", cfg, "migrate", "app", "up", "--to", "0004", env=env)
    assert r.returncode == 0, r.stderr
    assert "app: succeeded: applied 0003, 0004" in r.stdout and read_current(app_db) == "0004"
