"""safe: CREATE INDEX CONCURRENTLY outside a transaction

Lint corpus entry c063 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c063"
down_revision = 'c062'
transactional = False
EXPECT = "safe"
EXPECT_RULES = ()
SQL = """
CREATE INDEX CONCURRENTLY IF NOT EXISTS users_status_idx ON public.users (status)
"""


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
