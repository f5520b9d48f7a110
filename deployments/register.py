"""`dataops deploy` and `dataops server`: register everything the team uses every day on a
Prefect server, idempotently, and run a local server plus a worker for teams without Cloud.

What is registered:
- the process work pool the deployments run on;
- the deployments in deployments/prefect.yaml, through Prefect's own `prefect deploy`
  (the file reads the schedule's timezone and the repo's location from the environment);
- the notification block named in `alerts:` (Slack webhook, generic webhook, or e-mail);
- one automation that sends that notification for every flow run ending Failed or Crashed;
- one automation that starts rollback-migration for a production-migration run that
  Crashed (its process killed: no failure hook ran, so only the server can start it).
Running it twice changes nothing: every object is looked up by name and only created or
updated when it differs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dataops.errors import BadInput, OperationFailed, TransientError
from dataops.redact import redact
from dataops.runtime import OrphanGuard
from dataops.tasks.alerts import build_notification_block

REPO_ROOT = Path(__file__).resolve().parent.parent
PREFECT_FILE = REPO_ROOT / "deployments" / "prefect.yaml"
WORK_POOL = "dataops-process"
BLOCK_NAME = "dataops-alerts"
AUTOMATION_NAME = "dataops: alert on failed or crashed runs"
ROLLBACK_AUTOMATION_NAME = "dataops: roll back crashed production migrations"
ZOMBIE_AUTOMATION_NAME = "dataops: mark runs Crashed when their heartbeats stop"
MIGRATION_DEPLOYMENT = "migrate-database/production-migration"
ROLLBACK_DEPLOYMENT = "rollback-migration/rollback-migration"

ALERT_SUBJECT = "[dataops] {{ flow.name }} {{ flow_run.state.name | lower }}: {{ flow_run.name }}"
ALERT_BODY = (
    "Flow: {{ flow.name }}\n"
    "Run: {{ flow_run.name }} ({{ flow_run.state.name }})\n"
    "Environment: {{ flow_run.parameters.get('env') or flow_run.parameters.get('target') "
    "or flow_run.parameters.get('source') or '-' }}\n"
    "Error: {{ flow_run.state.message }}\n"
    "Link: {{ flow_run|ui_url }}"
)


@dataclass
class DeployReport:
    api_url: str
    work_pool: str = ""
    deployments: list[str] = field(default_factory=list)
    block: str | None = None
    automations: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"Prefect API: {self.api_url}", f"work pool: {self.work_pool}"]
        out += [f"deployment: {d}" for d in self.deployments]
        out.append(f"notification block: {self.block or 'none (alerts: not configured)'}")
        out += [f"automation: {a}" for a in self.automations]
        out.append("changed: " + (", ".join(self.changed) if self.changed else "nothing (already up to date)"))
        return out


def api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise BadInput("no Prefect server to deploy to; set prefect.api_url in dataops.yaml or PREFECT_API_URL, "
                       "or start one with `dataops server`")
    return url


def check_server(url: str, timeout: float = 5.0) -> None:
    import httpx

    try:
        ok = httpx.get(url.rstrip("/") + "/health", timeout=timeout).json() is True
    except Exception:  # noqa: BLE001 - any failure means the same thing to the user
        ok = False
    if not ok:
        raise TransientError(f"Prefect server at {url} does not answer; start it (`dataops server`) or fix prefect.api_url")


def ensure_work_pool(client, name: str = WORK_POOL) -> bool:
    """Create the process work pool if missing; returns whether anything changed."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    try:
        pool = client.read_work_pool(name)
    except ObjectNotFound:
        client.create_work_pool(WorkPoolCreate(name=name, type="process"))
        return True
    if pool.type != "process":
        raise BadInput(f"work pool '{name}' exists with type {pool.type}; dataops needs a process pool of that name")
    return False


def deployment_env(settings, config_path: str) -> dict[str, str]:
    """Values deployments/prefect.yaml reads with {{ $VAR }}."""
    return {
        "DATAOPS_HOME": str(REPO_ROOT),
        "DATAOPS_CONFIG": config_path,
        "DATAOPS_TIMEZONE": settings.schedules.timezone,
        "DATAOPS_REFRESH_CRON": settings.schedules.staging_refresh_cron,
    }


