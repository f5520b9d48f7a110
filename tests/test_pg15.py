"""Two server versions: a PostgreSQL 15 server of this session's own beside the embedded 16.

Backup of 15 restored into 16 (the upgrade path), refresh-staging from 15 into 16, a 16 backup
refused by a 15 target before anything is written, and validate and migrate up/down on 15. Each
server gets client tools of its own major version (tasks/pg.py client_binary).

PostgreSQL 15 is Debian's postgresql-15 (`make pg15` installs it when missing). Without it these
tests FAIL, saying so: a skip would hide the gap. DATAOPS_SKIP_PG15=1 skips them on purpose.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import psycopg
import pytest
from conftest import free_port, run_cli
from psycopg import sql
from test_migrations_examples import REPO_MIGRATIONS
from test_refresh_staging import ANON, broken_foreign_keys
from zoo import _ensure_reader as ensure_zoo_reader
from zoo import available_extensions, load_zoo, zoo_checksums

from dataops.dev.sample_app import TABLES, create_schema, seed
from dataops.dsn import Dsn
from dataops.errors import BadInput, ConfigError, OperationFailed
from dataops.settings import load_settings, parse_settings
from dataops.tasks import pg
from dataops.tasks.backup.catalog import list_backups
from dataops.tasks.backup.storage import open_storage
from dataops.tasks.migration.migrate import MigrationTarget, read_current, stamp

pytestmark = pytest.mark.extended  # make test-crash (CI runs it after make test), with `make pg15` first

SKIP_ENV = "DATAOPS_SKIP_PG15"
HEAD = sorted(p.name[:4] for p in (REPO_MIGRATIONS / "versions").glob("0*.py"))[-1]


def pg15_bin_dir() -> Path | None:
    """Where PostgreSQL 15's server binaries are: the per-major folders dataops itself searches."""
    for folder in pg.PER_MAJOR_BIN_DIRS:
        d = Path(folder.replace("{major}", "15"))
        if (d / "initdb").exists() and (d / "pg_ctl").exists() and (d / "postgres").exists():
            return d
    return None


def _run_as() -> dict:
    """initdb and postgres refuse to run as root: as root, run them as an unprivileged user (as
    pgserver does with its `pgserver` user)."""
    if os.geteuid() != 0:
        return {}
    for name in ("postgres", "pgserver", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return {"user": entry.pw_uid, "group": entry.pw_gid}
    pytest.fail("running as root and no unprivileged user (postgres, pgserver, nobody) to run PostgreSQL 15 as",
                pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def pg15_bin() -> Path:
    """First of all (before the Prefect harness starts): skipped only when asked, else PostgreSQL 15
    is there or every test of this file fails saying how to get it."""
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{SKIP_ENV}=1: the PostgreSQL 15 tests are skipped on purpose")
    bin_dir = pg15_bin_dir()
    if bin_dir is None:
        looked = ", ".join(f.replace("{major}", "15") for f in pg.PER_MAJOR_BIN_DIRS)
        pytest.fail(f"PostgreSQL 15 is not installed (looked in {looked}): run `make pg15` (apt-get install "
                    f"postgresql-15), or set {SKIP_ENV}=1 to skip these tests on purpose", pytrace=False)
    return bin_dir


@pytest.fixture(scope="session")
def pg15_dsn(pg15_bin) -> Dsn:
    """A PostgreSQL 15 server for the session: initdb in a temporary folder, trust auth, on a free
    port of 127.0.0.1; stopped and deleted at the end."""
    bin_dir = pg15_bin
    root = Path(tempfile.mkdtemp(prefix="dopg15-"))  # short: the socket path is limited to ~100 bytes
    as_user = _run_as()
    if as_user:
        os.chown(root, as_user["user"], as_user["group"])
    data, log, port = root / "data", root / "server.log", free_port()

    def run(*args: str) -> None:
        r = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=root, timeout=120, **as_user)
        if r.returncode:
            tail = log.read_text()[-2000:] if log.exists() else ""
            pytest.fail(f"PostgreSQL 15: {' '.join(map(str, args[:2]))} failed: {r.stderr.strip()}\n{tail}",
                        pytrace=False)

    run(bin_dir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "--encoding=UTF8", "--no-sync")
    run(bin_dir / "pg_ctl", "-D", data, "-l", log, "-w", "-t", "60", "-o",
        f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off -c full_page_writes=off", "start")
    try:
        dsn = Dsn(f"postgresql://postgres@127.0.0.1:{port}/postgres")
        assert pg.server_version(dsn)[0] == 15
        yield dsn
    finally:
        subprocess.run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True,
                       cwd=root, timeout=120, **as_user)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def make_db15(pg15_dsn):
    created: list[str] = []

    def make(prefix: str = "t15") -> Dsn:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        pg.create_database(pg15_dsn, name)
        created.append(name)
        return pg15_dsn.with_database(name)

    yield make
    for name in created:
        for leftover in (name, pg.previous_name(name)):
            pg.drop_database(pg15_dsn, leftover)


@pytest.fixture
def pg16_server(pg_server_dsn) -> Dsn:
    major, full = pg.server_version(pg_server_dsn)
    assert major >= 16, f"the test server is PostgreSQL {full}; these tests need 16 or newer beside 15"
    return pg_server_dsn


# -- the tests' own yardsticks ----------------------------------------------------------------------

def databases(server: Dsn) -> list[str]:
    with pg.connect(server, autocommit=True, dbname="postgres") as conn:
        return [r[0] for r in conn.execute("SELECT datname FROM pg_database ORDER BY 1")]


def schema_text(dsn: Dsn) -> str:
    """pg_dump --schema-only of the newest pg_dump here (16 reads 15 and 16 alike), so two servers
    of different versions are described by one tool; the lines naming the dump left out."""
    major = max(pg.server_version(dsn)[0], 16)
    conninfo, secret_env = dsn.libpq_args()
    out = subprocess.run([pg.client_binary("pg_dump", major), "--schema-only", "--no-owner", "--no-privileges",
                          "--exclude-schema=dataops_*", f"--dbname={conninfo}"], capture_output=True, text=True, check=True,
                         env={**os.environ, **secret_env}).stdout
    return "\n".join(line for line in out.splitlines()
                     if not re.match(r"^(-- Dumped (from|by)|\\(un)?restrict )", line))


def counts(dsn: Dsn) -> dict[str, int]:
    with pg.connect(dsn) as conn:
        return {t: conn.execute(f"SELECT count(*) FROM public.{t}").fetchone()[0] for t in TABLES}


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1] if text.strip() else ""


