"""Everything that talks to a PostgreSQL server as a server: connections, client binaries,
versions, and creating, renaming and dropping whole databases.

Client binaries must match the server's major version (a 15 pg_dump refuses a 16
server), so they are looked up in one place and checked before any work starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path

import psycopg
from psycopg import sql

from dataops.dsn import Dsn
from dataops.errors import ROW_SECURITY_FIX, BadInput, OperationFailed, TransientError, row_security_error
from dataops.failpoints import failpoint
from dataops.redact import redact

MAINTENANCE_DB = "postgres"
log = logging.getLogger("dataops.pg")


# -- connections ----------------------------------------------------------------------

@contextlib.contextmanager
def connect(dsn: Dsn, *, autocommit: bool = False, timeout: int = 10, dbname: str | None = None,
            application_name: str = "dataops") -> Iterator[psycopg.Connection]:
    """Open a connection, turning libpq's failures into errors that say what to fix.

    The session runs with row_security = off (Dsn.conninfo): a query that a row-level-security
    policy would filter fails instead, and that failure, raised out of the block, becomes the
    one-line BadInput naming the table and the fix."""
    overrides = {"connect_timeout": timeout, "application_name": application_name}
    if dbname:
        overrides["dbname"] = dbname
    target = dbname or dsn.database
    try:
        conn = psycopg.connect(dsn.conninfo(**overrides), autocommit=autocommit)
    except psycopg.OperationalError as exc:
        text = redact(str(exc)).strip().splitlines()[0] if str(exc).strip() else "no answer"
        if "does not exist" in text and "database" in text:
            raise BadInput(f"database \"{target}\" does not exist on {dsn.host}:{dsn.port}; create it or fix database_url") from None
        if "password authentication failed" in text or "no password supplied" in text:
            raise BadInput(f"cannot log in to {dsn.host}:{dsn.port} as {dsn.user}: {text}; fix the credentials in database_url") from None
        raise TransientError(f"cannot connect to PostgreSQL at {dsn.host}:{dsn.port} (database \"{target}\"): {text}; "
                             "check that the server is running and database_url is right") from None
    _iso_dates(conn)
    try:
        yield conn
    except psycopg.errors.InsufficientPrivilege as exc:
        err = row_security_error(exc, role=_role(conn), table=_rls_table(conn, exc))
        if err is None:
            raise
        raise err from None
    finally:
        conn.close()


def _iso_dates(conn: psycopg.Connection) -> None:
    """psycopg reads dates and timestamps only in ISO output: a database or role with
    `SET datestyle = 'SQL, DMY'` (set for a legacy application) made every timestamptz read fail.
    SET DateStyle = ISO changes the output format only; the input order the application relies
    on (DMY) stays. DateStyle is reported at login, so the usual case costs no round trip."""
    if (conn.info.parameter_status("DateStyle") or "ISO").startswith("ISO"):
        return
    conn.execute("SET DateStyle = ISO")
    if not conn.autocommit:
        conn.commit()


def _rls_table(conn: psycopg.Connection, exc: BaseException) -> str | None:
    """The qualified name of the table a row-level-security refusal names (PostgreSQL gives the
    bare name), when exactly one such table exists; the failed transaction is rolled back for it."""
    from dataops.errors import row_security_table

    name = row_security_table(exc)
    if name is None or conn.closed or conn.broken:
        return None
    try:
        conn.rollback()
        found = [r[0] for r in conn.execute(
            "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relname = %s AND c.relrowsecurity", (name,))]
        conn.rollback()
    except psycopg.Error:
        return None
    return found[0] if len(found) == 1 else None


def _role(conn: psycopg.Connection) -> str | None:
    try:
        return conn.info.user
    except Exception:  # noqa: BLE001 - a closed connection: the message does without the name
        return None


# -- row-level security ----------------------------------------------------------------------

def row_security_blockers(conn: psycopg.Connection) -> list[str]:
    """Tables whose row-level security would hide rows from the current role: RLS is enabled
    and the role neither owns the table (FORCE ROW LEVEL SECURITY applies to the owner too)
    nor is a superuser or BYPASSRLS. Quoted qualified names, sorted. With row_security = off a
    read of one of them fails; call this before starting, to refuse before anything is written."""
    return [r[0] for r in conn.execute(
        """
        SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relrowsecurity AND c.relkind IN ('r', 'p')
          AND n.nspname <> 'information_schema' AND n.nspname !~ '^pg_'
          AND NOT (SELECT r.rolsuper OR r.rolbypassrls FROM pg_roles r WHERE r.rolname = current_user)
          AND (c.relforcerowsecurity OR NOT pg_has_role(current_user, c.relowner, 'USAGE'))
        ORDER BY 1
        """).fetchall()]


def require_all_rows(conn: psycopg.Connection, doing: str) -> None:
    """BadInput (exit 2) when row-level security would hide rows of some table from this role:
    `doing` names the operation ("validate production")."""
    blocked = row_security_blockers(conn)
    if not blocked:
        return
    shown = ", ".join(blocked[:5]) + (f" and {len(blocked) - 5} more" if len(blocked) > 5 else "")
    raise BadInput(f"cannot {doing}: row-level security would hide rows of {shown} from role "
                   f"{_role(conn) or 'the connecting role'}; {ROW_SECURITY_FIX}")


def server_version(dsn: Dsn, timeout: int = 10, dbname: str | None = None) -> tuple[int, str]:
    """(major, full text) of the server, e.g. (16, '16.2'); `dbname` to ask through another database
    of the same server (the maintenance one, when the target may be renamed away)."""
    with connect(dsn, autocommit=True, timeout=timeout, dbname=dbname) as conn:
        num = conn.info.server_version
        full = conn.execute("SHOW server_version").fetchone()[0]
    return num // 10000, full.split()[0]


# -- client binaries ------------------------------------------------------------------

def _bundled_bin_dir() -> Path | None:
    try:
        from pgserver._commands import POSTGRES_BIN_PATH
    except Exception:  # noqa: BLE001 - pgserver missing or broken: fall back to PATH
        return None
    return Path(POSTGRES_BIN_PATH)


@lru_cache(maxsize=None)
def _binary_version(path: str) -> int:
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"(\d+)(?:\.(\d+))?", out)
    if not m:
        raise OperationFailed(f"cannot read the version of {path}")
    return int(m.group(1))


# Where packagers install each major version's client tools side by side: Debian and Ubuntu (and
# apt.postgresql.org), the PGDG RPMs of RHEL and Fedora, Homebrew's versioned formulae. A 15
# production and a 16 staging each find their own there without any setting.
PER_MAJOR_BIN_DIRS = ("/usr/lib/postgresql/{major}/bin", "/usr/pgsql-{major}/bin",
                      "/opt/homebrew/opt/postgresql@{major}/bin", "/usr/local/opt/postgresql@{major}/bin")


def _for_major(folder: str | Path, major: int) -> Path:
    return Path(str(folder).replace("{major}", str(major)))


def client_binary(name: str, server_major: int, bin_dir: Path | None = None) -> str:
    """Path to pg_dump/pg_restore/psql whose major version matches the server.

    Looks in postgres.bin_dir (`{major}` in it stands for the server's major version, so one
    setting serves servers of several versions, as a backup of 15 restored into 16 needs), then
    the per-major folders of PER_MAJOR_BIN_DIRS, then pgserver's bundled binaries, then PATH
    (Debian's /usr/bin/pg_dump is a wrapper that picks one version, not necessarily the server's).
    A mismatch is an error that names the setting, since a mismatched pg_dump refuses to run or
    writes an archive the other side cannot read.
    """
    candidates: list[Path] = []
    if bin_dir:
        candidates.append(_for_major(bin_dir, server_major) / name)
    candidates += [_for_major(folder, server_major) / name for folder in PER_MAJOR_BIN_DIRS]
    bundled = _bundled_bin_dir()
    if bundled:
        candidates.append(bundled / name)
    on_path = shutil.which(name)
    if on_path:
        candidates.append(Path(on_path))
    seen = []
    for c in dict.fromkeys(candidates):
        if c.exists() and os.access(c, os.X_OK):
            v = _binary_version(str(c))
            seen.append(f"{c} ({v})")
            if v == server_major:
                return str(c)
    found = "; found: " + ", ".join(seen) if seen else ""
    raise BadInput(f"no {name} for PostgreSQL {server_major}{found}; install the version {server_major} client tools "
                   f"(Debian/Ubuntu: postgresql-client-{server_major}) and set postgres.bin_dir in dataops.yaml "
                   "to their folder ({major} in it stands for the server's major version)")


def client_version(path: str) -> str:
    """The tool's own version number: `pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)` is 15.18, not
    the packager's suffix that ends the line."""
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    found = re.search(r"\)\s+(\d+(?:\.\d+)*\S*)", out)
    return found.group(1) if found else out.split()[-1]


