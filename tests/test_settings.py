"""dataops.yaml: every kind of bad config is one clear line that names the key, and writes nothing."""

from __future__ import annotations

import pytest
from conftest import run_cli

from dataops.errors import ConfigError
from dataops.settings import Role, load_settings, parse_settings

GOOD = {
    "environments": {"production": {"role": "production", "database_url": "postgresql://app:pw1234@db:5432/app"}},
    "storage": {"url": "s3://bucket/prefix"},
}


def with_(path: str, value):
    import copy

    data = copy.deepcopy(GOOD)
    node = data
    *parents, last = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return data


_DELETE = object()


def test_good_config_parses_with_defaults():
    s = parse_settings(GOOD)
    env = s.env("production")
    assert env.role is Role.PRODUCTION and env.name == "production"
    assert env.database_url.database == "app" and "pw1234" not in str(env.database_url)
    assert (s.backups.keep_last, s.backups.keep_days, s.backups.compression) == (7, 30, "zstd")
    assert (s.storage.bucket, s.storage.prefix) == ("bucket", "prefix")


def test_env_interpolation_with_default_and_secret_masking():
    data = with_("environments.production.database_url", "postgresql://app:${DB_PW}@db/app")
    data["storage"]["secret_access_key"] = "${S3_SECRET:-fallback-secret}"
    s = parse_settings(data, env={"DB_PW": "pa55word"})
    assert s.env("production").database_url.secret() == "postgresql://app:pa55word@db/app"
    assert "pa55word" not in repr(s) and "fallback-secret" not in repr(s)
    assert s.storage.secret_access_key.get_secret_value() == "fallback-secret"


BAD = [
    ("unknown top-level key", {**GOOD, "storgae": {}}, "storgae: unknown key"),
    ("unknown key in an environment", with_("environments.production.databse_url", "x"),
     "environments.production.databse_url: unknown key"),
    ("missing variable", with_("environments.production.database_url", "postgresql://u:${NOPE_PW}@h/db"),
     "environments.production.database_url: environment variable NOPE_PW is not set"),
    ("bad role", with_("environments.production.role", "prod"), "environments.production.role: Input should be"),
    ("missing database_url", with_("environments.production.database_url", _DELETE),
     "environments.production.database_url: is required"),
    ("database_url of another scheme", with_("environments.production.database_url", "mysql://u@h/db"),
     "environments.production.database_url: has scheme 'mysql://'"),
    ("database_url without a database", with_("environments.production.database_url", "postgresql://u@h"),
     "environments.production.database_url: names no database"),
    ("storage scheme", with_("storage.url", "ftp://host/x"), "storage.url: scheme 'ftp' is not supported"),
    ("s3 without bucket", with_("storage.url", "s3://"), "storage.url: s3 URL needs a bucket"),
    ("negative retention", with_("backups.keep_last", 0), "backups.keep_last: Input should be greater than or equal to 1"),
    ("no environments", with_("environments", {}), "environments: needs at least one environment"),
    ("bad environment name", with_("environments", {"prod db": GOOD["environments"]["production"]}),
     "must start with a letter"),
    ("kms key without kms", with_("storage.kms_key_id", "k"), "kms_key_id needs server_side_encryption: aws:kms"),
    ("missing storage", {"environments": GOOD["environments"]}, "storage: is required"),
]