# -- client tools per server version ------------------------------------------------------------------

def test_each_server_version_gets_its_own_client_tools(pg15_dsn, pg16_server, tmp_path, monkeypatch):
    """No bin_dir and nothing on PATH: 15's tools come from Debian's per-version folder (the wrapper
    /usr/bin/pg_dump no longer decides). `{major}` in bin_dir serves two versions with one setting."""
    monkeypatch.setenv("PATH", "")
    dump15 = Path(pg.client_binary("pg_dump", 15))
    assert dump15 == pg15_bin_dir() / "pg_dump"
    assert pg.client_version(str(dump15)).startswith("15.")

    # bin_dir with {major}: 16's tools found in <tmp>/16/bin, 15's (absent there) in Debian's folder
    bundled16 = Path(pg.client_binary("pg_restore", 16))
    (tmp_path / "16" / "bin").mkdir(parents=True)
    (tmp_path / "16" / "bin" / "pg_restore").symlink_to(bundled16)
    templated = tmp_path / "{major}" / "bin"
    assert pg.client_binary("pg_restore", 16, templated) == str(tmp_path / "16" / "bin" / "pg_restore")
    assert pg.client_binary("pg_restore", 15, templated) == str(pg15_bin_dir() / "pg_restore")
    # a fixed bin_dir of the other version is passed over, not used
    assert pg.client_binary("pg_restore", 16, pg15_bin_dir()) != str(pg15_bin_dir() / "pg_restore")

    with pytest.raises(BadInput, match=r"no pg_dump for PostgreSQL 9; .*postgresql-client-9.*\{major\}"):
        pg.client_binary("pg_dump", 9, templated)
    with pytest.raises(ConfigError, match=r"postgres.bin_dir.*the only placeholder is \{major\}"):
        parse_settings({"environments": {"a": {"role": "development", "database_url": "postgresql://x@h/d"}},
                        "storage": {"url": "file:///tmp/x"}, "postgres": {"bin_dir": "/usr/lib/postgresql/{version}/bin"}})


# -- 1. backup 15, restore into 16 ---------------------------------------------------------------------