# -- whole databases ------------------------------------------------------------------

def database_exists(dsn: Dsn, name: str) -> bool:
    with connect(dsn, autocommit=True, dbname=MAINTENANCE_DB) as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def create_database(dsn: Dsn, name: str) -> None:
    with connect(dsn, autocommit=True, dbname=MAINTENANCE_DB) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))


def terminate_connections(conn: psycopg.Connection, name: str) -> None:
    conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                 (name,))


def drop_database(dsn: Dsn, name: str, *, force: bool = True) -> None:
    with connect(dsn, autocommit=True, dbname=MAINTENANCE_DB) as conn:
        stmt = "DROP DATABASE IF EXISTS {} WITH (FORCE)" if force else "DROP DATABASE IF EXISTS {}"
        conn.execute(sql.SQL(stmt).format(sql.Identifier(name)))


def previous_name(target: str) -> str:
    """Where a swap puts the database it replaces until it is dropped: a name of its own per target
    (two targets that share their first 40 characters still differ by the digest), found again by
    the next swap."""
    digest = hashlib.sha256(target.encode()).hexdigest()[:8]
    return f"{target[:40]}_{digest}__dataops_old"


def recover_previous(conn: psycopg.Connection, target: str) -> str | None:
    """What an earlier swap left under `previous_name(target)`, put right; says what it did.

    Beside an existing target it is the database a finished swap replaced and failed to drop:
    dropped. Without the target it is the only copy left (the swap of an earlier dataops did its
    two renames one by one, and a kill between them lost the name): renamed back, never dropped.
    """
    old = previous_name(target)
    if not _db_exists(conn, old):
        return None
    if _db_exists(conn, target):
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(old)))
        return f"dropped {old}, the database an earlier swap replaced"
    conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(old), sql.Identifier(target)))
    return f"renamed {old} back to {target}: an interrupted swap had left it as the only copy"


