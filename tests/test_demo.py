"""`dataops demo`: the whole story on a fresh embedded stack, through the real command."""

from __future__ import annotations

import re
import socket
import tempfile
import uuid
from pathlib import Path

from conftest import free_port, run_cli

from dataops.dev.demo import STEPS, where_to_look
from dataops.dev.stack import dev_down
from dataops.settings import load_settings
from dataops.tasks import pg
from dataops.tasks.migration.audit import history
from dataops.tasks.migration.migrate import read_current, resolve


def flow_run_state(run_id: str) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(uuid.UUID(run_id)).state.type.value


def test_demo_tells_the_whole_story(prefect_api):
    root = Path(tempfile.mkdtemp(prefix="dodemo-"))
    port = free_port()
    try:
        r = run_cli("demo", "--users", "200", "--root", str(root), "--s3-port", str(port), "--keep",
                    env={"PREFECT_API_URL": prefect_api}, timeout=300)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
        out = r.stdout
        report = out.split("Demo report", 1)[1].split("Where to look", 1)[0]
        names = ["seed production", *(name for name, _ in STEPS)]
        lines = [next(ln for ln in report.splitlines() if ln.strip().startswith(name)) for name in names]
        for line in lines:
            assert re.search(r"\s ok \s+\d+\.\d\s", line), line
        assert [report.index(ln) for ln in lines] == sorted(report.index(ln) for ln in lines)  # the story's order
        assert re.search(r"^  total\s+ok\s+\d+\.\d$", report, re.M)

        # the migration's approval was answered automatically, and the output says why
        assert 'approval answered automatically by "auto-approve (demo mode)": this is demo mode' in out
        # the failing migration: failed, rolled back by the hook's flow, alerted
        failed = re.search(r"migration run (\S+) failed as intended: upgrade of revision demo2 on production "
                           r"failed: column \"username\" does not exist", out)
        rolled = re.search(r"rollback run (\S+) rolled-back it automatically: downgraded production from demo1 to "
                           r"(\S+): undid demo1", out)
        assert failed and rolled, out[-4000:]
        assert "alert received by the local receiver (warning): migration of production failed and was rolled back" \
            in out
        assert flow_run_state(failed[1]) == "FAILED" and flow_run_state(rolled[1]) == "COMPLETED"
        # PREFECT_API_URL names a server that answers: the runs' pages in its UI
        ui = prefect_api.removesuffix("/api")
        for run_id in (failed[1], rolled[1]):
            assert f"{ui}/runs/flow-run/{run_id}" in out.split("Where to look", 1)[1]

        # production ends at the example head, as it was before the failing migration
        settings = load_settings(root / "dataops.yaml")
        assert settings.alerts.webhook_url is None  # --keep: the config no longer points at the stopped receiver
        dsn = settings.env("production").database_url
        head = resolve(settings.migrations.path, "head")
        assert read_current(dsn) == head == rolled[2]
        with pg.connect(dsn) as conn:
            columns = {row[0] for row in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'users'")}
        assert {"first_name", "last_name"} <= columns and not {"nickname", "display_name"} & columns
        audit = [(a.action, a.outcome) for a in reversed(history(dsn))]
        assert audit == [("migrate", "succeeded"), ("migrate", "rolled-back"), ("rollback", "rolled-back")]
    finally:
        dev_down(root)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_without_a_server_the_demo_says_how_to_start_one():
    lines: list[str] = []
    where_to_look(None, [("migration of production", "abc")], lines.append)
    text = "\n".join(lines)
    assert "temporary local API" in text and "`dataops dev up && dataops server`" in text
    assert "PREFECT_API_URL=http://127.0.0.1:4200/api dataops demo" in text and "abc" not in text
