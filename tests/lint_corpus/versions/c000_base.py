"""base: the corpus starts here (the database is stamped at c000 after loading base.sql)"""
from alembic import op

revision = "c000"
down_revision = None
transactional = True


def upgrade() -> None:
    op.execute("SELECT 1")


def downgrade() -> None:
    op.execute("SELECT 1")
