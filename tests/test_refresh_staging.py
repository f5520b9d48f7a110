"""refresh-staging and anonymize on real PostgreSQL (source and target), through the real
flow and CLI: masked, referentially intact, deterministic, guarded, switched atomically."""

from __future__ import annotations

import copy

import pytest
from conftest import run_cli

from dataops.dev.sample_app import create_schema, seed
from dataops.errors import BadInput, SafetyRefusal
from dataops.settings import load_settings
from dataops.tasks import pg
from dataops.tasks.checksums import table_checksums
from dataops.tasks.refresh.plan import resolve_environments
from dataops.tasks.refresh.steps import SCRATCH_TAG, check_refresh, refresh

SALT = "refresh-test-salt-0123456789"
ANON = {
    "salt": SALT,
    "pool_size": 500,
    "rules": {
        "users": {"email": {"faker": "email", "unique": True}, "full_name": "name", "first_name": "first_name",
                  "last_name": "last_name", "phone": {"partial": {"keep_last": 2}},
                  "date_of_birth": {"shift_days": 30}, "address": "address", "ip_address": None,
                  "password_hash": {"constant": "x"}},
        "user_emails": {"email": {"faker": "email", "unique": True}},
        "audit_logs": {"ip_address": None, "user_agent": "keep"},
    },
    "delete": {"audit_logs": "event_type IN ('login', 'password_change')"},
}
MASKED_TEXT = ("email", "full_name", "phone", "address")


def run_refresh(settings, source=None, target=None, **kwargs):
    """As the flow and the CLI do it: the names resolved (and guarded) once, then the refresh."""
    return refresh(settings, *resolve_environments(settings, source, target), **kwargs)


def rows(dsn, query, *args):
    with pg.connect(dsn) as conn:
        return conn.execute(query, args).fetchall()


def checksums(dsn):
    with pg.connect(dsn) as conn:
        return {t: c.checksum for t, c in table_checksums(conn).items()}


def scratch_databases(server):
    return [r[0] for r in rows(server.with_database("postgres"),
                               "SELECT datname FROM pg_database WHERE strpos(datname, %s) > 0", SCRATCH_TAG)]


def broken_foreign_keys(dsn, expect: int | None = None) -> list[str]:
    """Orphaned rows under every declared foreign key, counted by plain SQL (a LEFT JOIN
    anti-join per constraint; the copies PostgreSQL keeps on partitions, conparentid <> 0,
    are covered by the one on the partitioned table). `expect`: how many there must be."""
    bad = []
    with pg.connect(dsn) as conn:
        fks = conn.execute("""SELECT conrelid::regclass::text, confrelid::regclass::text, conname,
                                     (SELECT array_agg(quote_ident(attname) ORDER BY k.o)
                                      FROM unnest(conkey) WITH ORDINALITY k(n, o)
                                      JOIN pg_attribute ON attrelid = conrelid AND attnum = k.n),
                                     (SELECT array_agg(quote_ident(attname) ORDER BY k.o)
                                      FROM unnest(confkey) WITH ORDINALITY k(n, o)
                                      JOIN pg_attribute ON attrelid = confrelid AND attnum = k.n),
                                     (SELECT relkind = 'r' FROM pg_class WHERE oid = conrelid),
                                     (SELECT relkind = 'r' FROM pg_class WHERE oid = confrelid)
                              FROM pg_constraint WHERE contype = 'f' AND conparentid = 0""").fetchall()
        for child, parent, name, ccols, pcols, child_plain, parent_plain in fks:
            # a plain table's own rows (ONLY: an inheritance parent's constraint is not its children's)
            child, parent = ("ONLY " if child_plain else "") + child, ("ONLY " if parent_plain else "") + parent
            join = " AND ".join(f"p.{p} = c.{c}" for c, p in zip(ccols, pcols))
            notnull = " AND ".join(f"c.{c} IS NOT NULL" for c in ccols)
            n = conn.execute(f"SELECT count(*) FROM {child} c LEFT JOIN {parent} p ON {join} "
                             f"WHERE {notnull} AND p.{pcols[0]} IS NULL").fetchone()[0]
            if n:
                bad.append(f"{name}: {n}")
    assert fks, "the schema has foreign keys"
    assert expect is None or len(fks) == expect, f"{len(fks)} foreign keys, expected {expect}"
    return bad


def _seeded_pair(make):
    prod, stg = make("prod"), make("stg")
    create_schema(prod)
    seed(prod, users=300)
    create_schema(stg)
    seed(stg, users=40, seed=7)
    return prod, stg


