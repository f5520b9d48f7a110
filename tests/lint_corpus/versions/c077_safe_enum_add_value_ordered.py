"""safe: ADD VALUE with AFTER, not used in the same transaction

Lint corpus entry c077 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c077"
down_revision = 'c076'
transactional = True
EXPECT = "safe"
EXPECT_RULES = ()
SQL = """
ALTER TYPE public.order_status ADD VALUE IF NOT EXISTS 'archived' AFTER 'shipped'
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
