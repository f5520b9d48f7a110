"""dangerous: DROP INDEX CONCURRENTLY in a transaction

Lint corpus entry c017 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c017"
down_revision = 'c016'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('concurrently-in-transaction',)
SQL = """
DROP INDEX CONCURRENTLY public.users_phone_idx
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
