"""The local Prefect API (dataops.local_api): started once by the first flow command when no
Prefect server is named, reused by the next ones with the runs' history kept, one server for two
commands started together, a stale record recovered, stopped by `local-api stop`, `dev down` and
its idle timeout; read-only commands start nothing at all, and a named server is used as is.

Each test has its own state folder; the commands run as a user runs them, in subprocesses with
neither PREFECT_API_URL nor prefect.api_url set.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import run_cli
from test_migrations_examples import migrations_copy
from test_refresh_staging import ANON

from dataops import local_api
from dataops.cli.app import FLOWS, OWN_API, READ_ONLY, app
from dataops.dev.sample_app import create_schema


@pytest.fixture
def world(make_db, write_config, tmp_path):
    """A dataops.yaml naming no Prefect server, a fresh state folder, and the env to run commands in;
    every local API the test started is stopped afterwards."""
    prod, stg = make_db("lprod"), make_db("lstg")
    create_schema(prod)
    create_schema(stg)
    cfg = write_config({"production": ("production", prod), "staging": ("staging", stg)},
                       storage={"url": f"file://{tmp_path}/store"},
                       extra={"migrations": {"path": str(migrations_copy(tmp_path))},
                              "transforms": {"path": str(Path(__file__).resolve().parents[1] / "transforms")},
                              "anonymize": ANON})
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(DATAOPS_STATE_DIR=str(state), DATAOPS_LOCAL_API_IDLE_S="600")
    yield {"cfg": cfg, "state": state, "env": env, "prod": prod}
    local_api.stop(state)
    assert servers(state) == []


def dataops(w, *args: str, env: dict | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "dataops.cli", "--config", str(w["cfg"]), *args], capture_output=True,
                       text=True, env={**w["env"], **(env or {})}, timeout=300)
    if ok:
        assert r.returncode == 0, r.stderr
    return r


def servers(state: Path) -> list[int]:
    """Pids of live local API servers for this state folder, from /proc."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            status = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if local_api.MARK.encode() in args and str(state).encode() in args and status not in (b"Z", b"X"):
            found.append(int(pid))
    return found


def record(state: Path) -> dict | None:
    path = state / "local-api.json"
    return json.loads(path.read_text()) if path.exists() else None


def flow_runs(url: str, name: str) -> list[dict]:
    """The flow runs of flow `name` the server knows, with their state."""
    def post(path: str, body: dict) -> list[dict]:
        req = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    flows = post("/flows/filter", {"flows": {"name": {"any_": [name]}}})
    if not flows:
        return []
    return post("/flow_runs/filter", {"flows": {"id": {"any_": [flows[0]["id"]]}}})


