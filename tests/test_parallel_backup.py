"""Parallel backups (backups.jobs: N): pg_dump -Fd -j N, one object per file, restored with
pg_restore -j N; on real PostgreSQL, the moto S3 server and Prefect."""

from __future__ import annotations

import hashlib
import json

import pytest
from zoo import load_zoo, schema_dump, zoo_checksums

from dataops.dev.sample_app import create_schema, seed
from dataops.errors import OperationFailed
from dataops.settings import load_settings
from dataops.tasks import pg
from dataops.tasks.backup.catalog import delete_backup, discard_leftovers, get_backup, list_backups
from dataops.tasks.backup.dump import backup
from dataops.tasks.backup.restore import restore, verify_and_record
from dataops.tasks.backup.storage import open_storage
from dataops.tasks.checksums import table_checksums

JOBS = {"jobs": 2}


def checksums(dsn):
    with pg.connect(dsn) as conn:
        return {t: (c.rows, c.checksum) for t, c in table_checksums(conn).items()}


def scratch_databases(dsn) -> int:
    with pg.connect(dsn, dbname="postgres") as conn:
        return conn.execute("SELECT count(*) FROM pg_database WHERE strpos(datname, '__dataops_') > 0").fetchone()[0]


@pytest.fixture
def zoo_world(make_db, write_config, s3_bucket, tmp_path):
    prod, stg = make_db("zoo"), make_db("zstg")
    load_zoo(prod)
    create_schema(stg)
    seed(stg, users=20, seed=7)
    cfg = write_config({"production": ("production", prod), "staging": ("staging", stg)}, bucket=s3_bucket,
                       backups={**JOBS, "local_dir": str(tmp_path / "local")})
    settings = load_settings(cfg)
    return {"cfg": cfg, "settings": settings, "prod": prod, "stg": stg, "storage": open_storage(settings.storage),
            "local": tmp_path / "local"}


def test_a_parallel_backup_of_the_zoo_round_trips_with_identical_checksums(zoo_world, s3_client, s3_bucket):
    w = zoo_world
    settings = w["settings"]
    before, schema_before = zoo_checksums(w["prod"]), schema_dump(w["prod"])
    m = backup(settings, settings.env("production"))

    assert m.archive_format == "directory" and m.jobs == 2
    names = [p.name for p in m.parts]
    assert "toc.dat" in names and sum(n.endswith(".dat") for n in names) > 20  # one object per table
    assert m.dump_key == f"production/{m.id}/dump.d/toc.dat.zst"
    # The bytes in the bucket are the ones the manifest lists, part by part.
    for part in m.parts:
        body = s3_client.get_object(Bucket=s3_bucket, Key=f"backups/{part.key}")["Body"].read()
        assert (len(body), hashlib.sha256(body).hexdigest()) == (part.size, part.sha256)
        assert body[:4] == b"\x28\xb5\x2f\xfd"  # each a zstd frame
    assert m.size == sum(p.size for p in m.parts) and m.raw_size == sum(p.raw_size for p in m.parts)
    stored = json.loads(s3_client.get_object(Bucket=s3_bucket, Key=f"backups/production/{m.id}/manifest.json")
                        ["Body"].read())
    assert stored["archive_format"] == "directory" and len(stored["parts"]) == len(m.parts)
    assert list(w["local"].iterdir()) == []  # the local folder went with the backup

    # Listed once, as one backup; verified; restored with identical rows, sequences and schema.
    assert [b.id for b in list_backups(w["storage"], "production")] == [m.id]
    assert verify_and_record(settings, w["storage"], m, settings.env("production")).ok
    assert get_backup(w["storage"], "production", m.id).verified
    restore(settings, w["storage"], get_backup(w["storage"], "production", m.id), settings.env("staging"))
    assert zoo_checksums(w["stg"]) == before
    assert schema_dump(w["stg"]) == schema_before
    assert scratch_databases(w["stg"]) == 0 and list(w["local"].iterdir()) == []


def test_the_flows_back_up_verify_and_restore_a_parallel_backup_of_the_sample_app(
        prefect_api, make_db, s3_bucket, write_config):
    from dataops.flows.backup_database import backup_database
    from dataops.flows.restore_database import restore_database
    from dataops.flows.verify_backup import verify_backup

    prod, stg = make_db("prod"), make_db("stg")
    create_schema(prod)
    seed(prod, users=300)
    cfg = write_config({"production": ("production", prod), "staging": ("staging", stg)}, bucket=s3_bucket,
                       backups=JOBS)
    m = backup_database("production", config=str(cfg))
    assert m["archive_format"] == "directory" and m["tables"]["users"] == 300
    assert verify_backup("production", m["id"], config=str(cfg))["ok"] is True
    restore_database("production", m["id"], "staging", config=str(cfg))
    assert checksums(stg) == checksums(prod)


def test_a_single_stream_backup_stays_the_default(make_db, write_config, tmp_path):
    prod = make_db("prod")
    create_schema(prod)
    seed(prod, users=10)
    cfg = write_config({"production": ("production", prod)}, storage={"url": f"file://{tmp_path}/store"})
    settings = load_settings(cfg)
    assert settings.backups.jobs == 1
    m = backup(settings, settings.env("production"))
    assert m.archive_format == "custom" and m.parts == [] and m.dump_key.endswith("dump.pgc.zst")


