"""dangerous: ADD VALUE used in the same transaction

Lint corpus entry c044 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c044"
down_revision = 'c043'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('enum-value-used-in-transaction',)
SQL = """
ALTER TYPE public.order_status ADD VALUE 'returned' AFTER 'shipped';
UPDATE public.orders SET status = 'returned' WHERE id < 0
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