def test_backup_of_15_restores_into_16_identically(prefect_api, make_db15, make_db, pg16_server, s3_bucket,
                                                   write_config):
    """The upgrade path through the CLI: pg_dump 15 for the 15 server, pg_restore 16 for the 16 one,
    both found through one bin_dir with {major}."""
    prod = make_db15("prod15")
    create_schema(prod)
    seed(prod, users=200)
    staging = make_db("stg16")
    with pg.connect(staging) as conn:
        conn.execute("CREATE TABLE old_staging (id int)")
        conn.commit()
    cfg = write_config({"production": ("production", prod), "staging": ("staging", staging)}, bucket=s3_bucket,
                       extra={"postgres": {"bin_dir": "/usr/lib/postgresql/{major}/bin"}})
    env = {"PREFECT_API_URL": prefect_api}

    r = run_cli("--config", str(cfg), "backup", "production", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    backup_id = r.stdout.split()[-1]
    (manifest,) = list_backups(open_storage(load_settings(cfg).storage), "production")
    assert manifest.id == backup_id and manifest.server_version.startswith("15.")
    assert re.match(r"15\.", manifest.pg_dump_version), manifest.pg_dump_version  # 15's own pg_dump wrote it

    r = run_cli("--config", str(cfg), "restore", "production", backup_id, "--into", "staging", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert pg.server_version(staging)[0] >= 16
    expected = zoo_checksums(prod)
    assert expected["public.users"].startswith("200:") and zoo_checksums(staging) == expected
    assert schema_text(staging) == schema_text(prod)  # pg_dump 16's account of both, without old_staging
    assert "old_staging" not in schema_text(staging)


@pytest.mark.xfail(strict=True, raises=OperationFailed, reason=(
    "PostgreSQL 16 prints a one-table view's definition without column qualifiers (15: customer.email, 16: "
    "email), so the restored copy's schema fingerprint (tasks/schema.py, views' pg_get_viewdef text) never "
    "equals a 15 manifest's and restore refuses: the fingerprint needs a form comparable across majors"))
def test_zoo_of_15_restores_into_16(make_db15, make_db, pg16_server, s3_bucket, write_config):
    """Every feature of the zoo across the upgrade path (plain functions: no CLI start-up)."""
    from dataops.tasks.backup.dump import backup
    from dataops.tasks.backup.restore import restore

    prod = make_db15("zoo15")
    load_zoo(prod)
    # extensions the 16 server lacks (pgserver's build has none) cannot cross: a server's, not a version's
    missing = available_extensions(prod) - available_extensions(pg16_server)
    with psycopg.connect(prod.conninfo(), autocommit=True) as conn:
        for (name,) in conn.execute("SELECT extname FROM pg_extension WHERE extname = ANY(%s)",
                                    (sorted(missing),)).fetchall():
            conn.execute(sql.SQL("DROP EXTENSION {} CASCADE").format(sql.Identifier(name)))
    with psycopg.connect(pg16_server.conninfo(), autocommit=True) as conn:  # the zoo's policies name zoo_reader
        ensure_zoo_reader(conn)
    staging = make_db("zoo16")
    cfg = write_config({"production": ("production", prod), "staging": ("staging", staging)}, bucket=s3_bucket)
    settings = load_settings(cfg)
    manifest = backup(settings, settings.env("production"))
    assert manifest.server_version.startswith("15.")

    try:
        restore(settings, open_storage(settings.storage), manifest, settings.env("staging"))
    except OperationFailed as exc:  # the known refusal only, staging untouched; anything else fails the test
        assert re.search(r"does not match its manifest: schema fingerprint \w+ differs from the manifest's \w+; "
                         r"target 'staging' was left unchanged$", str(exc)), str(exc)
        with pg.connect(staging) as conn:
            assert pg.row_counts(conn) == {}
        raise

    expected = zoo_checksums(prod)
    assert len(expected) > 40 and zoo_checksums(staging) == expected
    # the schema as 16 holds it: 15's schema put into a fresh 16 database by pg_dump 16, then both described
    reference = make_db("zooref")
    conninfo, secret_env = reference.libpq_args()
    psql = subprocess.run([pg.client_binary("psql", 16), "-X", "-q", "-v", "ON_ERROR_STOP=1", f"--dbname={conninfo}"],
                          input=schema_text(prod), capture_output=True, text=True, env={**os.environ, **secret_env})
    assert psql.returncode == 0, psql.stderr[-2000:]
    assert schema_text(staging) == schema_text(reference)


# -- 2. refresh-staging from 15 into 16 -----------------------------------------------------------------

def test_refresh_staging_from_15_into_16(make_db15, make_db, pg16_server, write_config):
    from dataops.tasks.refresh.plan import resolve_environments
    from dataops.tasks.refresh.steps import refresh

    prod = make_db15("prod15")
    create_schema(prod)
    seed(prod, users=300)
    staging = make_db("stg16")
    create_schema(staging)
    seed(staging, users=40, seed=7)
    cfg = write_config({"production": ("production", prod), "staging": ("staging", staging)},
                       extra={"anonymize": ANON}, bucket="unused")
    settings = load_settings(cfg)

    refresh(settings, *resolve_environments(settings, None, None))

    assert broken_foreign_keys(staging) == []
    want, got = counts(prod), counts(staging)
    with pg.connect(prod) as conn:
        want["audit_logs"] = conn.execute("SELECT count(*) FROM audit_logs WHERE event_type NOT IN "
                                          "('login', 'password_change')").fetchone()[0]
    assert got == want and got["users"] == 300
    with pg.connect(prod) as p, pg.connect(staging) as s:
        prod_emails = {r[0] for r in p.execute("SELECT email FROM users UNION SELECT email FROM user_emails")}
        stg_emails = {r[0] for r in s.execute("SELECT email FROM users UNION SELECT email FROM user_emails")}
        assert stg_emails and not prod_emails & stg_emails
        q = "SELECT md5(string_agg(o::text, '|' ORDER BY o.id)) FROM orders o"
        assert s.execute(q).fetchone() == p.execute(q).fetchone()


# -- 3. a 16 backup into 15: refused before anything is written ---------------------------------------------

def test_backup_of_16_into_15_is_refused_before_anything_is_written(prefect_api, make_db, make_db15, pg15_dsn,
                                                                    s3_bucket, write_config):
    prod = make_db("prod16")
    create_schema(prod)
    seed(prod, users=60)
    staging = make_db15("stg15")
    create_schema(staging)
    seed(staging, users=20, seed=3)
    cfg = write_config({"production": ("production", prod), "staging": ("staging", staging)}, bucket=s3_bucket,
                       backups={"scratch_database_url": pg15_dsn.secret()})
    env = {"PREFECT_API_URL": prefect_api}
    r = run_cli("--config", str(cfg), "backup", "production", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    backup_id = r.stdout.split()[-1]
    before, dbs_before, schema_before = zoo_checksums(staging), databases(pg15_dsn), schema_text(staging)

    r = run_cli("--config", str(cfg), "restore", "production", backup_id, "--into", "staging", env=env)
    assert r.returncode == 2, (r.stdout, r.stderr)
    line = last_line(r.stderr)
    assert re.fullmatch(rf"error: backup {backup_id} was taken from PostgreSQL 16\.\d+ and environment 'staging' "
                        r"runs PostgreSQL 15\.\d+: a backup restores into the same major version or a newer one, "
                        r"never an older one; restore it into a PostgreSQL 16 or newer server", line), line
    assert "Traceback" not in r.stderr
    assert zoo_checksums(staging) == before and schema_text(staging) == schema_before
    assert databases(pg15_dsn) == dbs_before  # not even a scratch database

    # verify-backup on a 15 scratch server (backups.scratch_database_url): the same refusal, before its scratch
    from dataops.tasks.backup.restore import verify

    settings = load_settings(cfg)
    (manifest,) = list_backups(open_storage(settings.storage), "production")
    with pytest.raises(BadInput, match=rf"and the scratch server 127\.0\.0\.1:{pg15_dsn.port} runs PostgreSQL 15\."):
        verify(settings, open_storage(settings.storage), manifest, settings.env("production"))
    assert databases(pg15_dsn) == dbs_before


# -- 4. validate and migrate up/down on 15 -----------------------------------------------------------------

def test_validate_and_migrate_up_and_down_on_15(prefect_api, make_db15, s3_bucket, write_config):
    app = make_db15("app15")
    create_schema(app)
    seed(app, users=100)
    stamp(MigrationTarget(app, REPO_MIGRATIONS), "0002")
    at_0002 = schema_text(app)
    rows_before = zoo_checksums(app, include_sequences=False)
    cfg = write_config({"app": ("staging", app)}, bucket=s3_bucket,
                       extra={"migrations": {"path": str(REPO_MIGRATIONS), "lock_timeout": "2s"}})
    env = {"PREFECT_API_URL": prefect_api}

    r = run_cli("--config", str(cfg), "validate", "app", env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert re.fullmatch(r"OK: app: \d+ checks passed", last_line(r.stdout)), r.stdout

    r = run_cli("--config", str(cfg), "migrate", "app", "up", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_current(app) == HEAD
    (taken,) = list_backups(open_storage(load_settings(cfg).storage), "app")  # the flow's backup: pg_dump 15
    assert taken.server_version.startswith("15.") and taken.pg_dump_version.startswith("15.")
    with pg.connect(app) as conn:
        cols = {(t, c): n for t, c, n in conn.execute(
            "SELECT table_name, column_name, is_nullable FROM information_schema.columns "
            "WHERE table_schema = 'public' AND (table_name, column_name) IN "
            "(('users', 'email_verified'), ('orders', 'tax_amount'))")}
        assert cols == {("users", "email_verified"): "NO", ("orders", "tax_amount"): "NO"}
        assert conn.execute("SELECT count(*) FROM orders WHERE tax_amount IS NULL").fetchone()[0] == 0

    r = run_cli("--config", str(cfg), "migrate", "app", "down", "--to", "0002", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_current(app) == "0002"
    assert schema_text(app) == at_0002
    assert zoo_checksums(app, include_sequences=False) == rows_before