@pytest.fixture
def two_backups(make_db, write_config, tmp_path):
    """production backed up twice in parallel into a folder store; staging with other rows."""
    prod, stg = make_db("prod"), make_db("stg")
    create_schema(prod)
    seed(prod, users=120)
    create_schema(stg)
    seed(stg, users=30, seed=7)
    cfg = write_config({"production": ("production", prod), "staging": ("staging", stg)},
                       storage={"url": f"file://{tmp_path}/store"}, backups=JOBS)
    settings = load_settings(cfg)
    storage = open_storage(settings.storage)
    first = backup(settings, settings.env("production"))
    second = backup(settings, settings.env("production"))
    return {"settings": settings, "storage": storage, "prod": prod, "stg": stg, "first": first, "second": second,
            "store": tmp_path / "store"}


@pytest.mark.parametrize("damage", ["altered", "missing"])
def test_an_altered_or_missing_part_fails_verification_and_the_restore_refuses_in_one_line(two_backups, damage):
    w = two_backups
    settings, storage, m = w["settings"], w["storage"], w["second"]
    part = max(m.parts, key=lambda p: p.size)  # the users' or orders' table
    path = w["store"] / part.key
    if damage == "altered":
        body = bytearray(path.read_bytes())
        body[len(body) // 2] ^= 0xFF
        path.write_bytes(bytes(body))
        expected = rf"^backup {m.id} is corrupt: its part {part.name} \(.*\) has {part.size} bytes sha256 "
    else:
        path.unlink()
        expected = rf"^backup {m.id} is incomplete: 1 of its {len(m.parts)} parts are missing from .* \(first: "
    before = checksums(w["stg"])

    with pytest.raises(OperationFailed, match=expected) as refused:
        restore(settings, storage, get_backup(storage, "production", m.id), settings.env("staging"))
    assert "\n" not in str(refused.value)
    assert checksums(w["stg"]) == before and scratch_databases(w["stg"]) == 0

    result = verify_and_record(settings, storage, get_backup(storage, "production", m.id), settings.env("production"))
    assert not result.ok and result.problems[0] == str(refused.value)  # the same one line
    assert get_backup(storage, "production", m.id).verification.ok is False
    assert get_backup(storage, "production", w["first"].id).verification is None  # the other one is whole


def test_retention_and_leftovers_treat_a_parallel_backup_as_one(two_backups):
    w = two_backups
    storage, first, second = w["storage"], w["first"], w["second"]
    assert [b.id for b in list_backups(storage, "production")] == [first.id, second.id]

    delete_backup(storage, first)  # what prune does to a backup out of retention: every part goes
    assert storage.list(f"production/{first.id}/") == []
    assert [b.id for b in list_backups(storage, "production")] == [second.id]

    # A backup killed between parts leaves parts without a manifest: not listed, discarded whole.
    storage.delete([f"production/{second.id}/manifest.json"])
    assert list_backups(storage, "production") == []
    gone = discard_leftovers(storage, "production")
    assert gone == [f"backup {second.id} without a manifest ({len(second.parts)} object(s))"]
    assert storage.list("production/") == []


def test_the_dump_uploads_each_file_while_pg_dump_writes_the_others(make_db, write_config, tmp_path):
    """Streaming, not upload-after-dump: the local folder never held the whole dump."""
    prod = make_db("prod")
    with pg.connect(prod) as conn:
        for i in range(8):
            conn.execute(f"CREATE TABLE t{i} AS SELECT g AS id, md5(g::text) || md5((g + {i})::text) AS body "
                         "FROM generate_series(1, 60000) g")
        conn.commit()
    # Each table's file is 4.3 MiB: with 1 MiB allowed to wait for an upload, pg_dump is paused
    # whenever a finished file waits, and the disk holds the two files being written and the
    # ones being uploaded, never the whole dump.
    cfg = write_config({"production": ("production", prod)}, storage={"url": f"file://{tmp_path}/store"},
                       backups={**JOBS, "local_queue_mb": 1})
    settings = load_settings(cfg)
    m = backup(settings, settings.env("production"))
    assert m.local_disk_peak is not None and 0 < m.local_disk_peak < 0.7 * m.raw_size, (m.local_disk_peak, m.raw_size)
    assert sorted(m.tables) == [f"t{i}" for i in range(8)] and set(m.tables.values()) == {60000}
    stored = open_storage(settings.storage)
    assert verify_and_record(settings, stored, m, settings.env("production")).ok  # paused and resumed, still whole


def test_a_parallel_backup_with_pg_dumps_own_compression_round_trips(make_db, write_config, tmp_path):
    """`compression: pg_dump`: pg_dump -Fd -j 2 gzips each table's file itself; the parts are stored as
    written (no .zst) and pg_restore reads them as they are."""
    prod, stg = make_db("prod"), make_db("stg")
    create_schema(prod)
    seed(prod, users=60)
    cfg = write_config({"production": ("production", prod), "staging": ("staging", stg)},
                       storage={"url": f"file://{tmp_path}/store"}, backups={**JOBS, "compression": "pg_dump"})
    settings = load_settings(cfg)
    storage = open_storage(settings.storage)
    m = backup(settings, settings.env("production"))
    names = {p.name for p in m.parts}
    assert "toc.dat" in names and any(n.endswith(".dat.gz") for n in names)
    assert not any(p.key.endswith(".zst") for p in m.parts)
    restore(settings, storage, m, settings.env("staging"))
    assert checksums(stg) == checksums(prod)
