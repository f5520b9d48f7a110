"""No password or secret key is ever shown: not in output, errors, logs, manifests or artifacts."""

from __future__ import annotations

from conftest import run_cli

DB_PW = "Pg-Pa55word-7731"
S3_SECRET = "S3-Secret-Key-99120"


def test_no_secret_in_any_output(prefect_api, db, make_db, s3_bucket, s3_client, write_config, tmp_path):
    from dataops.dev.sample_app import create_schema, seed

    create_schema(db)
    seed(db, users=50)
    staging = make_db("stg")
    url = lambda d: f"postgresql://postgres:{DB_PW}@/{d.database}?host={d.host}"  # noqa: E731 - trust auth ignores it
    cfg = write_config({"production": ("production", url(db)), "staging": ("staging", url(staging)),
                        "broken": ("development", f"postgresql://app:{DB_PW}@127.0.0.1:9/nowhere")},
                       bucket=s3_bucket)
    text = cfg.read_text().replace("${TEST_S3_SECRET:-testing}", "${TEST_S3_SECRET}")
    cfg.write_text(text)
    env = {"PREFECT_API_URL": prefect_api, "TEST_S3_SECRET": S3_SECRET}

    seen = []
    for args in (["backup", "production"], ["backups", "production", "--json"], ["backups", "production"],
                 ["verify-backup", "production"], ["restore", "production", "latest", "--into", "staging"],
                 ["restore", "production", "nope", "--into", "staging"], ["backup", "broken"], ["prune", "production"]):
        r = run_cli("-v", "--config", str(cfg), *args, env=env)
        seen.append(r.stdout + r.stderr)
        assert args[-1] in ("broken", "staging") or r.returncode == 0, (args, r.stderr[-2000:])
    everything = "\n".join(seen)
    assert "backup " in everything and "verified" in everything  # the commands did run
    assert "cannot connect to PostgreSQL at 127.0.0.1:9" in everything

    for obj in s3_client.list_objects_v2(Bucket=s3_bucket)["Contents"]:
        if obj["Key"].endswith(".json"):
            everything += s3_client.get_object(Bucket=s3_bucket, Key=obj["Key"])["Body"].read().decode()

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
        runs = client.read_flow_runs()
        logs = client.read_logs()
    assert artifacts and runs
    everything += "".join(str(a.data) + str(a.description) for a in artifacts)
    everything += "".join(str(r.parameters) + str(r.state.message if r.state else "") for r in runs)
    everything += "".join(log.message for log in logs)

    assert DB_PW not in everything
    assert S3_SECRET not in everything
