"""The sample application's schema and seeder, against a real PostgreSQL."""

from __future__ import annotations

import pytest

from dataops.dev.sample_app import TABLES, create_schema, seed
from dataops.errors import BadInput
from dataops.tasks import pg


@pytest.fixture(scope="module")
def seeded(pg_server_dsn):
    """One seeded database shared by the read-only checks (seeding is the slow part)."""
    name = "sample_app_seeded"
    pg.drop_database(pg_server_dsn, name)
    pg.create_database(pg_server_dsn, name)
    dsn = pg_server_dsn.with_database(name)
    create_schema(dsn)
    counts = seed(dsn, users=500, seed=7)
    yield dsn, counts
    pg.drop_database(pg_server_dsn, name)


def rows_of(dsn, query):
    with pg.connect(dsn) as conn:
        return conn.execute(query).fetchall()


def scalar(dsn, query, *params):
    with pg.connect(dsn) as conn:
        return conn.execute(query, params or None).fetchone()[0]


def test_schema_has_tables_view_function_trigger_and_enum(db):
    create_schema(db)
    with pg.connect(db) as conn:
        tables = {t for _, t in pg.user_tables(conn)}
        assert tables == set(TABLES)
        assert conn.execute("SELECT to_regclass('public.user_order_totals')").fetchone()[0] is not None
        assert conn.execute("SELECT count(*) FROM pg_trigger WHERE tgname = 'users_set_updated_at'").fetchone()[0] == 1
        assert conn.execute("SELECT enum_range(NULL::flag_kind)::text").fetchone()[0] == "{release,experiment,ops,permission}"
        # no unique constraint on (user_id, email): the duplicates are data for a later migration
        uniques = conn.execute("""SELECT count(*) FROM pg_constraint
                                  WHERE conrelid = 'user_emails'::regclass AND contype = 'u'""").fetchone()[0]
        assert uniques == 0


def test_seed_counts_are_exact_and_plausible(seeded):
    dsn, counts = seeded
    assert set(counts) == set(TABLES)
    assert all(n > 0 for n in counts.values()), counts
    assert counts["users"] == 500
    assert counts["categories"] == 50
    # Per user: the primary, 0, 1 or 2 extra addresses (each number for some users), and at
    # most one repeat of one of them (equal after lower(trim())).
    per_user = rows_of(dsn, """SELECT count(DISTINCT lower(trim(email))), count(*) FROM user_emails
                                   GROUP BY user_id""")
    assert len(per_user) == 500
    assert {addresses for addresses, _ in per_user} == {1, 2, 3}
    assert all(0 <= rows - addresses <= 1 for addresses, rows in per_user)
    assert sum(rows for _, rows in per_user) == counts["user_emails"]
    assert 2.4 * 500 < counts["orders"] < 3.6 * 500
    assert 4.2 * 500 < counts["audit_logs"] < 5.8 * 500
    assert 0.7 * 500 < counts["user_profiles"] < 0.9 * 500
    with pg.connect(dsn) as conn:
        assert pg.row_counts(conn) == counts


@pytest.mark.parametrize("child, fk, parent", [
    ("products", "category_id", "categories"),
    ("categories", "parent_id", "categories"),
    ("user_emails", "user_id", "users"),
    ("user_profiles", "user_id", "users"),
    ("orders", "user_id", "users"),
    ("orders", "product_id", "products"),
    ("audit_logs", "user_id", "users"),
])
def test_no_orphans(seeded, child, fk, parent):
    dsn, _ = seeded
    orphans = scalar(dsn, f"SELECT count(*) FROM {child} c LEFT JOIN {parent} p ON p.id = c.{fk} "
                          f"WHERE c.{fk} IS NOT NULL AND p.id IS NULL")
    assert orphans == 0


def test_user_emails_unique_and_primary_matches(seeded):
    dsn, _ = seeded
    assert scalar(dsn, "SELECT count(*) - count(DISTINCT email) FROM users") == 0
    # every user has exactly one primary address, equal to users.email after normalization
    assert scalar(dsn, """SELECT count(*) FROM users u JOIN user_emails e ON e.user_id = u.id AND e.is_primary
                          WHERE lower(trim(e.email)) = u.email""") == 500


