"""Schema migrations: Alembic revisions applied the way a production database needs.

Alembic knows the revision graph and renders SQL; this module decides how revisions touch a
live database:

- One migration at a time per database: a session-level advisory lock, taken with
  pg_try_advisory_lock so a second run fails at once and names the holder instead of queueing
  behind it (and, while queued, in front of the application's own queries).
- One transaction per revision, begun here so that `SET LOCAL lock_timeout` and
  `statement_timeout` apply to exactly that revision. A DDL statement waiting for a lock
  blocks every query queued behind it, so waiting is capped and retried with backoff, a
  bounded number of times, instead of hanging.
- A revision marked `transactional = False` (CREATE INDEX CONCURRENTLY, batched backfills) runs
  in its own autocommit block on the same connection that holds the lock; running it from
  another connection can deadlock against the lock holder's transaction.
- The version table and the audit table live in `dataops_migrations`, which fingerprints and
  table lists leave out.
- A run killed in the middle (kill -9, an evicted pod) leaves whole revisions only, except
  inside a `transactional = False` revision, whose statements commit one by one. The server
  is told to end the session as soon as the client is gone (`client_connection_check_interval`),
  so a dead run's DDL neither runs on nor keeps the lock. What an unfinished non-transactional
  revision left is cleaned by the next run either way: going up, an INVALID index the revision
  builds is dropped before it runs (CREATE INDEX CONCURRENTLY IF NOT EXISTS would keep it);
  going back (the rollback), the revision's downgrade runs first, without a version change.

Everything here is a plain function taking a `MigrationTarget` first, so the CLI, the tests
and the dev stack use them without Prefect; the Prefect tasks at the bottom take the
`Environment` a flow resolved and build the target from it.
"""

from __future__ import annotations

import contextlib
import getpass
import io
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from prefect import task

from dataops.dsn import Dsn
from dataops.errors import BadInput, OperationFailed, SafetyRefusal, first_line
from dataops.failpoints import failpoint
from dataops.settings import Environment, MigrationSettings, Settings
from dataops.tasks import pg
from dataops.tasks.retries import RETRY_TRANSIENT, RUN_ONCE

log = logging.getLogger("dataops.migrate")

VERSION_SCHEMA = "dataops_migrations"
# How often (ms) the server checks, while a statement of ours runs, that this process is still
# there: a killed run's CREATE INDEX CONCURRENTLY or table rewrite then ends within a second,
# letting go of its locks, instead of running to the end for nobody (PostgreSQL 14 and later).
CLIENT_CHECK_MS = 1000

# Two int4 halves of the advisory lock key, 'data' and 'migr' in ASCII, so that the lock is
# easy to recognise in pg_locks (classid, objid; objsubid 2 for the two-key form).
LOCK_KEY = (0x64617461, 0x6D696772)
# Taken alone after LOCK_KEY (tasks/pg.py says why). Tried, never waited for (beyond wait_s): a
# running transform refuses the migration, naming it.
SCHEMA_LOCK = pg.SCHEMA_LOCK

# Alembic keeps the running migration's context in module globals (`alembic.context`,
# `alembic.op`), so two Alembic commands in one process at once break each other. Runs in
# separate processes (the CLI, deployments) are kept apart by the advisory lock; runs in
# threads of one process also queue here.
_ALEMBIC = threading.RLock()


@dataclass(frozen=True)
class MigrationTarget:
    """Where migrations run and with which rules: a database, the migrations folder, options."""

    dsn: Dsn
    path: Path
    options: MigrationSettings = field(default_factory=MigrationSettings)
    label: str = ""  # environment name, for messages
    connect_timeout: int = 10

    @property
    def name(self) -> str:
        return self.label or self.dsn.database


@dataclass(frozen=True)
class Revision:
    revision: str
    down_revision: str | None
    message: str
    transactional: bool
    path: str

    def __str__(self) -> str:
        return f"{self.revision} {self.message}"


@dataclass
class Status:
    current: str | None
    head: str
    applied: list[Revision]
    pending: list[Revision]


@dataclass
class RevisionPlan:
    revision: str
    message: str
    transactional: bool
    sql: str
    path: str


@dataclass
class StepResult:
    revision: str
    direction: str  # up | down
    seconds: float
    attempts: int
    unfinished: bool = False  # down: a revision never recorded as applied, undone after an interrupted run


@dataclass
class ApplyResult:
    from_revision: str | None
    to_revision: str | None
    steps: list[StepResult]
    seconds: float

    @property
    def revisions(self) -> list[str]:
        return [s.revision for s in self.steps]


