"""dangerous: CREATE INDEX CONCURRENTLY in a transaction

Lint corpus entry c014 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c014"
down_revision = 'c013'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('concurrently-in-transaction',)
SQL = """
CREATE INDEX CONCURRENTLY users_status_idx ON public.users (status)
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
