"""safe: ANALYZE

Lint corpus entry c085 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c085"
down_revision = 'c084'
transactional = True
EXPECT = "safe"
EXPECT_RULES = ()
SQL = """
ANALYZE public.users
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
