"""Process-wide setup shared by the CLI and the demo: where Prefect's API is, how loud, and how
the process ends when it is told to stop."""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

EXIT_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def prepare_prefect(api_url: str | None, verbose: bool = False, local_api: bool = False,
                    idle_s: float | None = None) -> None:
    """Use the configured Prefect API; else, for a command that runs flows (`local_api`), the local
    API that dataops keeps running in the background (dataops.local_api), else Prefect's temporary
    one. Keep the console for our own one-line results unless asked for the run logs."""
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.pop("PREFECT_API_URL", None)  # set but empty: unset, as Prefect reads it
        if api_url:
            os.environ["PREFECT_API_URL"] = api_url
        elif local_api:
            from dataops import local_api as local

            os.environ["PREFECT_API_URL"] = local.ensure(idle_s).url
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    _refresh_prefect_settings()
    private_runtime_dir()
    exit_on_signals()


def _refresh_prefect_settings() -> None:
    """Prefect reads its settings from the environment once, when it is imported: if something
    imported it already, make it read PREFECT_API_URL again (else it starts its temporary API)."""
    import sys

    context = sys.modules.get("prefect.context")
    if context is not None and hasattr(context, "refresh_global_settings_context"):
        context.refresh_global_settings_context()


def exit_on_signals() -> None:
    """Make SIGTERM and SIGHUP end the command as Ctrl-C does: with an exception in the main
    thread (SystemExit, status 128 + the signal's number), so `finally` blocks and atexit
    hooks run.

    Python's default for these signals ends the process on the spot. Prefect's temporary API
    (a command run without PREFECT_API_URL) is a uvicorn child that only an atexit hook stops,
    so `kill` or `systemctl stop` of a backup left it running for ever, holding its port; the
    flow engine's own SIGTERM bridge cleans up the run (pg_dump and pg_restore are killed in
    their `finally`) and then re-raises the signal with the handler it found, which is this
    one. A signal someone chose to ignore (`nohup`'s SIGHUP) stays ignored; outside the main
    thread nothing can be installed, and nothing is.
    """
    def stop(signum, frame):
        raise SystemExit(128 + signum)

    for sig in EXIT_SIGNALS:
        try:
            if signal.getsignal(sig) is signal.SIG_DFL:
                signal.signal(sig, stop)
        except ValueError:  # not the main thread
            return


def private_runtime_dir() -> str:
    """pgserver wants XDG_RUNTIME_DIR to be a private folder; make one if it is unset."""
    if not os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(tempfile.gettempdir()) / f"dataops-runtime-{os.getuid()}"
        path.mkdir(mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = str(path)
    return os.environ["XDG_RUNTIME_DIR"]


# -- children that must not outlive this process ------------------------------------------------

_WATCHDOG = r"""
import os, signal, sys, time
for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
    signal.signal(sig, signal.SIG_IGN)  # only the end of the pipe ends this process
grace, groups = float(sys.argv[1]), set()
for line in sys.stdin:
    if line[0] == "=":  # the parent stopped them itself
        sys.exit(0)
    (groups.add if line[0] == "+" else groups.discard)(int(line[1:]))
if not groups:
    sys.exit(0)

def alive(group):
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # killpg finds zombies too: only a member still running counts
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    state, _ppid, pgrp = f.read().rsplit(b")", 1)[1].split()[:3]
            except (OSError, IndexError, ValueError):
                continue
            if int(pgrp) == group and state not in (b"Z", b"X"):
                return True
        return False
    except OSError:
        return True

sys.stderr.write(f"dataops: the parent {os.getppid()} is gone; stopping its children's process groups {sorted(groups)}\n")
for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
    for group in groups:
        try:
            os.killpg(group, sig)
        except OSError:
            pass
    deadline = time.monotonic() + wait
    while any(alive(g) for g in groups) and time.monotonic() < deadline:
        time.sleep(0.1)
"""


WATCHDOG_MARK = "dataops-orphan-guard"  # in the watchdog's command line, for ps and tests


class OrphanGuard:
    """Stops this process's children (whole process groups) when this process dies, however it
    dies: SIGKILL and the OOM killer run no handler and no `finally`.

    Children started in sessions of their own (so that a stop reaches their whole group in order)
    are not signalled by anything when their parent dies: after `kill -9` of `dataops server` its
    Prefect server and worker ran on for ever, holding the port, and the worker does not even stop
    on SIGTERM once its server is gone. So a small watchdog process reads a pipe whose only writer
    is this process. The kernel closes the pipe when this process ends, the watchdog reads the
    end of it and does what the parent would have done: SIGTERM to each group still registered,
    SIGKILL `grace` seconds later. On an orderly stop the parent `forget`s each child it stopped
    and closes the pipe, and the watchdog exits with nothing to do. Linux only in full (it reads
    /proc to tell a zombie from a live member, as deployments.register does); elsewhere a group
    with a zombie is waited for until the SIGKILL.
    """

    def __init__(self, grace: float):
        import subprocess
        import sys

        # Its own session: a Ctrl-C or a signal to this process's group does not reach it.
        self.proc = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(grace), WATCHDOG_MARK], stdin=subprocess.PIPE,
                                     start_new_session=True, text=True)

    def _say(self, line: str) -> None:
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):  # the watchdog is gone (killed): nothing to tell
            pass

    def watch(self, group: int) -> None:
        """Stop process group `group` if this process dies before it `forget`s it."""
        self._say(f"+{group}")

    def forget(self, group: int) -> None:
        self._say(f"-{group}")

    def close(self, timeout: float = 5.0) -> None:
        """This process stopped its children itself: the watchdog exits without doing anything."""
        import subprocess

        self._say("=")
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> OrphanGuard:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
