"""dangerous: VACUUM FULL

Lint corpus entry c023 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c023"
down_revision = 'c022'
transactional = False
EXPECT = "dangerous"
EXPECT_RULES = ('vacuum-full',)
SQL = """
VACUUM FULL public.orders
"""


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
