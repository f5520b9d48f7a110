"""The local stack behind `dataops dev up` / `dataops dev down`.

One embedded PostgreSQL 16 (pgserver) holding a seeded `production` and an empty
`staging`, a moto S3 server (or a folder) for backups, and a dataops.yaml pointing at
both, so a new user can run every command within a minute and without Docker.

Both servers outlive the process that started them (the CLI exits right after
`dev up`), so everything `dev down` needs is written under the root: the pgdata folder,
`s3.pid`, `s3.log` and `stack.json`.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import quote

from dataops.dsn import Dsn
from dataops.errors import BadInput, ConfigError, OperationFailed
from dataops.runtime import private_runtime_dir

log = logging.getLogger("dataops.dev.stack")

BUCKET = "dataops-backups"
PREFIX = "dev"
REGION = "us-east-1"
DATABASES = ("production", "staging")
S3_START_TIMEOUT = 15.0
MARKER = "# Written by `dataops dev up`"
# The example revisions shipped with the repository (baseline 0001, user_profiles 0002, ...).
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
_DEV_KEY = "dev"  # moto accepts any credentials

# moto servers started by this process, so that dev_down in the same process can reap them
_children: dict[int, subprocess.Popen] = {}


@atexit.register
def _leave_children_running() -> None:
    """They are meant to outlive us: stop subprocess warning 'still running' at exit."""
    for proc in _children.values():
        if proc.poll() is None:
            proc.returncode = 0


@dataclass(frozen=True)
class DevStack:
    root: Path
    pgdata: Path
    pg_dsn_production: Dsn
    pg_dsn_staging: Dsn
    storage_url: str
    config_path: Path
    counts: dict[str, int] = field(default_factory=dict)  # production, exact
    seeded: bool = False  # False: production was kept from an earlier `dev up`
    s3_endpoint: str | None = None
    s3_pid: int | None = None
    backup_dir: Path | None = None

    @property
    def state_path(self) -> Path:
        return self.root / "stack.json"


# -- up ---------------------------------------------------------------------------------

def dev_up(root: Path, *, users: int = 10_000, s3_port: int = 9900, store: Literal["s3", "file"] = "s3",
           config_path: Path, reset: bool = False, force: bool = False) -> DevStack:
    """Start (or reuse) the stack under `root` and write `config_path` for it.

    Existing databases are kept unless `reset`, so a second `dev up` is quick and keeps
    whatever the user did; `reset` drops them and empties the backup store too. A config
    file that `dev up` did not write is never overwritten unless `force`: it may point at
    real databases.
    """
    if store not in ("s3", "file"):
        raise BadInput(f"store must be 's3' or 'file' (got {store!r})")
    if users < 1:
        raise BadInput(f"users must be at least 1 (got {users})")
    if store == "s3" and not 1 <= s3_port <= 65535:
        raise BadInput(f"s3 port {s3_port} is not a TCP port; pick one between 1 and 65535")
    root = Path(root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    config_path = Path(config_path).expanduser().resolve()
    if not force:
        _check_config_is_ours(config_path)
    private_runtime_dir()

    # moto takes a second or two to import: let it boot while PostgreSQL is seeded
    s3_pid = _spawn_moto(root, s3_port) if store == "s3" else None

    from dataops.dev.sample_app import create_schema, seed
    from dataops.tasks import pg

    pgdata = root / "pg"
    socket_dir = _start_postgres(pgdata)
    base = _dsn(socket_dir, "postgres")
    fresh = {name: _prepare_database(base, name, reset, create_schema) for name in DATABASES}
    for name, created in fresh.items():
        if created:  # create_schema built what revision 0002 builds: record it, so `migrate up` goes on from there
            _stamp(_dsn(socket_dir, name))
    production = _dsn(socket_dir, "production")
    if fresh["production"]:
        log.info("seeding production with %d users", users)
        counts = seed(production, users=users)
    else:
        log.info("production already has the sample schema; keeping it (reset=True starts over)")
        with pg.connect(production) as conn:
            counts = pg.row_counts(conn)

    if store == "s3":
        endpoint = f"http://127.0.0.1:{s3_port}"
        _wait_for_s3(root, s3_port, s3_pid)
        _ensure_bucket(endpoint, empty=reset)
        storage_url, backup_dir = f"s3://{BUCKET}/{PREFIX}", None
    else:
        endpoint = None
        backup_dir = root / "backups"
        if reset and backup_dir.exists():
            shutil.rmtree(backup_dir)
        backup_dir.mkdir(exist_ok=True)
        storage_url = backup_dir.as_uri()

    stack = DevStack(root=root, pgdata=pgdata, pg_dsn_production=production,
                     pg_dsn_staging=_dsn(socket_dir, "staging"), storage_url=storage_url,
                     config_path=config_path, counts=counts, seeded=fresh["production"],
                     s3_endpoint=endpoint, s3_pid=s3_pid, backup_dir=backup_dir)
    _write_config(stack)
    _write_state(stack, s3_port if store == "s3" else None)
    return stack


def _stamp(dsn: Dsn) -> None:
    from dataops.dev.sample_app import SCHEMA_REVISION
    from dataops.tasks.migration.migrate import MigrationTarget, stamp

    stamp(MigrationTarget(dsn, MIGRATIONS_DIR, label=dsn.database), SCHEMA_REVISION)


def _dsn(socket_dir: Path, database: str) -> Dsn:
    # pgserver's own get_uri() says `postgres:@`, an empty password that reads like a masked one
    return Dsn(f"postgresql://postgres@/{database}?host={quote(str(socket_dir), safe='/')}")


def _start_postgres(pgdata: Path) -> Path:
    """Start the embedded server (or find it running) and return its socket folder."""
    import pgserver
    from pgserver.postgres_server import PostgresServer

    if pgdata in PostgresServer._instances and not _postmaster_pid(pgdata):
        _forget_pgserver_handle(pgdata)  # stopped behind pgserver's back: start afresh
    try:
        srv = pgserver.get_server(pgdata, cleanup_mode=None)  # None: keep running after we exit
    except subprocess.CalledProcessError as exc:
        raise OperationFailed(f"PostgreSQL did not start in {pgdata} ({exc}); see {pgdata / 'log'}") from None
    socket_dir = srv.get_postmaster_info().socket_dir
    if socket_dir is None:
        raise OperationFailed(f"PostgreSQL in {pgdata} listens on no unix socket; run `dataops dev down` and retry")
    log.info("PostgreSQL running: data %s, socket in %s", pgdata, socket_dir)
    return socket_dir


def _prepare_database(base: Dsn, name: str, reset: bool, create_schema) -> bool:
    """Make sure `name` exists with the sample schema; True if the schema was just created."""
    from dataops.tasks import pg

    if reset:
        pg.drop_database(base, name)
    if not pg.database_exists(base, name):
        pg.create_database(base, name)
    dsn = base.with_database(name)
    with pg.connect(dsn) as conn:
        if conn.execute("SELECT to_regclass('public.users')").fetchone()[0] is not None:
            return False
    create_schema(dsn)
    return True


# -- S3 (moto server) -------------------------------------------------------------------

def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _moto_port(pid: int) -> int | None:
    """The port of the moto server running as `pid`, or None if `pid` is not one."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        cmd = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    if "moto.server" not in cmd or "-p" not in cmd:
        return None
    try:
        return int(cmd[cmd.index("-p") + 1])
    except (IndexError, ValueError):
        return None


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _spawn_moto(root: Path, port: int) -> int:
    """Start moto's S3 server detached (or keep ours if already running) and return its pid."""
    pid_file = root / "s3.pid"
    pid = _read_pid(pid_file)
    if pid is not None:
        running_port = _moto_port(pid)
        if running_port == port:
            log.info("reusing the S3 server (pid %d) on port %d", pid, port)
            return pid
        if running_port is not None:  # ours, on another port: replace it
            _stop_pid(pid)
    pid_file.unlink(missing_ok=True)
    if _port_open(port):
        raise BadInput(f"port {port} on 127.0.0.1 is already in use by another program; "
                       "pick a free port for the S3 server (s3_port / --s3-port) or stop that program")
    with open(root / "s3.log", "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                cwd=root, start_new_session=True, close_fds=True)
    _children[proc.pid] = proc
    pid_file.write_text(f"{proc.pid}\n")
    log.info("started the S3 server (pid %d) on port %d, log %s", proc.pid, port, root / "s3.log")
    return proc.pid


def _wait_for_s3(root: Path, port: int, pid: int) -> None:
    import psutil

    deadline = time.monotonic() + S3_START_TIMEOUT
    url = f"http://127.0.0.1:{port}/"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # it answers HTTP: good enough, the bucket call will tell the rest
        except OSError:
            pass
        alive = psutil.pid_exists(pid) and _moto_port(pid) == port
        if not alive or time.monotonic() > deadline:
            tail = _tail(root / "s3.log")
            why = "exited" if not alive else f"did not answer within {S3_START_TIMEOUT:.0f} s"
            if alive:
                _stop_pid(pid)
            (root / "s3.pid").unlink(missing_ok=True)
            raise OperationFailed(f"the S3 server on port {port} {why}; see {root / 's3.log'}"
                                  + (f" (last line: {tail})" if tail else "")
                                  + "; try another --s3-port or store='file'")
        time.sleep(0.1)


def _tail(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def _s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name=REGION,
                        aws_access_key_id=_DEV_KEY, aws_secret_access_key=_DEV_KEY)


def _ensure_bucket(endpoint: str, *, empty: bool) -> None:
    from botocore.exceptions import ClientError

    client = _s3_client(endpoint)
    try:
        client.head_bucket(Bucket=BUCKET)
    except ClientError:
        client.create_bucket(Bucket=BUCKET)
        return
    if empty:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys})


