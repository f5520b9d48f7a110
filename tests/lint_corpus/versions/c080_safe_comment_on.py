"""safe: COMMENT ON

Lint corpus entry c080 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c080"
down_revision = 'c079'
transactional = True
EXPECT = "safe"
EXPECT_RULES = ()
SQL = """
COMMENT ON TABLE public.users IS 'people who signed up'
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
