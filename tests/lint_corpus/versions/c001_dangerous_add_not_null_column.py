"""dangerous: NOT NULL column without a default

Lint corpus entry c001 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c001"
down_revision = 'c000'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('add-not-null-column-without-default',)
SQL = """
ALTER TABLE public.users ADD COLUMN nick text NOT NULL
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