# -- finding the migrations ------------------------------------------------------------------

def target_for(settings: Settings, env: Environment) -> MigrationTarget:
    return MigrationTarget(env.database_url, settings.migrations_dir, settings.migrations, env.name,
                           settings.postgres.connect_timeout)


def alembic_config(path: Path, *, connection=None, buffer: io.StringIO | None = None):
    from alembic.config import Config

    if not (path / "env.py").is_file() or not (path / "versions").is_dir():
        raise BadInput(f"migrations folder {path} not found or incomplete (needs env.py and versions/); "
                       "set migrations.path in dataops.yaml")
    cfg = Config(output_buffer=buffer) if buffer is not None else Config()
    cfg.set_main_option("script_location", str(path))
    cfg.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    cfg.set_main_option("truncate_slug_length", "40")
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def script_directory(path: Path):
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(path))


def revisions(path: Path) -> list[Revision]:
    """Every revision, oldest first. One line of history only: branches must be merged first,
    because 'the revision before this run' must be a single point to roll back to."""
    script = script_directory(path)
    try:
        heads = script.get_heads()
    except Exception as exc:  # noqa: BLE001 - Alembic raises several kinds for a broken graph
        raise BadInput(f"migrations in {path}: {exc}; fix down_revision in the revision files") from None
    if len(heads) > 1:
        raise BadInput(f"migrations in {path} have {len(heads)} heads ({', '.join(sorted(heads))}); "
                       "give one of them the other as down_revision so history is a single line")
    out = []
    for sc in reversed(list(script.walk_revisions())):
        if isinstance(sc.down_revision, (tuple, list)):
            raise BadInput(f"revision {sc.revision} merges {', '.join(sc.down_revision)}; "
                           "dataops supports a single line of revisions")
        out.append(Revision(sc.revision, sc.down_revision, (sc.doc or "").strip().splitlines()[0] if sc.doc else "",
                            bool(getattr(sc.module, "transactional", True)), sc.path))
    return out


def resolve(path: Path, revision: str | None) -> str | None:
    """'head', 'base', a revision id or a unique prefix of one -> the id (None for base)."""
    revs = revisions(path)
    if revision in (None, "base"):
        return None
    if revision == "head":
        if not revs:
            raise BadInput(f"no revisions in {path / 'versions'}; create one with `dataops migrate ENV new \"message\"`")
        return revs[-1].revision
    exact = [r.revision for r in revs if r.revision == revision]
    found = exact or [r.revision for r in revs if r.revision.startswith(revision)]
    if len(found) != 1:
        known = ", ".join(r.revision for r in revs) or "none"
        why = "is ambiguous" if found else "does not exist"
        raise BadInput(f"revision '{revision}' {why} (known: {known}, head, base)")
    return found[0]


def _index(revs: list[Revision], revision: str | None) -> int:
    """Position after `revision` in `revs` (0 for base)."""
    if revision is None:
        return 0
    for i, r in enumerate(revs):
        if r.revision == revision:
            return i + 1
    raise OperationFailed(f"the database is at revision '{revision}', which is not in the migrations folder; "
                          "point migrations.path at the folder this database was migrated with")


# -- connections and the lock -----------------------------------------------------------------

def who_am_i() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


@contextlib.contextmanager
def connection(mt: MigrationTarget, *, who: str | None = None) -> Iterator:
    """A SQLAlchemy connection for Alembic on one psycopg connection, with the timeouts set
    for the whole session (they then also cover autocommit blocks) and our schema in place."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    app_name = f"dataops-migrate {who or who_am_i()}"[:63]

    def creator():
        raw = psycopg.connect(mt.dsn.conninfo(connect_timeout=mt.connect_timeout, application_name=app_name))
        return raw

    with pg.connect(mt.dsn, autocommit=True, timeout=mt.connect_timeout):  # turns libpq errors into one line
        pass
    engine = create_engine("postgresql+psycopg://", creator=creator, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT set_config('lock_timeout', :lt, false), set_config('statement_timeout', :st, false)"),
                         {"lt": mt.options.lock_timeout, "st": mt.options.statement_timeout})
            conn.execute(text("SELECT set_config('client_connection_check_interval', :ms, false) "
                              "WHERE current_setting('server_version_num')::int >= 140000"),
                         {"ms": str(CLIENT_CHECK_MS)})
            conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {VERSION_SCHEMA}"))
            conn.commit()
            yield conn
    finally:
        engine.dispose()


def current_revision(conn) -> str | None:
    from alembic.runtime.migration import MigrationContext

    ctx = MigrationContext.configure(conn, opts={"version_table_schema": VERSION_SCHEMA})
    rev = ctx.get_current_revision()
    if conn.in_transaction():
        conn.commit()
    return rev


def read_current(dsn: Dsn, timeout: int = 10) -> str | None:
    """The database's revision, read without writing anything (no schema, no table created)."""

    with pg.connect(dsn, autocommit=True, timeout=timeout) as conn:
        if conn.execute("SELECT to_regclass(%s)", (f"{VERSION_SCHEMA}.alembic_version",)).fetchone()[0] is None:
            return None
        rows = conn.execute(f"SELECT version_num FROM {VERSION_SCHEMA}.alembic_version").fetchall()
    if len(rows) > 1:
        raise OperationFailed(f"the database records {len(rows)} current revisions; dataops supports one line of history")
    return rows[0][0] if rows else None


