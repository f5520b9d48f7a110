"""flows/engine.py: flow runs end without waiting on the heartbeat thread, and still beat."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]

# What a deployment's process does: load the flow file by path (not through the `flows`
# package), then run a flow. The script prints whether the engine was patched and the run id.
SCRIPT = """
import json, sys
import prefect.flow_engine as engine
from prefect import flow
from prefect.flows import load_flow_from_entrypoint

before = getattr(engine._send_heartbeats, "dataops_no_join", False)
load_flow_from_entrypoint("flows/validate_database.py:validate_database")
after = getattr(engine._send_heartbeats, "dataops_no_join", False)

@flow(name="engine-check")
def check():
    from prefect.runtime import flow_run
    return flow_run.id

state = check(return_state=True)
print(json.dumps({"before": before, "after": after, "run": str(state.result()), "completed": state.is_completed()}))
"""


def test_a_flow_loaded_by_path_ends_promptly_and_still_sends_a_heartbeat(prefect_server):
    env = {**os.environ, "PREFECT_API_URL": prefect_server["url"], "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["before"] is False and out["after"] is True
    assert out["completed"]

    # The heartbeat watch needs the beat the thread sends as the run starts.
    query = {"filter": {"event": {"name": ["prefect.flow-run.heartbeat"]},
                        "any_resource": {"id": [f"prefect.flow-run.{out['run']}"]},
                        "occurred": {"since": "2000-01-01T00:00:00Z"}}, "limit": 10}
    deadline = time.monotonic() + 30
    while True:
        events = httpx.post(f"{prefect_server['url']}/events/filter", json=query).json()["events"]
        if events or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert [e["event"] for e in events] == ["prefect.flow-run.heartbeat"]
