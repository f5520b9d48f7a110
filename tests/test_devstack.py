"""`dev up` / `dev down` against the real embedded PostgreSQL and a real moto process."""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path

import boto3
import pytest
from conftest import free_port

from dataops.dev.stack import BUCKET, describe, dev_down, dev_up
from dataops.errors import BadInput, TransientError
from dataops.settings import Role, load_settings
from dataops.tasks import pg


@pytest.fixture
def root():
    # short on purpose: the unix socket path (root/pg/.s.PGSQL.5432) must stay under ~100 bytes
    path = Path(tempfile.mkdtemp(prefix="dodev-"))
    yield path
    dev_down(path)  # whatever a failed test left running
    shutil.rmtree(path, ignore_errors=True)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_up_writes_a_loadable_config_and_down_stops_everything(root, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    port = free_port()
    config = root / "dataops.yaml"

    stack = dev_up(root, users=300, s3_port=port, config_path=config)

    assert stack.seeded and stack.counts["users"] == 300
    settings = load_settings(config)
    assert {n: e.role for n, e in settings.environments.items()} == {"production": Role.PRODUCTION,
                                                                     "staging": Role.STAGING}
    assert settings.env("production").database_url == stack.pg_dsn_production
    assert settings.storage.url == f"s3://{BUCKET}/dev"
    assert settings.storage.endpoint_url == f"http://127.0.0.1:{port}"
    assert (settings.storage.region, settings.storage.access_key_id) == ("us-east-1", "dev")
    assert settings.storage.secret_access_key.get_secret_value() == "dev"
    assert (settings.backups.keep_last, settings.backups.keep_days) == (7, 30)
    assert "${AWS_SECRET_ACCESS_KEY:-dev}" in config.read_text()  # the secret comes from the environment

    with pg.connect(settings.env("production").database_url) as conn:
        assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 300
    with pg.connect(settings.env("staging").database_url) as conn:
        assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 0
        assert {t for _, t in pg.user_tables(conn)} >= {"users", "orders", "audit_logs"}

    s3 = boto3.client("s3", endpoint_url=stack.s3_endpoint, region_name="us-east-1",
                      aws_access_key_id="x", aws_secret_access_key="x")
    s3.head_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key="dev/marker", Body=b"kept")

    text = describe(stack)
    assert str(root) in text and f"127.0.0.1:{port}" in text and "dataops dev down" in text
    assert (root / "stack.json").exists() and (root / "s3.pid").exists()

    # a second `up` reuses both servers and keeps the data
    again = dev_up(root, users=300, s3_port=port, config_path=config)
    assert not again.seeded and again.counts == stack.counts and again.s3_pid == stack.s3_pid
    assert s3.get_object(Bucket=BUCKET, Key="dev/marker")["Body"].read() == b"kept"

    stopped = dev_down(root)
    assert len(stopped) == 2 and "S3" in stopped[0] and "PostgreSQL" in stopped[1]
    assert not port_open(port)
    with pytest.raises(TransientError, match="cannot connect"):
        with pg.connect(stack.pg_dsn_production, timeout=2):
            pass
    assert dev_down(root) == []


def test_file_store_and_reset(root):
    config = root / "dataops.yaml"
    stack = dev_up(root, users=50, store="file", config_path=config)
    assert stack.s3_endpoint is None and stack.backup_dir == root / "backups"
    assert load_settings(config).storage.url == (root / "backups").as_uri()
    (root / "backups" / "old.dump").write_text("x")

    stack = dev_up(root, users=20, store="file", config_path=config, reset=True)
    assert stack.seeded and stack.counts["users"] == 20
    assert not (root / "backups" / "old.dump").exists()
    assert [s.split(" ")[0] for s in dev_down(root)] == ["PostgreSQL"]


def test_port_taken_by_another_program_is_a_clear_error(root):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(BadInput, match=f"port {port} .* already in use .*s3_port"):
            dev_up(root, users=10, s3_port=port, config_path=root / "dataops.yaml")
    assert not (root / "pg").exists()  # failed before starting anything


def test_never_overwrites_a_config_it_did_not_write(root):
    config = root / "dataops.yaml"
    config.write_text("environments:\n  production: {role: production, database_url: postgresql://db/prod}\n")
    with pytest.raises(BadInput, match="was not written by `dataops dev up`; pass --force"):
        dev_up(root, users=10, store="file", config_path=config)
    assert config.read_text().startswith("environments:")
    assert not (root / "pg").exists()
    dev_up(root, users=10, store="file", config_path=config, force=True)
    assert load_settings(config).env("staging").role is Role.STAGING