_HOLDER = """
SELECT a.pid, a.application_name, a.usename, a.client_addr::text,
       to_char(a.backend_start AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %(a)s AND l.objid = %(b)s AND l.objsubid = 2
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
LIMIT 1"""


_SHARERS = """
SELECT a.pid, a.application_name, a.usename, a.client_addr::text,
       to_char(a.backend_start AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %(c)s AND l.objid = %(d)s AND l.objsubid = 2
  AND l.mode = 'ShareLock' AND l.pid <> pg_backend_pid()
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
ORDER BY a.backend_start"""


def _busy(label: str, holder: str) -> OperationFailed:
    return OperationFailed(f"another migration holds the lock on {label} ({holder}); "
                           "wait for it to finish, or end that session if it is stuck")


def _transforms_busy(label: str, rows: list) -> OperationFailed:
    """The transforms holding the schema lock shared, each named with its session."""
    named = []
    for row in rows or [None]:
        named.append(f"transform {pg.transform_of(row[1]) if row else '?'}: {pg.holder_words(row)}")
    return OperationFailed(f"a data transform is running on {label} ({'; '.join(named)}); a migration does not "
                           "change the schema under a transform's batches: wait for it to finish, or end that session "
                           "if it is stuck")


def _take_both(conn, label: str) -> OperationFailed | None:
    """LOCK_KEY, then SCHEMA_LOCK alone; None when both are held, else why not (neither is held)."""
    keys = {"a": LOCK_KEY[0], "b": LOCK_KEY[1], "c": SCHEMA_LOCK[0], "d": SCHEMA_LOCK[1]}
    if not conn.exec_driver_sql("SELECT pg_try_advisory_lock(%(a)s, %(b)s)", keys).scalar():
        return _busy(label, pg.holder_words(conn.exec_driver_sql(_HOLDER, keys).fetchone()))
    if conn.exec_driver_sql("SELECT pg_try_advisory_lock(%(c)s, %(d)s)", keys).scalar():
        return None
    busy = _transforms_busy(label, conn.exec_driver_sql(_SHARERS, keys).fetchall())
    conn.exec_driver_sql("SELECT pg_advisory_unlock(%(a)s, %(b)s)", keys)
    return busy


@contextlib.contextmanager
def migration_lock(conn, label: str, wait_s: float = 0.0) -> Iterator[None]:
    """The session-level advisory lock on this connection, and the schema lock alone (no data
    transform runs meanwhile); or OperationFailed naming the holder.

    `wait_s` > 0 keeps trying that long first: a rollback starts while the failed run may
    still be letting go of the lock. Otherwise a held lock fails at once (see the module).
    """
    keys = {"a": LOCK_KEY[0], "b": LOCK_KEY[1], "c": SCHEMA_LOCK[0], "d": SCHEMA_LOCK[1]}
    raw = conn.connection.dbapi_connection  # psycopg: the SQL below has no SQLAlchemy binds
    deadline = time.monotonic() + wait_s
    while (busy := _take_both(conn, label)) is not None:
        conn.commit()
        if time.monotonic() >= deadline:
            raise busy
        time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
    conn.commit()
    try:
        yield
    finally:
        if not conn.closed and not conn.invalidated and not raw.closed:
            try:
                if conn.in_transaction():
                    conn.rollback()
                conn.exec_driver_sql("SELECT pg_advisory_unlock(%(c)s, %(d)s), pg_advisory_unlock(%(a)s, %(b)s)",
                                     keys)
                conn.commit()
            except Exception:  # noqa: BLE001 - closing the connection releases it anyway
                log.warning("could not release the migration lock explicitly; it goes with the connection")


