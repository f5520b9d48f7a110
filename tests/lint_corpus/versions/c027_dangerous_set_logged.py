"""dangerous: SET LOGGED rewrites the table

Lint corpus entry c027 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c027"
down_revision = 'c026'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('set-logged',)
SQL = """
ALTER TABLE public.scratch_log SET LOGGED
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
