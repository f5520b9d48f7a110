"""user_profiles: one profile per user, with its foreign key and index

Revision ID: 0002
Revises: 0001
Create Date: 2025-07-01

Zero-downtime example 1: a new table. Creating it, its primary key (the index on user_id)
and its foreign key in one transaction is safe because nothing reads or writes it yet; the
only lock on users is the brief SHARE ROW EXCLUSIVE the foreign key takes.
"""
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None
transactional = True


def upgrade() -> None:
    op.execute("""
CREATE TABLE public.user_profiles (
    user_id      bigint PRIMARY KEY REFERENCES public.users (id) ON DELETE CASCADE,
    bio          text,
    avatar_url   text,
    timezone     text,
    preferences  jsonb NOT NULL DEFAULT '{}'::jsonb
)
""")


def downgrade() -> None:
    op.execute("DROP TABLE public.user_profiles")
