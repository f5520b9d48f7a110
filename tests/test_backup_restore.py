"""Backup -> storage -> restore on real PostgreSQL, a real S3-compatible server and Prefect."""

from __future__ import annotations

import json

import pytest

from dataops.dev.sample_app import create_schema, seed
from dataops.errors import BadInput, OperationFailed, SafetyRefusal
from dataops.flows.backup_database import backup_database
from dataops.flows.restore_database import restore_database
from dataops.flows.verify_backup import verify_backup
from dataops.settings import load_settings
from dataops.tasks import pg
from dataops.tasks.backup.catalog import list_backups
from dataops.tasks.backup.storage import open_storage
from dataops.tasks.checksums import table_checksums


def checksums(dsn):
    with pg.connect(dsn) as conn:
        return {t: (c.rows, c.checksum) for t, c in table_checksums(conn).items()}


@pytest.fixture
def seeded(make_db):
    prod = make_db("prod")
    create_schema(prod)
    seed(prod, users=300)
    return prod


def test_round_trip_restores_identical_rows(prefect_api, seeded, make_db, s3_bucket, s3_client, write_config):
    staging = make_db("stg")
    cfg = write_config({"production": ("production", seeded), "staging": ("staging", staging)}, bucket=s3_bucket)

    m = backup_database("production", config=str(cfg))

    # The bytes in the bucket are the ones the manifest describes.
    body = s3_client.get_object(Bucket=s3_bucket, Key=f"backups/{m['dump_key']}")["Body"].read()
    import hashlib

    assert hashlib.sha256(body).hexdigest() == m["sha256"] and len(body) == m["size"]
    manifest = json.loads(s3_client.get_object(Bucket=s3_bucket, Key=f"backups/production/{m['id']}/manifest.json")["Body"].read())
    assert manifest["tables"]["users"] == 300 and manifest["schema_fingerprint"] == m["schema_fingerprint"]
    assert manifest["compression"] == "zstd" and body[:4] == b"\x28\xb5\x2f\xfd"  # zstd frame magic

    r = restore_database("production", m["id"], "staging", config=str(cfg))
    assert r["tables"]["users"] == 300
    assert checksums(staging) == checksums(seeded)

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        latest = client.read_latest_artifacts()
    by_key = {a.key: a for a in latest}
    assert m["id"] in by_key["backup-production"].data and m["sha256"] in by_key["backup-production"].data
    assert m["id"] in by_key["restore-staging"].data


def test_server_side_encryption_is_requested(seeded, s3_bucket, s3_client, write_config, s3_endpoint):
    from dataops.tasks.backup.dump import backup

    cfg = write_config({"production": ("production", seeded)},
                       storage={"url": f"s3://{s3_bucket}/enc", "endpoint_url": s3_endpoint, "region": "us-east-1",
                                "access_key_id": "testing", "secret_access_key": "testing",
                                "server_side_encryption": "AES256"})
    settings = load_settings(cfg)
    m = backup(settings, settings.env("production"))
    for key in (f"enc/{m.dump_key}", f"enc/production/{m.id}/manifest.json"):
        assert s3_client.head_object(Bucket=s3_bucket, Key=key)["ServerSideEncryption"] == "AES256"


def test_restore_into_production_needs_confirmation(prefect_api, seeded, make_db, s3_bucket, write_config):
    other = make_db("other")
    create_schema(other)
    cfg = write_config({"production": ("production", seeded), "dev": ("development", other)}, bucket=s3_bucket)
    m = backup_database("dev", config=str(cfg))
    before = checksums(seeded)

    with pytest.raises(SafetyRefusal, match="--confirm production"):
        restore_database("dev", m["id"], "production", config=str(cfg))
    with pytest.raises(SafetyRefusal):
        restore_database("dev", m["id"], "production", confirm="prod", config=str(cfg))
    assert checksums(seeded) == before

    restore_database("dev", m["id"], "production", confirm="production", config=str(cfg))
    assert checksums(seeded)["users"][0] == 0


