"""Where backups live: any S3-compatible store through boto3, or a local folder.

Both kinds promise the same thing the backup code relies on: an object appears under its
final key only when it is complete. S3 gives this through multipart upload (aborted on
any error); the folder store writes to a hidden temporary name and renames.
"""

from __future__ import annotations

import os
import shutil
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from dataops.errors import BadInput, OperationFailed, TransientError
from dataops.failpoints import failpoint
from dataops.redact import redact
from dataops.settings import StorageSettings

MiB = 1024 * 1024


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    last_modified: datetime


@dataclass(frozen=True)
class Incomplete:
    """An upload that never finished: an S3 multipart upload never completed nor aborted (its parts
    are stored and billed, and invisible to a listing), or a folder's `.partial` file."""

    key: str
    ref: str  # the multipart upload's id, or the partial file's path
    started: datetime


class Storage(ABC):
    """Keys are relative to the configured prefix; callers never see the prefix."""

    description: str

    @abstractmethod
    def check(self) -> None: ...

    @abstractmethod
    def upload_stream(self, key: str, stream: BinaryIO) -> None: ...

    @abstractmethod
    def open_stream(self, key: str) -> BinaryIO: ...

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def list(self, prefix: str) -> list[ObjectInfo]: ...

    @abstractmethod
    def delete(self, keys: list[str]) -> None: ...

    @abstractmethod
    def incomplete(self, prefix: str) -> list[Incomplete]: ...

    @abstractmethod
    def discard_incomplete(self, uploads: list[Incomplete]) -> None: ...

    def exists(self, key: str) -> bool:
        return any(o.key == key for o in self.list(key))


def open_storage(settings: StorageSettings) -> Storage:
    if settings.scheme == "s3":
        return S3Storage(settings)
    return FileStorage(Path(settings.url.removeprefix("file://")))


# -- S3 -------------------------------------------------------------------------------

class S3Storage(Storage):
    def __init__(self, settings: StorageSettings):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.settings = settings
        self.bucket = settings.bucket
        self.prefix = settings.prefix
        where = f" at {settings.endpoint_url}" if settings.endpoint_url else ""
        self.description = f"s3://{self.bucket}/{self.prefix}{where}"
        secret = settings.secret_access_key.get_secret_value() if settings.secret_access_key else None
        self.client = boto3.client(
            "s3",
            endpoint_url=settings.endpoint_url,
            region_name=settings.region,
            aws_access_key_id=settings.access_key_id,
            aws_secret_access_key=secret,
            config=Config(
                retries={"mode": "standard", "max_attempts": 5},
                connect_timeout=10,
                read_timeout=120,
                s3={"addressing_style": "path"} if settings.endpoint_url else {},
                signature_version="s3v4",
            ),
        )
        chunk = settings.multipart_chunk_mb * MiB
        # Non-seekable uploads buffer one chunk per worker: memory is chunk x concurrency.
        # A non-seekable upload holds up to max_in_memory_upload_chunks parts in memory (10
        # by default: 80 MiB); capping it at the concurrency keeps the backup's memory flat.
        self.upload_config = TransferConfig(multipart_threshold=chunk, multipart_chunksize=chunk,
                                            max_concurrency=settings.max_concurrency, use_threads=True)
        self.upload_config.max_in_memory_upload_chunks = settings.max_concurrency  # s3transfer reads it
        self.client.meta.events.register("after-call.s3.UploadPart", _part_uploaded)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _extra(self) -> dict:
        extra = {}
        if self.settings.server_side_encryption:
            extra["ServerSideEncryption"] = self.settings.server_side_encryption
        if self.settings.kms_key_id:
            extra["SSEKMSKeyId"] = self.settings.kms_key_id
        return extra

    def _error(self, exc: Exception, action: str) -> Exception:
        from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in ("NoSuchBucket",) or (code == "404" and action == "check"):
                return BadInput(f"bucket '{self.bucket}' does not exist{self._at()}; create it or fix storage.url")
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
                return BadInput(f"access to bucket '{self.bucket}' denied ({code}) while trying to {action}; "
                                "fix storage.access_key_id / secret_access_key or the bucket policy")
            if code == "NoSuchUpload":  # aborted from outside: what discard_leftovers does to a dead backup's
                return TransientError(f"the unfinished upload was aborted by someone else while trying to {action} "
                                      "(a prune or another backup discarded it as a leftover); a retry uploads again")
            if code in ("NoSuchKey", "404"):
                return OperationFailed(f"object '{action}' not found in {self.description}")
            if status >= 500 or code in ("SlowDown", "RequestTimeout", "InternalError"):
                return TransientError(f"S3 error {code} while trying to {action}; retry later")
            return OperationFailed(redact(f"S3 error {code} while trying to {action}: {exc}"))
        if isinstance(exc, NoCredentialsError):
            return BadInput("no S3 credentials found; set storage.access_key_id and storage.secret_access_key "
                            "(e.g. ${AWS_ACCESS_KEY_ID}) or the AWS_* environment variables")
        if isinstance(exc, EndpointConnectionError):
            return TransientError(f"cannot reach the S3 endpoint{self._at()} while trying to {action}; "
                                  "check storage.endpoint_url and that the store is running")
        if isinstance(exc, BotoCoreError):
            return TransientError(redact(f"S3 client error while trying to {action}: {exc}"))
        return exc

    def _at(self) -> str:
        return f" at {self.settings.endpoint_url}" if self.settings.endpoint_url else ""

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:  # noqa: BLE001 - classified below
            raise self._error(exc, "check") from None

    def upload_stream(self, key: str, stream: BinaryIO) -> None:
        try:
            self.client.upload_fileobj(stream, self.bucket, self._key(key), ExtraArgs=self._extra() or None,
                                       Config=self.upload_config)
        except Exception as exc:  # noqa: BLE001
            # boto3 aborts the multipart upload on failure, so no partial object is left.
            cause = getattr(exc, "__cause__", None) or getattr(exc, "original_exception", None)
            from dataops.errors import DataopsError

            for candidate in (exc, cause):
                if isinstance(candidate, DataopsError):
                    raise candidate from None
            raise self._error(exc, f"upload {key}") from None

    def open_stream(self, key: str) -> BinaryIO:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, f"read {key}") from None

    def put_bytes(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **self._extra())
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, f"write {key}") from None

    def get_bytes(self, key: str) -> bytes:
        with self.open_stream(key) as body:
            return body.read()

    def list(self, prefix: str) -> list[ObjectInfo]:
        out: list[ObjectInfo] = []
        full = self._key(prefix)
        strip = len(self._key(""))
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    out.append(ObjectInfo(obj["Key"][strip:], obj["Size"], obj["LastModified"]))
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, f"list {prefix}") from None
        return out

    def incomplete(self, prefix: str) -> list[Incomplete]:
        out: list[Incomplete] = []
        strip = len(self._key(""))
        try:
            for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket,
                                                                                   Prefix=self._key(prefix)):
                for up in page.get("Uploads", []):
                    out.append(Incomplete(up["Key"][strip:], up["UploadId"], up["Initiated"]))
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, f"list unfinished uploads under {prefix}") from None
        return out

    def discard_incomplete(self, uploads: list[Incomplete]) -> None:
        for up in uploads:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=self._key(up.key), UploadId=up.ref)
            except Exception as exc:  # noqa: BLE001
                raise self._error(exc, f"abort the unfinished upload of {up.key}") from None

    def delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[i:i + 1000]]
            try:
                resp = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            except Exception as exc:  # noqa: BLE001
                raise self._error(exc, "delete objects") from None
            if resp.get("Errors"):
                first = resp["Errors"][0]
                raise OperationFailed(f"could not delete {first.get('Key')}: {first.get('Code')}")