def lock_is_free(mt: MigrationTarget) -> str | None:
    """None if no migration holds the lock right now, else who does (as an error sentence).
    A hint for preflight only; the lock taken before applying is what guarantees one run at
    a time. Writes nothing."""

    keys = {"a": LOCK_KEY[0], "b": LOCK_KEY[1], "c": SCHEMA_LOCK[0], "d": SCHEMA_LOCK[1]}
    with pg.connect(mt.dsn, autocommit=True, timeout=mt.connect_timeout) as conn:
        if not conn.execute("SELECT pg_try_advisory_lock(%(a)s, %(b)s)", keys).fetchone()[0]:
            return _busy(mt.name, pg.holder_words(conn.execute(_HOLDER, keys).fetchone())).message
        conn.execute("SELECT pg_advisory_unlock(%(a)s, %(b)s)", keys)
        if not conn.execute("SELECT pg_try_advisory_lock(%(c)s, %(d)s)", keys).fetchone()[0]:
            return _transforms_busy(mt.name, conn.execute(_SHARERS, keys).fetchall()).message
        conn.execute("SELECT pg_advisory_unlock(%(c)s, %(d)s)", keys)
        return None


# -- reading: status and plan -------------------------------------------------------------------

def status(mt: MigrationTarget) -> Status:
    revs = revisions(mt.path)
    if not revs:
        raise BadInput(f"no revisions in {mt.path / 'versions'}; create one with `dataops migrate ENV new \"message\"`")
    current = read_current(mt.dsn, mt.connect_timeout)
    i = _index(revs, current)
    return Status(current, revs[-1].revision, revs[:i], revs[i:])


def upgrade_path(mt: MigrationTarget, current: str | None, to: str = "head") -> list[Revision]:
    revs = revisions(mt.path)
    target = resolve(mt.path, to)
    start, end = _index(revs, current), _index(revs, target)
    if end < start:
        raise BadInput(f"{mt.name} is at {current}, past {target}; use `dataops migrate {mt.name} down --to {target}`")
    return revs[start:end]


def plan(mt: MigrationTarget, to: str = "head", *, current: str | None | type = ...) -> list[RevisionPlan]:
    """The SQL each pending revision would run, rendered offline (Alembic --sql mode).

    The database is only read, for its current revision; pass `current` to skip even that.
    """
    from alembic import command

    if current is ...:
        current = read_current(mt.dsn, mt.connect_timeout)
    revs = upgrade_path(mt, current, to)
    at_once = _plan_at_once(mt, revs)  # Alembic loads every revision file per run: once, not once per revision
    if at_once is not None:
        return at_once
    out = []
    for rev in revs:
        buf = io.StringIO()
        cfg = alembic_config(mt.path, buffer=buf)
        spec = f"{rev.down_revision}:{rev.revision}" if rev.down_revision else rev.revision
        try:
            with _ALEMBIC:
                command.upgrade(cfg, spec, sql=True)
        except Exception as exc:  # noqa: BLE001 - a broken revision file: say which one
            raise BadInput(f"revision {rev.revision} ({Path(rev.path).name}) cannot be rendered: "
                           f"{type(exc).__name__}: {exc}") from None
        out.append(RevisionPlan(rev.revision, rev.message, rev.transactional, buf.getvalue(), rev.path))
    return out


def _plan_at_once(mt: MigrationTarget, revs: list[Revision]) -> list[RevisionPlan] | None:
    """plan()'s SQL from one offline run, cut at each revision's BEGIN; None if that fails
    (then plan() renders revision by revision and names the one that cannot be rendered)."""
    import re

    from alembic import command

    if len(revs) < 2:
        return None
    buf = io.StringIO()
    first = revs[0]
    spec = f"{first.down_revision}:{revs[-1].revision}" if first.down_revision else revs[-1].revision
    try:
        with _ALEMBIC:
            command.upgrade(alembic_config(mt.path, buffer=buf), spec, sql=True)
    except Exception:  # noqa: BLE001 - the one-by-one path reports it
        return None
    text = buf.getvalue()
    marks = list(re.finditer(r"^-- Running upgrade \S* ?-> (\S+)$", text, re.MULTILINE))
    if [m.group(1) for m in marks] != [r.revision for r in revs] or \
            not all(text[:m.start()].rstrip().endswith("BEGIN;") for m in marks[1:]):
        return None
    cuts = [0, *(text.rfind("BEGIN;", 0, m.start()) for m in marks[1:]), len(text)]
    return [RevisionPlan(r.revision, r.message, r.transactional, text[cuts[i]:cuts[i + 1]], r.path)
            for i, r in enumerate(revs)]