# -- files ------------------------------------------------------------------------------

def _check_config_is_ours(path: Path) -> None:
    if not path.exists():
        return
    try:
        text = path.read_text()
    except OSError as exc:
        raise BadInput(f"cannot read {path}: {exc.strerror}; pass --config to write elsewhere") from None
    if MARKER not in text:
        raise BadInput(f"{path} exists and was not written by `dataops dev up`; pass --force to overwrite it "
                       "or --config to write elsewhere")


def _q(value: object) -> str:
    return json.dumps(str(value))  # a JSON string is a valid double-quoted YAML scalar


def _write_config(stack: DevStack) -> None:
    from dataops.settings import load_settings

    if stack.s3_endpoint:
        storage = f"""\
storage:
  # moto's S3 server on 127.0.0.1 (log: {stack.root / 's3.log'}); it keeps objects in memory,
  # so backups are gone after `dataops dev down`. Any key id and secret work.
  url: {_q(stack.storage_url)}
  endpoint_url: {_q(stack.s3_endpoint)}
  region: {REGION}
  access_key_id: "${{AWS_ACCESS_KEY_ID:-{_DEV_KEY}}}"
  secret_access_key: "${{AWS_SECRET_ACCESS_KEY:-{_DEV_KEY}}}"
"""
    else:
        storage = f"""\
storage:
  # backups as plain files in a local folder
  url: {_q(stack.storage_url)}
"""
    text = f"""\
{MARKER} for the local dev stack in {stack.root}.
# `dataops dev up --reset` rewrites it; `dataops dev down` stops the servers it points at.
# Both databases live on one embedded PostgreSQL 16 (pgserver), reached over a unix socket.

environments:
  production:
    role: production   # the safety guards treat it like the real thing
    description: {_q(f"local sample app with {stack.counts.get('users', 0)} users")}
    database_url: {_q(stack.pg_dsn_production.secret())}
  staging:
    role: staging
    description: "local staging: the sample schema, no rows until you refresh it"
    database_url: {_q(stack.pg_dsn_staging.secret())}

{storage}
backups:
  keep_last: 7   # always keep the 7 newest backups
  keep_days: 30  # and every backup younger than 30 days

migrations:
  path: {_q(MIGRATIONS_DIR)}   # Alembic revisions; `dataops migrate production status`
  allow_auto_approve: true   # local stack only: `migrate up --auto-approve` skips the approval pause

transforms:
  path: {_q(MIGRATIONS_DIR.parent / "transforms")}   # batched data fixes; `dataops transform production list`
{_anonymize_section()}"""
    stack.config_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = stack.config_path.with_name(stack.config_path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(stack.config_path)
    try:
        load_settings(stack.config_path)
    except ConfigError as err:  # our template is wrong: say so rather than leave a broken file
        raise OperationFailed(f"wrote {stack.config_path} but it does not load ({err.message}); "
                              "this is a bug in dataops dev up") from None


def _anonymize_section() -> str:
    """Masking rules for the sample app: every personal column has one, so `dataops
    refresh-staging` passes its PII guard. The salt is random per `dev up` unless
    DATAOPS_ANON_SALT is set (a real setup takes it from the environment only)."""
    import secrets

    return f"""
anonymize:   # how `dataops refresh-staging` and `dataops anonymize` mask personal data
  salt: "${{DATAOPS_ANON_SALT:-{secrets.token_hex(16)}}}"
  locale: en_US
  default: fail   # a personal-looking column without a rule stops the refresh
  rules:
    users:
      email: {{faker: email, unique: true}}
      full_name: name
      first_name: first_name
      last_name: last_name
      phone: {{partial: {{keep_last: 2}}}}
      date_of_birth: {{shift_days: 30}}
      address: address
      ip_address: null
      password_hash: {{constant: "x"}}
    user_emails:
      email: {{faker: email, unique: true}}   # the same rule as users.email: the addresses still match
    audit_logs:
      ip_address: null
      user_agent: keep
  delete:
    audit_logs: "event_type IN ('login', 'password_change')"

refresh:
  exclude: []
  truncate: []
  subset: {{}}   # e.g. orders: "created_at > now() - interval '90 days'"
"""


def _write_state(stack: DevStack, s3_port: int | None) -> None:
    state = {"pgdata": str(stack.pgdata), "s3_port": s3_port, "s3_pid": stack.s3_pid,
             "storage_url": stack.storage_url, "config_path": str(stack.config_path)}
    stack.state_path.write_text(json.dumps(state, indent=2) + "\n")


def _read_state(root: Path) -> dict:
    try:
        return json.loads((root / "stack.json").read_text())
    except (OSError, ValueError):
        return {}


# -- down -------------------------------------------------------------------------------

def dev_down(root: Path) -> list[str]:
    """Stop what `dev_up` started under `root`; returns what was stopped (empty if nothing ran).

    Data stays on disk (pgdata, backups folder); the next `dev up` starts from it.
    """
    root = Path(root).expanduser().resolve()
    state = _read_state(root)
    stopped = []

    pid_file = root / "s3.pid"
    pid = _read_pid(pid_file) or state.get("s3_pid")
    if pid:
        port = _moto_port(pid)
        if port is not None:
            _stop_pid(pid)
            stopped.append(f"S3 server (moto, pid {pid}, port {port})")
    pid_file.unlink(missing_ok=True)

    pgdata = Path(state.get("pgdata") or root / "pg")
    pg_pid = _stop_postgres(pgdata)
    if pg_pid:
        stopped.append(f"PostgreSQL (pid {pg_pid}, data {pgdata})")
    return stopped


def _stop_pid(pid: int, timeout: float = 5.0) -> None:
    """SIGTERM, wait, then SIGKILL. psutil's wait also reaps a process this process started."""
    import psutil

    _children.pop(pid, None)
    try:
        proc = psutil.Process(pid)
        proc.terminate()
        try:
            proc.wait(timeout)
        except psutil.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    except psutil.NoSuchProcess:
        pass


def _postmaster_pid(pgdata: Path) -> int | None:
    """The pid of the postmaster serving `pgdata`, or None if none runs (or the pid file is stale)."""
    import psutil

    pid = _read_pid_first_line(pgdata / "postmaster.pid")
    if pid is None:
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE or "postgres" not in proc.name():
            return None
    except psutil.NoSuchProcess:
        return None
    return pid


def _read_pid_first_line(path: Path) -> int | None:
    try:
        return int(path.read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stop_postgres(pgdata: Path) -> int | None:
    """`pg_ctl stop` as pgserver's own cleanup does it; returns the stopped pid."""
    pid = _postmaster_pid(pgdata)
    if pid is None:
        return None
    private_runtime_dir()
    import psutil
    from pgserver._commands import pg_ctl

    user = None
    owner = pgdata.stat().st_uid
    if os.geteuid() == 0 and owner != 0:  # pgserver runs postgres as its own system user when root
        import pwd

        user = pwd.getpwuid(owner).pw_name
    try:
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user, timeout=60)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        log.warning("pg_ctl stop failed for %s; terminating pid %d", pgdata, pid)
        try:
            proc = psutil.Process(pid)
            proc.terminate()
            try:
                proc.wait(5)
            except psutil.TimeoutExpired:
                proc.kill()
        except psutil.NoSuchProcess:
            pass
    _forget_pgserver_handle(pgdata)
    return pid


def _forget_pgserver_handle(pgdata: Path) -> None:
    """pgserver caches one handle per pgdata; a stale one would hand back a stopped server.

    Its own `_cleanup` releases the handle (cleanup_mode None stops nothing); dropping it
    from the cache and from atexit as well covers the case where it is not the last handle.
    """
    module = sys.modules.get("pgserver.postgres_server")
    if module is None:
        return
    handle = module.PostgresServer._instances.get(pgdata.resolve())
    if handle is None:
        return
    handle._cleanup()
    module.PostgresServer._instances.pop(pgdata.resolve(), None)
    atexit.unregister(handle._cleanup)


# -- show -------------------------------------------------------------------------------

def describe(stack: DevStack) -> str:
    """What runs where, for the terminal; DSNs print masked."""
    c = stack.counts
    prod = (f"{c.get('users', 0):,} users, {c.get('orders', 0):,} orders, {c.get('audit_logs', 0):,} audit logs"
            + ("" if stack.seeded else "; kept from an earlier `dev up`"))
    lines = [
        f"Dev stack in {stack.root}",
        f"  PostgreSQL 16 (embedded), data in {stack.pgdata}",
        f"    production  {stack.pg_dsn_production}  ({prod})",
        f"    staging     {stack.pg_dsn_staging}  ({'sample schema, no rows' if stack.seeded else 'kept'})",
    ]
    if stack.s3_endpoint:
        lines.append(f"  Backups     {stack.storage_url} on moto S3 at {stack.s3_endpoint} "
                     f"(pid {stack.s3_pid}, log {stack.root / 's3.log'})")
    else:
        lines.append(f"  Backups     {stack.storage_url}")
    lines += [
        f"  Config      {stack.config_path}",
        f"Use it with: export DATAOPS_CONFIG={stack.config_path}",
        f"Stop with:   dataops dev down --root {stack.root}",
    ]
    return "\n".join(lines)
