"""safe: CREATE FUNCTION

Lint corpus entry c081 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c081"
down_revision = 'c080'
transactional = True
EXPECT = "safe"
EXPECT_RULES = ()
SQL = """
CREATE FUNCTION public.order_total(o public.orders) RETURNS numeric LANGUAGE sql STABLE AS $$ SELECT o.amount * o.quantity $$
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
