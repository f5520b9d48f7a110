"""A refresh killed with SIGKILL in the middle of the copy leaves staging as it was, and the
next run discards the half-built copy it left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from test_refresh_staging import ANON, checksums, rows, run_refresh, scratch_databases

from dataops.dev.sample_app import create_schema, seed
from dataops.settings import load_settings
from dataops.tasks import pg
from dataops.tasks.refresh.steps import SCRATCH_TAG

RUN = ("from dataops.settings import load_settings; from dataops.tasks.refresh.plan import resolve_environments; "
       "from dataops.tasks.refresh.steps import refresh; s = load_settings({!r}); "
       "refresh(s, *resolve_environments(s, None, None))")


def test_kill_mid_copy_leaves_staging_intact_and_next_run_discards_the_copy(make_db, write_config, pg_server_dsn):
    prod, stg = make_db("prod"), make_db("stg")
    create_schema(prod)
    seed(prod, users=200)
    with pg.connect(prod) as conn:  # a big masked table, so the copy takes seconds
        conn.execute("CREATE TABLE events (id bigint PRIMARY KEY, user_id bigint REFERENCES users (id), "
                     "contact_email text)")
        conn.execute("INSERT INTO events SELECT g, 1 + g % 200, 'p' || g || '@example.com' "
                     "FROM generate_series(1, 200000) g")
        conn.commit()
    create_schema(stg)
    seed(stg, users=50, seed=7)
    before = checksums(stg)
    anon = {**ANON, "rules": {**ANON["rules"], "events": {"contact_email": {"hash": {}}}}}
    cfg = write_config({"production": ("production", prod), "staging": ("staging", stg)}, extra={"anonymize": anon})

    proc = subprocess.Popen([sys.executable, "-c", RUN.format(str(cfg))], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        loading = _wait_for_load_into_copy(pg_server_dsn, proc)
        os.killpg(proc.pid, signal.SIGKILL)  # the refresh and its copy workers
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert 1000 < loading < 200000  # killed in the middle of the big table's COPY, not after it

    # staging untouched and usable; the half-built copy is still there
    assert checksums(stg) == before
    assert rows(stg, "SELECT count(*) FROM users")[0][0] == 50
    left = scratch_databases(pg_server_dsn)
    assert len(left) == 1 and left[0].startswith(stg.database[:30] + SCRATCH_TAG)

    report = run_refresh(load_settings(cfg))
    assert report.cleaned == left and scratch_databases(pg_server_dsn) == []
    assert rows(stg, "SELECT count(*) FROM events")[0][0] == 200000 and report.leaks.ok
    assert rows(stg, "SELECT count(*) FROM events WHERE strpos(contact_email, '@') > 0")[0][0] == 0


def _wait_for_load_into_copy(server, proc, timeout: float = 120) -> int:
    """Rows loaded so far by a COPY into the scratch database, once there are some."""
    deadline = time.monotonic() + timeout
    with pg.connect(server.with_database("postgres"), autocommit=True) as conn:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"the refresh ended before it could be killed: {proc.stderr.read().decode()[-500:]}")
            found = conn.execute(
                """SELECT p.tuples_processed FROM pg_stat_progress_copy p JOIN pg_database d ON d.oid = p.datid
                   WHERE strpos(d.datname, %s) > 0 AND p.command = 'COPY FROM' AND p.tuples_processed > 1000
                   ORDER BY 1 DESC LIMIT 1""", (SCRATCH_TAG,)).fetchone()
            if found:
                return found[0]
            time.sleep(0.02)
    raise AssertionError("no COPY into the new copy seen")
