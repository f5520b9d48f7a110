"""dangerous: DROP TABLE

Lint corpus entry c037 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c037"
down_revision = 'c036'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('drop-table',)
SQL = """
DROP TABLE public.audit
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
