"""Failpoints: named places where a test makes the process die, fail or wait, as FoundationDB and
TiKV do, so that "kill it here, run it again, check nothing is lost" is tested at every step
that changes durable state.

A test arms them in a child process through the environment:

    DATAOPS_FAILPOINTS="restore.before_switch=exit,backup.after_upload=raise,refresh.after_copy=pause(3)"

- `exit`: `os._exit(FAILPOINT_EXIT)` at once, as `kill -9` would: no `finally`, no `except`, no
  Prefect hook runs, open connections drop (PostgreSQL rolls back what they had open);
- `raise`: a `FailpointError`, an ordinary failure that the operation's own error handling meets;
- `pause(S)`: sleep S seconds, so a test can act on the world (kill the server, run a second
  operation) while the operation stands there.

Production pays one dictionary lookup per point (an empty one when the variable is unset). Every
failpoint is written as a literal `failpoint("area.step")` call, so `tests/test_failpoints.py`
lists them from the code, and a new one without a crash test fails the suite.
"""

from __future__ import annotations

import os
import re
import sys
import time

ENV_VAR = "DATAOPS_FAILPOINTS"
FAILPOINT_EXIT = 86  # the exit status of a process a failpoint killed
_ACTION = re.compile(r"^(exit|raise|pause\((\d+(?:\.\d+)?)\))$")


class FailpointError(RuntimeError):
    """Raised by a failpoint armed with `raise`."""


def _parse(text: str) -> dict[str, str]:
    armed = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, action = item.partition("=")
        if not _ACTION.match(action.strip()):
            raise ValueError(f"{ENV_VAR}: {item!r}: write name=exit, name=raise or name=pause(seconds)")
        armed[name.strip()] = action.strip()
    return armed


_ARMED = _parse(os.environ.get(ENV_VAR, ""))


def failpoint(name: str) -> None:
    """Do what the test armed at `name`; nothing when it is not armed."""
    action = _ARMED.get(name)
    if action is None:
        return
    if action == "exit":
        sys.stderr.write(f"failpoint {name}: exiting\n")
        sys.stderr.flush()
        os._exit(FAILPOINT_EXIT)
    if action == "raise":
        raise FailpointError(f"failpoint {name}")
    time.sleep(float(_ACTION.match(action).group(2)))


def arm(name: str, action: str) -> None:
    """Arm a failpoint in this process (tests that run an operation in-process)."""
    _ARMED.update(_parse(f"{name}={action}"))


def disarm(name: str | None = None) -> None:
    if name is None:
        _ARMED.clear()
    else:
        _ARMED.pop(name, None)
