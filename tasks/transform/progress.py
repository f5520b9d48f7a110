"""What a run has done so far: progress read from the checkpoints while it runs, and the
summary (counts, longest transaction) when it ends."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from dataops.settings import Environment, Settings
from dataops.tasks.transform.plan import connect
from dataops.tasks.transform.state import RunState, progress

log = logging.getLogger("dataops.transform")


# -- progress -------------------------------------------------------------------------------------

class ProgressMonitor:
    """Reads the checkpoints every `every_s` and reports rows done and left, rate and ETA.

    It reads the database rather than counting in memory, so it sees every worker, in
    this process or on another machine. One last report when the block ends, so even a
    run shorter than `every_s` reports its rows and rate."""

    def __init__(self, settings: Settings, env: Environment, run: RunState, report, every_s: float = 5.0):
        self.settings, self.env, self.run, self.report, self.every_s = settings, env, run, report, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"progress-{run.transform}", daemon=True)
        self._t0 = time.monotonic()
        self._start_rows = run.total("scanned")

    def __enter__(self) -> "ProgressMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        try:
            with connect(self.settings, self.env, f"{self.run.transform}:progress", autocommit=True) as conn:
                while not self._stop.wait(self.every_s):
                    self.report(*self.line(progress(conn, self.run.id)))
                self.report(*self.line(progress(conn, self.run.id)))
        except Exception as exc:  # noqa: BLE001 - progress reports must never fail the run
            log.warning("progress reports of %s stopped: %s", self.run.transform, exc)

    def line(self, p: dict) -> tuple[float, str]:
        total, done = max(p["total"], p["scanned"]), p["scanned"]
        elapsed = time.monotonic() - self._t0
        rate = (done - self._start_rows) / elapsed if elapsed > 0 else 0.0
        left = max(total - done, 0)
        eta = f"{left / rate:,.0f} s" if rate > 0 else "unknown"
        fraction = 100.0 * done / total if total else 100.0
        return fraction, (f"{self.run.action} {self.run.transform} on {self.env.name}: {done:,} of {total:,} rows "
                          f"({fraction:.0f}%), {left:,} left, {p['changed']:,} changed, {p['invalid']:,} invalid, "
                          f"{rate:,.0f} rows/s, ETA {eta}")


# -- summaries --------------------------------------------------------------------------------------

@dataclass
class Session:
    """What this process saw of a run (a resumed run's earlier sessions are in the checkpoints)."""

    seconds: float
    longest_tx_s: float


def summarize(run: RunState, env: Environment, session: Session | None = None,
              problems: list[str] | None = None) -> dict:
    out = {
        "transform": run.transform, "environment": env.name, "run_id": run.id, "action": run.action,
        "status": run.status, "table": run.table_name, "reverts": run.reverts,
        "rows": max(run.total("total"), run.total("scanned")), "scanned": run.total("scanned"),
        "needing_work": run.total("matched"), "changed": run.total("changed"), "deleted": run.total("deleted"),
        "inserted": run.total("inserted"), "invalid": run.total("invalid"),
        "invalid_examples": run.invalid_examples[:5], "unchanged": run.total("unchanged"), "batches": run.batches,
        "ranges": len(run.ranges), "busy_s": round(sum(r.busy_s for r in run.ranges), 3),
        "longest_tx_s": round(max(run.longest_tx_s, session.longest_tx_s if session else 0.0), 4),
        "max_batch_seconds": run.params.get("max_batch_seconds"),
        "snapshot": (run.snapshot or {}).get("name"), "problems": problems or [],
        "detail": run.detail,
    }
    if session is not None:
        out["seconds"] = round(session.seconds, 3)
        out["rows_per_s"] = round(out["scanned"] / session.seconds) if session.seconds > 0 else None
    return out


PROGRESS_EVERY_S = 5.0  # how often a flow logs and publishes a run's progress


def gather_ranges(futures) -> tuple[float, BaseException | None]:
    """Wait for every range; keep the first error (the failed worker already asked the
    others to stop after their current batch)."""
    longest, error = 0.0, None
    from prefect.futures import as_completed

    for f in as_completed(futures):
        try:
            longest = max(longest, f.result().longest_tx_s)
        except BaseException as exc:  # noqa: BLE001 - re-raised once every worker has stopped
            error = error or exc
    return longest, error
