"""Two server versions: a PostgreSQL 15 server of this session's own beside the embedded 16.

Backup of 15 restored into 16 (the upgrade path), refresh-staging from 15 into 16, a 16 backup
refused by a 15 target before anything is written, and validate and migrate up/down on 15. Each
server gets client tools of its own major version (tasks/pg.py client_binary). The schema
fingerprint across the two (docs/schema-fingerprint.md): the zoo and TEXTS restored from 15 into
16 match their manifest, validate --against a 16 environment reports real drift only, and
manifests written before fingerprint version 2 still verify.

PostgreSQL 15 is Debian's postgresql-15 (`make pg15` installs it when missing). Without it these
tests FAIL, saying so: a skip would hide the gap. DATAOPS_SKIP_PG15=1 skips them on purpose.
"""

from __future__ import annotations

import json
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
from test_schema import VIEW_TEXTS
from zoo import _ensure_reader as ensure_zoo_reader
from zoo import available_extensions, load_zoo, zoo_checksums

from dataops.dev.sample_app import TABLES, create_schema, seed
from dataops.dsn import Dsn
from dataops.errors import BadInput, ConfigError
from dataops.settings import load_settings, parse_settings
from dataops.tasks import pg
from dataops.tasks.backup.catalog import MANIFEST, backup_folder, list_backups
from dataops.tasks.backup.storage import open_storage
from dataops.tasks.migration.migrate import MigrationTarget, read_current, stamp
from dataops.tasks.schema import FINGERPRINT_VERSION, catalog_snapshot, diff_snapshots, schema_fingerprint
from dataops.tasks.validation.validate import compare_environments, compare_with_expected

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


