"""The CLI contract scripts rely on: last word of `backup` is the id, `backups --json` lists manifests,
restore guards production. The demo's own test is in test_demo.py."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_cli

from dataops.dev.sample_app import create_schema, seed
from dataops.tasks import pg


def test_backup_list_verify_restore_through_the_cli(prefect_api, db, make_db, s3_bucket, write_config):
    create_schema(db)
    seed(db, users=80)
    staging = make_db("stg")
    cfg = write_config({"production": ("production", db), "staging": ("staging", staging)}, bucket=s3_bucket)
    env = {"PREFECT_API_URL": prefect_api}

    r = run_cli("--config", str(cfg), "backup", "production", env=env)
    assert r.returncode == 0, r.stderr
    backup_id = r.stdout.strip().splitlines()[-1].split()[-1]

    r = run_cli("--config", str(cfg), "backups", "production", "--json", env=env)
    listed = json.loads(r.stdout)
    assert [m["id"] for m in listed] == [backup_id] and listed[0]["tables"]["users"] == 80

    r = run_cli("--config", str(cfg), "verify-backup", "production", backup_id, env=env)
    assert r.returncode == 0 and f"backup {backup_id} verified" in r.stdout, r.stderr
    r = run_cli("--config", str(cfg), "backups", "production", env=env)
    assert backup_id in r.stdout and "yes" in r.stdout.splitlines()[-1]

    r = run_cli("--config", str(cfg), "restore", "production", backup_id, "--into", "staging", env=env)
    assert r.returncode == 0, r.stderr
    with pg.connect(staging) as conn:
        assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 80

    # Production target without --confirm: refused before anything runs, exit 2, one line.
    r = run_cli("--config", str(cfg), "restore", "production", backup_id, "--into", "production", env=env)
    assert r.returncode == 2 and r.stderr.startswith("error: environment 'production' has role production")
    assert "--confirm production" in r.stderr and len(r.stderr.strip().splitlines()) == 1

    r = run_cli("--config", str(cfg), "restore", "production", "20200101T000000Z-abcdef", "--into", "staging", env=env)
    assert r.returncode == 2 and "backup '20200101T000000Z-abcdef' not found" in r.stderr


def test_example_config_is_valid(monkeypatch):
    from dataops.settings import load_settings

    for var in ("PROD_DB_PASSWORD", "STAGING_DB_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(var, "x")
    settings = load_settings(Path(__file__).parent.parent / "examples" / "dataops.yaml")
    assert settings.env("production").is_production and settings.storage.bucket == "acme-db-backups"


def test_dev_commands_on_a_plain_install_say_which_extra_to_install(tmp_path):
    """A production worker installs `dataops` without the dev extra: `dataops dev up` then names the
    extra in one line, exits 2 and writes no dataops.yaml."""
    import subprocess
    import sys

    script = ("import sys; sys.modules['pgserver'] = None; sys.modules['moto'] = None; "
              "from dataops.cli.main import main; main()")
    r = subprocess.run([sys.executable, "-c", script, "dev", "up"], capture_output=True, text=True, cwd=tmp_path,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: the embedded dev stack needs pgserver, moto, which a plain install leaves out; "
        "install the dev extra: pip install 'dataops[dev]'"]
    assert list(tmp_path.iterdir()) == []
