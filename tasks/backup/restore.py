"""Restore a backup: check the bytes, load beside the target, prove it, then swap.

The target is never touched until the archive's checksum is verified and the restored
copy matches its manifest (row counts, schema fingerprint). The copy is built in a scratch
database on the target's server and put in place by rename, so a failure at any point
leaves the target as it was. verify-backup runs the same path without the swap.
"""

from __future__ import annotations

import contextlib
import logging
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from prefect import task

from dataops.dsn import Dsn
from dataops.errors import BadInput, DataopsError, Kind, OperationFailed, SafetyRefusal, is_transient
from dataops.failpoints import failpoint
from dataops.settings import Environment, Settings
from dataops.tasks import pg
from dataops.tasks.backup.catalog import Manifest, Verification, mark_verified
from dataops.tasks.backup.dump import check_client
from dataops.tasks.backup.parts import check_parts, fetch_parts, local_folder, restore_directory
from dataops.tasks.backup.storage import Storage, open_storage
from dataops.tasks.backup.streams import CHUNK, Download, HashingReader, Process, decompress_reader
from dataops.tasks.retries import RETRY_TRANSIENT
from dataops.tasks.schema import check_fingerprint_version
from dataops.tasks.scratch import discard_leftovers, owned_scratch
from dataops.tasks.validation.validate import compare_with_expected

log = logging.getLogger("dataops.restore")


@dataclass
class RestoreResult:
    backup_id: str
    target: str
    database: str
    seconds: float
    tables: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    discarded: list[str] = field(default_factory=list)  # scratch databases of killed runs, dropped first
    privileges: str = ""  # whether owners and GRANTs came along, and if not why

    @property
    def ok(self) -> bool:
        return not self.problems


def guard_target(target: Environment, confirm: str | None) -> None:
    """A production target needs its own name typed back; refuse before any change."""
    if target.is_production and confirm != target.name:
        raise SafetyRefusal(f"environment '{target.name}' has role production; restoring into it replaces its data. "
                            f"Pass --confirm {target.name} (flow parameter confirm='{target.name}') if you mean it")


def download(storage: Storage, manifest: Manifest) -> Download:
    """The backup's dump, read from storage; a transfer that breaks is transient (retried)."""
    return Download(storage.open_stream(manifest.dump_key),
                    f"backup {manifest.id} from {storage.description}", manifest.size)


def refuse_older_server(settings: Settings, manifest: Manifest, dsn: Dsn, where: str) -> None:
    """A backup loads into a server of its own major version or a newer one (the upgrade path), never
    an older one: pg_restore of the older version cannot read the newer archive format, and the dump
    may use syntax the older server lacks. Refused before anything is written (a scratch database
    would otherwise be created, fail halfway through pg_restore and be dropped)."""
    source = max(int(m.group()) for m in (re.match(r"\d+", v) for v in (manifest.server_version,
                                                                          manifest.pg_dump_version)) if m)
    major, full = pg.server_version(dsn, settings.postgres.connect_timeout, dbname=pg.MAINTENANCE_DB)
    if source > major:
        raise BadInput(f"backup {manifest.id} was taken from PostgreSQL {manifest.server_version} and {where} runs "
                       f"PostgreSQL {full}: a backup restores into the same major version or a newer one, never an "
                       f"older one; restore it into a PostgreSQL {source} or newer server")


def verify_checksum(storage: Storage, manifest: Manifest, workers: int = 2) -> None:
    """Read the whole object once and compare size and SHA-256 with the manifest (a parallel
    backup: every part, `workers` at a time, after checking that none is missing)."""
    if manifest.parts:
        check_parts(storage, manifest, workers)
        return
    dump = download(storage, manifest)
    try:
        reader = HashingReader(dump)
        while reader.read(8 * CHUNK):
            pass
    finally:
        dump.close()
    if reader.size != manifest.size or reader.hexdigest != manifest.sha256:
        raise OperationFailed(
            f"backup {manifest.id} is corrupt: {storage.description}/{manifest.dump_key} has "
            f"{reader.size} bytes sha256 {reader.hexdigest[:16]}..., the manifest says {manifest.size} bytes "
            f"sha256 {manifest.sha256[:16]}...; use another backup")


def restore_jobs(settings: Settings, manifest: Manifest) -> int:
    """pg_restore -j of a parallel backup: the configured jobs, or the backup's own when the
    configuration says 1 (a parallel backup restored by a configuration that dumps in one stream)."""
    return settings.backups.jobs if settings.backups.jobs > 1 else max(manifest.jobs, 1)


@contextlib.contextmanager
def checked_archive(settings: Settings, storage: Storage, manifest: Manifest) -> Iterator[Path | None]:
    """The backup, checked against its manifest before anything is written. One stream: its
    checksum read once (pg_restore_into streams it again and checks it again), yields None. A
    parallel backup: every part downloaded, checked and decompressed into a local folder, which
    pg_restore -Fd reads (disk: the dump's raw size), yields that folder."""
    if not manifest.parts:
        verify_checksum(storage, manifest)
        yield None
        return
    with local_folder(settings, "parrestore") as folder:
        fetch_parts(storage, manifest, folder, restore_jobs(settings, manifest))
        yield folder


