"""dangerous: SET lock_timeout = 0

Lint corpus entry c051 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c051"
down_revision = 'c050'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('lock-timeout',)
SQL = """
SET lock_timeout = 0;
ALTER TABLE public.users ADD COLUMN nick4 text
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
