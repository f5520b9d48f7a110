"""The backup catalog: manifests in storage, listing, lookup, verification marks, retention, freshness.

Layout under the storage prefix, one folder per backup:
    <env>/<backup id>/dump.pgc[.zst]   the pg_dump custom-format archive (written first), or
    <env>/<backup id>/dump.d/<file>[.zst]  with backups.jobs > 1: each file of pg_dump's directory
                                       format (toc.dat, one per table, blobs), its own object (parts.py)
    <env>/<backup id>/manifest.json    written last: its presence is what makes a backup
    <env>/<backup id>/verified.json    written by verify-backup
A dump without its manifest is the leftover of a failed run: never listed, restored or pruned.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Literal

from prefect import task
from pydantic import BaseModel, ConfigDict, ValidationError

from dataops.errors import BadInput, OperationFailed
from dataops.settings import Environment, Settings
from dataops.tasks.backup.storage import Storage, open_storage
from dataops.tasks.retries import RETRY_TRANSIENT

MANIFEST = "manifest.json"
VERIFIED = "verified.json"


class Verification(BaseModel):
    model_config = ConfigDict(extra="ignore")

    ok: bool
    verified_at: datetime
    duration_seconds: float
    problems: list[str] = []
    scratch_server: str | None = None


class Part(BaseModel):
    """One file of a directory-format dump as stored: `size` and `sha256` are of the stored
    (compressed) bytes, `raw_size` of the file pg_dump wrote."""

    model_config = ConfigDict(extra="ignore")

    name: str
    key: str
    size: int
    raw_size: int
    sha256: str


class Manifest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    format_version: int = 1
    id: str
    environment: str
    database: str
    role: str
    server_version: str
    pg_dump_version: str
    dump_key: str
    archive_format: Literal["custom", "directory"] = "custom"
    compression: Literal["zstd", "pg_dump"]
    size: int
    raw_size: int
    sha256: str
    started_at: datetime
    finished_at: datetime
    duration_seconds: float
    tables: dict[str, int]
    schema_fingerprint: str
    schema_fingerprint_version: int = 1  # how the fingerprint reads server-printed text (tasks/schema.py); absent: 1
    tool_version: str
    # Roles that own objects of the database or hold its GRANTs, read in the dump's snapshot: a restore
    # keeps owners and GRANTs when the target server has them all. None: a backup from before they were kept.
    roles: list[str] | None = None
    # A parallel backup (archive_format "directory"): its parts, dump_key being the toc.dat part's;
    # size and raw_size are the parts' totals and sha256 is parts.parts_digest over them.
    jobs: int = 1
    parts: list[Part] = []
    local_disk_peak: int | None = None  # bytes the parallel dump held on local disk at most
    verification: Verification | None = None

    @property
    def stored_keys(self) -> list[str]:
        """Every object that holds the dump."""
        return [p.key for p in self.parts] if self.parts else [self.dump_key]

    @property
    def verified(self) -> bool:
        return bool(self.verification and self.verification.ok)

    def summary(self) -> dict:
        """The fields a person wants in a list or an artifact."""
        return {
            "id": self.id,
            "database": self.database,
            "size_mib": round(self.size / 1048576, 2),
            "rows": sum(self.tables.values()),
            "tables": len(self.tables),
            "finished_at": self.finished_at.isoformat(timespec="seconds"),
            "verified": "yes" if self.verified else ("FAILED" if self.verification else "no"),
        }


def new_backup_id(now: datetime | None = None) -> str:
    """Sortable by time, unique even for two backups in the same second."""
    now = now or datetime.now(timezone.utc)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def backup_folder(env: str, backup_id: str) -> str:
    return f"{env}/{backup_id}"


def dump_key(env: str, backup_id: str, compression: str) -> str:
    return f"{backup_folder(env, backup_id)}/dump.pgc" + (".zst" if compression == "zstd" else "")


def write_manifest(storage: Storage, manifest: Manifest) -> None:
    body = manifest.model_dump(mode="json", exclude={"verification"})
    storage.put_bytes(f"{backup_folder(manifest.environment, manifest.id)}/{MANIFEST}",
                      json.dumps(body, indent=2, sort_keys=True).encode())


def _read_json(storage: Storage, key: str) -> dict:
    try:
        return json.loads(storage.get_bytes(key))
    except json.JSONDecodeError:
        raise OperationFailed(f"{key} in {storage.description} is not valid JSON; the backup catalog is damaged") from None


def list_backups(storage: Storage, env: str) -> list[Manifest]:
    """Complete backups of one environment, oldest first (newest last)."""
    objects = storage.list(f"{env}/")
    keys = {o.key for o in objects}
    out = []
    for key in sorted(keys):
        parts = key.split("/")
        if len(parts) != 3 or parts[2] != MANIFEST:
            continue
        try:
            manifest = Manifest.model_validate(_read_json(storage, key))
        except ValidationError:
            continue  # a manifest we cannot read is not a backup we can use
        if manifest.dump_key not in keys:
            continue
        vkey = f"{parts[0]}/{parts[1]}/{VERIFIED}"
        if vkey in keys:
            manifest.verification = Verification.model_validate(_read_json(storage, vkey))
        out.append(manifest)
    return sorted(out, key=lambda m: (m.finished_at, m.id))


def get_backup(storage: Storage, env: str, backup_id: str) -> Manifest:
    if backup_id in ("latest", "newest"):
        found = list_backups(storage, env)
        if not found:
            raise BadInput(f"environment '{env}' has no backups in {storage.description}; run `dataops backup {env}` first")
        return found[-1]
    for m in list_backups(storage, env):
        if m.id == backup_id:
            return m
    raise BadInput(f"backup '{backup_id}' not found for environment '{env}'; run `dataops backups {env}` to list them")


def mark_verified(storage: Storage, manifest: Manifest, verification: Verification) -> None:
    key = f"{backup_folder(manifest.environment, manifest.id)}/{VERIFIED}"
    storage.put_bytes(key, json.dumps(verification.model_dump(mode="json"), indent=2).encode())
    manifest.verification = verification


def delete_backup(storage: Storage, manifest: Manifest) -> None:
    """Manifest first: if we stop halfway, what remains is no longer listed as a backup."""
    folder = backup_folder(manifest.environment, manifest.id)
    storage.delete([f"{folder}/{MANIFEST}"])
    rest = [o.key for o in storage.list(f"{folder}/")]
    if rest:
        storage.delete(rest)


def discard_leftovers(storage: Storage, env: str) -> list[str]:
    """What killed backups of `env` left in storage, discarded: unfinished uploads (multipart
    uploads never completed nor aborted, `.partial` files) and dumps without a manifest. Only call it
    holding the environment's backup lock (dump.backup_lock): then no live backup of it is writing,
    and none of these can become a backup any more. (One exception, made safe elsewhere: a backup
    whose lock session ended under it, by a server restart or pg_terminate_backend, may still be
    writing. Its upload then fails and is retried under the lock taken again, and it writes its
    manifest only after taking the lock again and finding its dump whole: dump.finish_backup.)
    Returns what it discarded, in words."""
    gone = []
    unfinished = storage.incomplete(f"{env}/")
    storage.discard_incomplete(unfinished)
    gone += [f"unfinished upload of {u.key} (started {u.started:%Y-%m-%d %H:%M}Z)" for u in unfinished]
    folders: dict[str, list[str]] = {}
    for o in storage.list(f"{env}/"):
        parts = o.key.split("/")
        if len(parts) >= 3:  # a parallel backup's parts sit one folder deeper
            folders.setdefault(parts[1], []).append(o.key)
    for backup_id, keys in sorted(folders.items()):
        if f"{env}/{backup_id}/{MANIFEST}" not in keys:
            storage.delete(keys)
            gone.append(f"backup {backup_id} without a manifest ({len(keys)} object(s))")
    return gone


def retention_plan(manifests: list[Manifest], keep_last: int, keep_days: int,
                   now: datetime | None = None) -> tuple[list[Manifest], list[Manifest], dict[str, str]]:
    """Split backups into (keep, delete) and say why each kept one is kept.

    Kept: the `keep_last` newest, every one younger than `keep_days`, and always the
    newest verified one, because a backup that was proven to restore is the last line of
    defence and must never be pruned by a run of unverified ones.
    """
    now = now or datetime.now(timezone.utc)
    ordered = sorted(manifests, key=lambda m: (m.finished_at, m.id))
    reasons: dict[str, str] = {}
    for m in ordered[-keep_last:] if keep_last else []:
        reasons[m.id] = f"one of the {keep_last} newest"
    cutoff = now - timedelta(days=keep_days)
    for m in ordered:
        if m.id not in reasons and m.finished_at >= cutoff:
            reasons[m.id] = f"younger than {keep_days} days"
    verified = [m for m in ordered if m.verified]
    if verified and verified[-1].id not in reasons:
        reasons[verified[-1].id] = "newest verified backup"
    keep = [m for m in ordered if m.id in reasons]
    delete = [m for m in ordered if m.id not in reasons]
    return keep, delete, reasons


# -- freshness: is there a verified backup recent enough to restore from? --------------------

def age_hours(manifest: Manifest, now: datetime | None = None) -> float:
    """Hours since the backup finished (never negative: a clock a little ahead is not a future backup)."""
    now = now or datetime.now(timezone.utc)
    return max((now - manifest.finished_at).total_seconds() / 3600, 0.0)


def age_text(hours: float) -> str:
    """An age for a person: "40 min", "3 h", "2 d"."""
    if hours < 1:
        return f"{int(hours * 60)} min"
    if hours < 48:
        return f"{int(hours)} h"
    return f"{int(hours // 24)} d"


def verification_text(manifest: Manifest) -> str:
    """"verified 2026-12-03 04:10Z", "FAILED verification 2026-12-03 04:10Z" or "not verified"."""
    v = manifest.verification
    if v is None:
        return "not verified"
    when = f"{v.verified_at.astimezone(timezone.utc):%Y-%m-%d %H:%M}Z"
    return f"verified {when}" if v.ok else f"FAILED verification {when}"


@dataclass(frozen=True)
class Freshness:
    """The answer to "could we restore `env` from a verified backup younger than max_age_hours?"."""

    environment: str
    max_age_hours: int
    ok: bool
    detail: str  # one line; when not ok, it says what is missing and what to run
    newest_verified: str | None = None  # its id
    newest_verified_age_hours: float | None = None


def freshness(manifests: list[Manifest], env: str, max_age_hours: int, now: datetime | None = None) -> Freshness:
    """Only a verified backup counts: an unverified one may not restore, and one that failed
    verification does not. Age is counted from the end of the dump, as retention counts it."""
    now = now or datetime.now(timezone.utc)
    ordered = sorted(manifests, key=lambda m: (m.finished_at, m.id))
    verified = [m for m in ordered if m.verified]
    newest = verified[-1] if verified else None
    age = age_hours(newest, now) if newest else None
    if newest is not None and age <= max_age_hours:
        return Freshness(env, max_age_hours, True, f"newest verified backup of {env} is {newest.id}, "
                         f"{_age(age, max_age_hours)} old (limit {max_age_hours} h)", newest.id, age)
    latest = ordered[-1] if ordered else None
    if latest is None:
        found = "it has no backups"
    else:
        status = f"{_age(age_hours(latest, now), max_age_hours)} old and {verification_text(latest)}"
        if latest.verification and latest.verification.problems:
            status += f" ({latest.verification.problems[0]})"
        if newest is not None:
            found = f"the newest verified is {newest.id}, {_age(age, max_age_hours)} old"
            if latest is not newest:
                found += f"; the newest backup, {latest.id}, is {status}"
        elif len(ordered) == 1:
            found = f"its only backup, {latest.id}, is {status}"
        else:
            found = f"none of its {len(ordered)} backups is verified; the newest, {latest.id}, is {status}"
    if latest is not None and latest.verification is None and age_hours(latest, now) <= max_age_hours:
        todo = f"dataops verify-backup {env} {latest.id}"  # a fresh backup only waits for its verification
    else:
        todo = f"dataops backup {env} && dataops verify-backup {env}"
    return Freshness(env, max_age_hours, False, f"no verified backup of {env} younger than {max_age_hours} h: "
                     f"{found}; run {todo}", newest.id if newest else None, age)


def _age(hours: float, limit: int) -> str:
    """Whole hours (minutes under one), unless rounding would put an age on the wrong side of the limit."""
    if hours < 1:
        return f"{int(hours * 60)} min"
    whole = f"{hours:.0f} h"
    return whole if (round(hours) <= limit) == (hours <= limit) else f"{hours:.1f} h"


def check_freshness(storage: Storage, env: str, max_age_hours: int, now: datetime | None = None) -> Freshness:
    return freshness(list_backups(storage, env), env, max_age_hours, now)


# -- Prefect tasks --------------------------------------------------------------------

@task(name="delete-backup", **RETRY_TRANSIENT)
def delete_task(settings: Settings, manifest: Manifest) -> str:
    delete_backup(open_storage(settings.storage), manifest)
    return manifest.id


@task(name="backup-freshness", **RETRY_TRANSIENT)
def freshness_task(settings: Settings, env: Environment) -> Freshness:
    return check_freshness(open_storage(settings.storage), env.name, settings.backups.max_age_hours)