def register_deployments(settings, config_path: str, prefect_file: Path = PREFECT_FILE) -> None:
    env = {**os.environ, **deployment_env(settings, config_path)}
    cmd = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file", str(prefect_file), "--all"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        tail = redact((proc.stderr or proc.stdout).strip().splitlines()[-1] if (proc.stderr or proc.stdout).strip() else "")
        raise OperationFailed(f"prefect deploy failed: {tail}")


def deployment_names(client) -> list[str]:
    from prefect.client.schemas.filters import WorkPoolFilter, WorkPoolFilterName

    deps = client.read_deployments(work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[WORK_POOL])))
    flows = {f.id: f.name for f in client.read_flows()}
    return sorted(f"{flows.get(d.flow_id, '?')}/{d.name}" for d in deps)


def ensure_block(alerts) -> tuple[str | None, bool]:
    """Save the notification block under a fixed name; returns (block document id, changed)."""
    block = build_notification_block(alerts)
    if block is None:
        return None, False
    try:
        current = type(block).load(BLOCK_NAME)
        same = _block_data(current) == _block_data(block)
    except ValueError:  # no block of this type under that name yet
        same = False
    if same:
        return str(current._block_document_id), False
    block_id = block.save(BLOCK_NAME, overwrite=True)
    return str(block_id), True


def _block_data(block) -> dict:
    data = block.model_dump(mode="json", context={"include_secrets": True})
    return {k: v for k, v in data.items() if not k.startswith("_") and k != "block_type_slug"}


def failure_automation(block_id: str):
    from prefect.automations import Automation, EventTrigger, Posture
    from prefect.events.actions import SendNotification

    return Automation(
        name=AUTOMATION_NAME,
        description="Sends the dataops alert for every flow run that ends Failed or Crashed (server-side, so it "
                    "fires even when the process running the flow was killed).",
        trigger=EventTrigger(expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
                             match={"prefect.resource.id": "prefect.flow-run.*"},
                             posture=Posture.Reactive, threshold=1, within=0),
        actions=[SendNotification(block_document_id=block_id, subject=ALERT_SUBJECT, body=ALERT_BODY)],
    )


def rollback_automation(migration_id, rollback_id):
    """A crashed production migration gets the same rollback its failure hook would start.

    A Failed run is left to the hook (it runs in the flow's process, 40 ms after the state
    change): starting a second rollback from here would race it for the migration lock.
    """
    from prefect.automations import Automation, EventTrigger, Posture
    from prefect.events.actions import RunDeployment

    return Automation(
        name=ROLLBACK_AUTOMATION_NAME,
        description="Starts rollback-migration for a production-migration run that Crashed: a killed process runs "
                    "no failure hook. The rollback reads from the audit table how far the run got.",
        trigger=EventTrigger(expect={"prefect.flow-run.Crashed"},
                             match={"prefect.resource.id": "prefect.flow-run.*"},
                             match_related={"prefect.resource.role": "deployment",
                                            "prefect.resource.id": f"prefect.deployment.{migration_id}"},
                             posture=Posture.Reactive, threshold=1, within=0),
        actions=[RunDeployment(source="selected", deployment_id=rollback_id, parameters={
            "env": {"__prefect_kind": "jinja", "template": "{{ flow_run.parameters['env'] }}"},
            "run_id": {"__prefect_kind": "jinja", "template": "{{ flow_run.id }}"},
        })],
    )