def test_corrupted_object_is_refused_and_target_untouched(prefect_api, seeded, make_db, s3_bucket, s3_client, write_config):
    staging = make_db("stg")
    create_schema(staging)
    seed(staging, users=50, seed=7)
    cfg = write_config({"production": ("production", seeded), "staging": ("staging", staging)}, bucket=s3_bucket)
    m = backup_database("production", config=str(cfg))
    key = f"backups/{m['dump_key']}"
    body = bytearray(s3_client.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0xFF  # one flipped bit in the middle
    s3_client.put_object(Bucket=s3_bucket, Key=key, Body=bytes(body))
    before = checksums(staging)

    with pytest.raises(OperationFailed, match="corrupt"):
        restore_database("production", m["id"], "staging", config=str(cfg))
    assert checksums(staging) == before
    with pg.connect(staging, dbname="postgres") as conn:  # no scratch database left behind
        assert conn.execute("SELECT count(*) FROM pg_database WHERE datname LIKE '%%__dataops_%%'").fetchone()[0] == 0

    with pytest.raises(OperationFailed, match="failed verification"):
        verify_backup("production", m["id"], config=str(cfg))
    listed = list_backups(open_storage(load_settings(cfg).storage), "production")
    assert listed[0].verification is not None and not listed[0].verification.ok


def test_verify_marks_backup_verified(prefect_api, seeded, s3_bucket, write_config):
    cfg = write_config({"production": ("production", seeded)}, bucket=s3_bucket)
    m = backup_database("production", config=str(cfg))
    r = verify_backup("production", "latest", config=str(cfg))
    assert (r["backup_id"], r["ok"], set(r)) == (m["id"], True, {"backup_id", "ok", "seconds"})
    assert 0 < r["seconds"] < 60
    [listed] = list_backups(open_storage(load_settings(cfg).storage), "production")
    assert listed.verified and listed.verification.problems == []


def test_unknown_backup_id_is_bad_input(prefect_api, seeded, s3_bucket, write_config):
    cfg = write_config({"production": ("production", seeded), "staging": ("staging", seeded)}, bucket=s3_bucket)
    with pytest.raises(BadInput, match="backup 'nope' not found"):
        restore_database("production", "nope", "staging", config=str(cfg))


class _CutAfter:
    """A stream that dies after `limit` bytes, like a network that drops mid-upload."""

    def __init__(self, inner, limit):
        self.inner, self.limit, self.sent = inner, limit, 0

    def read(self, n=-1):
        data = self.inner.read(n)
        self.sent += len(data)
        if self.sent > self.limit:
            raise ConnectionResetError("connection reset by peer (simulated)")
        return data


def test_interrupted_upload_leaves_nothing(seeded, s3_bucket, s3_client, write_config):
    from dataops.tasks.backup.dump import dump_to_storage, preflight
    from dataops.tasks.backup.storage import S3Storage

    with pg.connect(seeded) as conn:  # ~20 MiB after compression: a multipart upload
        conn.execute("CREATE TABLE blob AS SELECT g AS id, md5(random()::text) || md5(random()::text) || "
                     "md5(random()::text) || md5(random()::text) AS junk FROM generate_series(1, 300000) g")
        conn.commit()
    cfg = write_config({"production": ("production", seeded)}, bucket=s3_bucket,
                       backups={"compression_level": 1})
    settings = load_settings(cfg)

    class Flaky(S3Storage):
        def upload_stream(self, key, stream):
            return super().upload_stream(key, _CutAfter(stream, 12 * 1024 * 1024))

    storage = Flaky(settings.storage)
    env = settings.env("production")
    with pytest.raises(Exception, match="connection reset"):
        dump_to_storage(settings, env, preflight(settings, env), storage)
    assert s3_client.list_objects_v2(Bucket=s3_bucket).get("KeyCount", 0) == 0
    assert not s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")
    assert list_backups(storage, "production") == []


def test_dump_without_manifest_is_not_a_backup(seeded, s3_bucket, s3_client, write_config):
    from dataops.tasks.backup.dump import dump_to_storage, preflight

    cfg = write_config({"production": ("production", seeded)}, bucket=s3_bucket)
    settings = load_settings(cfg)
    env = settings.env("production")
    m = dump_to_storage(settings, env, preflight(settings, env))  # the run "dies" before the manifest
    assert s3_client.list_objects_v2(Bucket=s3_bucket)["KeyCount"] == 1
    assert list_backups(open_storage(settings.storage), "production") == []
    with pytest.raises(BadInput):
        from dataops.tasks.backup.catalog import get_backup

        get_backup(open_storage(settings.storage), "production", m.id)


def test_file_storage_round_trip(prefect_api, seeded, make_db, tmp_path, write_config):
    staging = make_db("stg")
    cfg = write_config({"production": ("production", seeded), "staging": ("staging", staging)},
                       storage={"url": f"file://{tmp_path}/store"})
    m = backup_database("production", config=str(cfg))
    assert (tmp_path / "store" / m["dump_key"]).exists()
    assert not list((tmp_path / "store").rglob(".*partial*"))
    restore_database("production", "latest", "staging", config=str(cfg))
    assert checksums(staging) == checksums(seeded)
    with pg.connect(staging) as conn:  # analyzed by the restore (not autovacuum): plans work from the first query
        never = conn.execute("SELECT array_agg(relname ORDER BY relname) FROM pg_stat_user_tables "
                             "WHERE last_analyze IS NULL").fetchone()[0]
    assert never is None, never
