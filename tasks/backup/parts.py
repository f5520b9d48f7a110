"""A parallel backup (`backups.jobs: N`, N > 1), and the way back.

pg_dump -Fd -j N writes one file per table (and toc.dat, blobs.toc, one file per large object)
into a directory, its workers sharing one snapshot: ours, exported by the connection that counts
rows and reads the schema fingerprint, as in the single stream. Each file is created once and
closed once (toc.dat first, then each table's file when its worker moves on to the next table), so
a file is complete when the kernel reports it closed after writing (inotify IN_CLOSE_WRITE). From
then on it is compressed by zstd, hashed, uploaded as its own object and deleted locally, while
pg_dump goes on with the other tables. The local disk holds the files being written and those
waiting for an upload worker, not the whole dump (measured in docs/backup.md).

The way back needs files on disk: pg_restore -Fd opens each table's file by name, so every part is
downloaded, checked against the manifest (size and SHA-256 of the stored bytes) and decompressed
into a local folder before pg_restore -j N runs. That is the dump's raw size (manifest.raw_size),
checked against the free space first.

Storage layout: <env>/<backup id>/dump.d/<file>[.zst], manifest.json last, as for one stream: a
folder of parts without a manifest is the leftover of a killed backup (catalog.discard_leftovers).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import zstandard

from dataops.errors import OperationFailed
from dataops.failpoints import failpoint
from dataops.settings import Settings
from dataops.tasks.backup.catalog import Manifest, Part, backup_folder
from dataops.tasks.backup.storage import Storage
from dataops.tasks.backup.streams import (
    CHUNK,
    Download,
    HashingReader,
    Process,
    compress_reader,
    compressor,
    decompress_reader,
)

log = logging.getLogger("dataops.backup")

PARTS_DIR = "dump.d"
TOC = "toc.dat"
SMALL = 8 * CHUNK  # a file up to this size is compressed in one call and stored with one PUT
MiB = 1024 * 1024


def part_key(env: str, backup_id: str, name: str, compression: str) -> str:
    return f"{backup_folder(env, backup_id)}/{PARTS_DIR}/{name}" + (".zst" if compression == "zstd" else "")


def parts_digest(parts: list[Part]) -> str:
    """The manifest's sha256 of a multi-part backup: one digest over every part's name, size and
    SHA-256, so that the single field still names exactly the bytes stored."""
    lines = "".join(f"{p.name} {p.size} {p.sha256}\n" for p in sorted(parts, key=lambda p: p.name))
    return hashlib.sha256(lines.encode()).hexdigest()


# -- local folders --------------------------------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def local_folder(settings: Settings, purpose: str) -> Iterator[Path]:
    """A folder of this process under backups.local_dir, removed on the way out. A process killed
    with kill -9 cannot remove its own: the next one removes the folders of processes that are gone."""
    base = settings.backups.local_dir or Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    for old in base.glob("dataops-par*-*-*"):
        try:
            pid = int(old.name.split("-")[2])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not _alive(pid):
            with contextlib.suppress(OSError, ValueError):
                _kill_group(int((old / "pg_dump.pgid").read_text()))
            shutil.rmtree(old, ignore_errors=True)
    path = Path(tempfile.mkdtemp(prefix=f"dataops-{purpose}-{os.getpid()}-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def disk_use(folder: Path) -> int:
    total = 0
    with os.scandir(folder) as it:
        for entry in it:
            try:
                total += entry.stat().st_size
            except FileNotFoundError:  # uploaded and deleted meanwhile
                pass
    return total


try:
    _PRCTL = ctypes.CDLL("libc.so.6", use_errno=True).prctl  # resolved here: the child only calls it
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _PRCTL = None


def _die_with_parent() -> None:
    """pg_dump and pg_restore must not outlive a killed backup or restore: they would go on filling
    the local folder or a scratch database that the next run discards anyway."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _own_group_dying_with_parent() -> None:
    """pg_dump -j in a process group of its own, so that its workers (its forks) are paused, resumed
    and killed together; its leader dies with us, and the next backup kills workers a kill -9 of
    ours left paused (local_folder reads the group from the folder's `pg_dump.pgid`)."""
    os.setsid()
    _die_with_parent()


