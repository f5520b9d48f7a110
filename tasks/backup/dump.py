"""Back up one environment: pg_dump streamed into storage, then the manifest.

pg_dump's built-in gzip is single-threaded and is the bottleneck on a large database
(12.7 s vs 1.8 s uncompressed on 3M rows), so by default the archive is written with
`-Z0` and compressed in the stream by multi-threaded zstd. Row counts and the schema
fingerprint are read in the very snapshot pg_dump dumps (`--snapshot`), so the manifest
describes exactly what is in the archive even while the application keeps writing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone

from prefect import task

import dataops
from dataops.errors import DataopsError, Kind, OperationFailed, TransientError
from dataops.failpoints import failpoint
from dataops.settings import Environment, Settings
from dataops.tasks import pg
from dataops.tasks.backup.catalog import Manifest, discard_leftovers, dump_key, new_backup_id, write_manifest
from dataops.tasks.backup.parts import dump_directory, parts_digest
from dataops.tasks.backup.storage import Storage, open_storage
from dataops.tasks.backup.streams import HashingReader, Process, compress_reader, return_big_buffers
from dataops.tasks.retries import RETRY_TRANSIENT, RUN_ONCE
from dataops.tasks.schema import FINGERPRINT_VERSION, catalog_snapshot, fingerprint

log = logging.getLogger("dataops.backup")


@dataclass(frozen=True)
class Preflight:
    server_major: int
    server_version: str
    pg_dump: str
    pg_dump_version: str


def preflight(settings: Settings, env: Environment) -> Preflight:
    """Fail before writing anything: the server answers, pg_dump matches it, every row is readable
    (pg_dump runs with row_security off, so a policy would fail it halfway), storage is reachable."""
    major, full = pg.server_version(env.database_url, settings.postgres.connect_timeout)
    with pg.connect(env.database_url, autocommit=True, timeout=settings.postgres.connect_timeout) as conn:
        pg.require_all_rows(conn, f"back up {env.name}")
    binary = pg.client_binary("pg_dump", major, settings.postgres.bin_dir)
    open_storage(settings.storage).check()
    return Preflight(major, full, binary, pg.client_version(binary))


# What pg_dump and pg_restore print when the server went away under them: restarted or failed over
# (`pg_ctl restart -m immediate` ends every session with "terminating connection due to immediate
# shutdown command"), or their session was ended (pg_terminate_backend: "... due to administrator
# command"), or the server was down or still starting when they connected. Not a refused login or a
# missing database: those say "password authentication failed" or "does not exist", and stay errors.
LOST_CONNECTION = re.compile(
    r"server closed the connection|terminating connection|server terminated abnormally|no connection to the server|"
    r"could not (receive|send) data (from|to) server|SSL SYSCALL error|connection reset by peer|"
    r"connection to server .* failed: (Connection refused|No such file or directory)|"
    r"the database system is (starting up|shutting down|in recovery mode|not yet accepting connections)",
    re.IGNORECASE)


def check_client(process: Process) -> None:
    """A client binary's exit as an error: a lost connection is transient (the task's retry runs
    the whole step again, which rebuilds whatever the lost session held), anything else is not."""
    rc = process.wait()
    if rc != 0 and LOST_CONNECTION.search(process.stderr_tail(40)):
        raise TransientError(f"{process.name} failed (exit {rc}), its connection lost: {process.stderr_tail()}; "
                             "the server restarted or ended the session, a retry may succeed")
    process.check()


def dump_to_storage(settings: Settings, env: Environment, pre: Preflight, storage: Storage | None = None,
                    backup_id: str | None = None) -> Manifest:
    """Stream a consistent dump into storage and return its manifest (not yet written).

    Any failure (pg_dump error, lost connection, upload error) aborts the multipart
    upload, so no object is left under the dump's key. With backups.jobs > 1 the dump is
    pg_dump -Fd -j N and each of its files is its own object (parts.dump_directory); a failure
    deletes the parts already stored, and a kill leaves them without a manifest (never listed).
    """
    return_big_buffers()
    hold_backup_lock(env.name)  # a retry after a server restart takes the lock its session lost
    storage = storage or open_storage(settings.storage)
    backup_id = backup_id or new_backup_id()
    cfg = settings.backups
    key = dump_key(env.name, backup_id, cfg.compression)
    started = datetime.now(timezone.utc)
    t0 = time.monotonic()
    conninfo, secret_env = env.database_url.libpq_args()

    with pg.connect(env.database_url, timeout=settings.postgres.connect_timeout,
                    application_name="dataops-backup") as conn:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        snapshot = conn.execute("SELECT pg_export_snapshot()").fetchone()[0]
        if cfg.jobs > 1:
            with ThreadPoolExecutor(1) as pool:
                stats = pool.submit(_snapshot_stats, conn)  # in the snapshot pg_dump's workers share
                try:
                    out = dump_directory(settings, pre.pg_dump, storage, env.name, backup_id, snapshot, conninfo,
                                         secret_env, check_client)
                    tables, fp, roles = stats.result()
                except BaseException:
                    conn.cancel_safe()
                    raise
            conn.execute("COMMIT")
            return Manifest(
                id=backup_id, environment=env.name, database=env.database_url.database, role=env.role.value,
                server_version=pre.server_version, pg_dump_version=pre.pg_dump_version, dump_key=out.toc_key,
                archive_format="directory", compression=cfg.compression, size=sum(p.size for p in out.parts),
                raw_size=sum(p.raw_size for p in out.parts), sha256=parts_digest(out.parts), started_at=started,
                finished_at=datetime.now(timezone.utc), duration_seconds=round(time.monotonic() - t0, 3),
                tables=tables, schema_fingerprint=fp, schema_fingerprint_version=FINGERPRINT_VERSION,
                tool_version=dataops.__version__, roles=roles, jobs=cfg.jobs,
                parts=out.parts, local_disk_peak=out.local_disk_peak)
        args = [pre.pg_dump, "--format=custom", f"--snapshot={snapshot}", "--no-sync", f"--dbname={conninfo}"]
        args.append("--compress=0" if cfg.compression == "zstd" else "--compress=6")
        dump = Process(args, secret_env, stdout=subprocess.PIPE, name="pg_dump")
        raw = HashingReader(dump.proc.stdout, hash_bytes=False)  # counted only: the stored bytes are hashed

        def finished() -> None:
            check_client(dump)  # raises on a non-zero exit, which aborts the upload

        try:
            stream = compress_reader(raw, cfg.compression_level, cfg.compression_threads) \
                if cfg.compression == "zstd" else raw
            stored = HashingReader(stream, on_eof=finished)
            with ThreadPoolExecutor(2) as pool:
                # Counting shares the exported snapshot; it runs while the upload streams.
                stats = pool.submit(_snapshot_stats, conn)
                upload = pool.submit(storage.upload_stream, key, stored)
                try:
                    upload.result()
                    tables, fp, roles = stats.result()
                except BaseException:
                    # A stop (SIGTERM) or a failed upload must not wait for a pg_dump or a count that
                    # waits on a table lock: pg_dump killed, its stream ends unfinished and the
                    # upload aborts (finished() raises); the count is cancelled.
                    dump.kill()
                    conn.cancel_safe()
                    raise
            check_client(dump)
        finally:
            dump.close()
        conn.execute("COMMIT")

    finished_at = datetime.now(timezone.utc)
    return Manifest(
        id=backup_id, environment=env.name, database=env.database_url.database, role=env.role.value,
        server_version=pre.server_version, pg_dump_version=pre.pg_dump_version, dump_key=key,
        compression=cfg.compression, size=stored.size, raw_size=raw.size, sha256=stored.hexdigest,
        started_at=started, finished_at=finished_at, duration_seconds=round(time.monotonic() - t0, 3),
        tables=tables, schema_fingerprint=fp, schema_fingerprint_version=FINGERPRINT_VERSION,
        tool_version=dataops.__version__, roles=roles,
    )


def _snapshot_stats(conn) -> tuple[dict[str, int], str, list[str]]:
    # Counting runs beside pg_dump, which keeps the cores busy, so what matters is the CPU it
    # takes from the dump, not its own wall time: on the 4.5M-row bench database one backend
    # counts with 0.19 CPU-s, two parallel workers and their leader spend 0.25 (bench/RESULTS.md).
    conn.execute("SET LOCAL max_parallel_workers_per_gather = 0")
    return pg.row_counts(conn), fingerprint(catalog_snapshot(conn)), pg.object_roles(conn)


class _HeldLock:
    """The backup lock of one environment as this process holds it, and how to take it again.

    A session lock lives as long as its session: a server restart (or pg_terminate_backend of the
    holder) ends it while the backup goes on, or while the flow retries the dump. From then on a
    prune or a second backup may take the lock and discard what this backup is uploading; so the
    dump does not start, and the manifest is not written, until the lock is ours again.
    """

    def __init__(self, settings: Settings, env: Environment, conn, who: str):
        self.settings, self.env, self.conn, self.who = settings, env, conn, who
        self.again = contextlib.ExitStack()  # the connection of a lock taken again

    def alive(self) -> bool:
        if self.conn.closed or self.conn.broken:
            return False
        try:
            self.conn.execute("SELECT 1")
            return True
        except Exception:  # noqa: BLE001 - a session that cannot answer holds nothing
            return False

    def take_again(self) -> None:
        self.conn = self.again.enter_context(pg.held_lock(
            self.env.database_url, lock_name(self.env), timeout=self.settings.postgres.connect_timeout, who=self.who,
            busy=f"the backup of '{self.env.name}' lost its lock when its session ended (a server restart or "
                 "pg_terminate_backend), and another backup or prune of it has taken the lock since"))


_HELD: dict[str, _HeldLock] = {}  # environment name -> the backup lock this process holds for it


def lock_name(env: Environment) -> str:
    return f"dataops-backup:{env.name}"


def hold_backup_lock(env_name: str) -> bool:
    """Make sure the backup lock this process took for `env_name` is still held: take it again if
    its session ended. Returns whether it had to (then something may have been discarded
    meanwhile). Nothing to do outside backup_lock (tests and benchmarks call the steps bare)."""
    held = _HELD.get(env_name)
    if held is None or held.alive():
        return False
    log.warning("the backup lock of %s was lost with its session (server restart or pg_terminate_backend); "
                "taking it again", env_name)
    held.take_again()
    return True


@contextlib.contextmanager
def backup_lock(settings: Settings, env: Environment) -> Iterator[list[str]]:
    """One backup of an environment at a time, held on its own server for as long as the dump and
    its manifest are written; a second one is refused with the holder's name. Holding it, the
    leftovers of killed backups of this environment are discarded (catalog.discard_leftovers):
    nothing live can be writing them. Yields what was discarded."""
    who = f"dataops-backup {env.name} pid {os.getpid()} on {socket.gethostname()}"
    with pg.held_lock(env.database_url, lock_name(env), timeout=settings.postgres.connect_timeout, who=who,
                      busy=f"another backup of '{env.name}' is running") as conn:
        held = _HELD[env.name] = _HeldLock(settings, env, conn, who)
        try:
            yield discard_leftovers(open_storage(settings.storage), env.name)
        finally:
            _HELD.pop(env.name, None)
            held.again.close()


def finish_backup(storage: Storage, manifest: Manifest) -> None:
    """Write the manifest, holding the backup lock: the dump becomes a backup only if nothing
    discarded it while the lock was lost (a prune deletes a dump without a manifest)."""
    if hold_backup_lock(manifest.environment) and not _all_stored(storage, manifest):
        raise OperationFailed(f"the dump of backup {manifest.id} was discarded while the backup lock of "
                              f"'{manifest.environment}' was lost (a server restart or pg_terminate_backend ended "
                              "its session, and a prune or another backup ran meanwhile); nothing was listed; run "
                              "the backup again")
    write_manifest(storage, manifest)


def _all_stored(storage: Storage, manifest: Manifest) -> bool:
    if not manifest.parts:
        return storage.exists(manifest.dump_key)
    stored = {o.key for o in storage.list(f"{manifest.environment}/{manifest.id}/")}
    return all(key in stored for key in manifest.stored_keys)


def backup(settings: Settings, env: Environment) -> Manifest:
    """The whole backup as one plain call: preflight, dump, manifest last."""
    pre = preflight(settings, env)
    storage = open_storage(settings.storage)
    with backup_lock(settings, env) as discarded:
        for what in discarded:
            log.warning("discarded %s, left by an interrupted backup", what)
        manifest = dump_to_storage(settings, env, pre, storage)
        failpoint("backup.before_manifest")
        finish_backup(storage, manifest)
    log.info("backup %s of %s: %d bytes, sha256 %s", manifest.id, env.name, manifest.size, manifest.sha256[:12])
    return manifest


def discard_backup_leftovers(settings: Settings, env: Environment) -> list[str]:
    """prune's share of the cleanup: what killed backups left, discarded under the backup lock. A
    backup that is running (the lock is taken) or a server out of reach leaves them for the next
    backup, which discards them itself; retention goes on either way."""
    try:
        with backup_lock(settings, env) as discarded:
            for what in discarded:
                log.warning("discarded %s, left by an interrupted backup", what)
            return discarded
    except DataopsError as exc:
        if exc.kind is Kind.BAD_INPUT:
            raise
        log.warning("leftovers of interrupted backups of %s kept for now: %s", env.name, exc.message)
        return []


# -- Prefect tasks --------------------------------------------------------------------

@task(name="preflight-backup", **RETRY_TRANSIENT)
def preflight_task(settings: Settings, env: Environment) -> Preflight:
    return preflight(settings, env)


@task(name="dump-to-storage", **RETRY_TRANSIENT)
def dump_task(settings: Settings, env: Environment, pre: Preflight) -> Manifest:
    return dump_to_storage(settings, env, pre)


@task(name="write-manifest", **RETRY_TRANSIENT)
def write_manifest_task(settings: Settings, manifest: Manifest) -> Manifest:
    failpoint("backup.before_manifest")
    finish_backup(open_storage(settings.storage), manifest)
    return manifest


@task(name="discard-backup-leftovers", **RUN_ONCE)
def discard_leftovers_task(settings: Settings, env: Environment) -> list[str]:
    return discard_backup_leftovers(settings, env)