@pytest.mark.parametrize("label,data,message", BAD, ids=[b[0] for b in BAD])
def test_bad_config_names_the_key(label, data, message):
    with pytest.raises(ConfigError) as err:
        parse_settings(data, source="dataops.yaml", env={})
    text = err.value.message
    assert message in text, text
    assert text.startswith("dataops.yaml: ") and "\n" not in text
    assert "pw1234" not in text


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found; pass --config PATH, set DATAOPS_CONFIG"):
        load_settings(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("environments:\n  production: [unclosed\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        load_settings(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        load_settings(empty)


def test_config_lookup_order(tmp_path, monkeypatch):
    import yaml

    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    for p, db in ((a, "from_a"), (b, "from_b")):
        p.write_text(yaml.safe_dump(with_("environments.production.database_url", f"postgresql://u@h/{db}")))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dataops.yaml").write_text(yaml.safe_dump(GOOD))
    assert load_settings().env("production").database_url.database == "app"
    monkeypatch.setenv("DATAOPS_CONFIG", str(b))
    assert load_settings().env("production").database_url.database == "from_b"
    assert load_settings(a).env("production").database_url.database == "from_a"


# Each bad config names a real database and the test's own bucket, so that a command that wrote
# despite the error would leave objects there; the control case below proves it would.
STORAGE = ("storage: {url: 's3://BUCKET/p', endpoint_url: 'ENDPOINT', region: us-east-1, access_key_id: testing, "
           "secret_access_key: testing}\n")
CLI_BAD = [
    ("typo", "environments:\n  production:\n    role: production\n    databse_url: 'DSN'\n" + STORAGE,
     "databse_url: unknown key"),
    ("missing var", "environments:\n  production: {role: production, database_url: 'DSN${MISSING_PW_X}'}\n" + STORAGE,
     "MISSING_PW_X is not set"),
    ("bad yaml", "environments: [\n" + STORAGE, "not valid YAML"),
    ("bad role", "environments:\n  production: {role: live, database_url: 'DSN'}\n" + STORAGE,
     "environments.production.role"),
]
GOOD_TEXT = "environments:\n  production: {role: production, database_url: 'DSN'}\n" + STORAGE


def _config(tmp_path, text, db, bucket, endpoint):
    cfg = tmp_path / "dataops.yaml"
    cfg.write_text(text.replace("DSN", db.secret()).replace("BUCKET", bucket).replace("ENDPOINT", endpoint))
    return cfg


@pytest.mark.parametrize("label,text,message", CLI_BAD, ids=[c[0] for c in CLI_BAD])
def test_cli_bad_config_exits_2_with_one_line_and_writes_nothing(label, text, message, tmp_path, db, s3_bucket,
                                                                 s3_endpoint, s3_client):
    r = run_cli("--config", str(_config(tmp_path, text, db, s3_bucket, s3_endpoint)), "backup", "production")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert r.stdout == ""
    assert s3_client.list_objects_v2(Bucket=s3_bucket).get("KeyCount", 0) == 0


def test_the_same_config_without_the_fault_writes_a_backup(prefect_api, tmp_path, db, s3_bucket, s3_endpoint,
                                                           s3_client):
    """The control of the case above: its bucket and database are real, so "nothing written" means something."""
    r = run_cli("--config", str(_config(tmp_path, GOOD_TEXT, db, s3_bucket, s3_endpoint)), "backup", "production",
                env={"PREFECT_API_URL": prefect_api})
    assert r.returncode == 0, r.stderr
    assert s3_client.list_objects_v2(Bucket=s3_bucket)["KeyCount"] == 2  # the dump and its manifest


def test_cli_unknown_environment_and_unreachable_server(prefect_api, tmp_path, s3_bucket, s3_endpoint, s3_client):
    from conftest import free_port

    port = free_port()  # nothing listens here
    cfg = tmp_path / "dataops.yaml"
    cfg.write_text(
        "environments:\n"
        f"  production: {{role: production, database_url: 'postgresql://app:Hunter2Secret@127.0.0.1:{port}/app'}}\n"
        f"storage: {{url: 's3://{s3_bucket}/p', endpoint_url: '{s3_endpoint}', region: us-east-1,"
        " access_key_id: x, secret_access_key: y}\n")
    r = run_cli("--config", str(cfg), "backup", "prod")
    assert r.returncode == 2 and "unknown environment 'prod' (known: production)" in r.stderr
    r = run_cli("--config", str(cfg), "backup", "production", env={"PREFECT_API_URL": prefect_api})
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("error: cannot connect to PostgreSQL at 127.0.0.1") and len(r.stderr.strip().splitlines()) == 1
    assert "Hunter2Secret" not in r.stderr + r.stdout
    assert s3_client.list_objects_v2(Bucket=s3_bucket).get("KeyCount", 0) == 0


def test_cli_missing_bucket_is_bad_input(prefect_api, tmp_path, db, s3_endpoint):
    cfg = tmp_path / "dataops.yaml"
    cfg.write_text(
        f"environments:\n  production: {{role: production, database_url: '{db.secret()}'}}\n"
        f"storage: {{url: 's3://no-such-bucket/p', endpoint_url: '{s3_endpoint}', region: us-east-1,"
        " access_key_id: x, secret_access_key: y}\n")
    r = run_cli("--config", str(cfg), "backup", "production", env={"PREFECT_API_URL": prefect_api})
    assert r.returncode == 2, r.stderr
    assert "bucket 'no-such-bucket' does not exist" in r.stderr and "fix storage.url" in r.stderr


def test_every_command_has_help():
    from typer.testing import CliRunner

    from dataops.cli.main import app

    runner = CliRunner()
    for cmd in (["--help"], ["backup", "--help"], ["backups", "--help"], ["restore", "--help"],
                ["verify-backup", "--help"], ["prune", "--help"], ["dev", "up", "--help"], ["dev", "down", "--help"],
                ["demo", "--help"]):
        r = runner.invoke(app, cmd)  # in this process: a subprocess each would only add imports
        assert r.exit_code == 0 and "Usage:" in r.output, (cmd, r.output)


COMMANDS = [["backup", "production"], ["deploy"], ["migrate", "production", "up"], ["transform", "production", "list"],
            ["refresh-staging"], ["anonymize", "production"], ["validate", "production"], ["prune", "production"]]


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_every_command_refuses_a_config_with_a_typo_and_writes_nothing(argv, tmp_path, db, s3_bucket, s3_endpoint,
                                                                       s3_client):
    label, text, message = CLI_BAD[0]
    r = run_cli("--config", str(_config(tmp_path, text, db, s3_bucket, s3_endpoint)), *argv)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()] and message in r.stderr, r.stderr
    assert s3_client.list_objects_v2(Bucket=s3_bucket).get("KeyCount", 0) == 0