def test_quirks_for_later_features_are_present(seeded):
    dsn, _ = seeded
    messy = scalar(dsn, "SELECT count(*) FROM user_emails WHERE email <> lower(trim(email))")
    total = scalar(dsn, "SELECT count(*) FROM user_emails")
    assert 0 < messy < 0.1 * total
    assert scalar(dsn, "SELECT count(*) FROM user_emails WHERE email <> trim(email)") > 0
    dup_users = scalar(dsn, """SELECT count(DISTINCT user_id) FROM (
                                 SELECT user_id FROM user_emails GROUP BY user_id, lower(trim(email))
                                 HAVING count(*) > 1) d""")
    assert 0 < dup_users < 0.08 * 500
    no_first = scalar(dsn, "SELECT count(*) FROM users WHERE full_name !~ ' '")
    assert 0 < no_first < 0.06 * 500
    assert scalar(dsn, "SELECT count(*) FROM users WHERE first_name IS NOT NULL OR last_name IS NOT NULL") == 0


def test_sequences_are_past_the_copied_ids(seeded):
    dsn, counts = seeded
    with pg.connect(dsn) as conn:  # rolled back on close
        new_user = conn.execute("INSERT INTO users (email) VALUES ('new@example.com') RETURNING id").fetchone()[0]
        assert new_user == counts["users"] + 1
        conn.execute("INSERT INTO categories (name) VALUES ('New')")
        conn.execute("INSERT INTO products (category_id, sku, name, price) VALUES (1, 'NEW-1', 'New', 1)")
        conn.execute("INSERT INTO orders (user_id, product_id, quantity, amount, status) VALUES (%s, 1, 1, 1, 'paid')",
                     (new_user,))
        conn.execute("INSERT INTO user_emails (user_id, email) VALUES (%s, 'new@example.com')", (new_user,))
        conn.execute("INSERT INTO audit_logs (user_id, event_type) VALUES (%s, 'login')", (new_user,))
        conn.execute("INSERT INTO feature_flags (name) VALUES ('new_flag')")
        # the trigger keeps updated_at current
        assert conn.execute("UPDATE users SET phone = 'x' WHERE id = 1 RETURNING updated_at = now()").fetchone()[0]


def test_seed_is_deterministic(make_db):
    digests = []
    for _ in range(2):
        dsn = make_db("seed")
        create_schema(dsn)
        seed(dsn, users=200, seed=11)
        digests.append(tuple(
            scalar(dsn, f"SELECT md5(string_agg(t::text, ',' ORDER BY {key})) FROM {table} t")
            for table, key in (("users", "id"), ("user_emails", "id"), ("orders", "id"), ("audit_logs", "id"),
                               ("user_profiles", "user_id"), ("products", "id"))))
    assert digests[0] == digests[1]
    other = make_db("seed")
    create_schema(other)
    seed(other, users=200, seed=12)
    assert scalar(other, "SELECT md5(string_agg(t::text, ',' ORDER BY id)) FROM users t") != digests[0][0]


def test_seed_refuses_a_database_that_already_has_rows(seeded):
    dsn, _ = seeded
    with pytest.raises(BadInput, match='table "categories" .* already has rows'):
        seed(dsn, users=10)


def test_seed_needs_the_schema(db):
    with pytest.raises(BadInput, match='table "categories" does not exist.*create_schema'):
        seed(db, users=10)


def test_the_same_seed_gives_the_same_rows_and_another_seed_other_rows(db, make_db):
    """Benchmarks and the demo compare runs on seeded data: the seed must fix every row."""
    from dataops.tasks.checksums import table_checksums

    def seeded_sums(dsn, seed_value):
        create_schema(dsn)
        seed(dsn, users=200, seed=seed_value)
        with pg.connect(dsn) as conn:
            return {t: c.checksum for t, c in table_checksums(conn).items()}

    first, again, other = seeded_sums(db, 3), seeded_sums(make_db("seed_again"), 3), seeded_sums(make_db("seed_other"), 4)
    assert first == again
    assert first["users"] != other["users"] and first["user_emails"] != other["user_emails"]