def plan_text(plans: list[RevisionPlan]) -> str:
    if not plans:
        return "-- nothing to apply"
    parts = []
    for p in plans:
        mode = "" if p.transactional else " (not transactional: runs outside a transaction)"
        parts.append(f"-- revision {p.revision}: {p.message}{mode}\n{p.sql.strip()}\n")
    return "\n".join(parts)


# -- writing: upgrade, downgrade, stamp ------------------------------------------------------------

def _pg_error(exc: BaseException) -> BaseException | None:
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, psycopg.Error):
            return exc
        exc = getattr(exc, "orig", None) or exc.__cause__ or exc.__context__
        seen += 1
    return None


def _run_step(conn, mt: MigrationTarget, rev: Revision, direction: str, destination: str | None) -> StepResult:
    """One revision, one way, with lock-timeout retries. Transactional revisions run in a
    transaction begun here (Alembic joins it), so a failure leaves nothing of the revision.

    direction "undo": the downgrade of a non-transactional revision the database does not
    record as applied, which an interrupted run may have left partly done (see downgrade())."""
    from alembic import command
    from sqlalchemy import text

    opts = mt.options
    attempts = opts.lock_retries + 1
    t0 = time.monotonic()
    if direction == "up" and not rev.transactional:
        _drop_invalid_leftovers(conn, mt, rev)
    for attempt in range(1, attempts + 1):
        cfg = alembic_config(mt.path, connection=conn)
        try:
            if rev.transactional:
                with conn.begin():
                    conn.execute(text("SELECT set_config('lock_timeout', :lt, true), "
                                      "set_config('statement_timeout', :st, true)"),
                                 {"lt": opts.lock_timeout, "st": opts.statement_timeout})
                    _alembic_step(command, cfg, direction, destination, rev)
            else:
                _alembic_step(command, cfg, direction, destination, rev)
                if conn.in_transaction():
                    conn.commit()
            return StepResult(rev.revision, "up" if direction == "up" else "down", round(time.monotonic() - t0, 3),
                              attempt, unfinished=direction == "undo")
        except Exception as exc:  # noqa: BLE001 - classified below
            if conn.in_transaction():
                conn.rollback()
            pg_exc = _pg_error(exc)
            if isinstance(pg_exc, psycopg.errors.LockNotAvailable) and attempt < attempts:
                delay = opts.lock_retry_delay_s * 2 ** (attempt - 1) * (1 + random.random() * 0.25)
                log.warning("revision %s (%s): lock_timeout %s reached (attempt %d of %d); retrying in %.1f s",
                            rev.revision, direction, opts.lock_timeout, attempt, attempts, delay)
                time.sleep(delay)
                continue
            raise _step_error(mt, rev, direction, exc, pg_exc, attempt) from None
    raise AssertionError("unreachable")  # pragma: no cover


def _alembic_step(command, cfg, direction: str, destination: str | None, rev: Revision) -> None:
    from sqlalchemy import event

    conn = cfg.attributes["connection"]
    event.listen(conn, "after_execute", _statement_done)
    try:
        with _ALEMBIC:
            if direction == "up":
                command.upgrade(cfg, destination)
            elif direction == "down":
                command.downgrade(cfg, destination or "base")
            else:
                _downgrade_unrecorded(conn, cfg, rev)
    finally:
        event.remove(conn, "after_execute", _statement_done)


def _statement_done(conn, clause, *args) -> None:
    """After each statement of a revision itself (its SQL and DDL, not Alembic's reads and
    writes of the version table): a transactional revision's are still open, a
    non-transactional one's committed, the revision not yet recorded."""
    from sqlalchemy.sql.ddl import ExecutableDDLElement
    from sqlalchemy.sql.elements import TextClause

    if isinstance(clause, TextClause) or (
            isinstance(clause, ExecutableDDLElement)
            and getattr(getattr(clause, "element", None), "name", None) != "alembic_version"):
        failpoint("migrate.inside_revision")


def _downgrade_unrecorded(conn, cfg, rev: Revision) -> None:
    """Run a revision's downgrade() as Alembic would, but leave the version table alone: the
    database never recorded the revision as applied."""
    from alembic.operations import Operations
    from alembic.runtime.migration import MigrationContext

    module = script_directory(Path(cfg.get_main_option("script_location"))).get_revision(rev.revision).module
    ctx = MigrationContext.configure(conn, opts={"version_table_schema": VERSION_SCHEMA,
                                                 "transaction_per_migration": True})
    with Operations.context(ctx), ctx.begin_transaction(_per_migration=True):
        module.downgrade()


