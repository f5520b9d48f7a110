"""Commands that start children stop them when they are stopped.

`kill -TERM` of a parent does not reach its children: `dataops server` must stop its Prefect
server and worker itself, and a backup killed mid-dump must take pg_dump and Prefect's
temporary API server with it. Each case runs the real command in a session of its own,
records its whole process tree while it runs, signals the parent only, and then checks that
every process of that tree (and of the sessions involved) is gone, and for the server that
its port can be taken again at once.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from conftest import free_port

from dataops.runtime import WATCHDOG_MARK
from dataops.tasks import pg

STOP_WITHIN_S = 20

pytestmark = pytest.mark.extended  # make test-crash (CI runs it after make test)


_started: list[subprocess.Popen] = []


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(autouse=True)
def _sigint_as_a_terminal_gives_it(monkeypatch):
    """These tests send SIGINT as Ctrl-C would. Started from a background job (`make test-crash &`),
    pytest inherits SIGINT ignored, and so would every process it starts (and StopSignals keeps an
    ignored signal ignored, as a background job expects): the tests then failed for the harness,
    not for dataops. Each test and each process it starts gets SIGINT as a terminal would."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(autouse=True)
def _kill_leftovers():
    """A test failing half-way leaves nothing running for the next one."""
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            try:
                tree = psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                tree = []
            for p in [psutil.Process(proc.pid), *tree]:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            proc.wait()


def start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dataops.cli", *args], env={**os.environ, **env},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_default_sigint)
    _started.append(proc)
    return proc


def wait_healthy(proc: subprocess.Popen, port: int, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=1).read() == b"true":
                return
        except OSError:
            pass
        assert proc.poll() is None, f"exited {proc.returncode}: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"no server on {port}: {log.read_text()[-2000:]}"
        time.sleep(0.3)


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return found


def running(p: psutil.Process) -> bool:
    """Alive and not a zombie (a zombie is dead; its parent or init reaps it)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def describe(p: psutil.Process) -> str:
    try:
        return f"{p.pid} {' '.join(p.cmdline()[:5])}"
    except psutil.Error:
        return f"{p.pid} (gone)"


def sessions_members(sids: set[int]) -> list[psutil.Process]:
    left = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) in sids and running(p):
                left.append(p)
        except OSError:
            pass
    return left


def stop_and_check(proc: subprocess.Popen, sig: int, tree: list[psutil.Process], *, send: bool = True) -> int:
    """Signal the parent only (unless `send` is false: sent already); returns its exit code once
    it, every process of `tree` and every process of their sessions are gone."""
    sids = {proc.pid}
    for p in tree:
        try:
            sids.add(os.getsid(p.pid))
        except OSError:
            pass
    t0 = time.monotonic()
    if send:
        os.kill(proc.pid, sig)
    try:
        rc = proc.wait(STOP_WITHIN_S)
    except subprocess.TimeoutExpired:
        rc = None
    psutil.wait_procs(tree, timeout=max(0.1, STOP_WITHIN_S - (time.monotonic() - t0)))
    left = {p.pid: p for p in [*tree, *sessions_members(sids)] if running(p)}
    described = sorted(describe(p) for p in left.values())
    for p in left.values():  # leave nothing behind for the next test, even when failing
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    if rc is None:
        proc.kill()
        proc.wait()
    assert rc is not None, f"the parent did not exit within {STOP_WITHIN_S} s of {signal.Signals(sig).name}"
    assert described == [], f"left running after {signal.Signals(sig).name} to the parent: {described}"
    return rc


def bindable(port: int) -> bool:
    """What a server does to listen: SO_REUSEADDR, so only a listener (not TIME_WAIT) is in the way."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
        return True


def test_server_stops_its_server_and_worker(tmp_path, write_config):
    """SIGTERM (systemd, docker stop) to `dataops server`: exit 0, no Prefect server or worker
    left, the port free, and a second `dataops server` on that port starts and stops by Ctrl-C."""
    cfg = write_config({"dev": ("development", "postgresql://app@127.0.0.1:1/app")}, bucket="unused")
    port = free_port()
    env = {"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": ""}
    args = ["--config", str(cfg), "server", "--port", str(port), "--no-deploy"]

    for attempt, sig in enumerate((signal.SIGTERM, signal.SIGINT)):
        log = tmp_path / f"server{attempt}.log"
        proc = start(args, log, env)
        wait_healthy(proc, port, log)
        kids = server_children(proc)
        assert len([k for k in kids if WATCHDOG_MARK in k.cmdline()]) == 1  # it goes too, having nothing to do
        rc = stop_and_check(proc, sig, kids)
        assert rc == 0, log.read_text()[-2000:]
        assert f"{signal.Signals(sig).name}: stopping the worker and the server" in log.read_text()
        assert bindable(port), f"port {port} still taken"


def server_children(proc: subprocess.Popen) -> list[psutil.Process]:
    """The whole tree of a `dataops server` once its worker runs: its Prefect server and worker
    (asserted), the watchdog of its OrphanGuard, and their children."""
    def started():
        direct = [k for k in psutil.Process(proc.pid).children() if WATCHDOG_MARK not in k.cmdline()]
        return len(direct) == 2 and psutil.Process(proc.pid).children(recursive=True)

    kids = wait_for(started, 30, "the worker")
    names = sorted(" ".join(k.cmdline()[3:5]) for k in kids if k.ppid() == proc.pid and WATCHDOG_MARK not in k.cmdline())
    assert names == ["server start", "worker start"], names
    return kids


