"""dangerous: CREATE INDEX without CONCURRENTLY

Lint corpus entry c007 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c007"
down_revision = 'c006'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('index-not-concurrent',)
SQL = """
CREATE INDEX users_name_idx ON public.users (name)
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
