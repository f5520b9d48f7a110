"""Process-wide setup shared by the CLI and the demo: where Prefect's API is, and how loud."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


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


def private_runtime_dir() -> str:
    """pgserver wants XDG_RUNTIME_DIR to be a private folder; make one if it is unset."""
    if not os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(tempfile.gettempdir()) / f"dataops-runtime-{os.getuid()}"
        path.mkdir(mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = str(path)
    return os.environ["XDG_RUNTIME_DIR"]
