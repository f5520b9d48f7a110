"""dangerous: RENAME TABLE

Lint corpus entry c042 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c042"
down_revision = 'c041'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('rename-table',)
SQL = """
ALTER TABLE public.orders RENAME TO purchases
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
