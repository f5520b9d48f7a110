"""safe: VALIDATE CONSTRAINT in its own revision

Lint corpus entry c062 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c062"
down_revision = 'c061'
transactional = True
EXPECT = "safe"
EXPECT_RULES = ()
SQL = """
ALTER TABLE public.orders VALIDATE CONSTRAINT orders_amount_nonneg
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