def test_server_killed_with_sigkill_takes_its_server_and_worker_with_it(tmp_path, write_config):
    """kill -9 (the OOM killer, a stuck host's kill) runs no handler and no `finally`: its children,
    in sessions of their own, are signalled by nothing. The server's watchdog sees its pipe end,
    stops both groups (SIGTERM, then SIGKILL: a worker whose server is gone does not stop on
    SIGTERM), and the port can be taken again."""
    cfg = write_config({"dev": ("development", "postgresql://app@127.0.0.1:1/app")}, bucket="unused")
    port = free_port()
    log = tmp_path / "server.log"
    proc = start(["--config", str(cfg), "server", "--port", str(port), "--no-deploy"], log,
                 {"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": ""})
    wait_healthy(proc, port, log)
    kids = server_children(proc)
    children = [k for k in kids if k.ppid() == proc.pid and WATCHDOG_MARK not in k.cmdline()]
    rc = stop_and_check(proc, signal.SIGKILL, kids)
    assert rc == -signal.SIGKILL
    assert all(not running(k) for k in children)
    assert bindable(port), f"port {port} still taken"


def test_a_busy_port_is_refused(tmp_path, write_config):
    """A port something listens on would answer the health check for a server that never
    started; the command says so instead."""
    cfg = write_config({"dev": ("development", "postgresql://app@127.0.0.1:1/app")}, bucket="unused")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "dataops.cli", "--config", str(cfg), "server", "--port", str(port),
                            "--no-deploy"], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")})
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.startswith(f"error: port {port} on 127.0.0.1 is in use"), r.stderr


def test_backup_stopped_mid_dump_leaves_no_pg_dump_or_temporary_api(db, s3_bucket, write_config, tmp_path):
    """No PREFECT_API_URL, so the backup runs on Prefect's temporary API (a uvicorn child).
    The parent is frozen while pg_dump is blocked on its full pipe, so the SIGTERM surely lands
    mid-dump; then both children must go with it."""
    with pg.connect(db, autocommit=True) as conn:  # ~15 MB of dump: far more than the 1 MiB pipe
        conn.execute("CREATE TABLE big AS SELECT g AS id, md5(g::text) AS a, md5((g + 1)::text) AS b "
                     "FROM generate_series(1, 200000) g")
    cfg = write_config({"production": ("production", db)}, bucket=s3_bucket,
                       extra={"prefect": {"local_api": False}})  # Prefect's temporary API, not dataops' local one
    log = tmp_path / "backup.log"
    env = {"PREFECT_HOME": str(tmp_path / "prefect")}
    proc = start(["--config", str(cfg), "backup", "production"], log, {**env, "PREFECT_API_URL": ""})
    parent = psutil.Process(proc.pid)

    def dumping():
        try:
            return next((c for c in parent.children(recursive=True)
                         if c.name() == "pg_dump" and "--format=custom" in c.cmdline()), None)
        except psutil.NoSuchProcess:
            return None

    dump = wait_for(dumping, 90, f"pg_dump to start: {log.read_text()[-2000:]}")
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        time.sleep(0.5)  # pg_dump fills the pipe nobody reads and waits on it
        tree = parent.children(recursive=True)
        assert dump in tree and dump.status() != psutil.STATUS_ZOMBIE
        assert any("uvicorn" in c.cmdline() for c in tree), [c.cmdline()[:4] for c in tree]
        os.kill(proc.pid, signal.SIGTERM)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    rc = stop_and_check(proc, signal.SIGTERM, tree, send=False)
    assert rc == 143, log.read_text()[-2000:]
    assert "Traceback" not in log.read_text(), log.read_text()[-2000:]
    with pg.connect(db, autocommit=True) as conn:  # its lock went with its connection
        wait_for(lambda: conn.execute("SELECT count(*) = 0 FROM pg_locks WHERE locktype = 'advisory' AND database "
                                      "= (SELECT oid FROM pg_database WHERE datname = current_database())").fetchone()[0],
                 5, "the backup's advisory lock to go")


def test_a_child_that_ignores_sigterm_is_killed_with_its_group():
    """The grace period ends in SIGKILL to the whole group: a child deaf to SIGTERM (and its own
    child, which inherits the deafness) is gone too, within a second of the grace."""
    from dataops.deployments.register import StopSignals, start_child, stop_child

    procs = []
    script = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              "subprocess.Popen(['sleep', '60']); print('ready', flush=True); time.sleep(60)")
    with StopSignals() as stop:
        child = start_child(procs, stop, [sys.executable, "-c", script], stdout=subprocess.PIPE)
        assert child.stdout.readline() == b"ready\n" and procs == [child]
        tree = psutil.Process(child.pid).children(recursive=True) + [psutil.Process(child.pid)]
        assert os.getsid(child.pid) == child.pid != os.getsid(0)
        t0 = time.monotonic()
        stop_child(child, grace=0.5)
        took = time.monotonic() - t0
    assert child.returncode == -signal.SIGKILL
    gone, alive = psutil.wait_procs(tree, timeout=2)
    assert [p for p in alive if p.status() != psutil.STATUS_ZOMBIE] == []
    assert 0.5 <= took < 1.5, took


def test_a_stop_signal_waits_for_the_child_being_started_and_a_second_one_hurries():
    from dataops.deployments.register import StopRequested, StopSignals

    with StopSignals() as stop:
        try:
            with stop.held():  # as while Popen runs: the child must be on the list first
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                reached = True
            raise AssertionError("no StopRequested after the held section")
        except StopRequested as req:
            assert reached and req.signum == signal.SIGTERM and str(req) == "SIGTERM"
        stop.stopping()
        os.kill(os.getpid(), signal.SIGINT)  # while stopping: no exception, only hurry
        time.sleep(0.05)
        assert stop.hurry
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
