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

from dataops.errors import OperationFailed
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


JOB_SIZE = 4 * CHUNK
# Level 3's match table (2^17) is too small for a dump, whose repeats (a row's shape, a
# column's values) lie far apart: level 3 with level 4's table (2^18) came out 1.3% smaller
# than pg_dump's gzip, smaller than level 4 itself, at ~12% less CPU than level 4.
HASH_LOG = 18


def compressor(level: int, threads: int) -> zstandard.ZstdCompressor:
    """threads=0 means one zstd worker per core beside the one pg_dump's server backend
    keeps busy; with a single worker, compressing inline in the reading thread is cheaper
    than handing blocks to a thread. On 2 cores, two workers were no faster than inline
    (they take the core the backend and the S3 upload need) and cost ~25 MB more
    (bench/RESULTS.md). Jobs of 4 MiB keep each worker's buffers small: zstd's default
    (4x the window) costs ~35 MiB more at no gain in size worth having (0.1%). See
    HASH_LOG for the one parameter changed from the level's own."""
    workers = threads or max(1, (os.cpu_count() or 1) - 1)
    params = zstandard.ZstdCompressionParameters.from_level(
        level, hash_log=max(HASH_LOG, zstandard.ZstdCompressionParameters.from_level(level).hash_log),
        threads=workers if workers > 1 else 0, job_size=JOB_SIZE if workers > 1 else 0)
    return zstandard.ZstdCompressor(compression_params=params)


def compress_reader(source: BinaryIO, level: int, threads: int) -> BinaryIO:
    return compressor(level, threads).stream_reader(source, read_size=CHUNK, closefd=False)


def decompress_reader(source: BinaryIO) -> BinaryIO:
    return zstandard.ZstdDecompressor().stream_reader(source, read_size=CHUNK, closefd=False)


class Process:
    """A client binary with stderr drained in the background (so it can never block on a
    full pipe), and an error that quotes its last lines with secrets masked."""

    def __init__(self, args: list[str], env: dict[str, str], *, stdin=None, stdout=None, name: str):
        self.name = name
        self._err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(args, stdin=stdin, stdout=stdout, stderr=self._err,
                                     env={**os.environ, **env})
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


def pump(source: BinaryIO, sink: BinaryIO, chunk: int = CHUNK) -> int:
    """Copy until the end; returns bytes copied. Broken pipes surface to the caller."""
    total = 0
    while data := source.read(chunk):
        sink.write(data)
        total += len(data)
    return total


