"""The corpus runs under the repository's own env.py: the same connection, lock and timeouts as
the application's revisions, not a copy that could drift from it."""

import runpy
from pathlib import Path

runpy.run_path(str(Path(__file__).resolve().parents[2] / "migrations" / "env.py"), run_name="env")
