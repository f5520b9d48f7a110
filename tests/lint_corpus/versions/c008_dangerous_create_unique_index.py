"""dangerous: CREATE UNIQUE INDEX without CONCURRENTLY

Lint corpus entry c008 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c008"
down_revision = 'c007'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('index-not-concurrent', 'unique-index-existing-data')
SQL = """
CREATE UNIQUE INDEX users_lower_email_key ON public.users (lower(email))
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
