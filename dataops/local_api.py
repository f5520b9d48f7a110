"""A local Prefect API that dataops starts once and reuses, so that a flow command does not pay
for a new temporary API (about 10 s of start-up, and the runs' history lost) every time.

Used only when no Prefect server is named (`prefect.api_url` and PREFECT_API_URL unset) and the
command runs a flow. Everything lives in the state folder (`state_dir()`):

- `prefect/`: the server's PREFECT_HOME, with its SQLite database, so runs stay visible;
- `local-api.json`: the record of the running server (pid, port, Prefect version, started-at);
- `start.lock`: held while a command checks the record and starts a server, so that two
  commands started together start one server;
- `in-use.lock`: every command using the server holds it shared for its whole life; the server
  stops only when it can take it exclusively, so it never stops under a running command;
- `last-used`: its mtime is the last use; the server stops itself after `idle_s` without use;
- `local-api.log`: the server's output.

The server is the opposite of the children OrphanGuard watches: it must outlive the command
that starts it, so it runs in a session of its own. It stops itself when idle, and
`dataops local-api stop` (and `dataops dev down`) stop it at once. A record whose process is
gone or does not answer is stale: the next command stops what is left of it and starts a new
server; no wait is unbounded.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from dataops.errors import OperationFailed

STATE_ENV = "DATAOPS_STATE_DIR"
IDLE_ENV = "DATAOPS_LOCAL_API_IDLE_S"
MARK = "dataops-local-api"  # in the server's command line: ps, and the check that a pid is ours
DEFAULT_IDLE_S = 900.0
START_TIMEOUT_S = 120.0  # a new SQLite database takes ~10 s on an idle machine, far more on a busy one
HEALTH_TIMEOUT_S = 5.0


def state_dir() -> Path:
    """$DATAOPS_STATE_DIR, else $XDG_STATE_HOME/dataops, else ~/.local/state/dataops."""
    if os.environ.get(STATE_ENV):
        return Path(os.environ[STATE_ENV]).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base).expanduser() / "dataops"


def idle_seconds(configured: float | None = None) -> float:
    """$DATAOPS_LOCAL_API_IDLE_S, else dataops.yaml's prefect.local_api_idle_s, else 15 minutes."""
    raw = os.environ.get(IDLE_ENV)
    if raw:
        try:
            return max(1.0, float(raw))
        except ValueError:
            from dataops.errors import BadInput

            raise BadInput(f"{IDLE_ENV} must be a number of seconds, not {raw!r}") from None
    return float(configured) if configured else DEFAULT_IDLE_S


def prefect_version() -> str:
    from importlib.metadata import version

    return version("prefect")


@dataclass
class Record:
    pid: int
    port: int
    prefect_version: str
    started_at: str
    idle_s: float
    home: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _record_path(d: Path) -> Path:
    return d / "local-api.json"


def read_record(d: Path | None = None) -> Record | None:
    try:
        return Record(**json.loads(_record_path(d or state_dir()).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _write_record(d: Path, rec: Record) -> None:
    tmp = _record_path(d).with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(rec), indent=2) + "\n")
    os.replace(tmp, _record_path(d))


def _remove_record(d: Path, pid: int) -> None:
    """Only the record of `pid`: a newer server's record stays."""
    rec = read_record(d)
    if rec is not None and rec.pid == pid:
        _record_path(d).unlink(missing_ok=True)


# -- the command's side ------------------------------------------------------------------------

_held: list = []  # open lock files and the server's Popen: kept for the life of this process


def ensure(idle_s: float | None = None, timeout: float = START_TIMEOUT_S) -> Record:
    """The local API's record, started if none answers; marks it in use until this process ends."""
    d = state_dir()
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    _hold_in_use(d, timeout)
    touch(d)
    import atexit

    atexit.register(touch, d)  # idle time counts from the end of the last command
    with _flock(d / "start.lock", fcntl.LOCK_EX, timeout, "another dataops command is starting the local Prefect API"):
        rec = read_record(d)
        if rec is not None:
            if rec.prefect_version == prefect_version() and _is_ours(rec.pid, d) and healthy(rec):
                return rec
            _stop(d, rec)  # stale (gone, not answering) or another Prefect version
        return _start(d, idle_seconds(idle_s), timeout)


def touch(d: Path | None = None) -> None:
    path = (d or state_dir()) / "last-used"
    try:
        path.touch()
    except OSError:
        pass


def healthy(rec: Record, timeout: float = HEALTH_TIMEOUT_S) -> bool:
    try:
        with urllib.request.urlopen(f"{rec.url}/health", timeout=timeout) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError, ValueError):
        return False


