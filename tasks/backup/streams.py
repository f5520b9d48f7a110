"""Byte-stream plumbing between pg_dump/pg_restore and storage, in bounded memory.

Everything here is a file-like object with `read(n)`, so a dump flows from pg_dump's
stdout through zstd and SHA-256 into a multipart upload without ever being whole in
memory or on disk.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from collections.abc import Callable
from typing import BinaryIO

import zstandard

from dataops.errors import DataopsError, OperationFailed, TransientError, first_line, is_transient
from dataops.redact import redact

CHUNK = 1024 * 1024


class HashingReader:
    """Counts and hashes what passes through; `read(n)` returns n bytes unless at the end.

    Full reads matter: boto3 turns each read into one multipart part, and S3 rejects a
    part under 5 MiB that is not the last. `on_eof` runs once at the end of the stream and
    may raise, which makes the consumer (an upload) fail instead of completing.
    """

    def __init__(self, source: BinaryIO, on_eof: Callable[[], None] | None = None, *, hash_bytes: bool = True):
        self.source = source
        self.sha = hashlib.sha256() if hash_bytes else None
        self.size = 0
        self._on_eof = on_eof
        self._done = False

    def read(self, n: int = -1) -> bytes:
        if self._done:
            return b""
        if n is None or n < 0:
            parts = []
            while chunk := self.source.read(CHUNK):
                parts.append(chunk)
            data = b"".join(parts)
        else:
            parts, got = [], 0
            while got < n:
                chunk = self.source.read(n - got)
                if not chunk:
                    break
                parts.append(chunk)
                got += len(chunk)
            data = b"".join(parts)
        if data:
            if self.sha is not None:
                self.sha.update(data)
            self.size += len(data)
        if not data or (n is not None and 0 <= n and len(data) < n):
            self._finish()
        return data

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            if self._on_eof:
                self._on_eof()

    @property
    def hexdigest(self) -> str:
        return self.sha.hexdigest()

    def readable(self) -> bool:
        return True


class Download:
    """An object being read from storage, whose break is a TransientError saying how far it got.

    An S3 endpoint that dies, restarts or drops the connection in the middle of a GET ends the
    body early: botocore raises IncompleteReadError or ResponseStreamingError, which say nothing
    of a retry and which the retry policy does not know. Nothing read so far has been used for
    anything but a scratch database, so the step can start again from the first byte."""

    def __init__(self, source: BinaryIO, what: str, size: int | None = None):
        self.source = source
        self.what = what
        self.size = size
        self.got = 0

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.source.read(n)
        except DataopsError:
            raise
        except Exception as exc:  # noqa: BLE001 - only a broken transfer is turned into a retry
            if not broken_transfer(exc):
                raise
            of = f" of {self.size:,}" if self.size is not None else ""
            why = "the connection ended early" if type(exc).__name__ == "IncompleteReadError" else first_line(exc)
            raise TransientError(f"reading {self.what} broke off after {self.got:,}{of} bytes ({why}); "
                                 "a retry reads it again") from None
        self.got += len(data)
        return data

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        try:
            self.source.close()
        except Exception:  # noqa: BLE001 - a broken connection has nothing left to release
            pass


def broken_transfer(exc: BaseException) -> bool:
    """Whether `exc`, raised while reading a stream from storage, is the transfer breaking."""
    if is_transient(exc):
        return True
    try:
        from botocore.exceptions import IncompleteReadError, ResponseStreamingError
        from urllib3.exceptions import HTTPError

        return isinstance(exc, (IncompleteReadError, ResponseStreamingError, HTTPError))
    except ImportError:  # pragma: no cover - storage on a folder only
        return False


JOB_SIZE = 4 * CHUNK
# Levels 3 and 4 (zstd's "dfast") keep two match tables: a large one for long matches and a
# small one for short ones. A dump's useful repeats (a row's shape, a column's values) lie
# far apart, so the defaults are tuned the wrong way round for it: measured on the sample
# application's -Z0 dump (bench/RESULTS.md, "The codec alone"), level 3 with a larger long
# table (2^18, level 4's) and a smaller short one (2^10 instead of 2^16) came out 3% smaller
# than pg_dump's gzip (zstd's own level 3: 0.3% larger) for the same CPU, and took less CPU
# than the larger long table alone: short matches found through the big short table were
# mostly worse than the literals they replaced.
HASH_LOG = 18
SHORT_TABLE_LOG = 10
_DFAST = zstandard.STRATEGY_DFAST


def compression_params(level: int, workers: int) -> zstandard.ZstdCompressionParameters:
    own = zstandard.ZstdCompressionParameters.from_level(level)
    chain_log = min(SHORT_TABLE_LOG, own.chain_log) if own.strategy == _DFAST else own.chain_log
    return zstandard.ZstdCompressionParameters.from_level(
        level, hash_log=max(HASH_LOG, own.hash_log), chain_log=chain_log, threads=max(1, workers),
        job_size=JOB_SIZE)


def compressor(level: int, threads: int) -> zstandard.ZstdCompressor:
    """threads=0 means one zstd worker per core beside the one pg_dump's server backend
    keeps busy. Always at least one worker thread, never inline in the reading thread:
    zstd streaming inline keeps its history in a ring buffer and, once that wraps, matches
    across the seam by its slower "external dictionary" path; a worker compresses each
    job with the previous one as a plain prefix. On the -Z0 archive of bench/RESULTS.md,
    one worker took 0.70 CPU-s where inline took 0.99, and the reading thread keeps
    draining pg_dump's pipe while the worker compresses. Jobs of 4 MiB keep the worker's
    buffers small (+15 MiB against inline; 16 MiB jobs cost +67 MiB for 0.4% in size).
    See HASH_LOG for the match tables changed from the level's own."""
    return zstandard.ZstdCompressor(compression_params=compression_params(level, zstd_workers(threads)))


