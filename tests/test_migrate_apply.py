"""Applying revisions on a live database: lock timeouts and retries, the migration lock."""

from __future__ import annotations

import logging
import threading
import time

import psycopg
import pytest
from test_migrations_examples import REPO_MIGRATIONS, migrations_copy

from dataops.dev.sample_app import create_schema
from dataops.errors import OperationFailed
from dataops.settings import MigrationSettings
from dataops.tasks import pg
from dataops.tasks.migration.migrate import LOCK_KEY, MigrationTarget, downgrade, read_current, stamp, upgrade

FAST_RETRIES = MigrationSettings(lock_timeout="200ms", lock_retries=2, lock_retry_delay_s=0.2)


def lock_held(dsn) -> bool:
    """Looks without taking the lock (trying it would race the run being watched)."""
    with pg.connect(dsn, autocommit=True) as conn:
        return conn.execute("""SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted
                               AND classid = %s AND objid = %s AND database = (
                                   SELECT oid FROM pg_database WHERE datname = current_database())""",
                            LOCK_KEY).fetchone()[0] > 0


@pytest.fixture
def at_0002(db):
    create_schema(db)
    stamp(MigrationTarget(db, REPO_MIGRATIONS), "0002")
    return db


@pytest.fixture
def users_locked(at_0002):
    """Another session holding ACCESS EXCLUSIVE on users (what 0003 alters), as a long transaction would."""
    blocker = psycopg.connect(at_0002.conninfo(application_name="blocker"))
    blocker.execute("LOCK TABLE public.users IN ACCESS EXCLUSIVE MODE")
    yield blocker
    blocker.close()


def test_locked_table_times_out_retries_and_gives_up(at_0002, users_locked, caplog):
    mt = MigrationTarget(at_0002, REPO_MIGRATIONS, FAST_RETRIES, "prod")
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="dataops.migrate"):
        with pytest.raises(OperationFailed, match=r"upgrade of revision 0003 on prod could not get its table locks "
                                                  r"within lock_timeout \(200ms\) in 3 attempts: .*lock timeout"):
            upgrade(mt, "0003")
    elapsed = time.monotonic() - t0
    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 2  # bounded: 1 + lock_retries attempts
    assert 3 * 0.2 + 0.2 + 0.4 <= elapsed < 60  # waited and backed off, and did not hang
    assert read_current(at_0002) == "0002"
    assert not lock_held(at_0002)  # released by the failed run


def test_lock_released_between_attempts_lets_the_retry_succeed(at_0002, users_locked):
    class ReleaseOnRetry(logging.Handler):
        def emit(self, record):
            if "retrying" in record.getMessage():
                users_locked.rollback()  # the long transaction ends while we back off

    logger = logging.getLogger("dataops.migrate")
    handler = ReleaseOnRetry(level=logging.WARNING)
    logger.addHandler(handler)
    try:
        result = upgrade(MigrationTarget(at_0002, REPO_MIGRATIONS, FAST_RETRIES), "0003")
    finally:
        logger.removeHandler(handler)
    assert [(s.revision, s.attempts) for s in result.steps] == [("0003", 2)]
    assert read_current(at_0002) == "0003"


def test_concurrent_up_applies_each_revision_once_and_the_loser_names_the_holder(at_0002, tmp_path):
    path = migrations_copy(tmp_path, **{"0009_slow": '''
        """a slow revision, so that the two runs overlap"""
        from alembic import op
        revision = "0009"
        down_revision = "0008"
        transactional = True
        def upgrade():
            op.execute("CREATE TABLE public.applied_once (id int PRIMARY KEY)")
            op.execute("INSERT INTO public.applied_once VALUES (1)")
            op.execute("SELECT pg_sleep(2)")
        def downgrade():
            op.execute("DROP TABLE public.applied_once")
    '''})
    results: dict[str, object] = {}

    def run(name: str) -> None:
        t0 = time.monotonic()
        try:
            results[name] = upgrade(MigrationTarget(at_0002, path, label="prod"), who=f"runner-{name}")
        except OperationFailed as exc:
            results[name] = exc
        results[f"{name}-seconds"] = time.monotonic() - t0

    first = threading.Thread(target=run, args=("a",))
    first.start()
    deadline = time.monotonic() + 60
    while not lock_held(at_0002):  # wait until run a holds the lock
        assert time.monotonic() < deadline and first.is_alive()
        time.sleep(0.05)
    run("b")
    first.join(60)

    assert isinstance(results["b"], OperationFailed), results["b"]
    assert "another migration holds the lock on prod (pid " in results["b"].message
    assert "application_name dataops-migrate runner-a" in results["b"].message
    assert first.is_alive() is False and results["b-seconds"] < results["a-seconds"]  # failed fast, did not queue
    assert results["a"].revisions == ["0003", "0004", "0005", "0006", "0007", "0008", "0009"]
    assert read_current(at_0002) == "0009"
    with pg.connect(at_0002) as conn:
        assert conn.execute("SELECT count(*) FROM applied_once").fetchone()[0] == 1


def test_rollback_downgrade_waits_for_the_lock_then_gives_up_naming_the_holder(at_0002):
    """The rollback's downgrade waits (lock_wait_s) for a failed run still letting go of the lock."""
    mt = MigrationTarget(at_0002, REPO_MIGRATIONS, label="prod")
    upgrade(mt, "0003")
    with pg.connect(at_0002, autocommit=True, application_name="failed-run") as holder:
        holder.execute("SELECT pg_advisory_lock(%s, %s)", LOCK_KEY)
        t0 = time.monotonic()
        with pytest.raises(OperationFailed, match=r"another migration holds the lock on prod \(pid .*failed-run"):
            downgrade(mt, "0002", lock_wait_s=2)
        assert 2 <= time.monotonic() - t0 < 30
        assert read_current(at_0002) == "0003"

        threading.Timer(1, holder.execute, ("SELECT pg_advisory_unlock(%s, %s)", LOCK_KEY)).start()
        t0 = time.monotonic()
        result = downgrade(mt, "0002", lock_wait_s=30)
    assert result.revisions == ["0003"] and 1 <= time.monotonic() - t0 < 30
    assert read_current(at_0002) == "0002" and not lock_held(at_0002)


def test_statement_timeout_cancels_a_long_revision(at_0002, tmp_path):
    path = migrations_copy(tmp_path, **{"0009_long": '''
        """too long for statement_timeout"""
        from alembic import op
        revision = "0009"
        down_revision = "0008"
        transactional = True
        def upgrade():
            op.execute("SELECT pg_sleep(5)")
        def downgrade():
            pass
    '''})
    mt = MigrationTarget(at_0002, path, MigrationSettings(statement_timeout="300ms"))
    upgrade(mt, "0008")
    with pytest.raises(OperationFailed, match=r"revision 0009 .* ran longer than statement_timeout \(300ms\)"):
        upgrade(mt)
    assert read_current(at_0002) == "0008"