def stop(d: Path | None = None, timeout: float = 30.0) -> Record | None:
    """Stop the local API if one runs; returns its record (None if nothing ran)."""
    d = d or state_dir()
    if not _record_path(d).exists():
        return None
    with _flock(d / "start.lock", fcntl.LOCK_EX, timeout, "another dataops command is starting the local Prefect API"):
        rec = read_record(d)
        if rec is None:
            return None
        alive = _is_ours(rec.pid, d)
        _stop(d, rec)
        return rec if alive else None


def _hold_in_use(d: Path, timeout: float) -> None:
    f = open(d / "in-use.lock", "a+")
    _wait_lock(f, fcntl.LOCK_SH, timeout, "the local Prefect API is stopping")
    _held.append(f)


@contextlib.contextmanager
def _flock(path: Path, mode: int, timeout: float, what: str):
    with open(path, "a+") as f:
        _wait_lock(f, mode, timeout, what)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _wait_lock(f, mode: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(f, mode | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise OperationFailed(f"{what} and has not finished in {timeout:.0f} s; see {Path(f.name).parent / 'local-api.log'}"
                                      f" or stop it with `dataops local-api stop`") from None
            time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(d: Path, idle_s: float, timeout: float) -> Record:
    home = d / "prefect"
    home.mkdir(exist_ok=True, mode=0o700)
    log_path = d / "local-api.log"
    deadline = time.monotonic() + timeout
    for _attempt in range(3):  # a port taken between choosing and binding it: choose again
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
                   PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(port),
                   PREFECT_UI_API_URL=f"http://127.0.0.1:{port}/api", PREFECT_UI_URL=f"http://127.0.0.1:{port}",
                   PREFECT_LOGGING_SERVER_LEVEL="WARNING")
        with open(log_path, "ab") as log:
            log.write(f"\n-- {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S}Z starting on port {port}\n".encode())
            log.flush()
            proc = subprocess.Popen([sys.executable, "-m", "dataops.local_api", "serve", str(d), str(port), str(idle_s), MARK],
                                    env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, close_fds=True)
        _held.append(proc)
        rec = Record(pid=proc.pid, port=port, prefect_version=prefect_version(), idle_s=idle_s, home=str(home),
                     started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        _write_record(d, rec)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if healthy(rec, timeout=2.0):
                return rec
            time.sleep(0.1)
        _stop(d, rec)
        if time.monotonic() >= deadline:
            raise OperationFailed(f"the local Prefect API did not answer within {timeout:.0f} s; see {log_path}")
    raise OperationFailed(f"the local Prefect API did not start (exit {proc.returncode}); see {log_path}")


def _is_ours(pid: int, d: Path) -> bool:
    """pid runs our server for this state folder (not a recycled pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return sys.platform != "linux"
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            if f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X"):
                return False
    except (OSError, IndexError):
        pass
    return MARK.encode() in args and str(d).encode() in args


def _stop(d: Path, rec: Record, grace: float = 15.0) -> None:
    """SIGTERM to the server's session (it is the leader), SIGKILL after `grace`; drop its record."""
    if _is_ours(rec.pid, d):
        with contextlib.suppress(OSError):
            os.killpg(rec.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while _is_ours(rec.pid, d) and time.monotonic() < deadline:
            _reap(rec.pid)
            time.sleep(0.05)
        if _is_ours(rec.pid, d):
            with contextlib.suppress(OSError):
                os.killpg(rec.pid, signal.SIGKILL)
            time.sleep(0.1)
        _reap(rec.pid)
    _remove_record(d, rec.pid)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


# -- the server's side -------------------------------------------------------------------------

def serve(d: Path, port: int, idle_s: float) -> None:
    """Run Prefect's API and UI in this process until idle for `idle_s`, or SIGTERM."""
    import threading

    import uvicorn

    config = uvicorn.Config("prefect.server.api.server:create_app", factory=True, host="127.0.0.1", port=port,
                            log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    threading.Thread(target=_watch_idle, args=(d, idle_s, server), daemon=True, name="idle-watch").start()
    try:
        server.run()
    finally:
        _remove_record(d, os.getpid())
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S}Z stopped", flush=True)


def _watch_idle(d: Path, idle_s: float, server) -> None:
    """Stop the server once `last-used` is older than idle_s and no command holds in-use.lock.
    The exclusive lock is kept until this process ends: a command starting meanwhile waits for
    the stop, finds no record and starts a new server."""
    step = max(0.2, min(5.0, idle_s / 5))
    stamp, lock = d / "last-used", open(d / "in-use.lock", "a+")
    while True:
        time.sleep(step)
        try:
            age = time.time() - stamp.stat().st_mtime
        except OSError:
            age = idle_s
        if age < idle_s:
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue
        print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S}Z idle for {age:.0f} s: stopping", flush=True)
        _remove_record(d, os.getpid())
        server.should_exit = True
        time.sleep(20)
        os._exit(0)  # the graceful stop did not finish


if __name__ == "__main__" and len(sys.argv) >= 5 and sys.argv[1] == "serve":
    serve(Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