# Catalog text that a server version prints its own way, beyond the zoo: every kind of text the
# schema fingerprint reads (tasks/schema.py), in the shapes where 15 and 16 could disagree. Only
# views do (16 leaves out the qualifier of a query over one relation); the tests prove the rest
# prints alike, and test_schema.VIEW_TEXTS holds what both servers print for each view here.
TEXTS = r"""
CREATE SCHEMA texts;
CREATE DOMAIN texts.code AS text CHECK (VALUE ~ '^[A-Z]{3}$' AND VALUE NOT IN ('AAA', 'ZZZ'));
CREATE TABLE texts.item (
    id int PRIMARY KEY,
    name text NOT NULL,
    price numeric(8,2) DEFAULT 0.0,
    tags text[] DEFAULT '{}',
    kind text DEFAULT 'a' CHECK (kind IN ('a', 'b', 'c')),
    code texts.code,
    created date DEFAULT CURRENT_DATE,
    updated timestamptz DEFAULT now() + interval '1 day',
    qty int CHECK (qty BETWEEN 0 AND 1000),
    band text GENERATED ALWAYS AS (CASE WHEN price > 100 THEN 'high' WHEN price > 10 THEN 'mid' ELSE 'low' END) STORED,
    CONSTRAINT item_name_chk CHECK (name <> '' AND length(name) < 200 AND name !~ '^\s'),
    CONSTRAINT item_tags_chk CHECK (array_length(tags, 1) IS NULL OR 'x' <> ALL (tags))
);
CREATE TABLE texts."Odd Name" ("Id" int PRIMARY KEY REFERENCES texts.item ON DELETE CASCADE, "Välue" text COLLATE "C");
INSERT INTO texts.item (id, name, price, tags, kind, qty, created, updated)
    SELECT g, 'n' || g, g, ARRAY['t' || g], 'a', g, '2024-01-01', '2024-01-02 03:04:05+00' FROM generate_series(1, 20) g;
INSERT INTO texts."Odd Name" SELECT g, 'ü' || g FROM generate_series(1, 10) g;
CREATE INDEX item_expr ON texts.item (lower(name) text_pattern_ops, (price * 2)) WHERE kind IN ('a', 'b') AND qty > 0;
CREATE INDEX item_coll ON texts.item (name COLLATE "C" DESC NULLS LAST);
CREATE VIEW texts.v_alias AS SELECT i.id, i.name AS label, i.price::int AS p FROM texts.item i WHERE i.qty > 0 ORDER BY i.name;
CREATE VIEW texts.v_group AS SELECT kind, count(*) AS n, sum(price) FILTER (WHERE qty > 0) AS s FROM texts.item
    GROUP BY kind HAVING count(*) > 1;
CREATE VIEW texts.v_window AS SELECT id, rank() OVER w AS r, sum(price) OVER (PARTITION BY kind ORDER BY id) AS running
    FROM texts.item WINDOW w AS (ORDER BY price DESC);
CREATE VIEW texts.v_sublink AS SELECT id, name FROM texts.item
    WHERE EXISTS (SELECT 1 FROM texts."Odd Name" o WHERE o."Id" = item.id) AND id IN (SELECT "Id" FROM texts."Odd Name");
CREATE VIEW texts.v_join AS SELECT i.id, o."Välue" FROM texts.item i JOIN texts."Odd Name" o ON o."Id" = i.id;
CREATE VIEW texts.v_union AS SELECT id FROM texts.item UNION ALL SELECT "Id" FROM texts."Odd Name";
CREATE VIEW texts.v_cte AS WITH c AS (SELECT id, price FROM texts.item WHERE qty > 0) SELECT id, price * 2 AS double FROM c;
CREATE VIEW texts.v_subq AS SELECT s.id FROM (SELECT id FROM texts.item) s WHERE s.id > 1;
CREATE VIEW texts.v_func AS SELECT g.n, g.n * 2 AS twice FROM generate_series(1, 3) g(n);
CREATE VIEW texts.v_values AS SELECT * FROM (VALUES (1, 'a'), (2, 'b')) v(n, s);
CREATE VIEW texts.v_odd AS SELECT "Id", "Välue" FROM texts."Odd Name" WHERE "Välue" IS NOT NULL;
CREATE VIEW texts.v_wholerow AS SELECT item.id, item AS whole FROM texts.item;
CREATE VIEW texts.v_distinct AS SELECT DISTINCT ON (kind) kind, id FROM texts.item ORDER BY kind, id DESC;
CREATE VIEW texts.v_lateral AS SELECT i.id, t.tag FROM texts.item i, LATERAL unnest(i.tags) t(tag);
CREATE VIEW texts.v_check AS SELECT id, name, kind FROM texts.item WHERE kind = 'a' WITH CHECK OPTION;
CREATE VIEW texts.v_exprs AS SELECT id, CASE kind WHEN 'a' THEN 1 ELSE 2 END AS k, coalesce(qty, 0) AS q, tags[1] AS t1,
    price BETWEEN 1 AND 2 AS cheap, name LIKE 'x%' AS x, name::varchar(10) AS short, ARRAY[id, qty] AS pair,
    (SELECT max(o."Id") FROM texts."Odd Name" o) AS top, row(id, name)::text AS r FROM texts.item;
CREATE MATERIALIZED VIEW texts.mv_alias AS SELECT i.kind, count(*) AS n FROM texts.item i GROUP BY i.kind;
CREATE FUNCTION texts.atomic_count(k text) RETURNS bigint LANGUAGE sql STABLE
    BEGIN ATOMIC SELECT count(*) FROM texts.item WHERE kind = k; END;
CREATE FUNCTION texts.atomic_touch(i int) RETURNS void LANGUAGE sql
    BEGIN ATOMIC INSERT INTO texts."Odd Name" ("Id") VALUES (i); UPDATE texts.item SET qty = qty + 1 WHERE id = i; END;
CREATE FUNCTION texts.twice(x int) RETURNS int LANGUAGE sql IMMUTABLE RETURN x * 2;
CREATE FUNCTION texts.noop() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$;
CREATE TRIGGER item_when BEFORE UPDATE OF price ON texts.item FOR EACH ROW
    WHEN (OLD.price IS DISTINCT FROM NEW.price AND NEW.qty > 0) EXECUTE FUNCTION texts.noop();
ALTER TABLE texts.item ENABLE ROW LEVEL SECURITY;
CREATE POLICY item_kind ON texts.item USING (kind IN (SELECT v.s FROM (VALUES ('a')) v(s)) OR qty > 10);
CREATE TABLE texts.log (id int, at timestamptz DEFAULT now());
CREATE RULE item_log AS ON UPDATE TO texts.item WHERE NEW.qty <> OLD.qty DO ALSO INSERT INTO texts.log (id) VALUES (NEW.id);
"""


def load_texts(dsn: Dsn) -> None:
    with psycopg.connect(dsn.conninfo(), autocommit=True) as conn:
        conn.execute(TEXTS)


def snapshot(dsn: Dsn, version: int = FINGERPRINT_VERSION) -> dict:
    with pg.connect(dsn) as conn:
        return catalog_snapshot(conn, version)


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