def pg_restore_into(settings: Settings, storage: Storage, manifest: Manifest, dsn: Dsn,
                    local: Path | None = None, keep_privileges: bool = False) -> None:
    """Stream the archive into pg_restore. The checksum is checked again on this pass, so
    an object replaced between the check and the restore is still caught (the caller then
    drops the scratch database). A parallel backup is restored with pg_restore -j N from the
    folder checked_archive fetched (fetched here when not given)."""
    major, _ = pg.server_version(dsn, settings.postgres.connect_timeout)
    binary = pg.client_binary("pg_restore", major, settings.postgres.bin_dir)
    conninfo, secret_env = dsn.libpq_args()
    if manifest.parts:
        with contextlib.ExitStack() as stack:
            if local is None:
                local = stack.enter_context(checked_archive(settings, storage, manifest))
            restore_directory(binary, local, restore_jobs(settings, manifest), conninfo, secret_env, check_client,
                              keep_privileges)
        return
    args = [binary, "--format=custom", "--exit-on-error", f"--dbname={conninfo}"]
    if not keep_privileges:  # a scratch copy (verify) or a server without the backup's roles
        args[2:2] = ["--no-owner", "--no-privileges"]
    dump = download(storage, manifest)
    proc = Process(args, secret_env, stdin=subprocess.PIPE, name="pg_restore")
    source = HashingReader(dump)
    stream = decompress_reader(source) if manifest.compression == "zstd" else source
    try:
        try:
            while data := stream.read(CHUNK):  # a broken download raises here: pg_restore is killed below
                proc.proc.stdin.write(data)
            proc.proc.stdin.close()
        except BrokenPipeError:
            pass  # pg_restore stopped early; its exit status and message say why
        check_client(proc)  # a lost connection is transient: the retry loads a new scratch database
    finally:
        proc.close()
        dump.close()
    if source.hexdigest != manifest.sha256:
        raise OperationFailed(f"backup {manifest.id} changed while being restored (checksum mismatch); use another backup")


def compare_with_manifest(dsn: Dsn, manifest: Manifest) -> tuple[dict[str, int], list[str]]:
    """Row counts and schema fingerprint of a restored database against the manifest."""
    return compare_with_expected(dsn, manifest.tables, manifest.schema_fingerprint, source="the manifest",
                                 fingerprint_version=manifest.schema_fingerprint_version,
                                 fingerprint_source_major=int(re.match(r"\d+", manifest.server_version).group()))


def load_and_check(settings: Settings, storage: Storage, manifest: Manifest, scratch: Dsn,
                   purpose: str, local: Path | None = None, keep_privileges: bool = False) -> RestoreResult:
    """Restore into the (new, empty) scratch database and compare it with the manifest."""
    t0 = time.monotonic()
    pg_restore_into(settings, storage, manifest, scratch, local, keep_privileges)
    counts, problems = compare_with_manifest(scratch, manifest)
    return RestoreResult(manifest.id, purpose, scratch.database, round(time.monotonic() - t0, 3), counts, problems)


def restore(settings: Settings, storage: Storage, manifest: Manifest, target: Environment,
            confirm: str | None = None) -> RestoreResult:
    """Load the backup beside the target, check it, then swap it in: the target is replaced whole
    or not at all. Scratch databases left by killed runs on this server are discarded first."""
    guard_target(target, confirm)
    check_fingerprint_version(manifest.schema_fingerprint_version)  # a newer dataops' manifest: before any work
    dsn = target.database_url
    refuse_older_server(settings, manifest, dsn, f"environment '{target.name}'")
    with checked_archive(settings, storage, manifest) as local, \
            pg.replacement_lock(dsn, target.name, "restore", settings.postgres.connect_timeout):
        return _restore_locked(settings, storage, manifest, target, local)


def privileges_plan(settings: Settings, manifest: Manifest, dsn: Dsn) -> tuple[bool, str]:
    """Keep owners and GRANTs when the target server has every role the backup names (a
    disaster-recovery restore must give the application its privileges back); otherwise restore
    without them rather than fail, and say which roles were missing."""
    if manifest.roles is None:
        return False, "restored without owners and GRANTs: the backup is older than dataops keeping its roles"
    with pg.connect(dsn, autocommit=True, timeout=settings.postgres.connect_timeout, dbname=pg.MAINTENANCE_DB) as conn:
        missing = pg.missing_roles(conn, manifest.roles)
    if missing:
        return False, (f"restored without owners and GRANTs: role(s) {', '.join(missing[:5])}"
                       f"{' and more' if len(missing) > 5 else ''} are missing on the target server or not "
                       "granted to the restoring user; create them and restore again to keep them")
    return True, f"owners and GRANTs restored ({len(manifest.roles)} roles)"


