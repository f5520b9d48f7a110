"""dangerous: ADD COLUMN ... REFERENCES (cannot be NOT VALID)

Lint corpus entry c032 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c032"
down_revision = 'c031'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('constraint-not-valid',)
SQL = """
ALTER TABLE public.orders ADD COLUMN coupon_product_id bigint REFERENCES public.products (id)
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
