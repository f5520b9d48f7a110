"""users.email_verified and users.email_verified_at

Revision ID: 0003
Revises: 0002
Create Date: 2025-07-01

Zero-downtime example 2: new columns on a big, busy table. `NOT NULL DEFAULT false` is
safe on PostgreSQL 11+: a constant default is stored in the catalog, so there is no table
rewrite and the ACCESS EXCLUSIVE lock lasts milliseconds (lock_timeout keeps it from
queueing behind a long transaction). The timestamp is nullable: not verified yet.
"""
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None
transactional = True


def upgrade() -> None:
    op.execute("""
ALTER TABLE public.users
    ADD COLUMN email_verified boolean NOT NULL DEFAULT false,
    ADD COLUMN email_verified_at timestamptz
""")


def downgrade() -> None:
    op.execute("""
ALTER TABLE public.users
    DROP COLUMN email_verified_at,
    DROP COLUMN email_verified
""")