_INVALID_LEFTOVER = """
SELECT format('%%I.%%I', n.nspname, c.relname)
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relname = %(name)s AND NOT i.indisvalid
  AND NOT EXISTS (SELECT 1 FROM pg_stat_progress_create_index p WHERE p.index_relid = i.indexrelid)"""


def concurrent_indexes(sql: str) -> list[tuple[str, str]]:
    """(schema, index) of each named index that CREATE INDEX CONCURRENTLY builds in `sql`
    (an index lives in its table's schema); [] if the SQL does not parse."""
    from pglast import parse_sql
    from pglast.parser import ParseError

    try:
        stmts = parse_sql(sql)
    except ParseError:
        return []
    return [(s.stmt.relation.schemaname or "public", s.stmt.idxname) for s in stmts
            if type(s.stmt).__name__ == "IndexStmt" and s.stmt.concurrent and s.stmt.idxname]


def built_concurrently(mt: MigrationTarget, rev: Revision) -> list[tuple[str, str]]:
    """(schema, index) of each named index the revision's upgrade builds with CREATE INDEX
    CONCURRENTLY, read from its SQL rendered offline; [] if it does not render."""
    try:
        plans = plan(mt, rev.revision, current=rev.down_revision)
    except BadInput:
        return []
    return [ix for p in plans for ix in concurrent_indexes(p.sql)]


def _drop_invalid_leftovers(conn, mt: MigrationTarget, rev: Revision) -> None:
    """Drop the INVALID indexes a non-transactional revision builds, before it runs.

    An interrupted CREATE INDEX CONCURRENTLY (a killed run, a cancelled or failed build) leaves
    its index behind, INVALID: never used by queries, still paid for by every write. Running the
    revision again would fail on "already exists", or, with IF NOT EXISTS, succeed and keep it
    INVALID for good. Only the revision's own index names are touched, under the migration lock,
    and none whose build is running right now."""
    names = built_concurrently(mt, rev)
    if not names:
        return
    raw = conn.connection.dbapi_connection
    if conn.in_transaction():
        conn.commit()
    raw.autocommit = True  # DROP INDEX CONCURRENTLY cannot run in a transaction
    try:
        for schema, name in names:
            row = raw.execute(_INVALID_LEFTOVER, {"schema": schema, "name": name}).fetchone()
            if row:
                log.warning("revision %s: dropping the INVALID index %s left by an interrupted build, so that it is "
                            "built again", rev.revision, row[0])
                raw.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {row[0]}")
    except psycopg.Error as exc:
        raise OperationFailed(f"revision {rev.revision} on {mt.name}: could not drop the INVALID index an interrupted "
                              f"build left ({first_line(exc)}); nothing of the revision was run this time; drop it "
                              "with DROP INDEX CONCURRENTLY, or retry when it is quieter") from None
    finally:
        if not raw.closed:
            raw.autocommit = False


def _step_error(mt: MigrationTarget, rev: Revision, direction: str, exc: BaseException,
                pg_exc: BaseException | None, attempts: int) -> OperationFailed:
    what = f"{'upgrade' if direction == 'up' else 'downgrade'} of revision {rev.revision} on {mt.name}"
    left = ("nothing of it was applied" if rev.transactional else
            "it is not transactional, so part of it may have run; fix it and run it again (it must be safe to re-run)")
    if isinstance(pg_exc, psycopg.errors.LockNotAvailable):
        return OperationFailed(f"{what} could not get its table locks within lock_timeout ({mt.options.lock_timeout}) "
                               f"in {attempts} attempt{'s' if attempts > 1 else ''}: {first_line(pg_exc)}; "
                               "find the blocking session in pg_stat_activity, or retry when it is quieter; " + left)
    if isinstance(pg_exc, psycopg.errors.QueryCanceled):
        return OperationFailed(f"{what} ran longer than statement_timeout ({mt.options.statement_timeout}) and was "
                               f"cancelled; raise migrations.statement_timeout or split the revision; {left}")
    detail = first_line(pg_exc) if pg_exc is not None else f"{type(exc).__name__}: {first_line(exc)}"
    return OperationFailed(f"{what} failed: {detail}; {left}")