# -- local folder ---------------------------------------------------------------------

class FileStorage(Storage):
    def __init__(self, root: Path):
        self.root = root
        self.description = f"file://{root}"

    def _path(self, key: str) -> Path:
        p = (self.root / key).resolve()
        if self.root.resolve() not in p.parents:
            raise BadInput(f"key {key!r} escapes the storage folder")
        return p

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BadInput(f"cannot create storage folder {self.root}: {exc.strerror}; fix storage.url") from None
        if not os.access(self.root, os.W_OK):
            raise BadInput(f"storage folder {self.root} is not writable; fix its permissions or storage.url")

    def upload_stream(self, key: str, stream: BinaryIO) -> None:
        final = self._path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.partial-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as out:
                out.write(stream.read(4 * MiB))
                failpoint("backup.mid_upload")
                shutil.copyfileobj(stream, out, 4 * MiB)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)

    def open_stream(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            raise OperationFailed(f"object '{key}' not found in {self.description}") from None

    def put_bytes(self, key: str, data: bytes) -> None:
        import io

        self.upload_stream(key, io.BytesIO(data))

    def get_bytes(self, key: str) -> bytes:
        with self.open_stream(key) as f:
            return f.read()

    def list(self, prefix: str) -> list[ObjectInfo]:
        base = self.root
        if not base.exists():
            return []
        out = []
        for path in base.rglob("*"):
            if not path.is_file() or path.name.startswith("."):
                continue
            key = path.relative_to(base).as_posix()
            if key.startswith(prefix):
                st = path.stat()
                out.append(ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, timezone.utc)))
        return sorted(out, key=lambda o: o.key)

    def incomplete(self, prefix: str) -> list[Incomplete]:
        if not self.root.exists():
            return []
        out = []
        for path in self.root.rglob(".*.partial-*"):
            key = path.parent.joinpath(path.name[1:].split(".partial-")[0]).relative_to(self.root).as_posix()
            if key.startswith(prefix):
                out.append(Incomplete(key, str(path), datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)))
        return sorted(out, key=lambda u: u.ref)

    def discard_incomplete(self, uploads: list[Incomplete]) -> None:
        for up in uploads:
            Path(up.ref).unlink(missing_ok=True)

    def delete(self, keys: list[str]) -> None:
        for k in keys:
            self._path(k).unlink(missing_ok=True)


def _part_uploaded(**_kwargs) -> None:
    """botocore event hook: a multipart upload's part was stored (the failpoint kills a backup
    while its upload stands unfinished in the bucket)."""
    failpoint("backup.mid_upload")
