"""dangerous: FOREIGN KEY without NOT VALID

Lint corpus entry c031 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c031"
down_revision = 'c030'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('constraint-not-valid',)
SQL = """
ALTER TABLE public.orders ADD CONSTRAINT orders_product_id_fkey FOREIGN KEY (product_id) REFERENCES public.products (id)
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