def analyze(dsn: Dsn) -> None:
    """Statistics for the restored copy before it goes in place: pg_restore leaves none, and until
    autovacuum comes by the planner guesses. At 9M rows it chose a full scan for every keyset
    batch of a transform (each over the transform's 1 s bound, so it gave up). A sampled pass:
    about a second per 10M rows."""
    t0 = time.monotonic()
    with pg.connect(dsn, autocommit=True) as conn:
        conn.execute("ANALYZE")
    log.info("analyzed the restored copy in %.1f s", time.monotonic() - t0)


def _restore_locked(settings: Settings, storage: Storage, manifest: Manifest, target: Environment,
                    local: Path | None = None) -> RestoreResult:
    dsn = target.database_url
    discarded = discard_leftovers(dsn)
    keep, privileges = privileges_plan(settings, manifest, dsn)
    if not keep:
        log.warning("%s", privileges)
    with owned_scratch(dsn, dsn.database, "restore") as name:
        failpoint("restore.after_scratch_created")
        result = load_and_check(settings, storage, manifest, dsn.with_database(name), "restore", local, keep)
        if not result.ok:
            raise OperationFailed(f"restored copy of backup {manifest.id} does not match its manifest: "
                                  f"{'; '.join(result.problems[:3])}; target '{target.name}' was left unchanged")
        analyze(dsn.with_database(name))
        failpoint("restore.before_switch")
        old = pg.swap_database(dsn, name, dsn.database, step="restore")
    failpoint("restore.after_switch")
    if old:
        try:
            pg.drop_database(dsn, old)
        except Exception as exc:  # the restore is done: a retry would only load it all again
            if not is_transient(exc):
                raise
            log.warning("restored, but could not drop the replaced database %s yet (%s); the next restore or refresh "
                        "of %s drops it", old, exc, target.name)
    result.target, result.database, result.discarded = target.name, dsn.database, discarded
    result.privileges = privileges
    log.info("restored backup %s into %s (%s)", manifest.id, target.name, dsn)
    return result


def verify(settings: Settings, storage: Storage, manifest: Manifest, env: Environment) -> Verification:
    """Prove a backup restores: checksum, full restore into scratch, compare, drop. `env` is the
    environment the backup was taken from: its server holds the scratch database unless
    backups.scratch_database_url names another."""
    server = settings.backups.scratch_database_url or env.database_url
    t0 = time.monotonic()
    check_fingerprint_version(manifest.schema_fingerprint_version)
    refuse_older_server(settings, manifest, server, f"the scratch server {server.host}:{server.port}")
    with checked_archive(settings, storage, manifest) as local:
        discard_leftovers(server)
        with owned_scratch(server, manifest.database, "verify") as name:
            result = load_and_check(settings, storage, manifest, server.with_database(name), "verify", local)
            failpoint("verify.after_load")
    return Verification(ok=result.ok, verified_at=datetime.now(timezone.utc),
                        duration_seconds=round(time.monotonic() - t0, 3), problems=result.problems,
                        scratch_server=f"{server.host}:{server.port}")


def verify_and_record(settings: Settings, storage: Storage, manifest: Manifest, env: Environment) -> Verification:
    """verify(), with its outcome written beside the backup: a backup that does not restore is
    marked as such (a failed verification is a result, not an error); only a transient fault,
    which says nothing about the backup, is raised for a retry."""
    try:
        result = verify(settings, storage, manifest, env)
    except DataopsError as exc:
        if exc.kind is Kind.TRANSIENT:
            raise
        result = Verification(ok=False, verified_at=datetime.now(timezone.utc), duration_seconds=0,
                              problems=[exc.message])
    failpoint("verify.before_mark")
    mark_verified(storage, manifest, result)
    return result


# -- Prefect tasks --------------------------------------------------------------------

@task(name="verify-checksum", **RETRY_TRANSIENT)
def verify_checksum_task(settings: Settings, manifest: Manifest) -> None:
    verify_checksum(open_storage(settings.storage), manifest, restore_jobs(settings, manifest))


# Both retry a transient fault (a lost connection, a server restarted under pg_restore): a retry runs
# the whole step again, discarding the scratch database the failed attempt left, and the target is
# only ever replaced whole, so a second attempt can neither half-restore nor lose the old copy.
@task(name="restore-and-swap", **RETRY_TRANSIENT)
def restore_task(settings: Settings, manifest: Manifest, target: Environment, confirm: str | None) -> RestoreResult:
    return restore(settings, open_storage(settings.storage), manifest, target, confirm)


@task(name="restore-into-scratch", **RETRY_TRANSIENT)
def verify_task(settings: Settings, manifest: Manifest, env: Environment) -> Verification:
    return verify_and_record(settings, open_storage(settings.storage), manifest, env)
