"""dangerous: CHECK without NOT VALID

Lint corpus entry c030 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c030"
down_revision = 'c029'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('constraint-not-valid',)
SQL = """
ALTER TABLE public.orders ADD CONSTRAINT orders_quantity_positive CHECK (quantity > 0)
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