def swap_database(dsn: Dsn, new: str, target: str, *, step: str, attempts: int = 3) -> str | None:
    """Put database `new` in place of `target` and return the replaced database's name (None when
    there was no target). The caller drops it once it is sure it no longer needs it.

    Both renames run in one transaction (ALTER DATABASE RENAME is transactional): a kill, a lost
    connection or a failure between them leaves the old target under its name, and readers see
    the old database or the new one, never a half-loaded one or none. Connections to both are
    closed first, since a rename needs that; a client that reconnects in between makes the
    transaction fail as a whole, and it is tried again. `step` names the failpoints
    (`<step>.between_renames`).
    """
    old = previous_name(target)
    ident = sql.Identifier
    for attempt in range(1, attempts + 1):
        try:
            with connect(dsn, autocommit=True, dbname=MAINTENANCE_DB) as conn:
                recovered = recover_previous(conn, target)
                if recovered:
                    log.warning("%s", recovered)
                exists = _db_exists(conn, target)
                terminate_connections(conn, new)
                with conn.transaction():
                    if exists:
                        terminate_connections(conn, target)
                        conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(ident(target), ident(old)))
                        failpoint(f"{step}.between_renames")
                    conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(ident(new), ident(target)))
            return old if exists else None
        except psycopg.errors.ObjectInUse as exc:
            if attempt == attempts:
                raise TransientError(f"could not switch database \"{target}\": {str(exc).splitlines()[0]}; "
                                     "the previous database is untouched, try again") from None
            time.sleep(1)
    return None  # not reached


# -- session locks ------------------------------------------------------------------------

# Two int4 halves, 'data' and 'schm' in ASCII (easy to spot in pg_locks: classid, objid, objsubid 2):
# every data transform holds this lock shared for its run, a migration takes it alone before it
# changes the schema. So a migration never alters a table under a transform's batches, nor does a
# transform start under a migration; either is refused at once, naming the other. Both wings use
# this one pair.
SCHEMA_LOCK = (0x64617461, 0x7363686D)
TRANSFORM_APP = "dataops-transform:"  # a transform's lock session: application_name is this and its name


def transform_of(application_name: str | None) -> str:
    """The transform a lock-holding session runs, from its application_name."""
    app = application_name or ""
    return app[len(TRANSFORM_APP):] if app.startswith(TRANSFORM_APP) else f"application_name {app or '-'}"