def zombie_automation(within_s: float, flow_runs: list[str] | None = None, name: str = ZOMBIE_AUTOMATION_NAME):
    """A run whose host died (power, eviction, OOM of the whole machine) stays Running for
    ever: no process is left to run its hooks or report Crashed. Every flow run emits a
    heartbeat event (PREFECT_FLOWS_HEARTBEAT_FREQUENCY); this marks a run Crashed once they
    stop without a final state, which the two other automations then act on (the alert;
    the rollback of a production migration). Prefect's own recipe (docs: detect zombie flows).
    `flow_runs` narrows it to some runs (tests)."""
    from datetime import timedelta

    from prefect.automations import Automation, EventTrigger, Posture
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState

    ids = [f"prefect.flow-run.{r}" for r in flow_runs] if flow_runs else ["prefect.flow-run.*"]
    return Automation(
        name=name,
        description=f"Marks a flow run Crashed when {within_s:.0f} s pass after a heartbeat with neither another "
                    "heartbeat nor a final state: the process running it is gone with its host.",
        trigger=EventTrigger(after={"prefect.flow-run.heartbeat"},
                             expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed",
                                     "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
                                     "prefect.flow-run.Crashed"},
                             match={"prefect.resource.id": ids}, for_each={"prefect.resource.id"},
                             posture=Posture.Proactive, threshold=1, within=timedelta(seconds=within_s)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {within_s:.0f} s: the process running it is gone")],
    )


def check_heartbeat_window(crash_after_s: int | None) -> None:
    """A window shorter than the heartbeat interval would crash every healthy long run."""
    from prefect.settings import get_current_settings

    beat = get_current_settings().flows.heartbeat_frequency
    if crash_after_s is not None and (beat is None or crash_after_s <= beat):
        raise BadInput(f"prefect.crash_after_silence_s ({crash_after_s} s) must be longer than the flow heartbeat "
                       f"interval (PREFECT_FLOWS_HEARTBEAT_FREQUENCY: {beat}); raise it or set it to null")


def _ensure(client, wanted) -> bool:
    """Create or update the automation named like `wanted`; True if anything changed."""
    existing = client.read_automations_by_name(wanted.name)
    keys = ("trigger", "actions", "description", "enabled")
    if existing:
        have = existing[0]
        for extra in existing[1:]:
            client.delete_automation(extra.id)
        if all(getattr(have, k) == getattr(wanted, k) for k in keys):
            return len(existing) > 1
        from prefect.events.schemas.automations import AutomationCore

        client.update_automation(have.id, AutomationCore(**{k: getattr(wanted, k) for k in ("name", *keys)}))
        return True
    wanted.create()
    return True


def _remove(client, name: str) -> bool:
    existing = client.read_automations_by_name(name)
    for a in existing:
        client.delete_automation(a.id)
    return bool(existing)


def ensure_automation(client, block_id: str | None, crash_after_s: int | None = None) -> tuple[list[str], bool]:
    """The alert automation (only with a notification block), the heartbeat watch (unless
    turned off) and the crash rollback."""
    names, changed = [], False
    if crash_after_s is not None:
        changed |= _ensure(client, zombie_automation(crash_after_s))
        names.append(ZOMBIE_AUTOMATION_NAME)
    else:
        changed |= _remove(client, ZOMBIE_AUTOMATION_NAME)
    if block_id is not None:
        changed |= _ensure(client, failure_automation(block_id))
        names.append(AUTOMATION_NAME)
    try:
        migration = client.read_deployment_by_name(MIGRATION_DEPLOYMENT)
        rollback = client.read_deployment_by_name(ROLLBACK_DEPLOYMENT)
    except Exception:  # noqa: BLE001 - ObjectNotFound: a prefect.yaml without them needs no rollback automation
        return names, changed
    changed |= _ensure(client, rollback_automation(migration.id, rollback.id))
    names.append(ROLLBACK_AUTOMATION_NAME)
    return names, changed


def deploy(settings, config_path: str) -> DeployReport:
    from prefect.client.orchestration import get_client

    check_heartbeat_window(settings.prefect.crash_after_silence_s)  # bad input: before anything is written
    url = api_url()
    check_server(url)
    report = DeployReport(api_url=url, work_pool=WORK_POOL)
    with get_client(sync_client=True) as client:
        if ensure_work_pool(client):
            report.changed.append("work pool")
        before = _deployment_state(client)
        register_deployments(settings, config_path)
        if _deployment_state(client) != before:
            report.changed.append("deployments")
        report.deployments = deployment_names(client)
        block_id, changed = ensure_block(getattr(settings, "alerts", None))
        if changed:
            report.changed.append("notification block")
        report.block = f"{BLOCK_NAME} ({getattr(settings.alerts, 'kind', '')})" if block_id else None
        report.automations, changed = ensure_automation(client, block_id, settings.prefect.crash_after_silence_s)
        if changed:
            report.changed.append("automation")
    return report


