"""dangerous: BEGIN inside the revision's transaction

Lint corpus entry c049 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c049"
down_revision = 'c048'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('transaction-control',)
SQL = """
BEGIN;
ALTER TABLE public.users ADD COLUMN nick2 text;
COMMIT
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
