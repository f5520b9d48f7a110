"""safe: CHECK ... NOT VALID

Lint corpus entry c060 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c060"
down_revision = 'c059'
transactional = True
EXPECT = "safe"
EXPECT_RULES = ()
SQL = """
ALTER TABLE public.orders ADD CONSTRAINT orders_quantity_positive CHECK (quantity > 0) NOT VALID
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
