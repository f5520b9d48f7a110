"""index users.email_verified_at, built concurrently

Revision ID: 0004
Revises: 0003
Create Date: 2025-07-01

A plain CREATE INDEX blocks every write to users while it builds. CONCURRENTLY does not,
but it cannot run inside a transaction, so this revision is marked `transactional = False`
and runs in an autocommit block, on the connection that holds the migration lock. A build
that is interrupted leaves an INVALID index behind, so upgrade() drops a leftover first:
the revision is safe to run again.
"""
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None
transactional = False


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS public.users_email_verified_at_idx")
        op.execute("CREATE INDEX CONCURRENTLY users_email_verified_at_idx ON public.users (email_verified_at)")


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS public.users_email_verified_at_idx")