def test_zoo_of_15_restores_into_16(make_db15, make_db, pg16_server, s3_bucket, write_config):
    """Every feature of the zoo, and every kind of catalog text the schema fingerprint reads, across the
    upgrade path (plain functions: no CLI start-up). The restore checks the copy against the manifest's
    fingerprint: before fingerprint version 2 it refused this copy, whose views 16 prints otherwise."""
    from dataops.tasks.backup.dump import backup
    from dataops.tasks.backup.restore import restore

    prod = make_db15("zoo15")
    load_zoo(prod)
    load_texts(prod)
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
    assert manifest.server_version.startswith("15.") and manifest.schema_fingerprint_version == FINGERPRINT_VERSION

    restore(settings, open_storage(settings.storage), manifest, settings.env("staging"))

    expected = zoo_checksums(prod)
    assert len(expected) > 40 and zoo_checksums(staging) == expected
    assert expected["texts.item"].startswith("20:")
    # the schema as 16 holds it: 15's schema put into a fresh 16 database by pg_dump 16, then both described
    reference = make_db("zooref")
    conninfo, secret_env = reference.libpq_args()
    psql = subprocess.run([pg.client_binary("psql", 16), "-X", "-q", "-v", "ON_ERROR_STOP=1", f"--dbname={conninfo}"],
                          input=schema_text(prod), capture_output=True, text=True, env={**os.environ, **secret_env})
    assert psql.returncode == 0, psql.stderr[-2000:]
    assert schema_text(staging) == schema_text(reference)

    # Each server's own text (version 1): only views differ, exactly those reading one relation, and
    # as test_schema.VIEW_TEXTS says (regenerate it from here if the zoo's views change).
    raw15, raw16 = snapshot(prod, 1), snapshot(staging, 1)
    differences = diff_snapshots(raw15, raw16, "15", "16")
    assert {d.kind for d in differences} == {"view"}, [str(d) for d in differences if d.kind != "view"]
    assert {d.object for d in differences} == {n for n, t in VIEW_TEXTS.items() if t["15"] != t["16"]}
    for side, raw in (("15", raw15), ("16", raw16)):
        assert {n: v["definition"] for n, v in raw["views"].items()} == {n: t[side] for n, t in VIEW_TEXTS.items()}
    # ... and the texts that print alike are there, so that "alike" says something
    assert "WHEN (((old.price IS DISTINCT FROM new.price) AND (new.qty > 0)))" in \
        raw16["triggers"]["texts.item.item_when"]["definition"]
    assert raw16["constraints"]["texts.item.item_tags_chk"]["definition"].startswith("CHECK (((array_length(tags, 1)")
    assert raw16["columns"]["texts.item.band"]["generated"] == "stored"
    assert raw16["columns"]["texts.item.updated"]["default"] == "(now() + '1 day'::interval)"
    assert "text_pattern_ops" in raw16["indexes"]["texts.item_expr"]["definition"]
    assert "SELECT v.s" in raw16["policies"]["texts.item.item_kind"]["using"]
    assert "WHERE (new.qty <> old.qty)" in raw16["rules"]["texts.item.item_log"]["definition"]
    assert "'AAA'::text" in raw16["domains"]["texts.code"]["constraints"][0]
    assert raw15["functions"]["texts.atomic_touch(i integer)"] == raw16["functions"]["texts.atomic_touch(i integer)"]
    # the fingerprint's own form: no difference at all
    assert snapshot(prod) == snapshot(staging)

    # validate --against's comparison of the two servers (the CLI's is in the next test): nothing differs
    comparison = compare_environments(prod, staging)
    assert comparison.differences == [] and comparison.fingerprint_a == comparison.fingerprint_b
    assert {t.table: t.status for t in comparison.tables if t.status != "same"} == {}


# -- 1b. validate --against between a 15 and a 16 server ----------------------------------------------

