"""dangerous: CLUSTER

Lint corpus entry c025 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c025"
down_revision = 'c024'
transactional = False
EXPECT = "dangerous"
EXPECT_RULES = ('cluster',)
SQL = """
CLUSTER public.orders USING orders_pkey
"""


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