@pytest.fixture(scope="module")
def unchanged_pair(pg_server_dsn):
    """For tests that must change nothing: seeded once for the module."""
    import uuid

    names = []

    def make(prefix):
        names.append(f"{prefix}_{uuid.uuid4().hex[:10]}")
        pg.create_database(pg_server_dsn, names[-1])
        return pg_server_dsn.with_database(names[-1])

    yield _seeded_pair(make)
    for name in names:
        pg.drop_database(pg_server_dsn, name)


@pytest.fixture
def stack(make_db, write_config):
    """production seeded with 300 users; staging holding other (older) data."""
    return _with_config(*_seeded_pair(make_db), write_config)


@pytest.fixture
def read_only_stack(unchanged_pair, write_config):
    return _with_config(*unchanged_pair, write_config)


def _with_config(prod, stg, write_config):
    def config(anonymize=None, refresh_cfg=None, environments=None, bucket=None):
        extra = {"anonymize": anonymize if anonymize is not None else ANON}
        if refresh_cfg:
            extra["refresh"] = refresh_cfg
        envs = environments or {"production": ("production", prod), "staging": ("staging", stg)}
        return write_config(envs, extra=extra, bucket=bucket)

    return prod, stg, config


def test_refresh_flow_masks_validates_and_switches(prefect_api, stack, pg_server_dsn, s3_bucket):
    from prefect.client.orchestration import get_client

    from dataops.flows.refresh_staging import refresh_staging
    from dataops.tasks.backup.catalog import list_backups
    from dataops.tasks.backup.storage import open_storage

    prod, stg, config = stack
    cfg = config(refresh_cfg={"backup_target_first": True}, bucket=s3_bucket)
    r = refresh_staging(config=str(cfg))

    # the old staging was backed up first, by the foundation's backup flow
    backups = list_backups(open_storage(load_settings(cfg).storage), "staging")
    assert [b.id for b in backups] == [r["backup_id"]] and backups[0].tables["users"] == 40

    assert r["leak_scan"]["leaked"] == 0 and "0 leaked values" in r["leak_scan"]["summary"]
    prod_users = {row[0]: row for row in rows(prod, "SELECT id, email, full_name, phone, address, date_of_birth, "
                                                    "ip_address, password_hash, created_at FROM users")}
    stg_users = {row[0]: row for row in rows(stg, "SELECT id, email, full_name, phone, address, date_of_birth, "
                                                  "ip_address, password_hash, created_at FROM users")}
    assert stg_users.keys() == prod_users.keys() and len(stg_users) == 300  # the old staging rows are gone
    # every personal value replaced; unmasked columns kept
    for uid, p in prod_users.items():
        s = stg_users[uid]
        assert s[1] != p[1] and s[6] is None and s[7] == ("x" if p[7] else None) and s[8] == p[8]
        assert all(p[i] is None and s[i] is None or s[i] != p[i] for i in (3, 5))  # NULL stays NULL
    # no production email or phone anywhere in staging (the leak scan's claim, checked independently)
    prod_values = {v for p in prod_users.values() for v in (p[1], p[3]) if v}
    prod_values |= {e for (e,) in rows(prod, "SELECT email FROM user_emails")}
    stg_values = {v for s in stg_users.values() for v in (s[1], s[3]) if v}
    stg_values |= {e for (e,) in rows(stg, "SELECT email FROM user_emails")}
    assert not prod_values & stg_values
    # unique email stays unique, and its unique index was rebuilt and is valid
    assert rows(stg, "SELECT count(*) = count(DISTINCT email) FROM users")[0][0]
    assert rows(stg, "SELECT indisvalid FROM pg_index WHERE indexrelid = 'users_email_key'::regclass")[0][0]
    # the same source email masks to the same value in another table: joins on it still match
    same_in_prod = rows(prod, "SELECT e.id FROM user_emails e JOIN users u ON u.id = e.user_id AND u.email = e.email")
    same_in_stg = rows(stg, "SELECT e.id FROM user_emails e JOIN users u ON u.id = e.user_id AND u.email = e.email")
    assert sorted(same_in_stg) == sorted(same_in_prod) and len(same_in_prod) > 250
    # every foreign key holds; unmasked tables are identical; sensitive rows deleted
    assert broken_foreign_keys(stg) == []
    prod_sums, stg_sums = checksums(prod), checksums(stg)
    for t in ("orders", "products", "categories", "user_profiles", "settings", "feature_flags"):
        assert stg_sums[t] == prod_sums[t], t
    assert rows(stg, "SELECT count(*) FROM audit_logs WHERE event_type IN ('login', 'password_change')")[0][0] == 0
    assert r["tables"]["audit_logs"] == rows(prod, "SELECT count(*) FROM audit_logs WHERE event_type NOT IN "
                                                   "('login', 'password_change')")[0][0]
    # sequences past the copied data: an insert with the default id works
    with pg.connect(stg) as conn:
        conn.execute("INSERT INTO orders (user_id, product_id, quantity, amount, status) VALUES (1, 1, 1, 1, 'paid')")
        conn.commit()
    assert scratch_databases(pg_server_dsn) == []
    with get_client(sync_client=True) as client:
        art = {a.key: a for a in client.read_latest_artifacts()}["refresh-staging"]
    assert "0 leaked values" in art.data and "| users |" in art.data