def test_validate_against_a_16_environment_reports_real_drift_only(make_db15, make_db, s3_bucket, write_config):
    """Production on 15 and staging on 16, built by the same SQL: no drift for a version
    difference; a view or a default changed on one side is reported, in the neutral form. The
    report is `dataops validate production --against staging --json`'s, made by the functions
    its flow composes (flows/validate_database.py), without the CLI's Prefect start-up."""
    from dataops.tasks.validation.validate import build_report, run_checks

    prod, staging = make_db15("drift15"), make_db("drift16")
    for dsn in (prod, staging):
        create_schema(dsn)
        seed(dsn, users=30)
        load_texts(dsn)
    cfg = write_config({"production": ("production", prod), "staging": ("staging", staging)}, bucket=s3_bucket)
    settings = load_settings(cfg)
    a, b = settings.env("production"), settings.env("staging")

    def against() -> dict:
        return json.loads(json.dumps(build_report(run_checks(a, settings.validation), compare_environments(a, b))))

    report = against()
    assert report["ok"], (report["verdict"], [t for t in report["comparison"]["tables"] if t["status"] != "same"])
    assert report["comparison"]["schema_differences"] == []

    with pg.connect(staging) as conn:
        conn.execute("CREATE OR REPLACE VIEW texts.v_check AS SELECT id, name, kind FROM texts.item WHERE kind = 'b' "
                     "WITH CHECK OPTION")
        conn.execute("ALTER TABLE texts.item ALTER COLUMN qty SET DEFAULT 1")
        conn.commit()
    report = against()
    assert not report["ok"]
    assert [d["text"] for d in report["comparison"]["schema_differences"]] == [
        "column texts.item.qty differs: default: none (production) vs 1 (staging)",
        "view texts.v_check differs: definition: SELECT id, name, kind FROM texts.item WHERE (kind = 'a'::text); "
        "(production) vs SELECT id, name, kind FROM texts.item WHERE (kind = 'b'::text); (staging)"]


# -- 1c. manifests written before fingerprint version 2 -------------------------------------------------

def rewrite_manifest(storage, manifest, **fields) -> None:
    """The manifest as an older dataops wrote it: fields replaced, and the ones set to None absent."""
    body = {**manifest.model_dump(mode="json", exclude={"verification"}), **fields}
    body = {k: v for k, v in body.items() if v is not None}
    storage.put_bytes(f"{backup_folder(manifest.environment, manifest.id)}/{MANIFEST}",
                      json.dumps(body, indent=2, sort_keys=True).encode())


def test_a_15_manifest_of_fingerprint_version_1_still_verifies(make_db15, make_db, pg16_server, s3_bucket,
                                                               write_config):
    """Written before version 2 (no version field; the views as 15 prints them): the copy is
    fingerprinted the same way, so the backup still verifies and restores, into 15 and (its views
    read as 15 prints them) into 16. A manifest of a newer version than this dataops knows is
    refused before anything is written."""
    from dataops.tasks.backup.dump import backup
    from dataops.tasks.backup.restore import restore, verify

    prod, staging, upgraded = make_db15("old15"), make_db15("oldstg15"), make_db("oldup16")
    create_schema(prod)
    seed(prod, users=50)
    load_texts(prod)
    cfg = write_config({"production": ("production", prod), "staging": ("staging", staging),
                        "upgraded": ("staging", upgraded)}, bucket=s3_bucket)
    settings = load_settings(cfg)
    storage = open_storage(settings.storage)
    manifest = backup(settings, settings.env("production"))
    with pg.connect(prod) as conn:
        old_fingerprint = schema_fingerprint(conn, 1)
    assert old_fingerprint != manifest.schema_fingerprint  # 15 qualifies the columns of its one-table views

    rewrite_manifest(storage, manifest, schema_fingerprint=old_fingerprint, schema_fingerprint_version=None)
    (old,) = list_backups(storage, "production")
    assert old.schema_fingerprint_version == 1 and old.schema_fingerprint == old_fingerprint
    verification = verify(settings, storage, old, settings.env("production"))
    assert verification.ok, verification.problems
    restore(settings, storage, old, settings.env("staging"))
    assert zoo_checksums(staging) == zoo_checksums(prod)
    restore(settings, storage, old, settings.env("upgraded"))  # before, refused: 16 prints the views otherwise
    assert zoo_checksums(upgraded) == zoo_checksums(prod)
    # like with like is what makes it pass: the copy's version-2 fingerprint is another one
    _, problems = compare_with_expected(staging, old.tables, old.schema_fingerprint, source="the manifest")
    assert problems == [f"schema fingerprint {manifest.schema_fingerprint[:12]} differs from the manifest's "
                        f"{old_fingerprint[:12]}"]

    rewrite_manifest(storage, manifest, schema_fingerprint_version=3)
    (newer,) = list_backups(storage, "production")
    before, dbs_before = zoo_checksums(staging), databases(prod)
    for attempt in (lambda: restore(settings, storage, newer, settings.env("staging")),
                    lambda: verify(settings, storage, newer, settings.env("production"))):
        with pytest.raises(BadInput, match=r"^schema fingerprint version 3 is newer than this dataops knows \(1, 2\); "
                                           r"upgrade dataops to read it$"):
            attempt()
    assert zoo_checksums(staging) == before and databases(prod) == dbs_before


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
