"""Process-wide setup shared by the CLI and the demo: where Prefect's API is, how loud, and how
the process ends when it is told to stop."""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

EXIT_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def prepare_prefect(api_url: str | None, verbose: bool = False) -> None:
    """Use the configured Prefect API, else Prefect's temporary local one; keep the console
    for our own one-line results unless asked for the run logs."""
    if api_url and not os.environ.get("PREFECT_API_URL"):
        os.environ["PREFECT_API_URL"] = api_url
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    private_runtime_dir()
    exit_on_signals()


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