def try_lock(conn: psycopg.Connection, key: str) -> bool:
    """A session advisory lock named by `key`, held until the connection closes (a killed process
    lets it go with its connection)."""
    return conn.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (key,)).fetchone()[0]


@contextlib.contextmanager
def held_lock(dsn: Dsn, key: str, *, who: str, busy: str, dbname: str | None = None,
              timeout: int = 10) -> Iterator[psycopg.Connection]:
    """Hold the session lock `key` for the block, on a connection named `who` (what the holder is
    called when someone else asks); taken already, OperationFailed: `busy` and who holds it."""
    with connect(dsn, autocommit=True, dbname=dbname, timeout=timeout, application_name=who[:63]) as conn:
        if not try_lock(conn, key):
            raise OperationFailed(f"{busy} ({lock_holder(conn, key)}); wait for it to finish")
        yield conn


def replacement_lock(dsn: Dsn, env_name: str, what: str, timeout: int = 10):
    """One operation that replaces a whole database (a restore, a staging refresh) per target at a
    time, held on the server's maintenance database: the target itself is renamed away meanwhile."""
    return held_lock(dsn, f"dataops-replace:{dsn.database}", dbname=MAINTENANCE_DB, timeout=timeout,
                     who=f"dataops-{what} {env_name} pid {os.getpid()} on {socket.gethostname()}",
                     busy=f"another restore or refresh of '{env_name}' (database \"{dsn.database}\") is running")


def lock_holder(conn: psycopg.Connection, key: str) -> str:
    """Who holds the session lock `key`, in words an operator can act on."""
    row = conn.execute(
        """WITH k AS (SELECT hashtextextended(%s, 0) AS v)
           SELECT a.pid, a.application_name, a.usename, a.client_addr::text,
                  to_char(a.backend_start AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
           FROM k, pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
           WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
             AND l.classid = ((k.v >> 32) & 4294967295)::oid AND l.objid = (k.v & 4294967295)::oid
             AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
           LIMIT 1""", (key,)).fetchone()
    return holder_words(row)


def holder_words(row) -> str:
    """(pid, application_name, user, client address, since) as one phrase."""
    if row is None:
        return "a session that has just let it go"
    pid, app, user, addr, since = row
    return f"pid {pid}, application_name {app or '-'}, user {user}{', from ' + addr if addr else ''}, since {since}"