def wait_until(what, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if what():
            return True
        time.sleep(0.2)
    return what()


def test_every_command_is_read_only_or_runs_flows():
    """A new command is placed on purpose: read-only (starts nothing) or needing a Prefect API."""
    import typer.main

    import dataops.cli.main  # noqa: F401  (registers every command)

    root = typer.main.get_command(app)
    keys = set()
    for name, cmd in root.commands.items():
        sub = getattr(cmd, "commands", None)
        keys |= {f"{name} {s}" for s in sub} if sub else {name}
    assert keys - READ_ONLY - FLOWS - OWN_API == set()
    assert READ_ONLY & FLOWS == READ_ONLY & OWN_API == FLOWS & OWN_API == set()
    assert {"refresh-staging", "refresh-staging --check"} <= FLOWS | READ_ONLY


def test_read_only_commands_start_nothing(world):
    """With Prefect's temporary API forbidden too, these pass: they need no API at all, and leave no
    server, record or state folder behind."""
    no_api = {"PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "false"}
    out = {}
    for args in (["migrate", "production", "status"], ["migrate", "production", "plan"],
                 ["migrate", "production", "lint"], ["backups", "production"], ["transform", "production", "list"],
                 ["refresh-staging", "--check"], ["local-api", "status"]):
        r = dataops(world, *args, env=no_api, ok=False)
        assert r.returncode == 0, (args, r.stderr)
        out[args[0] if args[0] != "migrate" else args[2]] = r.stdout
    assert "8 pending" in out["status"] and "no backups of production yet" in out["backups"]
    assert "ready" in out["refresh-staging"].splitlines()[-1] and "not running" in out["local-api"]
    assert not world["state"].exists() and servers(world["state"]) == []
    # a flow command refused for its own parameters starts nothing either: exit 2 and one line
    for args in (["migrate", "production", "up", "--to", "nosuchrev"], ["migrate", "staging", "down", "--to", "nosuchrev"]):
        r = dataops(world, *args, env=no_api, ok=False)
        assert r.returncode == 2 and "nosuchrev" in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    assert not world["state"].exists() and servers(world["state"]) == []
    # a flow command, with the same prohibition, does need an API: the check above can fail
    assert dataops(world, "backup", "staging", env={**no_api, "DATAOPS_LOCAL_API_IDLE_S": "x"}, ok=False).returncode == 2


@pytest.mark.extended
def test_started_once_reused_recovered_and_stopped(world, tmp_path):
    state = world["state"]
    # two first commands at once: one server (backups of two environments: two of one are refused by its lock)
    procs = [subprocess.Popen([sys.executable, "-m", "dataops.cli", "--config", str(world["cfg"]), "backup", env],
                              env=world["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for env in ("staging", "production")]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    first = record(state)
    assert servers(state) == [first["pid"]]
    assert (state / "local-api.log").read_text().count("starting on port") == 1
    assert (Path(first["home"]) / "prefect.db").exists()

    # the next command reuses it; the runs of the first two are in its history
    dataops(world, "backup", "staging")
    assert record(state)["pid"] == first["pid"]
    url = f"http://127.0.0.1:{first['port']}/api"
    runs = flow_runs(url, "backup-database")
    assert len(runs) == 3 and {r["state_type"] for r in runs} == {"COMPLETED"}
    status = dataops(world, "local-api", "status").stdout
    assert f"pid {first['pid']}" in status and url in status

    # a named server is used as is: nothing started in another state folder
    other = tmp_path / "other-state"
    dataops(world, "backup", "staging", env={"PREFECT_API_URL": url, "DATAOPS_STATE_DIR": str(other)})
    assert not other.exists() and len(flow_runs(url, "backup-database")) == 4

    # a killed server leaves a stale record: the next command starts a new one on the same history
    os.killpg(first["pid"], signal.SIGKILL)
    assert wait_until(lambda: servers(state) == [], 10)
    dataops(world, "backup", "staging")
    second = record(state)
    assert second["pid"] != first["pid"] and servers(state) == [second["pid"]]
    runs = flow_runs(f"http://127.0.0.1:{second['port']}/api", "backup-database")
    assert len(runs) == 5

    # stopped on request, and by dev down
    r = dataops(world, "local-api", "stop")
    assert f"pid {second['pid']}" in r.stdout and servers(state) == [] and record(state) is None
    assert dataops(world, "local-api", "stop").stdout.strip() == "nothing was running"
    dataops(world, "backup", "staging")
    third = record(state)
    assert servers(state) == [third["pid"]]
    r = run_cli("dev", "down", "--root", str(tmp_path / "no-stack"), env={"DATAOPS_STATE_DIR": str(state)})
    assert r.returncode == 0 and f"the local Prefect API (pid {third['pid']}" in r.stdout
    assert servers(state) == [] and record(state) is None


@pytest.mark.extended
def test_stops_itself_when_idle_but_not_under_a_command(world):
    state = world["state"]
    dataops(world, "backup", "staging", env={"DATAOPS_LOCAL_API_IDLE_S": "3"})
    rec = record(state)
    assert servers(state) == [rec["pid"]]
    # a command in progress holds it in use (as a long backup does): no stop however old the stamp
    with open(state / "in-use.lock", "a+") as held:
        import fcntl

        fcntl.flock(held, fcntl.LOCK_SH)
        os.utime(state / "last-used", (time.time() - 60, time.time() - 60))
        time.sleep(5)
        assert servers(state) == [rec["pid"]]
    assert wait_until(lambda: servers(state) == [], 60)
    assert record(state) is None
    assert "idle for" in (state / "local-api.log").read_text()