def _kill_group(pgid: int) -> None:
    """SIGKILL to pg_dump's group, if it is still pg_dump's (a process group id can be reused)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and (proc / "comm").read_text().strip() == "pg_dump":
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, IndexError, ValueError):
            continue


# -- backup ---------------------------------------------------------------------------------------

class PartUploader:
    """Uploads finished files, `workers` at a time; each file is deleted locally once stored.

    Memory per worker: a small file whole (up to SMALL) or, for a larger one, zstd's buffers and
    the multipart upload's chunks (storage.multipart_chunk_mb x max_concurrency), as one stream."""

    def __init__(self, settings: Settings, storage: Storage, env: str, backup_id: str, workers: int):
        self.cfg = settings.backups
        self.storage, self.env, self.backup_id = storage, env, backup_id
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="dataops-part")
        self.futures: dict[str, Future] = {}
        self.waiting: dict[str, int] = {}  # finished files still on local disk, by name: their size
        self.lock = threading.Lock()
        self.stored: list[str] = []  # keys uploaded, for the cleanup of a failed backup

    def submit(self, path: Path) -> None:
        if path.name not in self.futures:
            with self.lock:
                self.waiting[path.name] = path.stat().st_size
            self.futures[path.name] = self.pool.submit(self._upload, path)

    def waiting_bytes(self) -> int:
        with self.lock:
            return sum(self.waiting.values())

    def raise_failed(self) -> None:
        for future in self.futures.values():
            if future.done() and future.exception() is not None:
                raise future.exception()

    def _upload(self, path: Path) -> Part:
        key = part_key(self.env, self.backup_id, path.name, self.cfg.compression)
        zstd = self.cfg.compression == "zstd"
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size <= SMALL:
                data = f.read()
                body = compressor(self.cfg.compression_level, 1).compress(data) if zstd else data
                self.storage.put_bytes(key, body)
                part = Part(name=path.name, key=key, size=len(body), raw_size=len(data),
                            sha256=hashlib.sha256(body).hexdigest())
            else:
                raw = HashingReader(f, hash_bytes=False)
                stream = compress_reader(raw, self.cfg.compression_level, self.cfg.compression_threads) \
                    if zstd else raw
                stored = HashingReader(stream)
                self.storage.upload_stream(key, stored)
                part = Part(name=path.name, key=key, size=stored.size, raw_size=raw.size, sha256=stored.hexdigest)
        path.unlink()
        with self.lock:
            self.stored.append(key)
            self.waiting.pop(path.name, None)
        failpoint("backup.between_parts")
        return part

    def results(self) -> list[Part]:
        return sorted((f.result() for f in self.futures.values()), key=lambda p: p.name)

    def abandon(self) -> None:
        """After a failure: nothing more is uploaded, and what was is deleted (best effort: a part
        left behind has no manifest, and the next backup or prune discards it)."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        try:
            if self.stored:
                self.storage.delete(list(self.stored))
        except Exception as exc:  # noqa: BLE001 - the original failure is the one to report
            log.warning("could not delete the parts of the failed backup %s (%s); the next backup or prune "
                        "discards them", self.backup_id, exc)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True)
class DirectoryDump:
    parts: list[Part]
    toc_key: str
    local_disk_peak: int


def dump_directory(settings: Settings, pg_dump: str, storage: Storage, env: str, backup_id: str, snapshot: str,
                   conninfo: str, secret_env: dict[str, str], check_client) -> DirectoryDump:
    """pg_dump -Fd -j N in `snapshot`, each file uploaded as soon as pg_dump closes it.
    `check_client` turns pg_dump's exit into an error (dump.check_client: a lost connection is
    transient)."""
    from inotify_simple import INotify, flags

    cfg = settings.backups
    limit = cfg.local_queue_mb * MiB
    with local_folder(settings, "pardump") as base, INotify() as watch:
        folder = base / "dump"
        folder.mkdir()
        watch.add_watch(folder, flags.CLOSE_WRITE)
        args = [pg_dump, "--format=directory", f"--jobs={cfg.jobs}", f"--snapshot={snapshot}", "--no-sync",
                f"--file={folder}", f"--dbname={conninfo}",
                "--compress=0" if cfg.compression == "zstd" else "--compress=6"]
        uploader = PartUploader(settings, storage, env, backup_id, cfg.jobs)
        dump = Process(args, secret_env, name="pg_dump", preexec_fn=_own_group_dying_with_parent)
        pgid = dump.proc.pid
        (base / "pg_dump.pgid").write_text(str(pgid))
        peak, paused, pauses = 0, False, 0
        try:
            while True:
                exited = dump.proc.poll() is not None
                for event in watch.read(timeout=0 if exited else 100):
                    if event.name:
                        uploader.submit(folder / event.name)
                peak = max(peak, disk_use(folder))
                uploader.raise_failed()  # a failed upload stops the dump now, not at its end
                if exited:
                    break
                # Back-pressure: finished files can always be uploaded, so a pause always ends.
                waiting = uploader.waiting_bytes()
                if not paused and waiting > limit:
                    os.killpg(pgid, signal.SIGSTOP)
                    paused, pauses = True, pauses + 1
                elif paused and waiting <= limit // 2:
                    os.killpg(pgid, signal.SIGCONT)
                    paused = False
            check_client(dump)
            for path in sorted(folder.iterdir()):  # a file whose event was lost (a full event queue)
                uploader.submit(path)
            parts = uploader.results()
        except BaseException:
            with contextlib.suppress(OSError):
                os.killpg(pgid, signal.SIGKILL)  # its workers too, paused or not
            dump.kill()
            uploader.abandon()
            raise
        finally:
            dump.close()
            uploader.close()
    names = {p.name for p in parts}
    if TOC not in names:
        raise OperationFailed(f"pg_dump --format=directory wrote no {TOC}; nothing was listed")
    log.info("parallel dump of %s: %d parts, local disk peak %.1f MiB, pg_dump paused %d times for uploads",
             env, len(parts), peak / MiB, pauses)
    return DirectoryDump(parts, part_key(env, backup_id, TOC, cfg.compression), peak)


# -- restore --------------------------------------------------------------------------------------

def corrupt(manifest: Manifest, storage: Storage, part: Part, size: int, sha: str) -> OperationFailed:
    return OperationFailed(
        f"backup {manifest.id} is corrupt: its part {part.name} ({storage.description}/{part.key}) has {size} bytes "
        f"sha256 {sha[:16]}..., the manifest says {part.size} bytes sha256 {part.sha256[:16]}...; use another backup")


def check_present(storage: Storage, manifest: Manifest) -> None:
    """Every part is in storage: one listing, before a byte is downloaded."""
    keys = {o.key for o in storage.list(f"{backup_folder(manifest.environment, manifest.id)}/")}
    missing = [p for p in manifest.parts if p.key not in keys]
    if missing:
        raise OperationFailed(f"backup {manifest.id} is incomplete: {len(missing)} of its {len(manifest.parts)} parts "
                              f"are missing from {storage.description} (first: {missing[0].key}); use another backup")


def _download(storage: Storage, manifest: Manifest, part: Part) -> Download:
    return Download(storage.open_stream(part.key), f"part {part.name} of backup {manifest.id} from "
                    f"{storage.description}", part.size)


def check_parts(storage: Storage, manifest: Manifest, workers: int) -> None:
    """Size and SHA-256 of every part against the manifest, reading each once (nothing on disk)."""
    check_present(storage, manifest)

    def one(part: Part) -> None:
        body = _download(storage, manifest, part)
        try:
            reader = HashingReader(body)
            while reader.read(8 * CHUNK):
                pass
        finally:
            body.close()
        if reader.size != part.size or reader.hexdigest != part.sha256:
            raise corrupt(manifest, storage, part, reader.size, reader.hexdigest)

    with ThreadPoolExecutor(workers, thread_name_prefix="dataops-check") as pool:
        list(pool.map(one, manifest.parts))


def fetch_parts(storage: Storage, manifest: Manifest, folder: Path, workers: int) -> None:
    """Every part downloaded, checked and decompressed into `folder`, `workers` at a time; a part
    that does not match its manifest entry fails the whole fetch before pg_restore reads anything."""
    check_present(storage, manifest)
    free = shutil.disk_usage(folder).free
    if free < manifest.raw_size + 64 * MiB:
        raise OperationFailed(f"restoring backup {manifest.id} (a parallel backup) needs {manifest.raw_size / MiB:,.0f} "
                              f"MiB free in {folder} for pg_restore's files, and {free / MiB:,.0f} MiB are free; free "
                              "some space or point backups.local_dir at a larger disk")

    def one(part: Part) -> None:
        body = _download(storage, manifest, part)
        source = HashingReader(body)
        broken = None
        try:
            stream = decompress_reader(source) if manifest.compression == "zstd" else source
            with open(folder / part.name, "wb") as out:
                shutil.copyfileobj(stream, out, CHUNK)
        except zstandard.ZstdError as exc:
            broken = exc
        finally:
            try:
                while source.read(CHUNK):  # hash every stored byte, even past a frame's end or a bad frame
                    pass
            finally:
                body.close()
        if source.size != part.size or source.hexdigest != part.sha256:
            raise corrupt(manifest, storage, part, source.size, source.hexdigest)
        if broken is not None:
            raise OperationFailed(f"backup {manifest.id} is corrupt: its part {part.name} matches its checksum but does "
                                  f"not decompress ({broken}); use another backup")

    with ThreadPoolExecutor(workers, thread_name_prefix="dataops-fetch") as pool:
        list(pool.map(one, manifest.parts))


def restore_directory(pg_restore: str, folder: Path, jobs: int, conninfo: str, secret_env: dict[str, str],
                      check_client, keep_privileges: bool = False) -> None:
    args = [pg_restore, "--format=directory", f"--jobs={jobs}", "--exit-on-error", f"--dbname={conninfo}", str(folder)]
    if not keep_privileges:
        args[3:3] = ["--no-owner", "--no-privileges"]
    proc = Process(args, secret_env, name="pg_restore", preexec_fn=_die_with_parent)
    try:
        check_client(proc)
    finally:
        proc.close()
