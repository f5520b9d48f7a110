"""safe: plain VACUUM outside a transaction

Lint corpus entry c086 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c086"
down_revision = 'c085'
transactional = False
EXPECT = "safe"
EXPECT_RULES = ()
SQL = """
VACUUM (ANALYZE) public.orders
"""


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