def upgrade(mt: MigrationTarget, to: str = "head", *, expect_from: str | None | type = ..., who: str | None = None,
            on_step: Callable[[StepResult], None] | None = None,
            on_start: Callable[[], None] | None = None) -> ApplyResult:
    """Apply the revisions up to `to`, one transaction each, under the migration lock.

    `expect_from` is the revision the plan was made (and approved) at: if another run moved
    the database meanwhile, nothing is applied, since what would run is not what was approved.
    `on_start` is called once the lock is held and the check passed, before the first revision.
    """
    t0 = time.monotonic()
    with connection(mt, who=who) as conn, migration_lock(conn, mt.name):
        current = current_revision(conn)
        if expect_from is not ... and current != expect_from:
            raise OperationFailed(f"{mt.name} is at revision {current or 'base'}, but the plan was made at "
                                  f"{expect_from or 'base'} (another run migrated it meanwhile); nothing was applied; "
                                  "plan and run again")
        steps = []
        path = upgrade_path(mt, current, to)
        if on_start and path:
            on_start()  # from here on this run may change the schema; before, it has not
        for rev in path:
            failpoint("migrate.before_revision")
            step = _run_step(conn, mt, rev, "up", rev.revision)
            # Committed with its version row; the caller's audit (on_step) does not list it yet.
            failpoint("migrate.after_revision")
            log.info("applied %s to %s in %.2f s (%d attempt(s))", rev, mt.name, step.seconds, step.attempts)
            steps.append(step)
            if on_step:
                on_step(step)
        final = current_revision(conn)
    return ApplyResult(current, final, steps, round(time.monotonic() - t0, 3))


def downgrade_path(mt: MigrationTarget, current: str | None, to: str | None = None,
                   steps: int | None = None) -> list[Revision]:
    """The revisions to undo, newest first: down to `to` ('base' or a revision), or `steps` of them."""
    revs = revisions(mt.path)
    i = _index(revs, current)
    if (to is None) == (steps is None):
        raise BadInput("say where to go down to: --to REV (or base) or --steps N, not both")
    if steps is not None:
        if steps < 1:
            raise BadInput(f"--steps must be at least 1 (got {steps})")
        if steps > i:
            raise BadInput(f"{mt.name} has {i} applied revision(s); cannot go down {steps}")
        return list(reversed(revs[i - steps:i]))
    j = _index(revs, resolve(mt.path, to))
    if j > i:
        raise BadInput(f"{mt.name} is at {current or 'base'}, below {to}; use `dataops migrate {mt.name} up --to {to}`")
    return list(reversed(revs[j:i]))


def guard_downgrade(env: Environment, confirm: str | None) -> None:
    """A downgrade drops what the revisions added: on production, only with the name typed back."""
    if env.is_production and confirm != env.name:
        raise SafetyRefusal(f"environment '{env.name}' has role production; a downgrade drops what the "
                            f"revisions added. Pass --confirm {env.name} (flow parameter "
                            f"confirm='{env.name}') if you mean it")


def unfinished_revision(mt: MigrationTarget, current: str | None, target: str | None) -> Revision | None:
    """The revision a run going up from `current` to `target` was applying when it stopped, if
    it is non-transactional (its committed statements stay); None otherwise."""
    if target is None or current == target:
        return None
    try:
        path = upgrade_path(mt, current, target)
    except (BadInput, OperationFailed):  # the database is elsewhere: not that run's doing
        return None
    return path[0] if path and not path[0].transactional else None


def downgrade(mt: MigrationTarget, to: str | None = None, *, steps: int | None = None, who: str | None = None,
              on_step: Callable[[StepResult], None] | None = None, lock_wait_s: float = 0.0,
              interrupted_target: str | None = None) -> ApplyResult:
    """Undo revisions, newest first, one transaction each, under the migration lock (waited
    for up to `lock_wait_s`).

    `interrupted_target`: the target of a run going up that failed or was killed (the rollback
    passes it). If the revision it was applying is non-transactional, part of it may be there
    without being recorded; its downgrade, which like its upgrade must be safe to run again,
    runs first. If that fails, the rest still runs and the caller's schema check decides.
    """
    t0 = time.monotonic()
    with connection(mt, who=who) as conn, migration_lock(conn, mt.name, lock_wait_s):
        current = current_revision(conn)
        done = []
        undo = downgrade_path(mt, current, to, steps)
        unfinished = unfinished_revision(mt, current, interrupted_target)
        if unfinished is not None:
            failpoint("migrate.before_downgrade")
            try:
                step = _run_step(conn, mt, unfinished, "undo", None)
            except OperationFailed as exc:
                log.warning("could not undo what the interrupted run left of %s on %s: %s", unfinished, mt.name,
                            exc.message)
            else:
                failpoint("migrate.after_downgrade")
                log.info("undid the unrecorded part of %s on %s in %.2f s", unfinished, mt.name, step.seconds)
                done.append(step)
                if on_step:
                    on_step(step)
        for rev in undo:
            failpoint("migrate.before_downgrade")
            step = _run_step(conn, mt, rev, "down", rev.down_revision)
            # Committed with its version row; the caller's audit does not list it yet.
            failpoint("migrate.after_downgrade")
            log.info("undid %s on %s in %.2f s", rev, mt.name, step.seconds)
            done.append(step)
            if on_step:
                on_step(step)
        final = current_revision(conn)
    return ApplyResult(current, final, done, round(time.monotonic() - t0, 3))


