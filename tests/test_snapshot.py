"""Table snapshots before a destructive step, and the way back."""

from __future__ import annotations

import pytest

from dataops.dev.sample_app import create_schema, seed
from dataops.errors import BadInput
from dataops.tasks import pg
from dataops.tasks.checksums import table_checksum
from dataops.tasks.transform.snapshot import drop_snapshot, restore_snapshot, take_snapshot


@pytest.fixture
def app_db(db):
    create_schema(db)
    seed(db, users=200)
    return db


def test_snapshot_restores_updated_and_deleted_rows(app_db):
    with pg.connect(app_db) as conn:
        before = table_checksum(conn, "public", "user_emails")
        snap = take_snapshot(conn, "user_emails")
        assert snap.rows == before.rows
        conn.execute("UPDATE user_emails SET email = lower(trim(email))")
        conn.execute("DELETE FROM user_emails WHERE id % 3 = 0")
        assert table_checksum(conn, "public", "user_emails") != before
        restore_snapshot(conn, snap)
        assert table_checksum(conn, "public", "user_emails") == before
        exists = "SELECT to_regclass(format('dataops_snapshots.%%I', %s::text)) IS NOT NULL"
        assert conn.execute(exists, (snap.name,)).fetchone()[0]
        drop_snapshot(conn, snap)
        conn.commit()
        assert not conn.execute(exists, (snap.name,)).fetchone()[0]


def test_partial_snapshot_of_columns_and_rows(app_db):
    with pg.connect(app_db) as conn:
        before = table_checksum(conn, "public", "users")
        snap = take_snapshot(conn, "users", columns=["full_name", "updated_at"], where="id <= 50")
        assert snap.columns == ("id", "full_name", "updated_at") and snap.rows == 50
        conn.execute("UPDATE users SET full_name = 'X' WHERE id <= 50")
        assert restore_snapshot(conn, snap) == 50
        assert table_checksum(conn, "public", "users") == before


def test_snapshot_of_unknown_table_or_column(app_db):
    with pg.connect(app_db) as conn:
        with pytest.raises(BadInput, match='table "public.nope" does not exist'):
            take_snapshot(conn, "nope")
        with pytest.raises(BadInput, match='column "nope" does not exist in table "public.users"'):
            take_snapshot(conn, "users", columns=["nope"])
