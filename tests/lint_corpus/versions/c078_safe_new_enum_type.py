"""safe: a new enum type

Lint corpus entry c078 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c078"
down_revision = 'c077'
transactional = True
EXPECT = "safe"
EXPECT_RULES = ()
SQL = """
CREATE TYPE public.mood AS ENUM ('happy', 'sad')
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
