"""safe: one batch of a backfill

Lint corpus entry c082 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c082"
down_revision = 'c081'
transactional = True
EXPECT = "safe"
EXPECT_RULES = ()
SQL = """
UPDATE public.users SET status = 'active' WHERE status IS NULL AND id BETWEEN 1 AND 1000
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