def _deployment_state(client) -> dict:
    from prefect.client.schemas.filters import WorkPoolFilter, WorkPoolFilterName

    deps = client.read_deployments(work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[WORK_POOL])))
    return {d.name: (str(d.id), d.entrypoint, d.parameters, sorted(str(s.schedule) for s in d.schedules))
            for d in deps}


# -- a local server and worker -------------------------------------------------------------

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STOP_GRACE_S = 5.0  # per process group, between SIGTERM and SIGKILL


class StopRequested(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """SIGTERM (systemd, `docker stop`), SIGINT (Ctrl-C) and SIGHUP (the terminal closed) as one
    StopRequested raised in the main thread, once. Any signal after that, or while the children
    are being stopped for another reason, does not interrupt the stopping (that would leave
    children behind); it only makes it kill at once, as a second Ctrl-C does elsewhere. One that
    lands while a child is being started is raised as soon as the child is on the list of those
    to stop: raised inside Popen it would lose the child. A signal ignored on entry (`nohup`'s
    SIGHUP, SIGINT of a background job) stays ignored."""

    def __init__(self):
        self.signum: int | None = None
        self.hurry = False
        self._stopping = False
        self._holding = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        for sig in STOP_SIGNALS:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self._stopping or self.signum is not None:
            self.hurry = True
        else:
            self.signum = signum
        self._raise_if_due()

    def _raise_if_due(self) -> None:
        if self.signum is not None and not self._holding and not self._stopping:
            self._stopping = True
            raise StopRequested(self.signum)

    @contextlib.contextmanager
    def held(self):
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1
        self._raise_if_due()

    def stopping(self) -> None:
        """From now on signals only hurry the stop along."""
        self._stopping = True


def start_child(procs: list[subprocess.Popen], stop: StopSignals, args: list[str], guard=None,
                **kwargs) -> subprocess.Popen:
    """Start a child in a session of its own and add it to `procs` (and to `guard`, a
    dataops.runtime.OrphanGuard that stops its group if this process is killed with SIGKILL).

    Its own session (so its own process group) because a signal to this process alone (`kill`,
    `docker stop`) never reaches children: stop_child stops the whole group, the grandchildren
    too (a worker's flow runs). And Ctrl-C at the terminal then reaches only this process, which
    stops the children in order instead of all at once."""
    with stop.held():
        proc = subprocess.Popen(args, start_new_session=True, **kwargs)
        procs.append(proc)
        if guard is not None:
            guard.watch(proc.pid)
    return proc


def stop_child(proc: subprocess.Popen, grace: float = STOP_GRACE_S, hurry=lambda: False) -> None:
    """SIGTERM to the child's process group, SIGKILL to whatever of it is left after `grace` s;
    returns once the group is empty (a few seconds at most after the kill)."""
    group = proc.pid  # a session leader leads its own group
    if not _signal_group(proc, group, signal.SIGTERM):
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and not hurry():
        if not _group_alive(proc, group):
            return
        time.sleep(0.1)
    _signal_group(proc, group, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while _group_alive(proc, group) and time.monotonic() < deadline:
        time.sleep(0.05)


def _group_alive(proc: subprocess.Popen, group: int) -> bool:
    try:
        os.killpg(group, 0)
        members = _live_member(group)
    except ProcessLookupError:
        members = False
    except PermissionError:  # a member that changed its user: alive, and not ours to kill
        members = True
    return proc.poll() is None or members  # polled last: a leader dead at the scan is reaped now


def _live_member(group: int) -> bool:
    """killpg finds zombies too, and a grandchild whose parent died first stays one until init
    reaps it (up to seconds with some inits): only a member still running counts. Without
    /proc, whatever killpg finds counts."""
    try:
        pids = [entry for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return True
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                state, _ppid, pgrp = f.read().rsplit(b")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if int(pgrp) == group and state not in (b"Z", b"X"):
            return True
    return False


def _signal_group(proc: subprocess.Popen, group: int, sig: int) -> bool:
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        proc.poll()
        return False
    return True


def check_port_free(host: str, port: int) -> None:
    """Refuse a port something already listens on: its health check would answer for a server
    that never started (ours would fail to bind and exit). Bound with SO_REUSEADDR, as uvicorn
    binds, so connections of a server stopped a moment ago (TIME_WAIT) do not count."""
    import errno
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, IndexError):
        return  # let the server report the bad host
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OperationFailed(f"port {port} on {host} is in use: another `dataops server` or Prefect "
                                      "server? Stop it or pass --port") from None
            raise BadInput(f"cannot listen on {host}:{port}: {exc.strerror}; check --host and --port") from None


def serve(host: str, port: int, config_path: str, out, deploy_settings=None) -> int:
    """Run `prefect server start` and a process worker until stopped; returns the exit code.

    SIGTERM, SIGINT (Ctrl-C) and SIGHUP all stop both: the worker's process group first (its
    flow runs can still report Crashed to the server), then the server's, each asked with
    SIGTERM and killed STOP_GRACE_S later if still there, so the port is free when this returns
    and the next `dataops server` can start at once. Such a requested stop returns 0: the
    command did what it was asked, and systemd counts 0 as a clean stop where it would count
    143 as a failure (unless told SuccessExitStatus=143). The server or the worker exiting on
    its own is an OperationFailed (exit 1), after the other one is stopped the same way.
    """
    check_port_free(host, port)
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "DATAOPS_CONFIG": config_path, "DATAOPS_HOME": str(REPO_ROOT),
           "PREFECT_UI_URL": f"http://{host}:{port}",  # so alerts link to the run's page
           "PREFECT_UI_API_URL": f"http://{host}:{port}/api"}  # the browser's API, also behind a proxy
    url = f"http://{host}:{port}/api"
    procs: list[subprocess.Popen] = []
    names: dict[int, str] = {}
    with StopSignals() as stop, OrphanGuard(STOP_GRACE_S) as guard:
        try:
            server = start_child(procs, stop, [sys.executable, "-m", "prefect", "server", "start", "--host", host,
                                               "--port", str(port)], guard,
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            names[server.pid] = "server"
            deadline = time.monotonic() + 60
            while True:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise OperationFailed(f"Prefect server did not start on {host}:{port}; is the port free?")
                try:
                    check_server(url, timeout=1)
                    break
                except TransientError:
                    time.sleep(0.5)
            env["PREFECT_API_URL"] = url
            os.environ["PREFECT_API_URL"] = url
            if deploy_settings is not None:
                for line in deploy(deploy_settings, config_path).lines():
                    out(line)
            worker = start_child(procs, stop, [sys.executable, "-m", "prefect", "worker", "start", "--pool",
                                               WORK_POOL, "--type", "process"], guard, env=env, cwd=REPO_ROOT)
            names[worker.pid] = "worker"
            out(f"Prefect UI: http://{host}:{port}  (deployments: http://{host}:{port}/deployments)")
            out(f"Worker polling pool {WORK_POOL}. Ctrl-C (or SIGTERM) stops both.")
            while all(p.poll() is None for p in procs):
                time.sleep(1)
            dead = next(p for p in procs if p.returncode is not None)
            raise OperationFailed(f"the Prefect {names[dead.pid]} exited on its own (exit {dead.returncode}); "
                                  "stopped the rest")
        except StopRequested as req:
            out(f"{req}: stopping the worker and the server")
        finally:
            stop.stopping()
            for p in reversed(procs):
                stop_child(p, hurry=lambda: stop.hurry)
    out("stopped")
    return 0
