"""Real parts for every test: PostgreSQL (embedded pgserver, or DATAOPS_TEST_DATABASE_URL),
an S3-compatible HTTP server on 127.0.0.1 (moto's server mode), and one Prefect test
harness per session (it takes ~15 s to start, so never one per test).
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
import uuid
from pathlib import Path

import pytest

_runtime = Path(tempfile.gettempdir()) / f"dataops-runtime-{os.getuid()}"
_runtime.mkdir(mode=0o700, exist_ok=True)
os.environ.setdefault("XDG_RUNTIME_DIR", str(_runtime))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# The local Prefect API that flow commands start when no server is named (dataops.local_api): the
# session's own, in a folder of its own, stopped at the end (and by itself if the session dies).
_OWN_STATE_DIR = None if os.environ.get("DATAOPS_STATE_DIR") else tempfile.mkdtemp(prefix="dataops-state-")
os.environ.setdefault("DATAOPS_STATE_DIR", _OWN_STATE_DIR or "")
os.environ.setdefault("DATAOPS_LOCAL_API_IDLE_S", "300")

from dataops.dsn import Dsn  # noqa: E402
from dataops.tasks import pg  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _restore_environ():
    """Tests may set environment variables; none leaks into the next test."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session", autouse=True)
def _stop_local_api():
    """No test session leaves a local Prefect API running."""
    yield
    from dataops import local_api

    local_api.stop()
    if _OWN_STATE_DIR:
        import shutil

        shutil.rmtree(_OWN_STATE_DIR, ignore_errors=True)


# -- PostgreSQL -------------------------------------------------------------------------

@pytest.fixture(scope="session")
def pg_server_dsn(tmp_path_factory) -> Dsn:
    """A DSN to the maintenance database of a real server: external if named, else embedded."""
    external = os.environ.get("DATAOPS_TEST_DATABASE_URL")
    if external:
        yield Dsn(external)
        return
    import pgserver

    # pgserver needs a short path: the unix socket path is limited to ~100 bytes.
    pgdata = Path(tempfile.mkdtemp(prefix="dopg-"))
    srv = pgserver.get_server(pgdata, cleanup_mode="delete")
    yield Dsn(srv.get_uri("postgres"))
    srv.cleanup()


@pytest.fixture
def make_db(pg_server_dsn):
    """Factory for fresh, randomly named databases, dropped after the test."""
    created: list[str] = []

    def make(prefix: str = "t") -> Dsn:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        pg.create_database(pg_server_dsn, name)
        created.append(name)
        return pg_server_dsn.with_database(name)

    yield make
    for name in created:
        for leftover in (name, pg.previous_name(name)):
            pg.drop_database(pg_server_dsn, leftover)


@pytest.fixture
def db(make_db) -> Dsn:
    return make_db()


# -- S3 ---------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A new, empty bucket for this test."""
    import boto3

    name = f"b-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_client(s3_endpoint):
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


# -- Prefect ----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def prefect_api():
    """One temporary Prefect server for the whole session; yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


# -- dataops.yaml for a test --------------------------------------------------------------

@pytest.fixture
def write_config(tmp_path, s3_endpoint):
    """Write a dataops.yaml for this test; returns its path. Environments map name -> (role, Dsn)."""
    import yaml

    def write(environments: dict, *, bucket: str | None = None, storage: dict | None = None,
              backups: dict | None = None, extra: dict | None = None, name: str = "dataops.yaml") -> Path:
        body = {
            "environments": {n: {"role": role, "database_url": dsn if isinstance(dsn, str) else dsn.secret()}
                             for n, (role, dsn) in environments.items()},
            "storage": storage or {"url": f"s3://{bucket}/backups", "endpoint_url": s3_endpoint,
                                   "region": "us-east-1", "access_key_id": "testing",
                                   "secret_access_key": "${TEST_S3_SECRET:-testing}"},
        }
        if backups:
            body["backups"] = backups
        body.update(extra or {})
        path = tmp_path / name
        path.write_text(yaml.safe_dump(body, sort_keys=False))
        return path

    return write


def stop_process(proc, timeout: float) -> None:
    """Ask a child to stop, then kill it if it has not within `timeout` seconds."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 240):
    """Run the real `dataops` command in a subprocess; returns CompletedProcess (text)."""
    import subprocess
    import sys

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "dataops.cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)


# -- a real Prefect server and an alert receiver ------------------------------------------