def _db_exists(conn: psycopg.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


# -- tables ---------------------------------------------------------------------------

def user_tables(conn: psycopg.Connection) -> list[tuple[str, str]]:
    """(schema, table) of every ordinary or partitioned table outside system schemas and our own."""
    rows = conn.execute(
        """
        SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
          AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'
          AND n.nspname NOT LIKE 'dataops\\_%%'
        ORDER BY 1, 2
        """
    ).fetchall()
    return [(r[0], r[1]) for r in rows]


# -- roles a database names ----------------------------------------------------------------

_USER_NS = "n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%'"
_OBJECT_ROLES = f"""
SELECT DISTINCT r.rolname FROM pg_roles r JOIN (
    SELECT c.relowner AS oid, c.relacl AS acl FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE {_USER_NS}
    UNION ALL SELECT n.nspowner, n.nspacl FROM pg_namespace n WHERE {_USER_NS} AND n.nspname NOT LIKE 'pg\\_%'
    UNION ALL SELECT p.proowner, p.proacl FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE {_USER_NS}
    UNION ALL SELECT t.typowner, t.typacl FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE {_USER_NS}
    UNION ALL SELECT 0, a.attacl FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace WHERE a.attacl IS NOT NULL AND {_USER_NS}
    UNION ALL SELECT d.defaclrole, d.defaclacl FROM pg_default_acl d
    UNION ALL SELECT l.lomowner, l.lomacl FROM pg_largeobject_metadata l
    UNION ALL SELECT e.extowner, NULL FROM pg_extension e
    UNION ALL SELECT unnest(p.polroles), NULL FROM pg_policy p
) o ON r.oid = o.oid OR r.oid IN (SELECT (aclexplode(o.acl)).grantee)
ORDER BY 1"""


def object_roles(conn: psycopg.Connection) -> list[str]:
    """The roles that own the database's objects or hold their GRANTs (and policies' roles): what a
    restore needs on the target server to keep owners and privileges. PUBLIC is no role."""
    return [r[0] for r in conn.execute(_OBJECT_ROLES).fetchall()]


def missing_roles(conn: psycopg.Connection, roles: list[str]) -> list[str]:
    """Of `roles`, those this session could not restore objects as: absent on the server, or ones
    the connected user is not a member of (ALTER ... OWNER TO needs that, unless superuser)."""
    rows = conn.execute("SELECT r.name, CASE WHEN EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r.name) "
                        "THEN pg_has_role(current_user, r.name, 'MEMBER') ELSE false END "
                        "FROM unnest(%s::text[]) AS r(name)", (roles,)).fetchall()
    return [name for name, usable in rows if not usable]


# -- user triggers silenced for one transaction ------------------------------------------------

_TRIGGER_MODES = {"D": "DISABLE TRIGGER {}", "R": "ENABLE REPLICA TRIGGER {}", "A": "ENABLE ALWAYS TRIGGER {}"}


def silence_user_triggers(conn: psycopg.Connection, tables: list[sql.Composable],
                          before_each: Callable[[], None] | None = None) -> list[tuple[sql.Composable, list]]:
    """DISABLE TRIGGER USER on each table (in the order given: every worker takes the locks in
    one order), returning what `restore_user_triggers` needs to put each trigger back in its
    mode. A plain ENABLE TRIGGER USER afterwards would switch on a trigger an operator had
    switched off on purpose, and reset ENABLE ALWAYS/REPLICA ones. The modes are read for every
    table before any is disabled: on a partitioned table the ALTER reaches the partitions'
    clones too. Both are transactional: they hold only until the caller commits."""
    silenced = []
    for table in tables:
        modes = conn.execute(
            "SELECT tgname, tgenabled::text FROM pg_trigger WHERE tgrelid = %s::regclass AND NOT tgisinternal "
            "AND tgenabled <> 'O' ORDER BY tgname", (table.as_string(conn),)).fetchall()
        silenced.append((table, [(name, mode) for name, mode in modes]))
    for table in tables:
        if before_each:
            before_each()
        conn.execute(sql.SQL("ALTER TABLE {} DISABLE TRIGGER USER").format(table))
    return silenced


def restore_user_triggers(conn: psycopg.Connection, silenced: list[tuple[sql.Composable, list]]) -> None:
    for table, _ in silenced:
        conn.execute(sql.SQL("ALTER TABLE {} ENABLE TRIGGER USER").format(table))
    for table, modes in silenced:
        for name, mode in modes:
            conn.execute(sql.SQL("ALTER TABLE {} " + _TRIGGER_MODES[mode]).format(table, sql.Identifier(name)))


def qualified(schema: str, table: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table))


def table_label(schema: str, table: str) -> str:
    return table if schema == "public" else f"{schema}.{table}"


def row_source(conn: psycopg.Connection, schema: str, table: str) -> sql.Composed:
    """What to read a table's own rows from: `ONLY t` for a plain table (an inheritance parent's
    rows without its children's, which are counted as tables of their own), `t` for a
    partitioned table (its rows are its partitions')."""
    kind = conn.execute("SELECT c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                        "WHERE n.nspname = %s AND c.relname = %s", (schema, table)).fetchone()
    if kind and kind[0] == "r":
        return sql.SQL("ONLY {}").format(qualified(schema, table))
    return qualified(schema, table)


def ensure_statistics(conn: psycopg.Connection, schema: str, table: str) -> bool:
    """ANALYZE a table the planner has no statistics for (a copy pg_restore just loaded, before
    autovacuum comes by): without them it guessed a full scan for every keyset batch of a 9M-row
    table. True when it ran. A sampled pass: well under a second for most tables."""
    has = conn.execute("SELECT EXISTS (SELECT 1 FROM pg_stats WHERE schemaname = %s AND tablename = %s)",
                       (schema, table)).fetchone()[0]
    if not has:
        conn.execute(sql.SQL("ANALYZE {}.{}").format(sql.Identifier(schema), sql.Identifier(table)))
    return not has


def row_counts(conn: psycopg.Connection) -> dict[str, int]:
    """Exact row counts of every user table (count(*), not the planner's estimate); an inheritance
    parent counts its own rows only."""
    counts = {}
    for schema, table in user_tables(conn):
        counts[table_label(schema, table)] = conn.execute(
            sql.SQL("SELECT count(*) FROM {}").format(row_source(conn, schema, table))).fetchone()[0]
    return counts
