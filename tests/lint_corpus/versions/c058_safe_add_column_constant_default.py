"""safe: NOT NULL column with a constant default (no rewrite since PostgreSQL 11)

Lint corpus entry c058 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c058"
down_revision = 'c057'
transactional = True
EXPECT = "safe"
EXPECT_RULES = ()
SQL = """
ALTER TABLE public.users ADD COLUMN active boolean NOT NULL DEFAULT true
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
