"""The schema zoo (tests/zoo) through backup, restore, verification, validation, migrations and
row-level security: every feature survives, measured with the test's own yardsticks (md5 of each
relation's sorted rows, pg_dump --schema-only), not only with dataops' checksums."""

from __future__ import annotations

import json
import shutil
import textwrap
import time

import psycopg
import pytest
from conftest import run_cli
from test_migrations_examples import REPO_MIGRATIONS
from zoo import (
    ODD_TABLE,
    RLS_ROWS,
    UNPOPULATED_MATVIEWS,
    ZOO_SQL,
    load_zoo,
    reader_dsn,
    schema_dump,
    zoo_checksums,
)

from dataops.errors import BadInput, classify
from dataops.tasks import pg

RLS_QUOTED = "zoo.secret_note"


@pytest.fixture
def zoo_db(make_db):
    dsn = make_db("zoo")
    t0 = time.monotonic()
    load_zoo(dsn)
    assert time.monotonic() - t0 < 5, "the zoo must stay quick to load"
    return dsn


def _copy_of(pg_server_dsn, make_db, source):
    """A copy by CREATE DATABASE ... TEMPLATE (the source must have no other sessions)."""
    name = make_db("zcopy").database
    pg.drop_database(pg_server_dsn, name)
    with pg.connect(pg_server_dsn, autocommit=True, dbname=pg.MAINTENANCE_DB) as conn:
        pg.terminate_connections(conn, source.database)
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{source.database}"')
    return pg_server_dsn.with_database(name)