def test_two_runs_give_identical_values_and_in_place_matches(stack, make_db, write_config):
    prod, stg, config = stack
    with pg.connect(prod) as conn:
        conn.execute("CREATE MATERIALIZED VIEW user_count AS SELECT count(*) AS n FROM users")
        conn.execute("CREATE TABLE contacts (id int, at date, email text) PARTITION BY RANGE (at)")
        conn.execute("CREATE TABLE contacts_old PARTITION OF contacts FOR VALUES FROM ('2000-01-01') TO ('2025-01-01')")
        conn.execute("CREATE TABLE contacts_new PARTITION OF contacts FOR VALUES FROM ('2025-01-01') TO ('2030-01-01')")
        conn.execute("INSERT INTO contacts SELECT id, created_at::date, email FROM users")
        conn.commit()
    anon = copy.deepcopy(ANON)
    anon["rules"]["contacts"] = {"email": {"faker": "email", "unique": True}}
    settings = load_settings(config(anonymize=anon))
    first = run_refresh(settings)
    assert rows(stg, "SELECT n FROM user_count") == [(300,)]  # refreshed after the load
    contacts = rows(stg, "SELECT c.email = u.email FROM contacts c JOIN users u USING (id)")
    assert len(contacts) == 300 and all(same for (same,) in contacts)  # partitioned, masked alike
    query = "SELECT id, email, full_name, first_name, last_name, phone, date_of_birth, address FROM users ORDER BY id"
    masked_once = rows(stg, query)
    emails_once = rows(stg, "SELECT id, email FROM user_emails ORDER BY id")
    second = run_refresh(settings)
    assert rows(stg, query) == masked_once and rows(stg, "SELECT id, email FROM user_emails ORDER BY id") == emails_once
    assert first.leaks.ok and second.leaks.ok and second.checks == first.checks

    # `anonymize dev` on a plain copy of production gives the very same values, by SQL
    from dataops.tasks.anonymize.in_place import anonymize

    dev = make_db("dev")
    with pg.connect(pg.Dsn(prod.secret()).with_database("postgres"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{dev.database}"')
        conn.execute(f'CREATE DATABASE "{dev.database}" TEMPLATE "{prod.database}"')
    cfg = config(anonymize=anon, environments={"production": ("production", prod), "staging": ("staging", stg),
                                               "dev": ("development", dev)})
    settings = load_settings(cfg)
    report = anonymize(settings, settings.env("dev"))
    assert report.leaks.ok and report.deleted["audit_logs"] > 0
    assert rows(dev, query) == masked_once and rows(dev, "SELECT id, email FROM user_emails ORDER BY id") == emails_once
    assert rows(dev, "SELECT id, email FROM contacts ORDER BY id") == rows(stg, "SELECT id, email FROM contacts ORDER BY id")
    assert rows(dev, "SELECT count(*) FROM users WHERE updated_at IS NOT NULL")[0][0] == \
        rows(prod, "SELECT count(*) FROM users WHERE updated_at IS NOT NULL")[0][0]  # user triggers were off
    with pytest.raises(SafetyRefusal, match=r"environments.production.role"):
        anonymize(settings, settings.env("production"))


def test_subset_keeps_every_referenced_row(stack):
    prod, stg, config = stack
    cutoff = "2025-06-01"
    subset = {"orders": f"created_at > '{cutoff}'", "users": "id <= 20", "user_emails": "user_id <= 20",
              "user_profiles": "user_id <= 20", "audit_logs": "user_id <= 20", "products": "false",
              "categories": "false"}
    report = run_refresh(load_settings(config(refresh_cfg={"subset": subset})))

    kept_orders = {r[0] for r in rows(prod, "SELECT id FROM orders WHERE created_at > %s", cutoff)}
    assert {r[0] for r in rows(stg, "SELECT id FROM orders")} == kept_orders and kept_orders
    want_users = {r[0] for r in rows(prod, "SELECT id FROM users WHERE id <= 20 UNION "
                                           "SELECT user_id FROM orders WHERE created_at > %s", cutoff)}
    assert {r[0] for r in rows(stg, "SELECT id FROM users")} == want_users and max(want_users) > 20
    want_products = {r[0] for r in rows(prod, "SELECT DISTINCT product_id FROM orders WHERE created_at > %s", cutoff)}
    assert {r[0] for r in rows(stg, "SELECT id FROM products")} == want_products
    want_categories = {r[0] for r in rows(prod, """
        WITH RECURSIVE k AS (SELECT c.id, c.parent_id FROM categories c WHERE c.id IN
                               (SELECT category_id FROM products p JOIN orders o ON o.product_id = p.id
                                WHERE o.created_at > %s)
                             UNION SELECT c.id, c.parent_id FROM categories c JOIN k ON c.id = k.parent_id)
        SELECT id FROM k""", cutoff)}
    got_categories = {r[0] for r in rows(stg, "SELECT id FROM categories")}
    assert got_categories == want_categories
    assert rows(stg, "SELECT count(*) FROM categories WHERE parent_id IS NOT NULL")[0][0] > 0  # parents came along
    assert broken_foreign_keys(stg) == []
    assert "with the subset" in report.checks[0] and report.leaks.ok


def test_excluded_and_truncated_tables(stack):
    prod, stg, config = stack
    report = run_refresh(load_settings(config(refresh_cfg={"exclude": ["feature_flags"], "truncate": ["audit_logs"]})))
    assert rows(stg, "SELECT to_regclass('public.feature_flags')") == [(None,)]  # not even created
    assert rows(stg, "SELECT count(*) FROM audit_logs") == [(0,)]
    assert rows(stg, "SELECT count(*) FROM users") == [(300,)] and report.leaks.ok
    assert {t.table: t.mode for t in report.tables}["audit_logs"] == "truncate"


@pytest.mark.parametrize("damage,problem", [
    ("UPDATE orders SET amount = amount + 0.01 WHERE id = (SELECT min(id) FROM orders)",
     "table orders: checksum of the unmasked columns differs from the source"),
    ("DELETE FROM user_profiles WHERE user_id = (SELECT min(user_id) FROM user_profiles)",
     "table user_profiles: 2"),
    # tables masked in Python: their unmasked columns are proved by the same second scan
    ("UPDATE users SET created_at = created_at - interval '1 microsecond' WHERE id = (SELECT max(id) FROM users)",
     "table users: checksum of the unmasked columns differs from the source"),
    ("UPDATE user_emails SET user_id = (SELECT min(id) FROM users) WHERE id = (SELECT max(id) FROM user_emails) "
     "AND user_id <> (SELECT min(id) FROM users)",
     "table user_emails: checksum of the unmasked columns differs from the source"),
])
def test_a_copy_that_differs_from_the_source_is_never_switched_in(stack, pg_server_dsn, damage, problem):
    """The checks compare the copy with the source snapshot: damage done to the copy after
    the load (a changed unmasked value, a lost row) fails the run, and staging stays."""
    from dataops.errors import OperationFailed
    from dataops.tasks.refresh.steps import PlainSteps, copy_data

    prod, stg, config = stack
    before = checksums(stg)

    class Damaging(PlainSteps):
        @staticmethod
        def copy_data(plan, snap, new, *args):
            results = copy_data(plan, snap, new, *args)
            with pg.connect(new.dsn) as conn:
                assert conn.execute(damage).rowcount == 1
                conn.commit()
            return results

    with pytest.raises(OperationFailed) as err:
        run_refresh(load_settings(config()), steps=Damaging)
    assert problem in err.value.message and "'staging' was left unchanged" in err.value.message
    assert checksums(stg) == before and scratch_databases(pg_server_dsn) == []


def test_guards_refuse_before_anything_is_written(stack, make_db, pg_server_dsn):
    prod, stg, config = stack
    before = checksums(stg)
    dev = make_db("dev")
    envs = {"production": ("production", prod), "staging": ("staging", stg), "dev": ("development", dev)}
    settings = load_settings(config(environments=envs))

    with pytest.raises(SafetyRefusal, match=r"refresh target 'production' has role production "
                                            r"\(environments.production.role\)"):
        run_refresh(settings, "staging", "production")
    with pytest.raises(SafetyRefusal, match=r"set refresh.allow_production_to_development: true"):
        run_refresh(settings, "production", "dev")

    # a personal column without a rule: refused with the list of columns, nothing copied
    anon = copy.deepcopy(ANON)
    del anon["rules"]["users"]["phone"], anon["rules"]["audit_logs"]["user_agent"]
    with pg.connect(prod) as conn:  # a harmless name, but full of emails
        conn.execute("ALTER TABLE user_profiles ADD COLUMN contact text")
        conn.execute("UPDATE user_profiles SET contact = 'u' || user_id || '@mail.example.com'")
        conn.commit()
    settings = load_settings(config(anonymize=anon))
    report = check_refresh(settings, *resolve_environments(settings, None, None))
    assert sorted(report.unmasked_personal) == [
        "audit_logs.user_agent (name suggests user agent)", "user_profiles.contact (values look like emails)",
        "users.phone (name suggests phone)"]
    with pytest.raises(SafetyRefusal) as err:
        run_refresh(settings)
    assert "3 personal-looking column(s) have no masking rule" in err.value.message
    assert "users.phone" in err.value.message and "anonymize.rules" in err.value.message
    assert checksums(stg) == before and scratch_databases(pg_server_dsn) == []

    # anonymize.default: hash masks them instead (and says so)
    anon["default"] = "hash"
    report = run_refresh(load_settings(config(anonymize=anon)))
    assert len(report.defaulted) == 3 and report.leaks.ok
    assert rows(stg, "SELECT count(*) FROM user_profiles WHERE strpos(contact, '@') > 0")[0][0] == 0


@pytest.mark.parametrize("change,message", [
    (lambda a, r: a["rules"]["users"].update(email={"faker": "emial", "unique": True}),
     'anonymize.rules.users.email: unknown Faker provider "emial" for locale en_US; did you mean "email"?'),
    (lambda a, r: a["rules"]["users"].update(emial="email"),
     'anonymize.rules.users.emial: column "emial" does not exist in table "public.users"; did you mean email?'),
    (lambda a, r: a["rules"].update(nope={"x": "keep"}), 'anonymize.rules.nope: table "public.nope" does not exist'),
    (lambda a, r: a["rules"]["users"].update(email=None), "anonymize.rules.users.email: column is NOT NULL"),
    (lambda a, r: r.update(subset={"orders": "created_on > now()"}),
     'refresh.subset.orders: the condition does not work on public.orders: column "created_on" does not exist'),
    (lambda a, r: r.update(exclude=["users"]),
     "refresh.exclude: table users is referenced by audit_logs (audit_logs_user_id_fkey), which is copied"),
    (lambda a, r: a.pop("salt"), "anonymize.salt is not set"),
])
def test_bad_rules_fail_before_any_copy(read_only_stack, pg_server_dsn, change, message):
    prod, stg, config = read_only_stack
    anon, refresh_cfg = copy.deepcopy(ANON), {}
    change(anon, refresh_cfg)
    before = checksums(stg)
    with pytest.raises(BadInput) as err:
        run_refresh(load_settings(config(anonymize=anon, refresh_cfg=refresh_cfg)))
    assert err.value.message.startswith(message)
    assert checksums(stg) == before and scratch_databases(pg_server_dsn) == []


def test_cli_check_refresh_and_anonymize_guard(prefect_api, stack):
    prod, stg, config = stack
    cfg = str(config())
    env = {"PREFECT_API_URL": prefect_api}

    r = run_cli("--config", cfg, "refresh-staging", "--check", env=env)
    assert r.returncode == 0, r.stderr
    assert "masked  users.email: faker email unique" in r.stdout and "ready" in r.stdout.splitlines()[-1]

    r = run_cli("--config", cfg, "refresh-staging", env=env)
    assert r.returncode == 0, r.stderr
    assert "leak scan: 0 leaked values" in r.stdout and "refreshed staging from production" in r.stdout.splitlines()[-1]

    r = run_cli("--config", cfg, "refresh-staging", "--target", "production", env=env)
    assert r.returncode == 2 and r.stderr.startswith("error: refresh target 'production' has role production")
    r = run_cli("--config", cfg, "anonymize", "production", env=env)
    assert r.returncode == 2 and "never runs on production" in r.stderr and len(r.stderr.strip().splitlines()) == 1