def zstd_workers(threads: int) -> int:
    """`compression_threads` as zstd worker threads: 0 means one per core but one."""
    return threads or max(1, (os.cpu_count() or 1) - 1)


def compress_reader(source: BinaryIO, level: int, threads: int) -> BinaryIO:
    return compressor(level, threads).stream_reader(source, read_size=CHUNK, closefd=False)


def decompress_reader(source: BinaryIO) -> BinaryIO:
    return zstandard.ZstdDecompressor().stream_reader(source, read_size=CHUNK, closefd=False)


class Process:
    """A client binary with stderr drained in the background (so it can never block on a
    full pipe), and an error that quotes its last lines with secrets masked."""

    def __init__(self, args: list[str], env: dict[str, str], *, stdin=None, stdout=None, name: str,
                 preexec_fn: Callable[[], None] | None = None):
        self.name = name
        self._err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(args, stdin=stdin, stdout=stdout, stderr=self._err,
                                     env={**os.environ, **env}, preexec_fn=preexec_fn)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                widen_pipe(pipe.fileno())

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def stderr_tail(self, lines: int = 3) -> str:
        self._err.seek(0)
        text = self._err.read().decode(errors="replace").strip().splitlines()
        return redact(" | ".join(text[-lines:]))

    def check(self) -> None:
        rc = self.wait()
        if rc != 0:
            raise OperationFailed(f"{self.name} failed (exit {rc}): {self.stderr_tail() or 'no message'}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.kill()
        for f in (self.proc.stdin, self.proc.stdout):
            if f:
                try:
                    f.close()
                except OSError:
                    pass
        self._err.close()


PIPE_SIZE = 1024 * 1024


def widen_pipe(fd: int) -> None:
    """A 1 MiB pipe instead of 64 KiB lets pg_dump (and the server behind it) keep going
    while the reader hands a block to zstd: measured ~15% off a backup's wall time on 2
    cores. Best effort: the limit is /proc/sys/fs/pipe-max-size, and only Linux has it."""
    try:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except (ImportError, AttributeError, OSError):
        pass


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def return_big_buffers() -> None:
    """Make glibc hand buffers of 1 MiB and more straight back to the OS when freed.

    By default glibc raises its mmap threshold to the size of any mmapped block freed, so
    after the first multipart part (8 MiB, joined from 1 MiB pipe reads) every later part
    and read comes from the heap of whichever thread allocated it, and each of those
    heaps keeps its high-water mark. With the threshold fixed at the read size, the
    backup flow into S3 peaked at 169.5 MiB instead of 189.4 MiB on 3M rows (plain
    backup(): 156.7 against 164.2), with no loss of speed (bench/RESULTS.md); fixed at
    4 MiB, which leaves the reads on the heaps, it saved half as much (1M rows). Best effort:
    glibc only."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, CHUNK)  # the pipe reads' size
    except (OSError, AttributeError):
        pass
