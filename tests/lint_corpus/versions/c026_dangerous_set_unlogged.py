"""dangerous: SET UNLOGGED rewrites the table

Lint corpus entry c026 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c026"
down_revision = 'c025'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('set-logged',)
SQL = """
ALTER TABLE public.orders SET UNLOGGED
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
