"""dangerous: RENAME COLUMN

Lint corpus entry c041 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c041"
down_revision = 'c040'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('rename-column',)
SQL = """
ALTER TABLE public.users RENAME COLUMN name TO full_name
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