def stamp(mt: MigrationTarget, revision: str) -> None:
    """Record `revision` as applied without running anything (a schema built another way)."""
    from alembic import command

    rev = resolve(mt.path, revision)
    with connection(mt) as conn, migration_lock(conn, mt.name):
        with conn.begin(), _ALEMBIC:
            command.stamp(alembic_config(mt.path, connection=conn), rev or "base")


# -- writing revision files ---------------------------------------------------------------------

def new_revision(path: Path, message: str) -> Path:
    """A new revision file from the template (upgrade and downgrade), numbered after the head."""
    from alembic import command

    message = message.strip()
    if not message:
        raise BadInput('give the revision a message, e.g. dataops migrate ENV new "add orders.discount"')
    revs = revisions(path)
    numbers = [int(r.revision) for r in revs if r.revision.isdigit()]
    rev_id = f"{(max(numbers) + 1) if numbers else 1:04d}"
    with _ALEMBIC:
        command.revision(alembic_config(path), message=message, rev_id=rev_id)
    created = sorted((path / "versions").glob(f"{rev_id}_*.py"))
    if not created:
        raise OperationFailed(f"alembic did not write revision {rev_id} into {path / 'versions'}")
    return created[0]


# -- round trip -----------------------------------------------------------------------------------

@dataclass
class RoundTripStep:
    revision: str
    message: str
    seconds: float
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def round_trip(mt: MigrationTarget, check: Callable[[Dsn], list[str]] | None = None) -> list[RoundTripStep]:
    """Every revision, oldest first, on `mt.dsn` (a scratch database): up, check, down, compare
    the schema fingerprint with the one before, up again. Stops at the first revision whose
    downgrade does not give back exactly the schema it started from."""
    from dataops.tasks.migration.checks import database_problems
    from dataops.tasks.schema import catalog_snapshot, diff_snapshots

    check = check or database_problems

    def snapshot() -> dict:
        with pg.connect(mt.dsn, timeout=mt.connect_timeout) as c:
            return catalog_snapshot(c)

    out = []
    for rev in revisions(mt.path):
        t0 = time.monotonic()
        problems: list[str] = []
        before = snapshot()
        try:
            upgrade(mt, rev.revision)
            problems += [f"after upgrade: {p}" for p in check(mt.dsn)]
            downgrade(mt, rev.down_revision or "base")
            diff = diff_snapshots(before, snapshot(), "before upgrade", "after downgrade")
            if diff:
                problems.append(f"downgrade does not give back the schema it started from: "
                                f"{'; '.join(map(str, diff[:3]))}{' ...' if len(diff) > 3 else ''}")
            else:
                upgrade(mt, rev.revision)
        except OperationFailed as exc:
            problems.append(exc.message)
        out.append(RoundTripStep(rev.revision, rev.message, round(time.monotonic() - t0, 3), problems))
        if problems:
            break
    return out


# -- Prefect tasks -----------------------------------------------------------------------------------

@task(name="migration-status", **RETRY_TRANSIENT)
def status_task(settings: Settings, env: Environment) -> Status:
    return status(target_for(settings, env))


@task(name="apply-migrations", **RUN_ONCE)
def upgrade_task(settings: Settings, env: Environment, to: str, expect_from: str | None, who: str,
                 on_step: Callable[[StepResult], None] | None = None,
                 on_start: Callable[[], None] | None = None) -> ApplyResult:
    # Run once: lock timeouts are retried per revision inside, and what to do after a failed
    # revision is the rollback flow's decision, not a retry's.
    return upgrade(target_for(settings, env), to, expect_from=expect_from, who=who, on_step=on_step,
                   on_start=on_start)


@task(name="downgrade-migrations", **RUN_ONCE)
def downgrade_task(settings: Settings, env: Environment, to: str | None, steps: int | None, who: str,
                   lock_wait_s: float = 0.0, interrupted_target: str | None = None) -> ApplyResult:
    return downgrade(target_for(settings, env), to, steps=steps, who=who, lock_wait_s=lock_wait_s,
                     interrupted_target=interrupted_target)