def test_the_zoo_has_what_it_promises(zoo_db):
    with pg.connect(zoo_db) as conn:
        q = lambda s: conn.execute(s).fetchall()  # noqa: E731
        kinds = dict(q("SELECT relkind, count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                       "WHERE n.nspname IN ('zoo', 'sales', 'Odd.Schema', 'public') GROUP BY 1"))
        assert kinds["p"] >= 5 and kinds["m"] == 3 and kinds["v"] >= 4 and kinds["r"] >= 30
        # two partition levels, defaults at both, hash under list
        assert q("SELECT count(*) FROM pg_partitioned_table pt JOIN pg_class c ON c.oid = pt.partrelid "
                 "WHERE c.relispartition")[0][0] == 2
        assert {r[0] for r in q("SELECT partstrat FROM pg_partitioned_table")} == {"r", "l", "h"}
        # matviews with and without data, unique indexes on them
        assert sorted(q("SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                        "WHERE c.relkind = 'm' AND NOT c.relispopulated")) == sorted(UNPOPULATED_MATVIEWS)
        # FKs declared on partitions themselves, and one that references a partitioned table
        assert q("SELECT count(*) FROM pg_constraint co JOIN pg_class c ON c.oid = co.conrelid "
                 "WHERE co.contype = 'f' AND c.relispartition AND co.conparentid = 0")[0][0] == 3
        assert q("SELECT count(*) FROM pg_constraint co JOIN pg_class p ON p.oid = co.confrelid "
                 "WHERE co.contype = 'f' AND p.relkind = 'p' AND co.conparentid = 0")[0][0] >= 1
        # a cycle of foreign keys, deferrable
        assert q("SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND condeferrable")[0][0] == 2
        # every table has rows; long values are TOASTed out of line
        assert all(int(v.split(":")[0]) > 0 for k, v in zoo_checksums(zoo_db).items() if not k.startswith("sequence"))
        assert q("SELECT max(length(c_text)) > 8192 AND max(length(c_bytea)) > 8192 FROM zoo.all_types")[0][0]
        assert q("SELECT c.relpersistence FROM pg_class c WHERE c.relname = 'session_cache'")[0][0] == "u"
        assert q("SELECT count(*) FROM {}".format(pg.qualified(*ODD_TABLE).as_string(conn)))[0][0] == 300
        assert q("SELECT rolbypassrls, rolsuper FROM pg_roles WHERE rolname = 'zoo_reader'")[0] == (False, False)
        assert q("SELECT count(*) FROM zoo.secret_note")[0][0] == RLS_ROWS  # the superuser sees every row


def test_backup_restore_and_verify_keep_every_row_and_the_schema(prefect_api, zoo_db, make_db, pg_server_dsn,
                                                                 s3_bucket, write_config):
    from dataops.flows.backup_database import backup_database
    from dataops.flows.restore_database import restore_database
    from dataops.flows.verify_backup import verify_backup
    from dataops.tasks.validation.validate import compare_environments

    staging = make_db("zstg")
    cfg = write_config({"production": ("production", zoo_db), "staging": ("staging", staging)}, bucket=s3_bucket)
    before, schema_before = zoo_checksums(zoo_db), schema_dump(zoo_db)

    m = backup_database("production", config=str(cfg))
    assert m["tables"]["zoo.secret_note"] == RLS_ROWS and m["tables"]["zoo.vehicle"] == 200  # own rows only
    assert verify_backup("production", m["id"], config=str(cfg))["ok"] is True
    restore_database("production", m["id"], "staging", config=str(cfg))

    assert zoo_checksums(staging) == before
    assert schema_dump(staging) == schema_before
    assert zoo_checksums(zoo_db) == before  # the source is untouched
    comparison = compare_environments(zoo_db, staging)
    assert comparison.ok, comparison.summary()
    assert {t.table for t in comparison.tables} >= {"zoo.payment", "zoo.secret_note", "Odd.Schema.Mixed Case.Table"}


def test_validate_passes_on_the_zoo_skipping_unpopulated_matviews_and_agrees_with_a_copy(zoo_db, make_db,
                                                                                        pg_server_dsn, write_config,
                                                                                        prefect_api):
    copy = _copy_of(pg_server_dsn, make_db, zoo_db)
    cfg = write_config({"dev": ("development", zoo_db), "copy": ("development", copy)}, bucket="unused")
    r = run_cli("--config", str(cfg), "validate", "dev", "--against", "copy", "--json",
                env={"PREFECT_API_URL": prefect_api})
    assert r.returncode == 0, r.stderr[-2000:] + r.stdout[-2000:]
    report = json.loads(r.stdout)
    assert report["ok"] and report["comparison"]["ok"] and not report["comparison"]["schema_differences"]
    statuses = {c["status"] for c in report["checks"]}
    assert statuses <= {"pass", "skip", "warn"}, [c for c in report["checks"] if c["status"] not in ("pass", "skip")]
    skipped = [c for c in report["checks"] if c["status"] == "skip"]
    assert [c["table"] for c in skipped] == ["zoo.pending_report"]
    assert skipped[0]["detail"].startswith("skipped: not populated")
    kinds = {c["kind"] for c in report["checks"] if c["status"] == "pass"}
    assert {"foreign_key", "unique", "sequence"} <= kinds
    fks = {c["name"] for c in report["checks"] if c["kind"] == "foreign_key"}
    assert "zoo.payment_p2022_01(staff_id) -> zoo.staff(staff_id)" in fks  # a partition's own foreign key
    assert "zoo.refund(payment_date, payment_id) -> zoo.payment(payment_date, payment_id)" in fks
    assert report["summary"]["skipped"] == 1 and report["summary"]["failed"] == 0


def test_one_failing_statement_marks_only_its_own_check(zoo_db):
    """A unique index whose expression cannot be evaluated in the check's query (it calls a function
    that raises for some rows) errors alone; every other unique key and foreign key still passes."""
    from dataops.tasks.validation.validate import run_checks

    with pg.connect(zoo_db, autocommit=True) as conn:
        conn.execute("""CREATE FUNCTION zoo.picky(t text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
                        BEGIN IF current_setting('enable_indexscan') = 'off' THEN RAISE EXCEPTION 'picky'; END IF;
                        RETURN t; END $$""")
        conn.execute("CREATE UNIQUE INDEX booking_picky ON zoo.booking (zoo.picky(guest))")
    report = run_checks(zoo_db)
    errored = [r for r in report.results if r.status == "error"]
    assert [(r.kind, r.constraint) for r in errored] == [("unique", "booking_picky")]
    assert errored[0].detail.startswith("could not run: picky")
    others = [r for r in report.results if r.constraint != "booking_picky"]
    assert all(r.status in ("pass", "skip") for r in others), [r.line() for r in others if r.status != "pass"]
    assert len([r for r in others if r.kind == "unique"]) > 25 and len([r for r in others if r.kind == "foreign_key"]) >= 12
    assert any(r.constraint == "booking_pkey" for r in others)


def test_row_security_is_an_error_not_a_filter(zoo_db, write_config, prefect_api):
    reader = reader_dsn(zoo_db)
    from dataops.tasks.validation.validate import run_checks, table_checksums

    with pg.connect(zoo_db) as conn:
        assert pg.row_security_blockers(conn) == []
        assert conn.execute("SELECT count(*) FROM zoo.secret_note").fetchone()[0] == RLS_ROWS
    with pg.connect(reader) as conn:
        assert pg.row_security_blockers(conn) == [RLS_QUOTED]
        assert conn.execute("SHOW row_security").fetchone()[0] == "off"
    with pytest.raises(BadInput) as refused:
        with pg.connect(reader) as conn:  # what a refresh or a count does: read the table
            conn.execute("SELECT * FROM zoo.secret_note")
    assert refused.value.message == ("row-level security on table zoo.secret_note would hide rows from role "
                                     "zoo_reader; grant the role BYPASSRLS, or connect as the table's owner")
    # a connection of someone else's (a copy worker's): classified the same way
    with psycopg.connect(reader.conninfo()) as raw:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
            raw.execute("COPY (SELECT * FROM zoo.secret_note) TO STDOUT").fetchall()
    assert isinstance(classify(err.value), BadInput) and "BYPASSRLS" in classify(err.value).message

    for read in (lambda: run_checks(reader), lambda: table_checksums(reader)):
        with pytest.raises(BadInput, match=r"cannot read every row of .*zoo\.secret_note from role zoo_reader; "
                                           r"grant the role BYPASSRLS"):
            read()

    cfg = write_config({"reader": ("development", reader)}, bucket="unused")
    r = run_cli("--config", str(cfg), "validate", "reader", env={"PREFECT_API_URL": prefect_api})
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        "error: cannot read every row of reader: row-level security would hide rows of zoo.secret_note from role "
        "zoo_reader; grant the role BYPASSRLS, or connect as the table's owner")
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_a_backup_that_row_security_would_shorten_is_refused_before_anything_is_stored(zoo_db, write_config,
                                                                                       s3_bucket, s3_client, prefect_api):
    cfg = write_config({"reader": ("production", reader_dsn(zoo_db))}, bucket=s3_bucket)
    r = run_cli("--config", str(cfg), "backup", "reader", env={"PREFECT_API_URL": prefect_api})
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        "error: cannot back up reader: row-level security would hide rows of zoo.secret_note from role zoo_reader; "
        "grant the role BYPASSRLS, or connect as the table's owner")
    assert s3_client.list_objects_v2(Bucket=s3_bucket).get("KeyCount", 0) == 0
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_row_security_blockers_count_owners_and_forced_policies(zoo_db):
    reader = reader_dsn(zoo_db)
    with pg.connect(zoo_db, autocommit=True) as conn:
        conn.execute("""CREATE TABLE public."Own Notes" (id int PRIMARY KEY, owner name);
                        INSERT INTO public."Own Notes" VALUES (1, 'alice');
                        ALTER TABLE public."Own Notes" OWNER TO zoo_reader;
                        ALTER TABLE public."Own Notes" ENABLE ROW LEVEL SECURITY;""")
    with pg.connect(reader) as conn:
        assert pg.row_security_blockers(conn) == [RLS_QUOTED]  # the owner reads its own table whole
        assert conn.execute('SELECT count(*) FROM public."Own Notes"').fetchone()[0] == 1
    with pg.connect(zoo_db, autocommit=True) as conn:
        conn.execute('ALTER TABLE public."Own Notes" FORCE ROW LEVEL SECURITY')
    with pg.connect(reader) as conn:
        assert pg.row_security_blockers(conn) == ['public."Own Notes"', RLS_QUOTED]


# -- migrations on the zoo ----------------------------------------------------------------------

_REVISIONS = {
    "0001_zoo": f'''
        """the schema zoo (tests/zoo/zoo.sql) as a baseline, so that `migrate test` has it on a scratch database"""
        from pathlib import Path
        from alembic import op
        revision = "0001"
        down_revision = None
        transactional = True
        def upgrade():
            # psycopg itself, not SQLAlchemy's text(): the file's '+05:30' is not a bind parameter
            op.get_bind().connection.driver_connection.execute(Path({str(ZOO_SQL)!r}).read_text())
        def downgrade():
            op.execute('DROP SCHEMA zoo, sales, "Odd.Schema" CASCADE; DROP TABLE public.items')
    ''',
    "0002_payment_channel": '''
        """a column on a partitioned parent: every partition gets it"""
        from alembic import op
        revision = "0002"
        down_revision = "0001"
        transactional = True
        def upgrade():
            op.execute("ALTER TABLE zoo.payment ADD COLUMN channel text DEFAULT 'web'")
        def downgrade():
            op.execute("ALTER TABLE zoo.payment DROP COLUMN channel")  # dataops: allow=drop-column
    ''',
    "0003_vehicle_colour": '''
        """a column on an inheritance parent: its children get it"""
        from alembic import op
        revision = "0003"
        down_revision = "0002"
        transactional = True
        def upgrade():
            op.execute("ALTER TABLE zoo.vehicle ADD COLUMN colour text")
        def downgrade():
            op.execute("ALTER TABLE zoo.vehicle DROP COLUMN colour")  # dataops: allow=drop-column
    ''',
}


def _columns(dsn, table: str) -> set[str]:
    with pg.connect(dsn) as conn:
        return {r[0] for r in conn.execute("SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass "
                                           "AND attnum > 0 AND NOT attisdropped", (table,))}


def test_migrate_up_down_and_test_on_partitioned_and_inherited_tables(zoo_db, tmp_path, s3_bucket, write_config,
                                                                      prefect_api):
    from dataops.tasks.migration.migrate import MigrationTarget, stamp

    path = tmp_path / "migrations"
    path.mkdir()
    for name in ("env.py", "script.py.mako"):
        shutil.copy(REPO_MIGRATIONS / name, path / name)
    (path / "versions").mkdir()
    for name, source in _REVISIONS.items():
        (path / "versions" / f"{name}.py").write_text(textwrap.dedent(source))
    stamp(MigrationTarget(zoo_db, path), "0001")  # the zoo is already there
    cfg = write_config({"dev": ("development", zoo_db)}, bucket=s3_bucket, extra={"migrations": {"path": str(path)}})
    env = {"PREFECT_API_URL": prefect_api}
    before = zoo_checksums(zoo_db)

    r = run_cli("--config", str(cfg), "migrate", "dev", "up", env=env)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    assert "now at 0003" in r.stdout
    for part in ("zoo.payment", "zoo.payment_p2022_01", "zoo.payment_default"):
        assert "channel" in _columns(zoo_db, part)
    for child in ("zoo.vehicle", "zoo.car", "zoo.truck"):
        assert "colour" in _columns(zoo_db, child)
    after = zoo_checksums(zoo_db)
    changed = {k for k in before if before[k] != after.get(k)}
    assert changed == {"zoo.payment_p2022_01", "zoo.payment_p2022_02", "zoo.payment_p2022_03", "zoo.payment_default",
                       "zoo.vehicle", "zoo.car", "zoo.truck"}  # a new column in each row's text, nothing else
    assert all(before[k].split(":")[0] == after[k].split(":")[0] for k in changed)

    from dataops.flows.downgrade_database import downgrade_database

    down = downgrade_database("dev", to="0001", config=str(cfg))  # in this process: one CLI start less
    assert down["undone"] == ["0003", "0002"] and down["revision"] == "0001"
    assert "channel" not in _columns(zoo_db, "zoo.payment_p2022_02") and "colour" not in _columns(zoo_db, "zoo.car")
    assert zoo_checksums(zoo_db) == before

    r = run_cli("--config", str(cfg), "migrate", "dev", "test", env=env)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    assert "3 revision(s): up, check, down, same schema, up again: ok" in r.stdout


OWNERS_AND_ACLS = """
SELECT n.nspname || '.' || c.relname, pg_get_userbyid(c.relowner), coalesce(c.relacl::text, '')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname IN ('zoo', 'sales', 'Odd.Schema', 'public') AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
UNION ALL SELECT 'schema ' || nspname, pg_get_userbyid(nspowner), coalesce(nspacl::text, '')
FROM pg_namespace WHERE nspname IN ('zoo', 'sales', 'Odd.Schema')
ORDER BY 1"""


def test_a_restore_keeps_owners_and_grants_when_the_target_has_the_roles_and_says_so_when_not(
        zoo_db, make_db, s3_bucket, write_config):
    """A disaster-recovery restore gives the application its privileges back: owners and GRANTs
    come along when every role the backup names exists on the target server. When one is gone
    (dropped since the backup), the restore still loads every row, without owners and GRANTs,
    and its result names the missing role."""
    from dataops.settings import load_settings
    from dataops.tasks.backup.dump import backup
    from dataops.tasks.backup.restore import restore
    from dataops.tasks.backup.storage import open_storage

    staging = make_db("zacl")
    with pg.connect(zoo_db) as conn:
        conn.execute("CREATE ROLE zoo_auditor NOLOGIN; CREATE TABLE zoo.audited (id int PRIMARY KEY); "
                     "ALTER TABLE zoo.audited OWNER TO zoo_auditor; GRANT SELECT ON zoo.payment TO zoo_auditor")
        conn.commit()
        acls = conn.execute(OWNERS_AND_ACLS).fetchall()
    assert ("zoo.audited", "zoo_auditor", "") in acls and any("zoo_reader=r/" in a for _, _, a in acls)
    settings = load_settings(write_config({"production": ("production", zoo_db), "staging": ("staging", staging)},
                                          bucket=s3_bucket))
    storage = open_storage(settings.storage)
    try:
        m = backup(settings, settings.env("production"))
        assert {"zoo_reader", "zoo_auditor"} <= set(m.roles)
        r = restore(settings, storage, m, settings.env("staging"))
        assert r.privileges.startswith("owners and GRANTs restored"), r.privileges
        with pg.connect(staging) as conn:
            assert conn.execute(OWNERS_AND_ACLS).fetchall() == acls
    finally:
        with pg.connect(zoo_db) as conn:  # the role goes, as after a clean-up since the backup
            conn.execute("DROP TABLE IF EXISTS zoo.audited; REVOKE ALL ON zoo.payment FROM zoo_auditor")
            conn.commit()
        with pg.connect(staging) as conn:
            conn.execute("DROP TABLE IF EXISTS zoo.audited; REVOKE ALL ON zoo.payment FROM zoo_auditor")
            conn.commit()
        with pg.connect(zoo_db, autocommit=True, dbname=pg.MAINTENANCE_DB) as conn:
            conn.execute("DROP ROLE IF EXISTS zoo_auditor")

    before = zoo_checksums(zoo_db)
    r = restore(settings, storage, m, settings.env("staging"))
    assert r.privileges.startswith("restored without owners and GRANTs: role(s) zoo_auditor are missing"), r.privileges
    assert {k: v for k, v in zoo_checksums(staging).items() if "audited" not in k} == before
    with pg.connect(staging) as conn:
        assert not any(a for _, _, a in conn.execute(OWNERS_AND_ACLS).fetchall())  # no GRANT came along