@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """`prefect server start` on a free port (not the test harness): deployments, workers,
    automations and the UI behave as they do for the team."""
    import subprocess
    import sys
    import time
    import urllib.request

    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "PREFECT_API_URL": "", "PREFECT_UI_URL": f"http://127.0.0.1:{port}",
           "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}
    log = open(home / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 90
    while True:
        try:
            if urllib.request.urlopen(url + "/health", timeout=1).read() == b"true":
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield {"url": url, "home": str(home), "ui": f"http://127.0.0.1:{port}"}
    stop_process(proc, 15)
    log.close()


@pytest.fixture
def webhook_receiver():
    """An HTTP endpoint on 127.0.0.1 that records every JSON body it gets (the demo's receiver)."""
    from dataops.dev.alert_receiver import AlertReceiver

    with AlertReceiver() as rx:
        yield {"url": rx.url, "received": rx.received, "receiver": rx}


@pytest.fixture(scope="session")
def deployed(prefect_server):
    """The embedded stack, its deployments on the real server, and a worker polling the pool.

    Shared by the deployment-run and browser tests (deploying and starting a worker costs
    about half a minute); tests that change it say so and tolerate each other's changes."""
    import subprocess
    import sys

    import yaml

    from dataops.dev.stack import dev_down, dev_up

    root = Path(tempfile.mkdtemp(prefix="dodep-"))
    cfg = root / "dataops.yaml"
    stack = dev_up(root, users=150, s3_port=free_port(), config_path=cfg)
    data = yaml.safe_load(cfg.read_text())
    data["migrations"]["approval_poll_s"] = 1
    cfg.write_text("# Written by `dataops dev up` (edited by the test)\n" + yaml.safe_dump(data, sort_keys=False))
    env = {"PREFECT_API_URL": prefect_server["url"]}
    worker = None
    try:
        r = run_cli("--config", str(cfg), "deploy", env=env, timeout=400)
        assert r.returncode == 0, r.stderr[-3000:]
        worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", "dataops-process", "--type", "process"],
            env={**os.environ, **env, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5",
                 "DATAOPS_CONFIG": str(cfg)},
            cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        yield {"stack": stack, "config": cfg, "server": prefect_server}
    finally:
        if worker:
            stop_process(worker, 20)
        dev_down(root)


# -- make test runs a fixed sample of the crash matrix; make test-crash the rest, with the fault and signal
# tests (marked `extended`); CI runs both, and make test stays under 15 minutes on 2 cores -------------

EXTENDED = pytest.mark.extended


def answer_approval(client, flow_run_id, run_input: dict, timeout: float = 60) -> None:
    """Resume a paused migration with an answer, as a person does: only once its form exists.
    Prefect sets the run Paused first and saves the form's schema just after; an answer in between
    makes the flow's own save of the schema fail (409, "a flow run input with this key already
    exists"), so wait for the schema as the UI does before it shows the form."""
    from prefect.flow_runs import resume_flow_run

    from dataops.flows.migrate_database import APPROVAL_KEY

    deadline = time.monotonic() + timeout
    while True:
        try:
            client.read_flow_run_input(flow_run_id, f"paused-{APPROVAL_KEY}-schema")  # keyset_from_paused_state
            break
        except Exception:  # noqa: BLE001 - not there yet (404)
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    resume_flow_run(flow_run_id, run_input=run_input)


def sampled(values, sample) -> list:
    """Parameters of a crash test: those in `sample` run in `make test` (CI), the others carry the
    extended mark and run in `make test-crash`. Restore and verify cells are all sampled."""
    return [v if v in sample else pytest.param(*(v if isinstance(v, tuple) else (v,)), marks=EXTENDED)
            for v in values]


# -- the crash matrix's counts, printed at the end of every run ------------------------------------

def pytest_terminal_summary(terminalreporter):
    """How much of the crash matrix ran: failpoints in the code, and the kill-and-recover cells of
    tests/test_crash_*.py that passed and failed (CI's log shows it after every run)."""
    stats = terminalreporter.stats
    cells = {k: [r for r in stats.get(k, []) if getattr(r, "when", "call") == "call" and "test_crash_" in r.nodeid]
             for k in ("passed", "failed")}
    if not (cells["passed"] or cells["failed"]):
        return
    try:
        from test_failpoints import failpoints_in_code

        points = len(failpoints_in_code())
    except Exception:  # noqa: BLE001 - the count is a report, never a failure
        points = "?"
    terminalreporter.write_line(f"crash matrix: {points} failpoints in the code; {len(cells['passed'])} crash cells "
                                f"passed, {len(cells['failed'])} failed")
