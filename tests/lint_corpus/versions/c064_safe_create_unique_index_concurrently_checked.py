"""safe: unique index CONCURRENTLY after the duplicates query came back empty

Lint corpus entry c064 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

# dataops: allow=unique-index-existing-data

revision = "c064"
down_revision = 'c063'
transactional = False
EXPECT = "safe"
EXPECT_RULES = ()
SQL = """
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS users_phone_uidx ON public.users (phone)
"""


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
